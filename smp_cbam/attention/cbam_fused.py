"""CBAM's fused implementations: the same outputs and gradients as the formula
(``CBAM.forward_reference``) with fewer passes over full-size tensors.

``FusedCBAM`` and ``fused_forward`` use eager torch ops (any device); ``KernelCBAM``,
``KernelBatchNormCBAM`` and ``kernel_infer`` the compiled CPU kernels (``kernels``). ``CBAM``
chooses among them (``CBAM._choose``); nothing here checks whether its input suits it, except
``eager_infer`` and ``eager_train``, which ``CBAM`` tries first: the kernels' binding checks
their input in C++ and takes only what ``CBAM._choose`` would send to the kernels (the tests
check that the two agree).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn
from torch.autograd.function import FunctionCtx, once_differentiable

from . import kernels

if TYPE_CHECKING:
    from .cbam import CBAM, ChannelAttention, SpatialAttention


# Fast paths. With g = sigmoid(MLP(mean_hw x) + MLP(max_hw x)) of shape (N,C,1,1), y = x*g,
# P = [mean_c y; max_c y], s = sigmoid(bn(conv(P))) of shape (N,1,H,W) and out = y*s (+ x):
# the forward allocates one full-size tensor, y, and scales it by s in place. The backward, with
# G = dL/dout and T = G*x its one full-size temporary, uses
#   dL/ds = sum_c T g                                   (a batched matmul)
#   dL/dP = autograd through sigmoid, bn and conv        (small)
#   dL/dg = sum_hw T s + sum_hw x dP_avg / C + x[argmax_c] dP_max    (argmax_c from y = x*g in T)
#   dL/dy = G s + dP_avg / C + dP_max scattered to argmax_c                (written into T)
#   dL/dx = g dL/dy + d_avg / HW + d_max scattered to argmax_hw (+ G)      (in place in T)
# where d_avg, d_max come from autograd through the MLP and sigmoid (small). The MLP and the
# conv/bn keep ordinary autograd graphs over small leaf tensors made in the forward, so their
# parameter gradients and BatchNorm's running statistics behave exactly as in the plain path.
# Both paths send a tied max's gradient to its first maximal element, as torch.max(dim) does;
# the eager path finds that element with cheaper ops (channel_max_indexed, channel_argmax_).
# The kernel paths compute the same in fewer passes over full-size tensors. Without gradients
# (kernel_infer): pool over H*W, then pool over C, convolve and scale one block of rows at a time
# while the block is in cache (over x itself when inplace). Training without spatial BatchNorm
# (KernelCBAM): those two passes into a new tensor; backward, dL/ds, sum_hw T s, argmax_c, dL/dP
# and sum_hw x dP_avg one block of rows at a time (G, x), then dL/dx (G -> dx); one kernel call
# each way, the MLP and the k x k convolution differentiated by hand. With spatial BatchNorm (KernelBatchNormCBAM), whose batch
# statistics need the whole convolution before the sigmoid: pool over H*W, pool over C and scale
# as three passes, the MLP and BatchNorm with autograd graphs, the convolution in the kernels
# (oneDNN is slow for 2 -> 1 channels).


def fetch(module: nn.Module, name: str) -> nn.Module | torch.Tensor | None:
    """``getattr(module, name)`` for a parameter or submodule, read from the module's tables.

    ``nn.Module.__getattr__`` runs only after Python's ordinary lookup has failed, a cost that
    adds up between a network's large ops. A name not in the tables (a pruned or parametrized
    weight) goes through ``getattr``.
    """
    for table in (module._parameters, module._modules):
        if name in table:
            return table[name]
    return getattr(module, name)


class GateState(NamedTuple):
    """A fused forward's output and, for the backward, its small intermediates: the channel
    descriptors (N, C) with the gate graph from them (made leaves) to the channel gate, the pooled
    maps, the spatial gate's graph (from ``z``, the convolution's output, where the kernels
    convolve; else from the pooled maps) and the channel max's pixel index."""

    out: torch.Tensor
    avg: torch.Tensor
    max: torch.Tensor
    channel_gate: torch.Tensor
    pooled: torch.Tensor
    z: torch.Tensor | None
    spatial_gate: torch.Tensor
    channel_index: torch.Tensor | None


def leaf_gate(gate: Callable[..., torch.Tensor], track: bool, *inputs: torch.Tensor) -> torch.Tensor:
    """``gate(*inputs)``; with ``track``, a graph from the inputs, made leaves, to the result."""
    with torch.set_grad_enabled(track):
        return gate(*(t.requires_grad_(track) for t in inputs))


def channel_max_indexed(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The max over H*W, ``(N, C)``, and its flat index, ``(N, C, 1)``: ``x.flatten(2).max(dim=2)``.

    The max over W, then the first row holding the maximum, then the first column in that row:
    the first maximal element in H*W order, which is what ``torch.max(dim)`` returns.
    """
    n, c, h, w = x.shape
    mx, row = x.amax(dim=3).max(dim=2, keepdim=True)
    cols = x.gather(2, row.unsqueeze(3).expand(n, c, 1, w)).view(n, c, w)
    return mx.view(n, c), row * w + cols.argmax(dim=2, keepdim=True)


def channel_argmax_(y: torch.Tensor, mx: torch.Tensor) -> torch.Tensor:
    """The first channel where ``y`` reaches its channel max ``mx`` (``y.max(dim=1)``'s index).

    Overwrites ``y``. Float ops only, since on CPU an indexed or bool-valued reduction over dim 1
    is 2-3x slower: mark the hits with 1.0, weight channel ``c`` by ``C - c``, take the largest.
    """
    c = y.shape[1]
    if c > 2 / torch.finfo(y.dtype).eps:  # the weights would not be exact in y's dtype
        return y.max(dim=1, keepdim=True)[1]
    rank = torch.arange(c, 0, -1, dtype=y.dtype, device=y.device).view(1, c, 1, 1)
    weights = torch.eq(y, mx, out=y).mul_(rank)
    # a NaN matches nothing: clamp keeps the index valid, the values are NaN anyway
    return (c - weights.amax(dim=1, keepdim=True).long()).clamp_(max=c - 1)


def autocast_gate_dtype(x: torch.Tensor) -> torch.dtype | None:
    """Under autocast for ``x``'s device, the dtype of the gates' computations: float32, or
    float64 for float64 input; None without autocast.

    Autocast runs convolutions and matmuls in its half-precision dtype and keeps reductions in
    float32. The gates follow the second rule throughout (pooled descriptors, MLP, spatial
    convolution, sigmoids): they are small, and the spatial gate's 2 -> 1 convolution and the
    sigmoids gain nothing in half precision. The full-size products stay in ``x``'s dtype.
    """
    device = x.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.promote_types(x.dtype, torch.float32)
    return None


def fused_forward(cbam: CBAM, x: torch.Tensor, track: bool, gate_dtype: torch.dtype | None = None) -> GateState:
    """Run under no_grad (and autocast off); with ``track`` the indices and small gate graphs for
    the backward. ``gate_dtype``: that of the descriptors, MLP, convolution and gates (default
    ``x``'s; ``autocast_gate_dtype``); ``out`` has ``x``'s dtype."""
    n, c = x.shape[:2]
    acc = gate_dtype or x.dtype
    avg = x.flatten(2).mean(dim=2, dtype=acc)
    if track:
        mx, idx_c = channel_max_indexed(x)
    else:
        mx, idx_c = x.amax(dim=(2, 3)), None
    mx = mx.to(acc)
    g_c = leaf_gate(cbam.channel._linear_gate, track, avg, mx)
    g_x = g_c.detach().to(x.dtype).view(n, c, 1, 1)
    out = x.mul_(g_x) if cbam.inplace and not track and not cbam.residual else x * g_x
    pooled = torch.cat([out.mean(dim=1, keepdim=True, dtype=acc), out.amax(dim=1, keepdim=True).to(acc)], dim=1)
    # channels_last makes oneDNN's backward of this 2 -> 1 convolution several times faster
    pooled = pooled.contiguous(memory_format=torch.channels_last)
    g_s = leaf_gate(cbam.spatial._conv_gate, track, pooled)
    out.mul_(g_s.detach().to(x.dtype))
    if cbam.residual:
        out.add_(x)
    return GateState(out, avg, mx, g_c, pooled, None, g_s, idx_c)


def fused_infer(cbam: CBAM, x: torch.Tensor) -> torch.Tensor:
    """The no-grad forward of the eager fused path, under autocast too."""
    gate_dtype = autocast_gate_dtype(x)
    with torch.no_grad(), _autocast_off(x, gate_dtype):
        return fused_forward(cbam, x, False, gate_dtype).out


def _autocast_off(x: torch.Tensor, gate_dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(x.device.type, enabled=False) if gate_dtype else contextlib.nullcontext()


def _add_at_(t: torch.Tensor, dim: int, index: torch.Tensor, src: torch.Tensor) -> None:
    """``t.scatter_add_(dim, index, src)`` for an ``index`` with one entry per slice (no repeats).

    On CPU, ``scatter_add_`` into half precision accumulates in a float32 copy of the whole of
    ``t``; with no repeated index, gather, add and scatter give the same rounding without it.
    """
    if t.dtype in (torch.bfloat16, torch.float16):
        t.scatter_(dim, index, t.gather(dim, index).add_(src))
    else:
        t.scatter_add_(dim, index, src)


class FusedCBAM(torch.autograd.Function):
    """Training on the eager fused path, for any device and floating dtype, and under autocast
    (``autocast_gate_dtype``). Small tensors meet full-size ones in the full-size dtype."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: torch.Tensor, cbam: CBAM, *params: torch.Tensor) -> torch.Tensor:
        gate_dtype = autocast_gate_dtype(x)
        with _autocast_off(x, gate_dtype):
            state = fused_forward(cbam, x, True, gate_dtype)
        ctx.save_for_backward(x, state.channel_index, *params)
        ctx.graph = state
        ctx.n_channel_params = len(list(cbam.channel.parameters()))
        ctx.residual = cbam.residual
        ctx.autocast = gate_dtype is not None
        return state.out

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> tuple:
        x = ctx.saved_tensors[0]
        with torch.autocast(x.device.type, enabled=False) if ctx.autocast else contextlib.nullcontext():
            return FusedCBAM._backward(ctx, grad)

    @staticmethod
    def _backward(ctx: FunctionCtx, grad: torch.Tensor) -> tuple:
        x, idx_c, *params = ctx.saved_tensors
        _, avg, mx, g_c, pooled, _, g_s, _ = ctx.graph
        needs = ctx.needs_input_grad[2:]
        k = ctx.n_channel_params
        n, c, h, w = x.shape
        hw = h * w
        low = x.dtype  # the full-size dtype; the gates' may be wider (autocast)
        fmt = torch.contiguous_format if x.is_contiguous() else torch.channels_last
        grad = grad.contiguous(memory_format=fmt)
        gc, gs = g_c.detach().to(low).view(n, c, 1, 1), g_s.detach().to(low)  # as the forward used them

        t = grad * x
        d_gs = torch.bmm(gc.view(n, 1, c), t.view(n, c, hw))
        d_gc = torch.bmm(t.view(n, c, hw), gs.reshape(n, hw, 1)).to(g_c.dtype)
        sp_params = [p for p, need in zip(params[k:], needs[k:]) if need]
        d_pooled, *d_sp = torch.autograd.grad(
            g_s, [pooled, *sp_params], d_gs.view_as(g_s).to(g_s.dtype), retain_graph=True
        )
        # contiguous halves: a strided broadcast operand slows full-size ops 2-4x
        d_avg_c, d_max_c = d_pooled.to(low).contiguous().split(1, dim=1)
        d_gc += torch.bmm(x.view(n, c, hw), d_avg_c.reshape(n, hw, 1)) / c
        mx_s = pooled.detach()[:, 1:].to(low).contiguous()
        idx_s = channel_argmax_(torch.mul(x, gc, out=t), mx_s)  # T is free again
        d_gc.view(n, c).scatter_add_(
            1, idx_s.reshape(n, hw), (x.gather(1, idx_s) * d_max_c).reshape(n, hw).to(d_gc.dtype)
        )
        ch_params = [p for p, need in zip(params[:k], needs[:k]) if need]
        d_avg, d_max, *d_ch = torch.autograd.grad(g_c, [avg, mx, *ch_params], d_gc.view_as(g_c), retain_graph=True)

        dx = None
        if ctx.needs_input_grad[0]:
            dx = torch.addcmul(d_avg_c / c, grad, gs, out=t)  # dL/dy, reusing T's memory
            _add_at_(dx, 1, idx_s, d_max_c)
            dx.mul_(gc).add_((d_avg.view(n, c, 1, 1) / hw).to(low))  # faster than a broadcast addcmul
            _add_at_(dx.view(n, c, hw), 2, idx_c, d_max.reshape(n, c, 1).to(low))
            if ctx.residual:
                dx.add_(grad)
        d_params = iter([*d_ch, *d_sp])
        return (dx, None, *(next(d_params) if need else None for need in needs))


def kernel_forward(cbam: CBAM, x: torch.Tensor, track: bool) -> GateState:
    """``fused_forward`` with the kernels; the gate graphs start at the pooled descriptors and
    at the spatial convolution's output (the kernels convolve, ``spatial_conv_backward``). The
    small tensors are in the kernels' compute type (float32 for bfloat16 ``x``), so the gates'
    torch ops run with autocast off, as the fused path's do."""
    with _autocast_off(x, autocast_gate_dtype(x)):
        return _kernel_forward(cbam, x, track)


def _kernel_forward(cbam: CBAM, x: torch.Tensor, track: bool) -> GateState:
    n, c, h, w = x.shape
    conv = cbam.spatial.conv
    x3 = x.view(n, c, h * w)
    avg, mx, idx_c = kernels.channel_pool(x3, track)
    g_c = leaf_gate(cbam.channel._linear_gate, track, avg, mx)
    pooled = kernels.spatial_pool(x3, g_c.detach()).view(n, 2, h, w)
    z = kernels.spatial_conv(pooled, conv.weight.detach())
    if conv.bias is not None:
        z += conv.bias.detach()
    g_s = leaf_gate(cbam.spatial._bn_gate, track, z)
    out = kernels.scale(x3, g_c.detach(), g_s.detach().reshape(n, h * w), cbam.residual)
    return GateState(out.view(n, c, h, w), avg, mx, g_c, pooled, z, g_s, idx_c)


def kernel_infer(
    cbam: CBAM, channel: ChannelAttention, spatial: SpatialAttention, x: torch.Tensor, affine: tuple[float, float]
) -> torch.Tensor:
    """The no-grad forward in one call of the kernels' operator and two passes over ``x``: its
    channel pool, then ``attend``, which pools over channels, convolves and scales row blocks while
    they are in cache (over ``x`` itself if inplace). ``affine``: the spatial BatchNorm as
    ``a z + b`` (``SpatialAttention._affine``)."""
    return kernels.cbam_infer(x, *infer_params(channel, spatial), *affine, cbam.residual, cbam.inplace)


def eager_infer(
    cbam: CBAM, channel: ChannelAttention, spatial: SpatialAttention, x: torch.Tensor
) -> torch.Tensor | None:
    """``kernel_infer`` through the kernels' direct binding (``cbam_infer_eager``), which skips the
    dispatcher; None where the binding does not take the call (a gradient to record, input the
    kernels do not take, a mode or transform that needs the dispatcher, the kernels not built yet)
    or the spatial BatchNorm normalizes with batch statistics: CBAM then chooses as for any input.
    Each step here runs between a network's large ops, with cold caches, hence the few of them."""
    module = kernels.extension()
    if module is None:
        return None
    bn = spatial._modules["bn"]
    # bn(z) = a z + b; _affine gives (1, 0) for Identity too, a call this hot path skips
    affine = (1.0, 0.0) if type(bn) is nn.Identity else spatial._affine()
    if affine is None:
        return None
    return module.cbam_infer_eager(x, *infer_params(channel, spatial), *affine, cbam.residual, cbam.inplace)


def eager_train(
    cbam: CBAM, channel: ChannelAttention, spatial: SpatialAttention, x: torch.Tensor
) -> torch.Tensor | None:
    """``KernelCBAM`` for a call with a gradient to record, decided by the kernels' binding
    (``cbam_takes``, in C++) rather than by Python's checks of the input; None where it does not
    take the call (input the kernels do not take, a mode or transform, a spatial BatchNorm, the
    kernels not built yet, nothing that records a gradient): CBAM then chooses as for any input."""
    module = kernels.extension()
    if module is None or type(spatial._modules["bn"]) is not nn.Identity:
        return None
    params = infer_params(channel, spatial)
    if not module.cbam_takes(x, *params):
        return None
    if not (x.requires_grad or any(p is not None and p.requires_grad for p in params)):
        return None
    return KernelCBAM.apply(x, cbam, *params)


def infer_params(channel: ChannelAttention, spatial: SpatialAttention) -> tuple[torch.Tensor | None, ...]:
    """The kernels' parameters: the MLP's weights and biases, then the spatial convolution's (None
    for an absent bias), read from the layers' tables, or through ``getattr`` where one is computed
    on access (a parametrization, weight norm), as ``fetch`` reads them."""
    mlp = channel._modules["mlp"]._modules
    first, second, conv = mlp["0"], mlp["2"], spatial._modules["conv"]
    try:
        p1, p2, p3 = first._parameters, second._parameters, conv._parameters
        return p1["weight"], p1["bias"], p2["weight"], p2["bias"], p3["weight"], p3["bias"]
    except KeyError:
        return tuple(getattr(layer, name) for layer in (first, second, conv) for name in ("weight", "bias"))


def train(cbam: CBAM, x: torch.Tensor, use_kernels: bool) -> torch.Tensor:
    """The forward that records CBAM's gradient: the kernels' or the fused eager one."""
    if not use_kernels:
        return FusedCBAM.apply(x, cbam, *cbam.parameters())
    if isinstance(cbam.spatial.bn, nn.Identity):
        return KernelCBAM.apply(x, cbam, *infer_params(cbam.channel, cbam.spatial))
    return KernelBatchNormCBAM.apply(x, cbam, *cbam.parameters())


class KernelCBAM(torch.autograd.Function):
    """Training without spatial BatchNorm: one kernel call forward (``cbam_train``), one backward
    (``cbam_backward``, which also differentiates the MLP and the convolution by hand).

    Its inputs after ``x`` and the module: the MLP's and the convolution's weights and biases as
    ``infer_params`` reads them (None for an absent bias; a parametrized weight as computed, so
    that its gradient flows on through the parametrization)."""

    @staticmethod
    def forward(
        ctx: FunctionCtx, x: torch.Tensor, cbam: CBAM, w1: torch.Tensor, b1: torch.Tensor | None,
        w2: torch.Tensor, b2: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
    ) -> torch.Tensor:  # fmt: skip
        saved = kernels.cbam_train(x, w1, b1, w2, b2, weight, bias, cbam.residual)
        ctx.save_for_backward(x, *saved[1:], w1, w2, weight)
        ctx.residual = cbam.residual
        return saved.out

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> tuple:
        needs_x = ctx.needs_input_grad[0]
        x, *rest, w1, w2, weight = ctx.saved_tensors
        saved = kernels.TrainForward(None, *rest)
        grads = kernels.cbam_backward(grad, x, saved, w1, w2, weight, ctx.residual, needs_x)
        # TrainGrads after x: w1, b1, w2, b2, weight, bias, the inputs' order after the module
        d_params = (d if need else None for d, need in zip(grads[1:], ctx.needs_input_grad[2:], strict=True))
        return (grads.x if needs_x else None, None, *d_params)


class KernelBatchNormCBAM(torch.autograd.Function):
    """Training with spatial BatchNorm: its batch statistics need the whole convolution before the
    sigmoid, so the kernels run as separate passes and the MLP and BatchNorm keep autograd graphs."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: torch.Tensor, cbam: CBAM, *params: torch.Tensor) -> torch.Tensor:
        state = kernel_forward(cbam, x, track=True)
        ctx.save_for_backward(x, state.channel_index, state.pooled, *params)
        ctx.graph = state
        ctx.n_channel_params = len(list(cbam.channel.parameters()))
        ctx.n_conv_params = len(list(cbam.spatial.conv.parameters()))
        ctx.residual = cbam.residual
        return state.out

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> tuple:
        # the gates' graphs were recorded with autocast off (kernel_forward): not recast here either
        with _autocast_off(grad, autocast_gate_dtype(grad)):
            return KernelBatchNormCBAM._backward(ctx, grad)

    @staticmethod
    def _backward(ctx: FunctionCtx, grad: torch.Tensor) -> tuple:
        x, idx_c, pooled, *params = ctx.saved_tensors
        _, avg, mx, g_c, _, z, g_s, _ = ctx.graph
        needs = ctx.needs_input_grad[2:]
        k, k_conv = ctx.n_channel_params, ctx.n_conv_params
        n, c, h, w = x.shape
        x3, grad = x.view(n, c, h * w), grad.contiguous().view(n, c, h * w)
        gc, gs = g_c.detach(), g_s.detach().reshape(n, h * w)

        d_gs, d_gc, idx_s, x_at = kernels.gate_grads(grad, x3, gc, gs)
        bn_params = [p for p, need in zip(params[k + k_conv :], needs[k + k_conv :]) if need]
        d_z, *d_bn = torch.autograd.grad(g_s, [z, *bn_params], d_gs.view_as(g_s), retain_graph=True)
        d_pooled, d_weight = kernels.spatial_conv_backward(d_z.contiguous(), pooled, params[k])
        d_conv = [d_weight, d_z.sum().view(1)][:k_conv]
        d_sp = [d for d, need in zip(d_conv, needs[k:]) if need] + d_bn
        d_pooled = d_pooled.view(n, 2, h * w)
        d_gc += kernels.pool_gate_grad(x3, d_pooled, idx_s, x_at)
        ch_params = [p for p, need in zip(params[:k], needs[:k]) if need]
        d_avg, d_max, *d_ch = torch.autograd.grad(g_c, [avg, mx, *ch_params], d_gc, retain_graph=True)

        dx = None
        if ctx.needs_input_grad[0]:
            dx = kernels.input_grad(grad, gc, gs, d_pooled, idx_s, d_avg, d_max, idx_c, ctx.residual).view(n, c, h, w)
        d_params = iter([*d_ch, *d_sp])
        return (dx, None, *(next(d_params) if need else None for need in needs))
