"""Attention in every smp architecture: after the decoder stages, inside the encoder's blocks.

::

    model = smp.FPN("resnet18", encoder_weights=None)
    smp_cbam.add_attention(model, "cbam", where="decoder")   # in place, returns the model
    smp_cbam.add_attention(model, "cbam", where="encoder")   # inside every residual block
    smp.FPN("resnet18", decoder_attention_type="cbam")       # the same as where="decoder"

Where the modules go (``where="decoder"``), one per feature-carrying decoder stage, applied to
the stage's output (the module is the stage's child ``attention``):

* Unet, UnetPlusPlus: smp's own ``attention1``/``attention2`` slots of every decoder block, as
  ``decoder_attention_type`` builds them (same modules, same state_dict keys);
* FPN: each pyramid level ``p5, p4, p3, p2``; PSPNet: the fused ``conv`` after pyramid pooling;
  DeepLabV3: the ASPP output and the decoder output; DeepLabV3Plus: the ASPP branch, the
  high-resolution projection ``block1`` and the fused ``block2``; Linknet, MAnet: every decoder
  block; PAN: the FPA block and every GAU block; UPerNet: the PSP module and every FPN conv
  block; Segformer: every per-level MLP projection; DPT: every fusion block.

``where="encoder"`` puts the module inside every residual block on the residual branch, before
the addition of the shortcut, as the CBAM paper does: after ``bn2`` (BasicBlock) or ``bn3``
(Bottleneck) of smp's ResNet/ResNeXt encoders (child ``attention`` of that BatchNorm), and in
the ``se`` slot that timm's ResNet family fills from ``attn_layer`` for ``tu-`` encoders
(``tu-resnet*``, ``tu-resnext*``, ResNet-D, ...). Only the stages the encoder's ``depth`` runs
get modules. ``where="both"`` does both.

The stage outputs are routed through the module by a forward hook on the stage, so every
existing state_dict key stays as it was (weights of the plain model load into it, with
``strict=False``) and the added keys are ``<stage>.attention.*``. :func:`add_attention` records
what it added in the model's hub config (``_smp_cbam_attention``), which ``save_pretrained``
writes; :func:`install` wraps the ``__init__`` of smp's architectures so that ``from_pretrained``
(after ``import smp_cbam``) adds the same modules again before loading the weights, and so that
``decoder_attention_type`` builds decoder attention in every architecture.
"""

import functools
import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import segmentation_models_pytorch as smp
import torch
from segmentation_models_pytorch.base import SegmentationModel
from segmentation_models_pytorch.base import modules as smp_modules
from torch import nn

from . import registry
from .attention.cbam import reset_gates

WHERE = ("decoder", "encoder", "both")
CONFIG_KEY = "_smp_cbam_attention"
ATTRIBUTE = "attention"

AttentionSpec = str | None | Callable[[int], nn.Module]


@dataclass(frozen=True)
class Point:
    """Where one attention module goes.

    ``kind``: ``"wrapper"`` (smp's ``Attention`` wrapper at ``module``: its ``attention`` is
    replaced), ``"hook"`` (the output of ``module`` goes through its new child ``attention``) or
    ``"slot"`` (timm block at ``module``: its ``se`` slot is filled).
    """

    module: str
    channels: int
    kind: str = "hook"

    @property
    def name(self) -> str:
        """Qualified name of the inserted attention module."""
        return f"{self.module}.{'se' if self.kind == 'slot' else ATTRIBUTE}"


# ---------------------------------------------------------------------------------------------
# decoder insertion points, one function per architecture


def _unet(model: nn.Module) -> list[Point]:
    points = []
    for name, block in model.decoder.named_modules(prefix="decoder"):
        for slot, channels in (
            ("attention1", lambda b: b.conv1[0].in_channels),
            ("attention2", lambda b: b.conv2[0].out_channels),
        ):
            if isinstance(getattr(block, slot, None), smp_modules.Attention):
                points.append(Point(f"{name}.{slot}", channels(block), "wrapper"))
    return points


def _fpn(model: nn.Module) -> list[Point]:
    d = model.decoder
    levels = [Point("decoder.p5", d.p5.out_channels)]
    return levels + [Point(f"decoder.p{k}", getattr(d, f"p{k}").skip_conv.out_channels) for k in (4, 3, 2)]


def _pspnet(model: nn.Module) -> list[Point]:
    return [Point("decoder.conv", model.decoder.conv[0].out_channels)]


def _deeplabv3(model: nn.Module) -> list[Point]:
    d = model.decoder
    return [Point("decoder.aspp", d.aspp.project[0].out_channels), Point("decoder", d.conv.out_channels)]


def _deeplabv3plus(model: nn.Module) -> list[Point]:
    d = model.decoder
    return [
        Point("decoder.aspp", d.aspp[1][1].out_channels),
        Point("decoder.block1", d.block1[0].out_channels),
        Point("decoder.block2", d.block2[0][1].out_channels),
    ]


def _linknet(model: nn.Module) -> list[Point]:
    return [Point(f"decoder.blocks.{i}", b.block[2][0].out_channels) for i, b in enumerate(model.decoder.blocks)]


def _manet(model: nn.Module) -> list[Point]:
    return [Point(f"decoder.blocks.{i}", b.conv2[0].out_channels) for i, b in enumerate(model.decoder.blocks)]


def _pan(model: nn.Module) -> list[Point]:
    d = model.decoder
    points = [Point("decoder.fpa", d.fpa.mid[0].conv.out_channels)]
    for name in ("gau3", "gau2", "gau1"):  # the order the forward runs them; depth drops the first
        if hasattr(d, name):
            points.append(Point(f"decoder.{name}", getattr(d, name).conv2.conv.out_channels))
    return points


def _upernet(model: nn.Module) -> list[Point]:
    d = model.decoder
    points = [Point("decoder.psp", d.psp.out_conv[0].out_channels)]
    return points + [Point(f"decoder.fpn_conv_blocks.{i}", b[0].out_channels) for i, b in enumerate(d.fpn_conv_blocks)]


def _segformer(model: nn.Module) -> list[Point]:
    return [Point(f"decoder.mlp_stage.{i}", m.linear.out_features) for i, m in enumerate(model.decoder.mlp_stage)]


def _dpt(model: nn.Module) -> list[Point]:
    return [
        Point(f"decoder.fusion_blocks.{i}", b.project.out_channels) for i, b in enumerate(model.decoder.fusion_blocks)
    ]


DECODER_POINTS: dict[type, Callable[[nn.Module], list[Point]]] = {
    smp.Unet: _unet,
    smp.UnetPlusPlus: _unet,
    smp.FPN: _fpn,
    smp.PSPNet: _pspnet,
    smp.DeepLabV3: _deeplabv3,
    smp.DeepLabV3Plus: _deeplabv3plus,
    smp.Linknet: _linknet,
    smp.MAnet: _manet,
    smp.PAN: _pan,
    smp.UPerNet: _upernet,
    smp.Segformer: _segformer,
    smp.DPT: _dpt,
}
NATIVE_DECODER_ATTENTION = (smp.Unet, smp.UnetPlusPlus)


def _decoder_points(model: nn.Module) -> list[Point]:
    for cls in type(model).__mro__:
        if cls in DECODER_POINTS:
            return DECODER_POINTS[cls](model)
    names = ", ".join(c.__name__ for c in DECODER_POINTS)
    raise ValueError(f"no decoder insertion points known for architecture {type(model).__name__}; supported: {names}")


# ---------------------------------------------------------------------------------------------
# encoder insertion points

SUPPORTED_ENCODERS = (
    "smp's ResNet/ResNeXt encoders (resnet18, resnet34, resnet50, resnet101, resnet152, "
    "resnext50_32x4d, resnext101_32x*d) and timm ResNet-family encoders whose blocks have no "
    "attention yet (tu-resnet*, tu-resnext*, tu-resnet*d, ...)"
)


def _torchvision_blocks() -> dict[type, str]:
    from torchvision.models.resnet import BasicBlock, Bottleneck

    return {BasicBlock: "bn2", Bottleneck: "bn3"}


def _timm_blocks() -> dict[type, str]:
    from timm.models.resnet import BasicBlock, Bottleneck

    return {BasicBlock: "conv2", Bottleneck: "conv3"}


def _smp_resnet_points(encoder: nn.Module) -> list[Point]:
    blocks = _torchvision_blocks()
    points = []
    for k in range(1, 5):
        if encoder._depth < k + 1:  # smp keeps the layers its depth does not run
            break
        for name, block in getattr(encoder, f"layer{k}").named_children():
            norm = blocks[type(block)]
            points.append(Point(f"encoder.layer{k}.{name}.{norm}", getattr(block, norm).num_features))
    return points


def _timm_points(encoder: nn.Module, name: str) -> list[Point]:
    blocks = _timm_blocks()
    points, taken = [], []
    for qualname, block in encoder.named_modules(prefix="encoder"):
        conv = blocks.get(type(block))
        if conv is None:
            continue
        if block.se is not None:
            taken.append(f"{qualname}.se ({type(block.se).__name__})")
        points.append(Point(qualname, getattr(block, conv).out_channels, "slot"))
    if taken:
        raise ValueError(
            f"encoder {name!r} already has attention in its blocks: {taken[0]}, ...; "
            f"use an encoder without attention, one of {SUPPORTED_ENCODERS}"
        )
    return points


def _encoder_points(model: nn.Module) -> list[Point]:
    from segmentation_models_pytorch.encoders.resnet import ResNetEncoder
    from segmentation_models_pytorch.encoders.timm_universal import TimmUniversalEncoder

    encoder = model.encoder
    name = model.config.get("encoder_name") or type(encoder).__name__
    points = []
    if isinstance(encoder, ResNetEncoder):
        points = _smp_resnet_points(encoder)
    elif isinstance(encoder, TimmUniversalEncoder):
        points = _timm_points(encoder, name)
    if not points:
        raise ValueError(
            f"where='encoder' is not supported for encoder {name!r} of {type(model).__name__}; "
            f"supported: {SUPPORTED_ENCODERS}"
        )
    return points


# ---------------------------------------------------------------------------------------------
# public API


def _check_where(where: str) -> None:
    if where not in WHERE:
        raise ValueError(f"where must be one of {WHERE}, got {where!r}")


def _check_model(model: nn.Module) -> None:
    if not isinstance(model, SegmentationModel):
        raise ValueError(f"model must be an smp SegmentationModel, got {type(model).__name__}")


def insertion_points(model: nn.Module, where: str = "decoder") -> dict[str, int]:
    """The attention modules :func:`add_attention` would insert: qualified name -> channels.

    Raises ValueError, naming the architecture or the encoder, where the placement is not
    supported.
    """
    _check_where(where)
    _check_model(model)
    return {p.name: p.channels for p in _points(model, where)}


def _points(model: nn.Module, where: str) -> list[Point]:
    points = []
    if where in ("decoder", "both"):
        points += _decoder_points(model)
    if where in ("encoder", "both"):
        points += _encoder_points(model)
    return points


def supports(model_or_arch: nn.Module | str, where: str = "decoder", encoder: str | None = None) -> bool:
    """Whether :func:`add_attention` can place attention ``where`` in a model.

    ``model_or_arch``: a built smp model (exact answer), or an architecture name as
    ``smp.create_model`` takes it. With a name, ``where="decoder"`` is known from the architecture;
    for ``"encoder"``/``"both"`` pass ``encoder`` (an smp encoder name) for an exact answer;
    without it the answer is whether the architecture accepts any supported encoder (every one
    but DPT, whose encoders are vision transformers).
    """
    _check_where(where)
    if isinstance(model_or_arch, nn.Module):
        try:
            _check_model(model_or_arch)
            _points(model_or_arch, where)
        except ValueError:
            return False
        return True
    cls = smp.MODEL_ARCHITECTURES_MAPPING.get(str(model_or_arch).lower())
    if cls is None or not any(issubclass(cls, c) for c in DECODER_POINTS):
        return False
    if where == "decoder":
        return True
    if encoder is None:
        return not issubclass(cls, smp.DPT)
    return _encoder_name_supported(encoder) and not issubclass(cls, smp.DPT)


def _encoder_name_supported(name: str) -> bool:
    from segmentation_models_pytorch.encoders.resnet import resnet_encoders

    if name in resnet_encoders:
        return True
    if not name.startswith("tu-"):
        return False
    import timm

    try:  # built on the meta device: no memory, no weights
        with torch.device("meta"):
            model = timm.create_model(name[3:], pretrained=False)
    except Exception:
        return False
    blocks = [m for m in model.modules() if type(m) in _timm_blocks()]
    return bool(blocks) and all(b.se is None for b in blocks)


def _build(attention: AttentionSpec, channels: int) -> nn.Module:
    """``attention`` for ``channels`` channels: a registered name (``build_attention`` of the
    registry) or a factory called as ``factory(channels)``."""
    if callable(attention):
        return attention(channels)
    return registry.build_attention(attention, channels)


def timm_attention(attention: AttentionSpec = "cbam") -> Callable[..., nn.Module]:
    """``attention`` in timm's ``attn_layer`` calling convention: ``layer(channels, **kwargs)``.

    timm passes ``device`` and ``dtype`` (and block-specific keywords, which are ignored); the
    module is built as :func:`add_attention` builds it, then moved. Use it as
    ``smp.Unet("tu-resnet18", encoder_weights=None, block_args={"attn_layer": timm_attention("cbam")})``;
    ``add_attention(model, "cbam", where="encoder")`` puts the same modules in the same place and
    also survives ``save_pretrained``/``from_pretrained``.
    """
    if not (attention is None or isinstance(attention, str) or callable(attention)):
        raise ValueError(f"attention must be a registered name or a factory, got {attention!r}")
    return functools.partial(_timm_layer, attention)


def _timm_layer(attention: AttentionSpec, channels: int, device=None, dtype=None, **_: object) -> nn.Module:
    return _build(attention, channels).to(device=device, dtype=dtype)


def _attend(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook: the stage's output through the stage's ``attention`` child."""
    return module.attention(output)


def _describe(attention: AttentionSpec) -> dict:
    if attention is None or isinstance(attention, str):
        return {"attention": attention}
    name = getattr(attention, "__qualname__", None) or type(attention).__qualname__
    return {"attention": None, "factory": f"{getattr(attention, '__module__', '?')}.{name}"}


def add_attention(model: nn.Module, attention: AttentionSpec = "cbam", where: str = "decoder") -> nn.Module:
    """Insert ``attention`` into ``model`` in place and return the model.

    Args:
        model: an smp model (any architecture of smp's ``create_model``).
        attention: a name from :func:`smp_cbam.available_attentions` (``None``/``"none"`` add
            nothing) or a factory called as ``factory(channels)``.
        where: ``"decoder"`` (after every feature-carrying decoder stage, see the module doc),
            ``"encoder"`` (inside every residual block, before the shortcut is added) or ``"both"``.

    Raises ValueError naming the architecture or encoder when the placement is not supported,
    or when a place already holds attention; the model is left unchanged then. A model with
    attention added by name saves with ``save_pretrained`` and loads with ``from_pretrained``
    (after ``import smp_cbam``); one built from an unregistered factory saves with a warning, and
    loading it raises (register the factory with :func:`smp_cbam.register_attention` and pass its
    name).
    """
    return _add(model, attention, where, record=True)


def _add(model: nn.Module, attention: AttentionSpec, where: str, record: bool) -> nn.Module:
    _check_where(where)
    _check_model(model)
    if attention == "none":
        attention = None
    if not (attention is None or isinstance(attention, str) or callable(attention)):
        raise ValueError(f"attention must be a registered name, None or a factory, got {attention!r}")
    points = _points(model, where)
    if attention is None:
        return model
    modules = dict(model.named_modules())
    _check_free(model, points, modules)
    reference = next(model.parameters(), None)
    built = [_build(attention, p.channels) for p in points]  # all or nothing
    for point, module in zip(points, built):
        if reference is not None:
            module.to(device=reference.device, dtype=reference.dtype)
        owner = modules[point.module]
        if point.kind == "wrapper":
            owner.attention = module
        elif point.kind == "slot":
            owner.se = module
        else:
            setattr(owner, ATTRIBUTE, module)
            owner.register_forward_hook(_attend)
    if record:
        model._hub_mixin_config.setdefault(CONFIG_KEY, []).append({**_describe(attention), "where": where})
    return model


def _check_free(model: nn.Module, points: list[Point], modules: dict[str, nn.Module]) -> None:
    for point in points:
        owner = modules[point.module]
        if point.kind == "wrapper":
            busy = not isinstance(owner.attention, nn.Identity)
        elif point.kind == "slot":
            busy = owner.se is not None
        else:
            busy = hasattr(owner, ATTRIBUTE)
        if busy:
            raise ValueError(
                f"{type(model).__name__} already has attention at {point.name}; "
                "build the model without attention to add another type"
            )


# ---------------------------------------------------------------------------------------------
# smp's constructors: persistence and decoder_attention_type everywhere


def _apply_recorded(model: nn.Module, spec: dict) -> None:
    if spec.get("factory"):
        raise ValueError(
            f"this {type(model).__name__} was saved with attention from the unregistered factory "
            f"{spec['factory']} ({spec.get('where')}); register it with "
            "smp_cbam.register_attention(name, factory) and add it by name before saving"
        )
    _add(model, spec["attention"], spec["where"], record=False)


def _wrap_init(cls: type) -> None:
    init = cls.__init__
    if getattr(init, "_smp_cbam", False):
        return
    native = "decoder_attention_type" in inspect.signature(init).parameters

    @functools.wraps(init)
    def __init__(self: nn.Module, *args, **kwargs) -> None:
        recorded = kwargs.pop(CONFIG_KEY, None) or []
        # without native support smp would hand decoder_attention_type to the encoder, which
        # ignores it: build it here instead
        attention = None if native else kwargs.pop("decoder_attention_type", None)
        init(self, *args, **kwargs)
        if attention is not None:
            _add(self, attention, "decoder", record=False)  # the hub config has the argument
        for spec in recorded:
            _apply_recorded(self, spec)
        # smp's initialize_decoder re-initialises every conv and BatchNorm of the decoder,
        # attention included: a CBAM built with init="neutral" gets its neutral start back
        reset_gates(self)

    __init__._smp_cbam = True
    cls.__init__ = __init__


def _wrap_save(cls: type) -> None:
    save = cls.save_pretrained
    if getattr(save, "_smp_cbam", False):
        return

    @functools.wraps(save)
    def save_pretrained(self: nn.Module, *args, **kwargs):
        factories = [spec for spec in self._hub_mixin_config.get(CONFIG_KEY, []) if spec.get("factory")]
        if factories:  # saved all the same: the weights are worth keeping
            warnings.warn(
                f"this {type(self).__name__} has attention from the unregistered factory {factories[0]['factory']} "
                f"({factories[0]['where']}): from_pretrained cannot rebuild it. Register the factory with "
                "smp_cbam.register_attention(name, factory) and add the attention by name to save a model that loads.",
                stacklevel=2,
            )
        return save(self, *args, **kwargs)

    save_pretrained._smp_cbam = True
    cls.save_pretrained = save_pretrained


def install() -> None:
    """Wrap the ``__init__`` of every smp architecture (idempotent): ``decoder_attention_type``
    builds decoder attention through :func:`add_attention` where smp has no native support,
    and attention recorded in a saved config is added again by ``from_pretrained``; and their
    ``save_pretrained``, which warns of attention that ``from_pretrained`` cannot rebuild."""
    for cls in smp.MODEL_ARCHITECTURES_MAPPING.values():
        _wrap_init(cls)
    _wrap_save(SegmentationModel)
