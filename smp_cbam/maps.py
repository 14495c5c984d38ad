"""What the decoder attention looks at: channel weights and spatial maps, captured with hooks.

::

    with capture_attention(model) as maps:
        model(images)
    maps["decoder.blocks.0.attention2.attention"].channel  # (N, C) CBAM / SCSE / SE / ECA channel weights
    maps["decoder.blocks.0.attention2.attention"].spatial  # (N, H, W) CBAM / SCSE spatial map

Captured: every attention module of a supported type that is not part of another one: those
inside smp's decoder ``Attention`` wrappers (``decoder_attention_type``), those that
:func:`smp_cbam.add_attention` inserted (``decoder.p4.attention``, ``encoder.layer1.0.bn2.attention``,
...), and those in timm blocks (``encoder.model.layer1.0.se``). A forward pre-hook on each computes
the module's gates from its input, without gradients, before the module runs (the decoders' CBAM
overwrites its input at inference), so the maps are the same whichever code path the forward takes
(CBAM's fused path calls neither ``channel`` nor ``spatial``). Buffers such as
BatchNorm running statistics are restored after the recomputation, so capturing does not change
the model. Supported: :class:`~smp_cbam.CBAM`, smp's ``SCSEModule``,
:class:`~smp_cbam.ChannelAttention`, :class:`~smp_cbam.SpatialAttention`,
:class:`~smp_cbam.SqueezeExcite` and :class:`~smp_cbam.ECA`; ``None`` (``nn.Identity``) and other
module types record nothing.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from segmentation_models_pytorch.base.modules import SCSEModule
from torch import nn

from .attention import CBAM, ECA, ChannelAttention, SpatialAttention, SqueezeExcite

Gates = tuple[torch.Tensor | None, torch.Tensor | None]


@dataclass(frozen=True)
class AttentionMaps:
    """The gates one attention module applied: ``channel`` (N, C) and ``spatial`` (N, H, W),
    each None when the module has no such gate."""

    channel: torch.Tensor | None
    spatial: torch.Tensor | None


def _cbam_gates(m: CBAM, x: torch.Tensor) -> Gates:
    channel = m.channel.gate(x)
    return channel, m.spatial.gate(x * channel)


def _scse_gates(m: SCSEModule, x: torch.Tensor) -> Gates:
    return m.cSE(x), m.sSE(x)


def _se_gates(m: SqueezeExcite, x: torch.Tensor) -> Gates:
    return torch.sigmoid(m.fc(x.mean(dim=(2, 3), keepdim=True))), None


def _eca_gates(m: ECA, x: torch.Tensor) -> Gates:
    return torch.sigmoid(m.conv(x.mean(dim=(2, 3)).unsqueeze(1))), None


_GATES: dict[type[nn.Module], Callable[[nn.Module, torch.Tensor], Gates]] = {
    CBAM: _cbam_gates,
    SCSEModule: _scse_gates,
    ChannelAttention: lambda m, x: (m.gate(x), None),
    SpatialAttention: lambda m, x: (None, m.gate(x)),
    SqueezeExcite: _se_gates,
    ECA: _eca_gates,
}


def _gates_of(module: nn.Module) -> Callable[[nn.Module, torch.Tensor], Gates] | None:
    return next((fn for cls, fn in _GATES.items() if isinstance(module, cls)), None)


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every attention module of ``model`` whose maps can be captured and that is not part of
    another one (CBAM's own ``channel``/``spatial`` halves are not listed), by qualified name
    (``decoder.blocks.0.attention1.attention``, ``decoder.p5.attention``, ...), in module order."""
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():  # parents before their children
        if _gates_of(module) is not None and not any(name.startswith(f"{outer}.") for outer in found):
            found[name] = module
    return found


def compute_maps(module: nn.Module, x: torch.Tensor) -> AttentionMaps:
    """The gates ``module`` applies to ``x``, without gradients and leaving its buffers as they were."""
    gates = _gates_of(module)
    if gates is None:
        raise TypeError(f"no attention maps known for {type(module).__name__}")
    saved = [b.clone() for b in module.buffers()]
    with torch.no_grad():
        channel, spatial = gates(module, x)
        for buffer, value in zip(module.buffers(), saved):
            buffer.copy_(value)
    return AttentionMaps(
        channel=None if channel is None else channel.reshape(x.shape[0], x.shape[1]),
        spatial=None if spatial is None else spatial[:, 0],
    )


@contextmanager
def capture_attention(model: nn.Module) -> Iterator[dict[str, AttentionMaps]]:
    """Record the maps of every attention module of ``model`` while the context is open.

    Yields a dict, qualified module name -> :class:`AttentionMaps`, which every forward pass
    updates with the maps of the modules it ran (the latest pass wins; Unet's last block has no
    skip connection, so its ``attention1`` never runs). The hooks are removed on exit.
    """
    record: dict[str, AttentionMaps] = {}

    def hook(name: str) -> Callable:
        def store(module: nn.Module, args: tuple) -> None:
            record[name] = compute_maps(module, args[0])

        return store

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in attention_modules(model).items()]
    try:
        yield record
    finally:
        for handle in handles:
            handle.remove()
