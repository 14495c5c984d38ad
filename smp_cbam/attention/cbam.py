"""CBAM: Convolutional Block Attention Module (Woo et al., ECCV 2018, arXiv:1807.06521).

``CBAM(x) = S(C(x))`` where

* channel attention ``C(x) = x * sigmoid(MLP(avgpool(x)) + MLP(maxpool(x)))`` with one MLP
  ``C -> C/r -> C`` (ReLU) shared by both pooled descriptors, and
* spatial attention ``S(y) = y * sigmoid(conv_kxk([mean_c(y); max_c(y)]))`` with a
  ``2 -> 1`` convolution padded to keep the size.

The defaults follow the paper's formula; ``mlp_bias``, ``spatial_bn`` (the authors' code puts a
BatchNorm after the spatial convolution), ``residual`` (``output + input``) and ``init="neutral"``
(both gates start at the constant 0.5, see ``INITS``) select the variants found in published
implementations.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import cbam_fused, kernels, ops
from .cbam_fused import fetch as _fetch
from .checks import check_channels, check_choice, check_flag, check_positive

# How the gates' last layers start. "default": PyTorch's initialisation, so each gate starts
# input-dependent around 0.5. "neutral": the layers that feed each sigmoid start at zero (the
# channel MLP's second layer, the spatial convolution, or the spatial BatchNorm's gamma as in
# the authors' code), so both gates start at exactly sigmoid(0) = 0.5 for every input and CBAM
# starts as the fixed scaling x / 4 (x * 1.25 with residual) that gradients then move away from.
INITS = ("default", "neutral")
IMPLS = ("auto", "reference", "fused", "kernels")


def _zero(layer: nn.Module) -> None:
    """Zero a layer's weight and bias, so its output is 0 for every input."""
    with torch.no_grad():
        layer.weight.zero_()
        if layer.bias is not None:
            layer.bias.zero_()


def hidden_channels(
    in_channels: int, reduction: int = 16, rd_ratio: float | None = None, rd_channels: int | None = None
) -> int:
    """The MLP's hidden width: ``rd_channels``, else ``round(in_channels * rd_ratio)``, else
    ``in_channels // reduction``; at least 1. timm's attention layers name the first two."""
    if rd_channels is not None:
        return check_positive("rd_channels", rd_channels)
    if rd_ratio is not None:
        if not 0 < rd_ratio <= 1:
            raise ValueError(f"rd_ratio must be in (0, 1], got {rd_ratio}")
        return max(round(in_channels * rd_ratio), 1)
    return max(in_channels // check_positive("reduction", reduction), 1)


def reset_gates(model: nn.Module) -> nn.Module:
    """Apply each CBAM part's ``init`` again, in place; returns ``model``.

    smp initialises a decoder after building it (``initialize_decoder``: every ``Conv2d`` and
    ``BatchNorm2d`` in it, attention included), which undoes the neutral start; ``smp_cbam``'s
    registry calls this after smp's initialisation.
    """
    for module in model.modules():
        if isinstance(module, (ChannelAttention, SpatialAttention)):
            module.reset_gate()
    return model


def _channel_pool(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and max over H*W, both ``(N, C, 1, 1)``.

    The max is ``torch.max(dim)``'s, whose gradient goes to the first maximal element of a tie.
    """
    flat = x.flatten(2)
    return flat.mean(dim=2, keepdim=True).unsqueeze(3), flat.max(dim=2, keepdim=True)[0].unsqueeze(3)


def _spatial_pool(x: torch.Tensor) -> torch.Tensor:
    """Channel mean and max stacked as ``(N, 2, H, W)``; ``torch.max(dim)`` as in ``_channel_pool``."""
    return torch.cat([x.mean(dim=1, keepdim=True), x.max(dim=1, keepdim=True)[0]], dim=1)


class ChannelAttention(nn.Module):
    """Channel half of CBAM: one shared MLP over the average- and max-pooled descriptors."""

    def __init__(
        self,
        in_channels: int,
        reduction: int = 16,
        mlp_bias: bool = False,
        init: str = "default",
        *,
        rd_ratio: float | None = None,
        rd_channels: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        in_channels = check_positive("in_channels", in_channels)
        mlp_bias = check_flag("mlp_bias", mlp_bias)
        check_choice("init", init, INITS)
        self.in_channels = in_channels
        hidden = hidden_channels(in_channels, reduction, rd_ratio, rd_channels)
        factory = {"device": device, "dtype": dtype}
        self.mlp = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, bias=mlp_bias, **factory),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, in_channels, 1, bias=mlp_bias, **factory),
        )
        self.init = init
        self.reset_gate()

    def reset_gate(self) -> None:
        """Apply ``init`` to the MLP's second layer (see ``INITS``); ``reset_gates`` says when."""
        if self.init == "neutral":
            _zero(self.mlp[2])

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """The channel weights, shape ``(N, C, 1, 1)``."""
        check_channels(x, self.in_channels)
        avg, mx = _channel_pool(x)
        return self._mlp_gate(avg, mx)

    def _mlp_gate(self, avg: torch.Tensor, mx: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.mlp(avg) + self.mlp(mx))

    def _linear_gate(self, avg: torch.Tensor, mx: torch.Tensor) -> torch.Tensor:
        """``_mlp_gate`` for ``(N, C)`` descriptors: both through one pair of matmuls.

        The same weights as the 1x1 convolutions, without their fixed cost per call (on CPU,
        oneDNN takes about 50 us per tiny convolution, forward or backward).
        """
        first, _, second = self.mlp
        hidden = F.relu(F.linear(torch.cat([avg, mx]), first.weight.flatten(1), first.bias))
        z = F.linear(hidden, second.weight.flatten(1), second.bias)
        return torch.sigmoid(z[: len(avg)] + z[len(avg) :])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


class SpatialAttention(nn.Module):
    """Spatial half of CBAM: a k x k convolution over the channel-wise mean and max maps."""

    def __init__(
        self,
        kernel_size: int = 7,
        spatial_bn: bool = False,
        init: str = "default",
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        kernel_size = check_positive("kernel_size", kernel_size)
        spatial_bn = check_flag("spatial_bn", spatial_bn)
        if kernel_size % 2 == 0:
            # a channel count, as timm's attn_layer and add_attention's factories pass it, is likely
            hint = (
                ". SpatialAttention takes no channel count: as timm's attn_layer use "
                "smp_cbam.timm_attention('cbam_spatial'), with add_attention the name 'cbam_spatial'"
                if kernel_size >= 16
                else ""
            )
            raise ValueError(f"kernel_size must be odd, got {kernel_size}{hint}")
        check_choice("init", init, INITS)
        factory = {"device": device, "dtype": dtype}
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=not spatial_bn, **factory)
        self.bn = nn.BatchNorm2d(1, **factory) if spatial_bn else nn.Identity()
        self.init = init
        self.reset_gate()

    def reset_gate(self) -> None:
        """Apply ``init`` to the layer before the sigmoid (see ``INITS``): with BatchNorm its gamma,
        as the authors do, so the convolution keeps a gradient; ``reset_gates`` says when."""
        if self.init == "neutral":
            _zero(self.bn if isinstance(self.bn, nn.BatchNorm2d) else self.conv)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """The spatial map, shape ``(N, 1, H, W)``."""
        return self._conv_gate(_spatial_pool(x))

    def _conv_gate(self, pooled: torch.Tensor) -> torch.Tensor:
        return self._bn_gate(self.conv(pooled))

    def _bn_gate(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.bn(z))

    def _affine(self) -> tuple[float, float] | None:
        """``(a, b)`` with ``bn(z) == a * z + b``; None where the BatchNorm normalizes with batch
        statistics (training mode, or no running statistics)."""
        bn = self._modules["bn"]
        if isinstance(bn, nn.Identity):
            return 1.0, 0.0
        if bn.training or bn.running_var is None:
            return None
        a = torch.rsqrt(bn.running_var + bn.eps)
        if bn.affine:
            a = a * bn.weight
        b = (bn.bias if bn.affine else 0.0) - bn.running_mean * a
        return a.item(), b.item()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


class CBAM(nn.Module):
    """Channel attention followed by spatial attention, called like smp's ``SCSEModule``.

    ``impl`` picks the implementation; all give the formula's outputs and gradients (up to
    summation order), the fused ones with fewer passes over full-size tensors:

    ===============  ============================================================================
    ``impl``         input it runs on (other input: ``"auto"`` takes the next row down, an explicit
                     choice raises ``ValueError``)
    ===============  ============================================================================
    ``"kernels"``    the compiled CPU kernels (``kernels``, ``cbam_fused.Kernel*``): NCHW- or
                     channels_last-contiguous (channels_last not with a spatial BatchNorm on batch
                     statistics), non-empty float32/float64 CPU tensors, and bfloat16 ones under
                     CPU autocast with float32 parameters (autocast's numerics, as below: ``x``,
                     the output and ``x``'s gradient in bfloat16, all else in float32), once the
                     kernels are built
    ``"fused"``      eager fused ops (``cbam_fused.FusedCBAM``): 4-D NCHW or channels_last tensors on
                     any device and floating dtype; under autocast with autocast's numerics
                     (descriptors, MLP, convolution and gates in float32, output in ``x``'s dtype).
                     ``"auto"`` takes it on the CPU only: on CUDA it saves memory (a sixth of a Unet
                     step's peak) but runs slower than the formula, whose fewer, larger kernels
                     suit a GPU
    ``"reference"``  the formula with ordinary autograd (``forward_reference``): anything
    ``"auto"``       the first row that takes the input (the default)
    ===============  ============================================================================

    Every ``impl`` runs the reference where a fused path would hide what the caller wants to
    see: under TorchScript and tracing, for tensor subclasses, under ``torch.func`` transforms
    (``vmap``, ``grad``, ``jacrev``: the kernels have no batching rule and the autograd functions
    no ``vmap`` staticmethod), and while hooks sit on ``channel`` or ``spatial`` (which only the
    reference calls). Under ``torch.compile`` and
    ``torch.export``, ``"auto"`` and ``"kernels"`` put the kernels into the graph as custom
    operators (``ops``) where they take the input and the spatial gate has no BatchNorm, under
    CPU autocast too (its bfloat16 activations with float32 parameters, as in eager mode), and
    with ``inplace=True`` in a compiled no-grad graph as an operator that writes over its input;
    all else runs the reference there, as does ONNX export. Only ``"auto"`` and ``"kernels"`` ever
    build the kernels, and only for input they take (never for CUDA, meta, float16 input, or
    bfloat16 input outside autocast).

    Args:
        in_channels: channels of the input.
        reduction: MLP reduction ratio ``r``; the hidden width is ``max(in_channels // r, 1)``.
        kernel_size: odd size of the spatial convolution (7 in the paper).
        mlp_bias: biases in the shared MLP (the authors' code has them, the formula does not).
        spatial_bn: BatchNorm after the spatial convolution, as in the authors' code.
        residual: return ``CBAM(x) + x`` instead of ``CBAM(x)``.
        inplace: the output may be written over the input when no gradient is recorded
            (inference), as ``nn.ReLU(inplace=True)`` does: read the input again only as the
            output; smp's decoders build CBAM with it, since their attention inputs are fresh
            intermediates. Training always writes a new tensor.
        init: ``"default"`` (PyTorch's initialisation) or ``"neutral"``: the channel MLP's second
            layer and the spatial convolution (with ``spatial_bn``, the BatchNorm's gamma) start at
            zero, so both gates are exactly 0.5 for every input and CBAM starts as ``x / 4``
            (``1.25 x`` with ``residual``), as the authors start their spatial gate.
        impl: ``"auto"``, ``"kernels"``, ``"fused"`` or ``"reference"`` (table above).
        rd_ratio, rd_channels: timm's names for the MLP's hidden width (``in_channels * rd_ratio``
            rounded, or ``rd_channels``); either replaces ``reduction``.
        device, dtype: where and how the parameters are created, as for torch's layers.

    Built as timm's ``attn_layer`` (``CBAM(channels, device=..., dtype=...)``), e.g.
    ``timm.create_model("resnet18", block_args={"attn_layer": CBAM})``.
    """

    def __init__(
        self,
        in_channels: int,
        reduction: int = 16,
        kernel_size: int = 7,
        mlp_bias: bool = False,
        spatial_bn: bool = False,
        residual: bool = False,
        inplace: bool = False,
        init: str = "default",
        impl: str = "auto",
        *,
        rd_ratio: float | None = None,
        rd_channels: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        check_choice("impl", impl, IMPLS)
        residual, inplace = check_flag("residual", residual), check_flag("inplace", inplace)  # the others: the parts
        factory = {"device": device, "dtype": dtype}
        self.channel = ChannelAttention(
            in_channels, reduction, mlp_bias, init, rd_ratio=rd_ratio, rd_channels=rd_channels, **factory
        )
        self.spatial = SpatialAttention(kernel_size, spatial_bn, init, **factory)
        self.residual = residual
        self.inplace = inplace
        self.impl = impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.impl == "reference" or torch.jit.is_scripting() or torch.jit.is_tracing():
            return self.forward_reference(x)
        return self._forward_fused(x)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The paper's formula with ordinary autograd."""
        out = self.spatial(self.channel(x))
        return out + x if self.residual else out

    def extra_repr(self) -> str:
        return f"residual={self.residual}, inplace={self.inplace}, impl={self.impl!r}"

    @torch.jit.unused
    def _forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self._forward_captured(x)
        modules = self._modules  # submodules are always here (nn.Module.__getattr__ is a Python call)
        channel, spatial = modules["channel"], modules["spatial"]
        if (
            type(x) is not torch.Tensor
            or _functorch_active()
            or channel._forward_hooks
            or channel._forward_pre_hooks
            or spatial._forward_hooks
            or spatial._forward_pre_hooks
        ):
            return self.forward_reference(x)
        grad = torch.is_grad_enabled()
        if self.impl != "fused":  # the common calls first, in as few steps as they take
            out = (cbam_fused.eager_train if grad else cbam_fused.eager_infer)(self, channel, spatial, x)
            if out is not None:
                return out
        training = grad and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        impl = self._choose(x, training)
        if impl == "reference":
            return self.forward_reference(x)
        if x.size(1) != channel.in_channels:  # (x is 4-D here)
            check_channels(x, channel.in_channels)
        use_kernels = impl == "kernels"
        if training:
            return cbam_fused.train(self, x, use_kernels)
        if use_kernels:
            # what eager_infer did not take: the first call (before the build), a mode or transform
            affine = spatial._affine()
            if affine is not None:  # else the BatchNorm normalizes with batch statistics
                return cbam_fused.kernel_infer(self, channel, spatial, x, affine)
            with torch.no_grad():
                return cbam_fused.kernel_forward(self, x, track=False).out
        return cbam_fused.fused_infer(self, x)

    @torch.jit.unused
    def _forward_captured(self, x: torch.Tensor) -> torch.Tensor:
        """Under ``torch.compile``/``torch.export``: the kernels as custom operators (``ops``,
        visible to the graph, with their fake implementations and backward) where they take
        ``x``, else the reference. A spatial BatchNorm's statistics and the fused autograd
        functions do not go into a captured graph, so those run the reference."""
        channel, spatial = self.channel, self.spatial
        training = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        if (
            self.impl not in ("auto", "kernels")
            or torch.onnx.is_in_onnx_export()  # ONNX has no such operator: the formula's ops
            or channel._forward_hooks
            or channel._forward_pre_hooks
            or spatial._forward_hooks
            or spatial._forward_pre_hooks
            or not isinstance(spatial.bn, nn.Identity)
            or x.dim() != 4
            or x.device.type != "cpu"
            or _dtype_refusal(x, spatial.conv.weight) is not None
            # channels_last too: inductor lays convolution activations out that way
            or not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))
            or x.numel() == 0
            or not _kernels_ready()
        ):
            return self.forward_reference(x)
        check_channels(x, channel.in_channels)
        first, _, second = channel.mlp
        conv = spatial.conv
        args = (x, first.weight, first.bias, second.weight, second.bias, conv.weight, conv.bias, self.residual)
        if training:
            return ops.cbam_train(*args)[0]
        if self.inplace and not torch.compiler.is_exporting():
            # as eager mode does; an exported program keeps the functional operator, which other
            # runtimes take more readily than a mutation
            ops.cbam_infer_(*args)
            return x
        return ops.cbam_infer(*args)

    @torch.jit.unused
    def _choose(self, x: torch.Tensor, training: bool) -> str:
        """The implementation for ``x`` (``training``: with a gradient to record) by the class
        docstring's table, the one place that decides (``cbam_fused.eager_infer`` and
        ``eager_train``, tried first, take only what this sends to the kernels; the tests check
        that).
        Each property of ``x`` is read once: in a network, with cold caches, every call into torch
        costs microseconds."""
        wanted = self.impl
        refusal = None
        if x.dim() != 4:
            refusal = f"{x.dim()}-d input"
        else:
            nchw = x.is_contiguous()
            if not (nchw or x.is_contiguous(memory_format=torch.channels_last)):
                refusal = "input that is neither NCHW- nor channels_last-contiguous"
            elif wanted in ("auto", "kernels"):
                device = x.device.type
                refusal = _kernel_refusal(self, x, device, nchw, training)
                if refusal is None:
                    return "kernels"
                if wanted == "auto":
                    # off the CPU the formula's ops beat the fused path's (on CUDA at the bench's
                    # sizes, forward and backward; docs/performance.md), which pays for its fewer
                    # passes with more, smaller kernel launches
                    return "fused" if device == "cpu" else "reference"
        if refusal is None:
            return "fused"
        if wanted == "auto":
            return "reference"
        raise ValueError(f"impl={wanted!r} does not take {refusal} (impl='auto' takes anything)")


# torch.autograd.Function asks the same question before it applies a function; no public API asks it
_functorch_active: Callable[[], bool] = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)


def _autocast(device: str) -> bool:
    """Whether autocast is on for ``device`` (a device type without autocast, like meta: no)."""
    return torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)


def _dtype_refusal(x: torch.Tensor, weight: torch.Tensor) -> str | None:
    """Why the kernels do not take ``x``'s dtype, or None: float32 and float64 as they are, with or
    without autocast; bfloat16 under CPU autocast with float32 parameters (``weight``: what a
    convolution under autocast hands over; the kernels compute in float32, as autocast would).
    Outside autocast bfloat16 input with float32 parameters is an error in the formula, and a
    model cast to bfloat16 (bfloat16 parameters) runs the fused path. The one rule for eager mode
    (``_kernel_refusal``) and a captured graph."""
    dtype = x.dtype
    if dtype is torch.bfloat16:
        if not torch.is_autocast_enabled("cpu"):
            return "torch.bfloat16 input outside autocast"
        if weight.dtype is not torch.float32:
            return f"torch.bfloat16 input with {weight.dtype} parameters"
        return None
    if dtype is not torch.float32 and dtype is not torch.float64:
        return f"{dtype} input"
    return None


@torch.compiler.assume_constant_result
def _kernels_ready() -> bool:
    """``kernels.available()``, read once by a graph capture as a constant, not traced into."""
    return kernels.available()


def _kernel_refusal(cbam: CBAM, x: torch.Tensor, device: str, nchw: bool, training: bool) -> str | None:
    """Why the kernels do not take ``x`` (4-D, NCHW or channels_last; ``device``: its device type,
    which the caller reads once), or None where they do. The build is asked for last: never for
    input the kernels would not take."""
    if device != "cpu":
        return f"{device} input"
    spatial = cbam._modules["spatial"]
    refusal = _dtype_refusal(x, _fetch(spatial._modules["conv"], "weight"))
    if refusal is not None:
        return refusal
    if not nchw:
        # a spatial BatchNorm on batch statistics needs the whole map before its sigmoid: the
        # kernels then run as separate passes, which read NCHW
        if (training and not isinstance(spatial._modules["bn"], nn.Identity)) or (
            not training and spatial._affine() is None
        ):
            return "channels_last input with a spatial BatchNorm in training or on batch statistics"
    if x.numel() == 0:
        return "empty input"
    if not kernels.available():
        return "input while the kernels are not built (see the warning, or SMP_CBAM_KERNELS)"
    return None
