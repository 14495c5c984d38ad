"""CBAM and other attention types for the decoders of segmentation_models.pytorch.

``import smp_cbam`` registers ``"cbam"``, ``"cbam_channel"``, ``"cbam_spatial"``, ``"se"`` and
``"eca"`` as ``decoder_attention_type`` of smp's Unet and Unet++.
"""

from .cbam import CBAM, ChannelAttention, SpatialAttention
from .eca import ECA
from .maps import AttentionMaps, capture_attention
from .registry import available_attentions, build_attention, install, register_attention
from .se import SqueezeExcite

install()

__version__ = "0.1.0"
__all__ = [
    "CBAM",
    "ECA",
    "AttentionMaps",
    "ChannelAttention",
    "SpatialAttention",
    "SqueezeExcite",
    "available_attentions",
    "build_attention",
    "capture_attention",
    "register_attention",
]
