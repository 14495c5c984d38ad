"""Attention modules and their implementations.

``cbam`` holds CBAM and its two halves, ``cbam_fused`` CBAM's fused implementations, ``se`` and
``eca`` the other channel attentions, ``kernels`` the compiled CPU kernels (``csrc/``) that CBAM
uses.
"""

from .cbam import CBAM, ChannelAttention, SpatialAttention, reset_gates
from .eca import ECA
from .se import SqueezeExcite

__all__ = ["CBAM", "ECA", "ChannelAttention", "SpatialAttention", "SqueezeExcite", "reset_gates"]
