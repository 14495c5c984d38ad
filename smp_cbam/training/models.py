"""Building the compared smp models, and counting the parameters a model really uses.

:func:`build_model` gives every attention arm of one seed the same encoder and decoder weights
(the paired design of the comparison runner); :func:`count_parameters` counts only the parameters
that take part in the forward pass, so a depth-3 encoder that keeps unused stages is not charged
for them.
"""

import inspect
from collections.abc import Iterator, Sequence

import segmentation_models_pytorch as smp
import torch
from torch import nn

from ..registry import available_attentions

PLACEMENTS = ("decoder", "encoder", "both")


def normalize_attention(attention: str | None) -> str | None:
    """``None`` for no attention (``None`` or ``"none"``), else the registered name; raises
    ValueError naming ``attention`` for an unknown one."""
    if attention is None or attention == "none":
        return None
    if attention not in available_attentions():
        names = ", ".join(repr(n) for n in ["none", *available_attentions()])
        raise ValueError(f"unknown decoder attention type {attention!r}; available: {names}")
    return attention


def has_native_decoder_attention(arch: str) -> bool:
    """Whether smp's ``arch`` takes ``decoder_attention_type`` (Unet, Unet++)."""
    return "decoder_attention_type" in inspect.signature(_arch_class(arch)).parameters


def _arch_class(arch: str) -> type[nn.Module]:
    try:
        return smp.MODEL_ARCHITECTURES_MAPPING[arch.lower()]
    except KeyError:
        names = ", ".join(sorted(smp.MODEL_ARCHITECTURES_MAPPING))
        raise ValueError(f"unknown arch {arch!r}; smp has: {names}") from None


def check_model_args(arch: str, encoder: str, attention: str | None, placement: str = "decoder") -> None:
    """Raise ValueError naming the argument when ``build_model`` would refuse these names, before
    anything is built or trained: an unknown arch, encoder (smp's names, or ``"tu-<timm model>"``),
    attention or placement, or a placement that :mod:`smp_cbam.placement` does not support for
    ``arch``."""
    _arch_class(arch)
    attention = normalize_attention(attention)
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    if not _encoder_exists(encoder):
        raise ValueError(
            f"unknown encoder {encoder!r}: use one of smp.encoders.get_encoder_names() or 'tu-<timm model name>'"
        )
    if attention is None or (placement == "decoder" and has_native_decoder_attention(arch)):
        return
    try:
        from ..placement import supports
    except ImportError:
        raise ValueError(_NO_PLACEMENT.format(arch=arch, placement=placement)) from None
    if not supports(arch, placement):
        raise ValueError(f"attention placement={placement!r} is not supported for arch {arch!r}")


def _encoder_exists(encoder: str) -> bool:
    if encoder.startswith("tu-"):
        import timm

        return timm.is_model(encoder[3:])
    return encoder in smp.encoders.get_encoder_names()


_NO_PLACEMENT = (
    "arch {arch!r} with placement={placement!r} needs smp_cbam.add_attention, which this version of "
    "smp_cbam lacks; use Unet or Unet++ with placement='decoder'"
)


def build_model(
    arch: str,
    encoder: str,
    attention: str | None,
    placement: str = "decoder",
    *,
    in_channels: int = 3,
    classes: int = 1,
    decoder_channels: Sequence[int] | None = None,
    encoder_weights: str | None = None,
    encoder_depth: int = 5,
    seed: int | None = None,
    **smp_kwargs,
) -> nn.Module:
    """An smp model of ``arch`` with ``attention`` placed in the ``placement`` part of it.

    Unet and Unet++ with ``placement="decoder"`` use smp's own ``decoder_attention_type``; every
    other case builds the plain model and calls :func:`smp_cbam.add_attention`. ``smp_kwargs``
    go to :func:`segmentation_models_pytorch.create_model` (``aux_params``, ``decoder_use_norm``,
    ...).

    With ``seed``, every weight outside the attention modules is initialised exactly as in the
    same model without attention, so runs that differ only in the attention type start from the
    same encoder and decoder. The seed applies to a copy of torch's CPU generator: the caller's
    random state (``seed_everything``'s, which drives dropout and the rest) is left as it was.

    Parameters that the forward pass never uses are frozen (:func:`freeze_unused_parameters`).
    """
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        model = _build(arch, encoder, attention, placement, in_channels=in_channels, classes=classes,
                       decoder_channels=decoder_channels, encoder_weights=encoder_weights,
                       encoder_depth=encoder_depth, seed=seed, **smp_kwargs)  # fmt: skip
    return freeze_unused_parameters(model, in_channels)


def freeze_unused_parameters(model: nn.Module, in_channels: int, size: int = 64) -> nn.Module:
    """Set ``requires_grad=False`` on the parameters that the forward pass never uses.

    smp builds some modules that its forward skips: torchvision-style encoders keep the stages
    deeper than ``encoder_depth``, and Unet's first decoder block has no skip input, so its
    ``attention1`` never runs. Those weights never get a gradient, which DDP refuses ("parameters
    that were not used in producing the loss"). Autograd is asked which parameters one eval-mode
    pass on zeros depends on (:func:`used_parameters`: no random numbers drawn, no BatchNorm
    statistics changed; fused attention paths count, unlike forward hooks). Freezing rather than
    deleting keeps the state dict that ``from_pretrained`` and earlier checkpoints expect, and
    changes no trained value: the optimiser skips parameters without a gradient anyway.
    """
    used = set(used_parameters(model, torch.zeros(1, in_channels, size, size)))
    for name, parameter in model.named_parameters():
        if name not in used:
            parameter.requires_grad_(False)
    return model


def _build(
    arch: str,
    encoder: str,
    attention: str | None,
    placement: str,
    *,
    in_channels: int,
    classes: int,
    decoder_channels: Sequence[int] | None,
    encoder_weights: str | None,
    encoder_depth: int,
    seed: int | None,
    **smp_kwargs,
) -> nn.Module:
    check_model_args(arch, encoder, attention, placement)
    attention = normalize_attention(attention)
    if "decoder_attention_type" in smp_kwargs:
        raise ValueError("pass the attention as attention=, not decoder_attention_type= in smp_kwargs")
    kwargs = dict(
        encoder_name=encoder,
        encoder_depth=encoder_depth,
        encoder_weights=encoder_weights,
        in_channels=in_channels,
        classes=classes,
        **smp_kwargs,
    )
    if decoder_channels is not None:
        kwargs["decoder_channels"] = list(decoder_channels)
    elif encoder_depth != 5 and arch.lower().replace("_", "") in ("unet", "unetplusplus"):
        # smp's default decoder_channels have five entries; its own error names only those
        raise ValueError(
            f"encoder_depth={encoder_depth} needs decoder_channels with {encoder_depth} entries (smp's default "
            f"has 5), e.g. decoder_channels={[256, 128, 64, 32, 16][:encoder_depth]}"
        )
    native = placement == "decoder" and has_native_decoder_attention(arch)
    if attention is None or not native:
        if seed is not None:
            torch.manual_seed(seed)
        model = smp.create_model(arch, **kwargs)
        if attention is None:
            return model
        # the plain model is built first, so its weights do not depend on the attention
        return _add_attention(model, arch, attention, placement)
    if seed is None:
        return smp.create_model(arch, decoder_attention_type=attention, **kwargs)
    torch.manual_seed(seed)
    model = smp.create_model(arch, decoder_attention_type=attention, **kwargs)
    torch.manual_seed(seed)
    reference = smp.create_model(arch, decoder_attention_type=None, **kwargs)
    result = model.load_state_dict(reference.state_dict(), strict=False)
    if result.unexpected_keys:  # the attention only adds modules; anything else is a bug
        raise RuntimeError(f"weights of {arch} without attention do not fit: {result.unexpected_keys}")
    return model


def _add_attention(model: nn.Module, arch: str, attention: str, placement: str) -> nn.Module:
    try:
        from .. import add_attention  # provided by smp_cbam.placement
    except ImportError:
        raise ValueError(_NO_PLACEMENT.format(arch=arch, placement=placement)) from None
    return add_attention(model, attention=attention, where=placement)


def _tensors(output) -> Iterator[torch.Tensor]:
    """The floating-point tensors in a model output (a tensor, or tuples/lists/dicts of them)."""
    if isinstance(output, torch.Tensor):
        if output.is_floating_point():
            yield output
    elif isinstance(output, (tuple, list)):
        for item in output:
            yield from _tensors(item)
    elif isinstance(output, dict):
        for item in output.values():
            yield from _tensors(item)


def used_parameters(model: nn.Module, example_input: torch.Tensor) -> list[str]:
    """Names of the parameters that the forward pass of ``example_input`` depends on.

    A parameter counts when the model's outputs have a gradient path to it (what DDP calls a
    used parameter). Gradients are asked of autograd, not stored, so ``.grad`` stays untouched;
    the model runs in eval mode (BatchNorm statistics unchanged) and every parameter is made
    to require a gradient for the pass, so frozen ones count too. Modes and ``requires_grad``
    flags are restored afterwards.
    """
    named = [(name, p) for name, p in model.named_parameters() if p is not None]
    training = model.training
    flags = [p.requires_grad for _, p in named]
    try:
        model.eval()
        for _, p in named:
            p.requires_grad_(True)
        with torch.enable_grad():
            outputs = list(_tensors(model(example_input)))
            if not outputs:
                raise ValueError("the model returned no floating-point tensor to trace parameters from")
            total = sum(o.float().sum() for o in outputs)
            grads = torch.autograd.grad(total, [p for _, p in named], allow_unused=True)
    finally:
        for (_, p), flag in zip(named, flags):
            p.requires_grad_(flag)
        model.train(training)
    return [name for (name, _), grad in zip(named, grads) if grad is not None]


def count_parameters(model: nn.Module, example_input: torch.Tensor) -> int:
    """Number of parameter values that take part in the forward pass of ``example_input``
    (see :func:`used_parameters`); shared parameters count once."""
    used = set(used_parameters(model, example_input))
    return sum(p.numel() for name, p in model.named_parameters() if name in used)
