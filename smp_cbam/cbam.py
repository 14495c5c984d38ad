"""CBAM: Convolutional Block Attention Module (Woo et al., ECCV 2018, arXiv:1807.06521).

``CBAM(x) = S(C(x))`` where

* channel attention ``C(x) = x * sigmoid(MLP(avgpool(x)) + MLP(maxpool(x)))`` with one MLP
  ``C -> C/r -> C`` (ReLU) shared by both pooled descriptors, and
* spatial attention ``S(y) = y * sigmoid(conv_kxk([mean_c(y); max_c(y)]))`` with a
  ``2 -> 1`` convolution padded to keep the size.

The defaults follow the paper's formula; ``mlp_bias``, ``spatial_bn`` (the authors' code puts a
BatchNorm after the spatial convolution) and ``residual`` (``output + input``) select the variants
found in published implementations.
"""

import torch
from torch import nn


def _check_positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def _check_channels(x: torch.Tensor, in_channels: int) -> None:
    if x.shape[1] != in_channels:
        raise ValueError(
            f"expected an input with {in_channels} channels, got {x.shape[1]} "
            f"(input shape {list(x.shape)})"
        )


class ChannelAttention(nn.Module):
    """Channel half of CBAM: one shared MLP over the average- and max-pooled descriptors."""

    def __init__(self, in_channels: int, reduction: int = 16, mlp_bias: bool = False):
        super().__init__()
        _check_positive("in_channels", in_channels)
        _check_positive("reduction", reduction)
        self.in_channels = in_channels
        hidden = max(in_channels // reduction, 1)
        self.mlp = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, bias=mlp_bias),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, in_channels, 1, bias=mlp_bias),
        )

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """The channel weights, shape ``(N, C, 1, 1)``."""
        _check_channels(x, self.in_channels)
        avg = x.mean(dim=(2, 3), keepdim=True)
        mx = x.amax(dim=(2, 3), keepdim=True)
        return torch.sigmoid(self.mlp(avg) + self.mlp(mx))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


class SpatialAttention(nn.Module):
    """Spatial half of CBAM: a k x k convolution over the channel-wise mean and max maps."""

    def __init__(self, kernel_size: int = 7, spatial_bn: bool = False):
        super().__init__()
        _check_positive("kernel_size", kernel_size)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=not spatial_bn)
        self.bn = nn.BatchNorm2d(1) if spatial_bn else nn.Identity()

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """The spatial map, shape ``(N, 1, H, W)``."""
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.bn(self.conv(pooled)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


class CBAM(nn.Module):
    """Channel attention followed by spatial attention, called like smp's ``SCSEModule``.

    Args:
        in_channels: channels of the input.
        reduction: MLP reduction ratio ``r``; the hidden width is ``max(in_channels // r, 1)``.
        kernel_size: odd size of the spatial convolution (7 in the paper).
        mlp_bias: biases in the shared MLP (the authors' code has them, the formula does not).
        spatial_bn: BatchNorm after the spatial convolution, as in the authors' code.
        residual: return ``CBAM(x) + x`` instead of ``CBAM(x)``.
    """

    def __init__(
        self,
        in_channels: int,
        reduction: int = 16,
        kernel_size: int = 7,
        mlp_bias: bool = False,
        spatial_bn: bool = False,
        residual: bool = False,
    ):
        super().__init__()
        self.channel = ChannelAttention(in_channels, reduction, mlp_bias)
        self.spatial = SpatialAttention(kernel_size, spatial_bn)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.spatial(self.channel(x))
        return out + x if self.residual else out
