"""Decoder attention types for smp: ``decoder_attention_type=<name>`` in Unet and Unet++.

smp's decoder blocks build ``segmentation_models_pytorch.base.modules.Attention(name,
in_channels=C)``. :func:`install` wraps that class's ``__init__`` once, so names registered here
are built from their factory while ``None`` and ``"scse"`` go through smp's own code unchanged.
Because the class object itself is patched, the import order of smp and smp_cbam does not matter.
"""

from collections.abc import Callable
from functools import partial

from segmentation_models_pytorch.base import modules as smp_modules
from torch import nn

from .attention import CBAM, ECA, ChannelAttention, SpatialAttention, SqueezeExcite

AttentionFactory = Callable[[int], nn.Module]

_SMP_NATIVE = (None, "scse")
_FACTORIES: dict[str, AttentionFactory] = {}


def register_attention(name: str, factory: AttentionFactory, overwrite: bool = False) -> None:
    """Make ``decoder_attention_type=name`` build ``factory(in_channels)`` in smp decoders."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if name in _SMP_NATIVE:
        raise ValueError(f"{name!r} is smp's own attention type and cannot be replaced")
    if not callable(factory):
        raise TypeError(f"factory for {name!r} must be callable, got {type(factory).__name__}")
    if name in _FACTORIES and not overwrite:
        raise ValueError(f"attention {name!r} is already registered; pass overwrite=True")
    _FACTORIES[name] = factory


def available_attentions() -> list[str | None]:
    """Every valid ``decoder_attention_type``: smp's own (None, "scse") and the registered ones."""
    return [*_SMP_NATIVE, *_FACTORIES]


def build_attention(name: str | None, in_channels: int) -> nn.Module:
    """The module that ``decoder_attention_type=name`` puts in a decoder block."""
    return smp_modules.Attention(name, in_channels=in_channels).attention


def install() -> None:
    """Patch smp's ``Attention`` so it builds registered names (idempotent)."""
    smp_init = smp_modules.Attention.__init__
    if getattr(smp_init, "_smp_cbam", False):
        return

    def __init__(self: nn.Module, name: str | None, **params) -> None:
        if name in _SMP_NATIVE:
            smp_init(self, name, **params)
        elif isinstance(name, str) and name in _FACTORIES:
            nn.Module.__init__(self)
            # smp passes in_channels=C; factories are called as factory(C) (AttentionFactory)
            in_channels = params.pop("in_channels")
            self.attention = _FACTORIES[name](in_channels, **params)
        else:
            names = ", ".join(repr(n) for n in available_attentions())
            raise ValueError(f"unknown decoder attention type {name!r}; available: {names}")

    __init__._smp_cbam = True
    smp_modules.Attention.__init__ = __init__


for _name, _factory in {
    # in place at inference: a decoder block's attention input is a fresh intermediate (the
    # concatenated skip or conv2's output, itself an in-place ReLU's), used by nothing else
    "cbam": partial(CBAM, inplace=True),
    # x + CBAM(x): the identity path that smp's decoder lacks around its attention
    "cbam_residual": partial(CBAM, residual=True, inplace=True),
    # both gates start at a constant (sigmoid(0) = 0.5), as in the authors' initialisation
    "cbam_neutral": partial(CBAM, init="neutral", inplace=True),
    "cbam_channel": ChannelAttention,
    "cbam_spatial": lambda in_channels: SpatialAttention(),
    "se": SqueezeExcite,
    "eca": ECA,
}.items():
    register_attention(_name, _factory)
