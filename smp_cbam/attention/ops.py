"""CBAM's CPU kernels as ``torch.library`` operators: ``smp_cbam::cbam_train``,
``smp_cbam::cbam_backward``, ``smp_cbam::cbam_infer`` and its in-place form ``cbam_infer_``.

Each has a schema, a fake implementation (output shapes only: used by ``torch.compile``,
``torch.export`` and the meta device, so none of them builds the kernels) and the CPU
implementation, which calls the compiled kernels (``kernels``). ``cbam_train`` has its backward
registered (``register_autograd``), so a compiled or exported graph keeps the operator and its
gradient instead of falling back to the formula; ``cbam_infer`` and ``cbam_backward`` raise if a
gradient is asked of them, and ``cbam_infer_``, a mutation, has no autograd kernel at all (a
backward through it would pass the gradient through unchanged: CBAM calls it only where no
gradient is recorded). All take channels_last input as it is (inductor's layout for convolution
activations on CPU) and give their full-size outputs in it; ``cbam_infer_`` writes over ``x``
(through a dense copy where ``x`` is neither layout).

They are defined with ``torch.library.Library`` rather than ``torch.library.custom_op``: the
latter wraps each call of every operator in Python layers of its own (a dynamo guard, an
ADInplaceOrView kernel, alias checks, an autograd kernel), and a compiled Unet calls
``cbam_infer_`` once per CBAM per forward. Here only the operators with a registered backward pass
through a Python autograd kernel.

CBAM calls these where a graph is being captured (``CBAM._forward_captured``); eager code calls
the kernels' operators (``smp_cbam_cpu``) directly, which skips the dispatch to Python altogether,
and a no-grad forward goes through their pybind11 binding (``cbam_fused.eager_infer``), which skips
the dispatcher too.
"""

from types import ModuleType

import torch
from torch import Tensor

from . import kernels


def _cpu() -> ModuleType:
    """The kernels' module, whose functions these implementations call directly: they run inside
    the dispatcher already, and a compiled graph calls them between its large ops, where a second
    trip through it (``torch.ops.smp_cbam_cpu``) costs tens of microseconds with cold caches."""
    if not kernels.available():
        raise RuntimeError("smp_cbam's CPU kernels are not built; CBAM only calls this operator where they are")
    return kernels.extension()


def _train_cpu(
    x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None, weight: Tensor, bias: Tensor | None,
    residual: bool,
) -> tuple[Tensor, ...]:  # fmt: skip
    """``kernels.cbam_train``: the output and what the backward needs (``kernels.TrainForward``)."""
    return tuple(_cpu().cbam_train(_layout(x), w1, b1, w2, b2, weight, bias, residual))


def _train_fake(x, w1, b1, w2, b2, weight, bias, residual):  # noqa: ANN001, ANN202 - the op's signature
    n, c, h, w = x.shape
    hidden = w1.shape[0]
    small = _compute_dtype(x)
    return (
        torch.empty_like(_layout(x)),  # the kernels' empty_like of what they read
        x.new_empty(2 * n, c, dtype=small),
        x.new_empty(2 * n, hidden, dtype=small),
        x.new_empty(n, c, dtype=small),
        x.new_empty(n, c, dtype=torch.long),
        x.new_empty(n, h * w, dtype=small),
        x.new_empty(n, 2, h, w, dtype=small),
    )


def _backward_cpu(
    grad: Tensor, x: Tensor, descriptors: Tensor, hidden: Tensor, channel_gate: Tensor, channel_index: Tensor,
    spatial_gate: Tensor, pooled: Tensor, w1: Tensor, w2: Tensor, weight: Tensor, residual: bool,
) -> tuple[Tensor, ...]:  # fmt: skip
    """``kernels.cbam_backward``: ``kernels.TrainGrads`` (dx always computed here, in ``x``'s layout;
    ``grad`` in any)."""
    return tuple(_cpu().cbam_backward(
        grad, _layout(x), descriptors, hidden, channel_gate, channel_index, spatial_gate, pooled, w1, w2, weight,
        residual, True,
    ))  # fmt: skip


def _backward_fake(
    grad, x, descriptors, hidden, channel_gate, channel_index, spatial_gate, pooled, w1, w2, weight, residual
):  # noqa: ANN001, ANN202
    c, n_hidden = x.shape[1], hidden.shape[1]
    return (
        torch.empty_like(x, memory_format=_memory_format(x)),
        w1.new_empty(w1.shape),
        w1.new_empty(n_hidden),
        w2.new_empty(w2.shape),
        w2.new_empty(c),
        weight.new_empty(weight.shape),
        weight.new_empty(1),
    )


def _setup_train(ctx, inputs, output) -> None:  # noqa: ANN001 - register_autograd's signature
    x, w1, b1, w2, b2, weight, bias, residual = inputs
    ctx.save_for_backward(x, *output[1:], w1, w2, weight)
    ctx.residual = residual
    ctx.has_bias = (b1 is not None, b2 is not None, bias is not None)


def _train_backward(ctx, grad, *unused):  # noqa: ANN001, ANN202 - register_autograd's signature
    x, descriptors, hidden, g, index, s, pooled, w1, w2, weight = ctx.saved_tensors
    dx, dw1, db1, dw2, db2, dweight, dbias = cbam_backward(
        grad, x, descriptors, hidden, g, index, s, pooled, w1, w2, weight, ctx.residual
    )
    has_b1, has_b2, has_bias = ctx.has_bias
    return (
        dx, dw1, db1 if has_b1 else None, dw2, db2 if has_b2 else None, dweight, dbias if has_bias else None, None
    )  # fmt: skip


def _infer_cpu(
    x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None, weight: Tensor, bias: Tensor | None,
    residual: bool,
) -> Tensor:  # fmt: skip
    """``kernels.cbam_infer`` without spatial BatchNorm, into a new tensor of ``x``'s layout (NCHW or
    channels_last; any other strides are made NCHW)."""
    return _cpu().cbam_infer(_layout(x), w1, b1, w2, b2, weight, bias, 1.0, 0.0, residual, False)


def _infer_fake(x, w1, b1, w2, b2, weight, bias, residual):  # noqa: ANN001, ANN202
    return torch.empty_like(_layout(x))


# CBAM(inplace=True) (smp's decoders) under torch.compile: the kernel written over x, as in eager
# mode. Inductor's re-inplacing lets it write into the activation buffer when nothing else reads it,
# so the graph allocates (and, with glibc's defaults, faults in) no output for each CBAM; where x is
# read again, functionalization keeps the mutation's order, so x reads as the output, as in eager
# mode's kernel path. The kernel bumps x's version counter, as any in-place op does.
def _infer_inplace_cpu(
    x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None, weight: Tensor, bias: Tensor | None,
    residual: bool,
) -> None:  # fmt: skip
    """``cbam_infer`` over ``x``: in place where ``x`` is NCHW- or channels_last-contiguous, else
    (strides a graph may choose under ``flexible_layout``) into a dense copy written back."""
    module = _cpu()
    dense = _layout(x)
    if dense is x:
        module.cbam_infer(x, w1, b1, w2, b2, weight, bias, 1.0, 0.0, residual, True)
    else:
        x.copy_(module.cbam_infer(dense, w1, b1, w2, b2, weight, bias, 1.0, 0.0, residual, False))


def _infer_inplace_fake(x, w1, b1, w2, b2, weight, bias, residual):  # noqa: ANN001, ANN202
    return None


def _no_gradient(name: str):  # noqa: ANN202
    def backward(ctx, *grads):  # noqa: ANN001, ANN202, ARG001 - register_autograd's signature
        raise RuntimeError(f"smp_cbam::{name} has no gradient: CBAM calls smp_cbam::cbam_train where one is recorded")

    return backward


_PARAMS = "Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, Tensor weight, Tensor? bias, bool residual"


def _register(lib: torch.library.Library) -> None:
    # flexible_layout: inductor may hand over channels_last input (its layout for convolution
    # activations on CPU), which the kernels take as it is, returning the same layout; with the
    # default constraint inductor would copy into NCHW before every CBAM and back after it
    tags = (torch.Tag.flexible_layout,)
    outputs = "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
    lib.define(f"cbam_train(Tensor x, {_PARAMS}) -> {outputs}", tags=tags)
    lib.define(
        "cbam_backward(Tensor grad, Tensor x, Tensor descriptors, Tensor hidden, Tensor channel_gate, "
        "Tensor channel_index, Tensor spatial_gate, Tensor pooled, Tensor w1, Tensor w2, Tensor weight, "
        f"bool residual) -> {outputs}",
        tags=tags,
    )
    lib.define(f"cbam_infer(Tensor x, {_PARAMS}) -> Tensor", tags=tags)
    lib.define(f"cbam_infer_(Tensor(a!) x, {_PARAMS}) -> ()", tags=tags)
    for name, cpu, fake in (
        ("cbam_train", _train_cpu, _train_fake),
        ("cbam_backward", _backward_cpu, _backward_fake),
        ("cbam_infer", _infer_cpu, _infer_fake),
        ("cbam_infer_", _infer_inplace_cpu, _infer_inplace_fake),
    ):
        lib.impl(name, cpu, "CPU")
        torch.library.register_fake(f"smp_cbam::{name}", fake, lib=lib)
    torch.library.register_autograd("smp_cbam::cbam_train", _train_backward, setup_context=_setup_train, lib=lib)
    torch.library.register_autograd("smp_cbam::cbam_backward", _no_gradient("cbam_backward"), lib=lib)
    torch.library.register_autograd("smp_cbam::cbam_infer", _no_gradient("cbam_infer"), lib=lib)


# importlib.reload runs this module again while its first Library still holds the namespace
# (torch refuses a second "DEF"): the first registrations stay, and their functions read this
# module's globals, which reload refreshes
if "_LIB" not in globals():
    _LIB = torch.library.Library("smp_cbam", "DEF")
    _register(_LIB)

cbam_train = torch.ops.smp_cbam.cbam_train.default
cbam_backward = torch.ops.smp_cbam.cbam_backward.default
cbam_infer = torch.ops.smp_cbam.cbam_infer.default
cbam_infer_ = torch.ops.smp_cbam.cbam_infer_.default


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The kernels' dtype for everything but the full-size tensors: float32 for bfloat16 ``x``
    (what autocast hands over; autocast's numerics), else ``x``'s."""
    return torch.float32 if x.dtype == torch.bfloat16 else x.dtype


def _channels_last(x: Tensor) -> bool:
    """Channels_last- and not NCHW-contiguous (a tensor that is both, e.g. C = 1, counts as NCHW)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _memory_format(x: Tensor) -> torch.memory_format:
    """The layout the kernels give their full-size outputs for input ``x``."""
    return torch.channels_last if _channels_last(x) else torch.contiguous_format


def _layout(x: Tensor) -> Tensor:
    """``x`` as the kernels take it: channels_last as it is, any other strides made NCHW."""
    return x if _channels_last(x) else x.contiguous()
