"""CBAM and other attention types for segmentation_models.pytorch.

``import smp_cbam`` registers ``"cbam"``, ``"cbam_residual"``, ``"cbam_neutral"``,
``"cbam_channel"``, ``"cbam_spatial"``, ``"se"`` and ``"eca"`` as ``decoder_attention_type`` of
smp's Unet and Unet++, makes ``decoder_attention_type``
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

The package imports torch and smp only when they are needed, so that ``smp-cbam --help`` (whose
entry point imports this package first) answers at once. The names are still registered by
``import smp_cbam``: at once when smp is already imported, otherwise the moment smp is imported.
"""

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

# public name -> the module that defines it, imported on first use (PEP 562)
_LAZY = {
    "CBAM": "smp_cbam.attention",
    "ECA": "smp_cbam.attention",
    "ChannelAttention": "smp_cbam.attention",
    "SpatialAttention": "smp_cbam.attention",
    "SqueezeExcite": "smp_cbam.attention",
    "AttentionMaps": "smp_cbam.maps",
    "capture_attention": "smp_cbam.maps",
    "add_attention": "smp_cbam.placement",
    "insertion_points": "smp_cbam.placement",
    "timm_attention": "smp_cbam.placement",
    "available_attentions": "smp_cbam.registry",
    "build_attention": "smp_cbam.registry",
    "install": "smp_cbam.registry",
    "register_attention": "smp_cbam.registry",
    # the training names import Lightning, albumentations and OpenCV (the `train` extra)
    "SegmentationModule": "smp_cbam.training.module",
    "SegmentationDataModule": "smp_cbam.training.data",
}
_SUBMODULES = ("attention", "benchmarks", "maps", "placement", "registry", "report", "training")
_SMP = "segmentation_models_pytorch"


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'smp_cbam' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, *_SUBMODULES})


def _install() -> None:
    importlib.import_module("smp_cbam.registry").install()
    importlib.import_module("smp_cbam.placement").install()


class _InstallAfterSmp(importlib.abc.Loader):
    """Runs smp's own loader, then registers the attention names into the fresh smp."""

    def __init__(self, loader: importlib.abc.Loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        # smp's module keeps its own loader (importlib.resources and reloads go through it)
        module.__loader__ = module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        _install()


class _SmpImportHook(importlib.abc.MetaPathFinder):
    """Finds smp with the other finders and wraps its loader in :class:`_InstallAfterSmp`."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _SMP:
            return None
        sys.meta_path.remove(self)  # one use: smp is imported once per interpreter
        spec = next(
            (s for f in sys.meta_path if hasattr(f, "find_spec") and (s := f.find_spec(fullname, path, target))),
            None,
        )
        if spec is not None and spec.loader is not None:
            spec.loader = _InstallAfterSmp(spec.loader)
        return spec


if _SMP in sys.modules:
    _install()
elif not any(type(f).__name__ == _SmpImportHook.__name__ for f in sys.meta_path):
    sys.meta_path.insert(0, _SmpImportHook())


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
