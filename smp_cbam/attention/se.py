"""Squeeze-and-excitation (Hu et al., CVPR 2018, arXiv:1709.01507)."""

import torch
from torch import nn

from .cbam import hidden_channels
from .checks import check_channels, check_positive


class SqueezeExcite(nn.Module):
    """``x * sigmoid(W2 relu(W1 avgpool(x)))`` with a ``C -> max(C/r, 1) -> C`` bottleneck."""

    def __init__(
        self,
        in_channels: int,
        reduction: int = 16,
        *,
        rd_ratio: float | None = None,
        rd_channels: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        """``rd_ratio``/``rd_channels`` (timm's names) replace ``reduction``; ``device``/``dtype``
        as for torch's layers, so timm can build it as ``attn_layer``."""
        super().__init__()
        in_channels = check_positive("in_channels", in_channels)
        self.in_channels = in_channels
        hidden = hidden_channels(in_channels, reduction, rd_ratio, rd_channels)
        factory = {"device": device, "dtype": dtype}
        self.fc = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, **factory),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, in_channels, 1, **factory),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_channels(x, self.in_channels)
        return x * torch.sigmoid(self.fc(x.mean(dim=(2, 3), keepdim=True)))
