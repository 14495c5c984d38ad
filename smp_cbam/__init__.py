"""CBAM and other attention types for segmentation_models.pytorch.

``import smp_cbam`` registers ``"cbam"``, ``"cbam_channel"``, ``"cbam_spatial"``, ``"se"`` and
``"eca"`` as ``decoder_attention_type`` of smp's Unet and Unet++, makes ``decoder_attention_type``
build decoder attention in every other smp architecture, and lets ``from_pretrained`` restore
attention added by :func:`add_attention` (decoder, encoder or both; see :mod:`smp_cbam.placement`).

Where things live:

* :mod:`smp_cbam.attention`: the attention modules and their implementations (CBAM's fused
  paths and compiled CPU kernels);
* :mod:`smp_cbam.registry`, :mod:`smp_cbam.placement`, :mod:`smp_cbam.maps`: the smp glue
  (attention names, attention in every architecture, captured maps);
* :mod:`smp_cbam.training`: the Lightning module, data module and comparison runner
  (``pip install smp-cbam[train]``);
* :mod:`smp_cbam.report`: results files, statistics, tables and plots;
* :mod:`smp_cbam.benchmarks`: developer benchmarks, imported only by ``smp-cbam bench``.
"""

from . import placement
from .attention import CBAM, ECA, ChannelAttention, SpatialAttention, SqueezeExcite
from .maps import AttentionMaps, capture_attention
from .placement import add_attention, insertion_points, timm_attention
from .registry import available_attentions, build_attention, install, register_attention

install()
placement.install()

__version__ = "0.1.0"

# the training names import Lightning, albumentations and OpenCV (the `train` extra): only on use
_LAZY = {
    "SegmentationModule": "smp_cbam.training.module",
    "SegmentationDataModule": "smp_cbam.training.data",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'smp_cbam' has no attribute {name!r}")


__all__ = [
    "CBAM",
    "ECA",
    "AttentionMaps",
    "ChannelAttention",
    "SegmentationDataModule",
    "SegmentationModule",
    "SpatialAttention",
    "SqueezeExcite",
    "add_attention",
    "available_attentions",
    "build_attention",
    "capture_attention",
    "insertion_points",
    "register_attention",
    "timm_attention",
]
