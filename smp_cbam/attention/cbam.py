"""CBAM: Convolutional Block Attention Module (Woo et al., ECCV 2018, arXiv:1807.06521).

``CBAM(x) = S(C(x))`` where

* channel attention ``C(x) = x * sigmoid(MLP(avgpool(x)) + MLP(maxpool(x)))`` with one MLP
  ``C -> C/r -> C`` (ReLU) shared by both pooled descriptors, and
* spatial attention ``S(y) = y * sigmoid(conv_kxk([mean_c(y); max_c(y)]))`` with a
  ``2 -> 1`` convolution padded to keep the size.

The defaults follow the paper's formula; ``mlp_bias``, ``spatial_bn`` (the authors' code puts a
BatchNorm after the spatial convolution) and ``residual`` (``output + input``) select the variants
found in published implementations.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import FunctionCtx, once_differentiable

from . import kernels
from .checks import check_channels, check_positive


def _fetch(module: nn.Module, name: str) -> nn.Module | torch.Tensor | None:
    """``getattr(module, name)`` for a parameter or submodule, read from the module's tables.

    ``nn.Module.__getattr__`` runs only after Python's ordinary lookup has failed: about 1 us per
    name, several times that between a network's large ops. A name not in the tables (a pruned or
    parametrized weight) goes through ``getattr``.
    """
    for table in (module._parameters, module._modules):
        if name in table:
            return table[name]
    return getattr(module, name)


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

    def __init__(self, in_channels: int, reduction: int = 16, mlp_bias: bool = False):
        super().__init__()
        check_positive("in_channels", in_channels)
        check_positive("reduction", reduction)
        self.in_channels = in_channels
        hidden = max(in_channels // reduction, 1)
        self.mlp = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, bias=mlp_bias),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, in_channels, 1, bias=mlp_bias),
        )

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

    def __init__(self, kernel_size: int = 7, spatial_bn: bool = False):
        super().__init__()
        check_positive("kernel_size", kernel_size)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=not spatial_bn)
        self.bn = nn.BatchNorm2d(1) if spatial_bn else nn.Identity()

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
        bn = _fetch(self, "bn")
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

    The forward runs a fused implementation that gives the plain formula's outputs and gradients
    with fewer passes over full-size tensors: compiled CPU kernels (``_KernelCBAM``, see
    ``smp_cbam.kernels``) for contiguous float32/float64 CPU input, eager ops (``_FastCBAM``)
    otherwise or when ``kernels`` is set to False. It falls back to the plain formula
    (``forward_plain``) under TorchScript, tracing, ``torch.compile``/``torch.export``, autocast,
    tensor subclasses, hooks on ``channel``/``spatial``, or when ``fast`` is set to False.

    Args:
        in_channels: channels of the input.
        reduction: MLP reduction ratio ``r``; the hidden width is ``max(in_channels // r, 1)``.
        kernel_size: odd size of the spatial convolution (7 in the paper).
        mlp_bias: biases in the shared MLP (the authors' code has them, the formula does not).
        spatial_bn: BatchNorm after the spatial convolution, as in the authors' code.
        residual: return ``CBAM(x) + x`` instead of ``CBAM(x)``.
        inplace: write the output over the input when no gradient is recorded (inference), as
            ``nn.ReLU(inplace=True)`` does; smp's decoders build CBAM with it, since their
            attention inputs are fresh intermediates. Training always writes a new tensor.
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
    ):
        super().__init__()
        self.channel = ChannelAttention(in_channels, reduction, mlp_bias)
        self.spatial = SpatialAttention(kernel_size, spatial_bn)
        self.residual = residual
        self.inplace = inplace
        self.fast = True
        self.kernels = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast and not torch.jit.is_scripting() and not torch.jit.is_tracing():
            return self._forward_fast(x)
        return self.forward_plain(x)

    def forward_plain(self, x: torch.Tensor) -> torch.Tensor:
        """The paper's formula with ordinary autograd."""
        out = self.spatial(self.channel(x))
        return out + x if self.residual else out

    @torch.jit.unused
    def _forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        channel, spatial = _fetch(self, "channel"), _fetch(self, "spatial")
        if (
            torch.compiler.is_compiling()
            or type(x) is not torch.Tensor
            or channel._forward_hooks
            or channel._forward_pre_hooks
            or spatial._forward_hooks
            or spatial._forward_pre_hooks
        ):
            return self.forward_plain(x)
        train = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        if not train and self.kernels and kernels.available():
            out = _kernel_infer(self, channel, spatial, x)
            if out is not None:
                return out
        path = self._fast_path(x)
        if path is None:
            return self.forward_plain(x)
        check_channels(x, channel.in_channels)
        use_kernels = path == "kernels"
        if train:
            return _training_function(self, use_kernels).apply(x, self, *self.parameters())
        with torch.no_grad():
            return (_kernel_forward if use_kernels else _fused_forward)(self, x, track=False)[0]

    @torch.jit.unused
    def _fast_path(self, x: torch.Tensor) -> str | None:
        """``"kernels"``, ``"eager"``, or None where the plain formula must run, by the dimensions,
        layout, device and dtype of ``x``, and autocast. Each property of ``x`` is read once: in a
        network, with cold caches, every call into torch costs microseconds."""
        if x.dim() != 4:
            return None
        nchw = x.is_contiguous()
        if not (nchw or x.is_contiguous(memory_format=torch.channels_last)):
            return None
        device = x.device.type
        if torch.is_autocast_enabled(device):
            return None
        kernels_apply = (
            self.kernels
            and nchw
            and device == "cpu"
            and x.dtype in (torch.float32, torch.float64)
            and x.numel() > 0
            and kernels.available()
        )
        return "kernels" if kernels_apply else "eager"


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
# the eager path finds that element with cheaper ops (_channel_max_indexed, _channel_argmax_).
# The kernel paths compute the same in fewer passes over full-size tensors. Without gradients
# (_kernel_infer): pool over H*W, then pool over C, convolve and scale one block of rows at a time
# while the block is in cache (over x itself when inplace). Training without spatial BatchNorm
# (_KernelCBAM): those two passes into a new tensor; backward, dL/ds, sum_hw T s, argmax_c, dL/dP
# and sum_hw x dP_avg one block of rows at a time (G, x), then dL/dx (G -> dx); one kernel call
# each way, the MLP and the k x k convolution differentiated by hand. With spatial BatchNorm (_KernelBatchNormCBAM), whose batch
# statistics need the whole convolution before the sigmoid: pool over H*W, pool over C and scale
# as three passes, the MLP and BatchNorm with autograd graphs, the convolution in the kernels
# (oneDNN is slow for 2 -> 1 channels).


def _leaf_gate(gate: Callable[..., torch.Tensor], track: bool, *inputs: torch.Tensor) -> torch.Tensor:
    """``gate(*inputs)``; with ``track``, a graph from the inputs, made leaves, to the result."""
    with torch.set_grad_enabled(track):
        return gate(*(t.requires_grad_(track) for t in inputs))


def _channel_max_indexed(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The max over H*W, ``(N, C)``, and its flat index, ``(N, C, 1)``: ``x.flatten(2).max(dim=2)``.

    The max over W, then the first row holding the maximum, then the first column in that row:
    the first maximal element in H*W order, which is what ``torch.max(dim)`` returns.
    """
    n, c, h, w = x.shape
    mx, row = x.amax(dim=3).max(dim=2, keepdim=True)
    cols = x.gather(2, row.unsqueeze(3).expand(n, c, 1, w)).view(n, c, w)
    return mx.view(n, c), row * w + cols.argmax(dim=2, keepdim=True)


def _channel_argmax_(y: torch.Tensor, mx: torch.Tensor) -> torch.Tensor:
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


def _fused_forward(cbam: CBAM, x: torch.Tensor, track: bool) -> tuple[torch.Tensor, tuple]:
    """Run under no_grad; with ``track`` the indices and small gate graphs for the backward."""
    n, c = x.shape[:2]
    avg = x.flatten(2).mean(dim=2)
    if track:
        mx, idx_c = _channel_max_indexed(x)
    else:
        mx, idx_c = x.amax(dim=(2, 3)), None
    g_c = _leaf_gate(cbam.channel._linear_gate, track, avg, mx)
    if cbam.inplace and not track and not cbam.residual:
        out = x.mul_(g_c.view(n, c, 1, 1))
    else:
        out = x * g_c.detach().view(n, c, 1, 1)
    pooled = torch.cat([out.mean(dim=1, keepdim=True), out.amax(dim=1, keepdim=True)], dim=1)
    # channels_last makes oneDNN's backward of this 2 -> 1 convolution several times faster
    pooled = pooled.contiguous(memory_format=torch.channels_last)
    g_s = _leaf_gate(cbam.spatial._conv_gate, track, pooled)
    out.mul_(g_s)
    if cbam.residual:
        out.add_(x)
    return out, (avg, mx, g_c, pooled, g_s, idx_c)


class _FastCBAM(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, x: torch.Tensor, cbam: CBAM, *params: torch.Tensor) -> torch.Tensor:
        out, (avg, mx, g_c, pooled, g_s, idx_c) = _fused_forward(cbam, x, track=True)
        ctx.save_for_backward(x, idx_c, *params)
        ctx.graph = (avg, mx, g_c, pooled, g_s)
        ctx.n_channel_params = len(list(cbam.channel.parameters()))
        ctx.residual = cbam.residual
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> tuple:
        x, idx_c, *params = ctx.saved_tensors
        avg, mx, g_c, pooled, g_s = ctx.graph
        needs = ctx.needs_input_grad[2:]
        k = ctx.n_channel_params
        n, c, h, w = x.shape
        hw = h * w
        fmt = torch.contiguous_format if x.is_contiguous() else torch.channels_last
        grad = grad.contiguous(memory_format=fmt)
        gc, gs = g_c.detach().view(n, c, 1, 1), g_s.detach()

        t = grad * x
        d_gs = torch.bmm(gc.view(n, 1, c), t.view(n, c, hw))
        d_gc = torch.bmm(t.view(n, c, hw), gs.reshape(n, hw, 1))
        sp_params = [p for p, need in zip(params[k:], needs[k:]) if need]
        d_pooled, *d_sp = torch.autograd.grad(
            g_s, [pooled, *sp_params], d_gs.view_as(g_s), retain_graph=True
        )
        # contiguous halves: a strided broadcast operand slows full-size ops 2-4x
        d_avg_c, d_max_c = d_pooled.contiguous().split(1, dim=1)
        d_gc += torch.bmm(x.view(n, c, hw), d_avg_c.reshape(n, hw, 1)) / c
        mx_s = pooled.detach()[:, 1:].contiguous()
        idx_s = _channel_argmax_(torch.mul(x, gc, out=t), mx_s)  # T is free again
        d_gc.view(n, c).scatter_add_(
            1, idx_s.reshape(n, hw), (x.gather(1, idx_s) * d_max_c).reshape(n, hw)
        )
        ch_params = [p for p, need in zip(params[:k], needs[:k]) if need]
        d_avg, d_max, *d_ch = torch.autograd.grad(
            g_c, [avg, mx, *ch_params], d_gc.view_as(g_c), retain_graph=True
        )

        dx = None
        if ctx.needs_input_grad[0]:
            dx = torch.addcmul(d_avg_c / c, grad, gs, out=t)  # dL/dy, reusing T's memory
            dx.scatter_add_(1, idx_s, d_max_c)
            dx.mul_(gc).add_(d_avg.view(n, c, 1, 1) / hw)  # faster than a broadcast addcmul
            dx.view(n, c, hw).scatter_add_(2, idx_c, d_max.reshape(n, c, 1))
            if ctx.residual:
                dx.add_(grad)
        d_params = iter([*d_ch, *d_sp])
        return (dx, None, *(next(d_params) if need else None for need in needs))


def _kernel_forward(cbam: CBAM, x: torch.Tensor, track: bool) -> tuple[torch.Tensor, tuple]:
    """``_fused_forward`` with the kernels; the gate graphs start at the pooled descriptors and
    at the spatial convolution's output (the kernels convolve, ``spatial_conv_backward``)."""
    n, c, h, w = x.shape
    ops, conv = torch.ops.smp_cbam, cbam.spatial.conv
    x3 = x.view(n, c, h * w)
    avg, mx, idx_c = ops.channel_pool(x3, track)
    g_c = _leaf_gate(cbam.channel._linear_gate, track, avg, mx)
    pooled = ops.spatial_pool(x3, g_c.detach()).view(n, 2, h, w)
    z = ops.spatial_conv(pooled, conv.weight.detach())
    if conv.bias is not None:
        z += conv.bias.detach()
    g_s = _leaf_gate(cbam.spatial._bn_gate, track, z)
    out = ops.scale(x3, g_c.detach(), g_s.detach().reshape(n, h * w), cbam.residual)
    return out.view(n, c, h, w), (avg, mx, g_c, pooled, z, g_s, idx_c)


def _kernel_infer(
    cbam: CBAM, channel: ChannelAttention, spatial: SpatialAttention, x: torch.Tensor
) -> torch.Tensor | None:
    """The no-grad forward in one call and two passes over ``x``: its channel pool, then
    ``attend``, which pools over channels, convolves and scales row blocks while they are in cache
    (over ``x`` itself if inplace). None where the BatchNorm normalizes with batch statistics, or
    where the kernels do not take ``x`` (``cbam_infer`` says which)."""
    affine = spatial._affine()
    if affine is None:
        return None
    first, _, second = _fetch(channel, "mlp")
    conv = _fetch(spatial, "conv")
    return torch.ops.smp_cbam.cbam_infer(
        x, _fetch(first, "weight"), _fetch(first, "bias"), _fetch(second, "weight"), _fetch(second, "bias"),
        _fetch(conv, "weight"), _fetch(conv, "bias"), *affine, cbam.residual, cbam.inplace,
    )  # fmt: skip


def _training_function(cbam: CBAM, use_kernels: bool) -> type[torch.autograd.Function]:
    if not use_kernels:
        return _FastCBAM
    return _KernelCBAM if isinstance(cbam.spatial.bn, nn.Identity) else _KernelBatchNormCBAM


class _KernelCBAM(torch.autograd.Function):
    """Training without spatial BatchNorm: one kernel call forward (``cbam_train``), one backward
    (``cbam_backward``, which also differentiates the MLP and the convolution by hand)."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: torch.Tensor, cbam: CBAM, *params: torch.Tensor) -> torch.Tensor:
        first, _, second = cbam.channel.mlp
        conv = cbam.spatial.conv
        out, *saved = torch.ops.smp_cbam.cbam_train(
            x, first.weight, first.bias, second.weight, second.bias, conv.weight, conv.bias, cbam.residual
        )
        ctx.save_for_backward(x, *saved, first.weight, second.weight, conv.weight)
        # which of the kernel's gradients [w1, b1, w2, b2, weight, bias] are parameters
        ctx.present = (True, first.bias is not None, True, second.bias is not None, True, conv.bias is not None)
        ctx.residual = cbam.residual
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> tuple:
        needs_x = ctx.needs_input_grad[0]
        dx, *grads = torch.ops.smp_cbam.cbam_backward(grad, *ctx.saved_tensors, ctx.residual, needs_x)
        d_params = [d for d, present in zip(grads, ctx.present, strict=True) if present]
        needs = ctx.needs_input_grad[2:]
        return (dx if needs_x else None, None, *(d if need else None for d, need in zip(d_params, needs)))


class _KernelBatchNormCBAM(torch.autograd.Function):
    """Training with spatial BatchNorm: its batch statistics need the whole convolution before the
    sigmoid, so the kernels run as separate passes and the MLP and BatchNorm keep autograd graphs."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: torch.Tensor, cbam: CBAM, *params: torch.Tensor) -> torch.Tensor:
        out, (avg, mx, g_c, pooled, z, g_s, idx_c) = _kernel_forward(cbam, x, track=True)
        ctx.save_for_backward(x, idx_c, pooled, *params)
        ctx.graph = (avg, mx, g_c, z, g_s)
        ctx.n_channel_params = len(list(cbam.channel.parameters()))
        ctx.n_conv_params = len(list(cbam.spatial.conv.parameters()))
        ctx.residual = cbam.residual
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> tuple:
        x, idx_c, pooled, *params = ctx.saved_tensors
        avg, mx, g_c, z, g_s = ctx.graph
        needs = ctx.needs_input_grad[2:]
        k, k_conv = ctx.n_channel_params, ctx.n_conv_params
        n, c, h, w = x.shape
        ops = torch.ops.smp_cbam
        x3, grad = x.view(n, c, h * w), grad.contiguous().view(n, c, h * w)
        gc, gs = g_c.detach(), g_s.detach().reshape(n, h * w)

        d_gs, d_gc, idx_s, x_at = ops.gate_grads(grad, x3, gc, gs)
        bn_params = [p for p, need in zip(params[k + k_conv :], needs[k + k_conv :]) if need]
        d_z, *d_bn = torch.autograd.grad(g_s, [z, *bn_params], d_gs.view_as(g_s), retain_graph=True)
        d_pooled, d_weight = ops.spatial_conv_backward(d_z.contiguous(), pooled, params[k])
        d_conv = [d_weight, d_z.sum().view(1)][:k_conv]
        d_sp = [d for d, need in zip(d_conv, needs[k:]) if need] + d_bn
        d_pooled = d_pooled.view(n, 2, h * w)
        d_gc += ops.pool_gate_grad(x3, d_pooled, idx_s, x_at)
        ch_params = [p for p, need in zip(params[:k], needs[:k]) if need]
        d_avg, d_max, *d_ch = torch.autograd.grad(
            g_c, [avg, mx, *ch_params], d_gc, retain_graph=True
        )

        dx = None
        if ctx.needs_input_grad[0]:
            dx = ops.input_grad(
                grad, gc, gs, d_pooled, idx_s, d_avg, d_max, idx_c, ctx.residual
            ).view(n, c, h, w)
        d_params = iter([*d_ch, *d_sp])
        return (dx, None, *(next(d_params) if need else None for need in needs))
