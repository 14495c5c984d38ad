"""Squeeze-and-excitation (Hu et al., CVPR 2018, arXiv:1709.01507)."""

import torch
from torch import nn

from .checks import check_channels, check_positive


class SqueezeExcite(nn.Module):
    """``x * sigmoid(W2 relu(W1 avgpool(x)))`` with a ``C -> max(C/r, 1) -> C`` bottleneck."""

    def __init__(self, in_channels: int, reduction: int = 16):
        super().__init__()
        check_positive("in_channels", in_channels)
        check_positive("reduction", reduction)
        self.in_channels = in_channels
        hidden = max(in_channels // reduction, 1)
        self.fc = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, in_channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_channels(x, self.in_channels)
        return x * torch.sigmoid(self.fc(x.mean(dim=(2, 3), keepdim=True)))
