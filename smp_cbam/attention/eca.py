"""Efficient channel attention (Wang et al., CVPR 2020, arXiv:1910.03151)."""

import math

import torch
from torch import nn

from .checks import check_channels, check_positive


def eca_kernel_size(channels: int, gamma: int = 2, b: int = 1) -> int:
    """The paper's adaptive kernel size: the odd number nearest to ``(log2(C) + b) / gamma``."""
    k = int(abs((math.log2(channels) + b) / gamma))
    return k if k % 2 else k + 1


class ECA(nn.Module):
    """``x * sigmoid(conv1d_k(avgpool(x)))``: a 1-D convolution across the pooled channels."""

    def __init__(
        self,
        in_channels: int,
        kernel_size: int | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        """``device``/``dtype`` as for torch's layers, so timm can build it as ``attn_layer``."""
        super().__init__()
        in_channels = check_positive("in_channels", in_channels)
        if kernel_size is None:
            kernel_size = eca_kernel_size(in_channels)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 1, got {kernel_size}")
        self.in_channels = in_channels
        self.conv = nn.Conv1d(1, 1, kernel_size, padding=kernel_size // 2, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_channels(x, self.in_channels)
        y = self.conv(x.mean(dim=(2, 3)).unsqueeze(1))  # (N, 1, C)
        return x * torch.sigmoid(y).transpose(1, 2).unsqueeze(-1)
