"""The compiled CPU kernels, each against its formula in torch ops, and their build fallback."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from smp_cbam import CBAM
from smp_cbam.attention import kernels

pytestmark = pytest.mark.skipif(
    os.environ.get("SMP_CBAM_KERNELS") == "0", reason="kernels disabled by SMP_CBAM_KERNELS=0"
)
# hw: below one vector of lanes, not a multiple of it, above a chunk/tile (1024 in the source)
SHAPES = [(2, 3, 5), (2, 7, 37), (1, 4, 2500)]


@pytest.fixture(scope="module")
def ops() -> object:
    assert kernels.available()
    return torch.ops.smp_cbam_cpu


def _tied(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Small integers, so that maxima tie often."""
    return torch.randint(-4, 5, shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to summation order: relative to the largest magnitude (sums may cancel)."""
    rtol = 1e-5 if expected.dtype == torch.float32 else 1e-12
    atol = rtol * expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def _acc(dtype: torch.dtype) -> torch.dtype:
    """The kernels' compute type, that of every small tensor: float32 for bf16 input."""
    return torch.float32 if dtype == torch.bfloat16 else dtype


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_channel_pool(ops: object, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    x = _tied(shape, dtype)
    x[0, 0, -1] = float("nan")  # the max is the NaN, its index the NaN's
    x[0, 1, shape[2] // 2] = float("nan")  # mid-row: found through the sum, not the vector max
    x[-1, -1] = float("inf")
    x[-1, -1, 1::2] = -float("inf")  # mean NaN from inf - inf, but no NaN element: max is inf
    mean, mx, idx = ops.channel_pool(x, True)
    assert mean.dtype == mx.dtype == _acc(dtype)
    x = x.to(_acc(dtype))  # exact
    ref = x.max(dim=2)
    torch.testing.assert_close(mean, x.mean(dim=2), equal_nan=True)
    torch.testing.assert_close(mx, ref.values, equal_nan=True, rtol=0, atol=0)
    assert torch.equal(idx, ref.indices)
    assert ops.channel_pool(x, False)[2] is None


@pytest.mark.parametrize("shape", [*SHAPES, (2, 300, 1100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_spatial_pool_and_gate_grads(ops: object, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """x and G in ``dtype``, the gates and all results in the compute type."""
    n, c, hw = shape
    acc = _acc(dtype)
    x_low = _tied(shape, dtype)
    x_low[0, :, 0] = 3  # every channel ties at one pixel
    g = torch.rand(n, c, dtype=acc)
    g[:, ::2] = 0.5  # equal weights keep ties in y = x g
    s = torch.rand(n, hw, dtype=acc)
    grad_low = torch.randn(shape).to(dtype)
    x, grad = x_low.to(acc), grad_low.to(acc)  # exact
    y = x * g[:, :, None]
    ref = y.max(dim=1)
    pooled = ops.spatial_pool(x_low, g)
    assert pooled.dtype == acc
    _close(pooled[:, 0], y.mean(dim=1))
    assert torch.equal(pooled[:, 1], ref.values)
    d_s, d_g, idx, x_at = ops.gate_grads(grad_low, x_low, g, s)
    assert idx.dtype == d_s.dtype == d_g.dtype == x_at.dtype == acc
    idx = idx.long()
    assert torch.equal(idx, ref.indices)
    assert torch.equal(x_at, x.gather(1, idx[:, None]).squeeze(1))
    _close(d_s, (grad * y).sum(dim=1))
    _close(d_g, (grad * x * s[:, None]).sum(dim=2))


@pytest.mark.parametrize("c", [3, 4, 9])  # channels one at a time, four at a time, both
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_spatial_pool_max_keeps_nan_like_torch(ops: object, c: int, dtype: torch.dtype) -> None:
    """A NaN among y = x g is the max, in a vector lane or the tail, in the first or a later
    channel, from x itself or from inf * 0; inf and -inf without a NaN give inf."""
    n, hw = 2, 37
    x = torch.randn(n, c, hw).to(dtype)
    g = torch.rand(n, c, dtype=_acc(dtype)) + 0.1
    x[0, 0, 3] = float("nan")  # first channel, a vector lane
    x[0, c - 1, 35] = float("nan")  # last channel, the tail
    x[1, c // 2, 5] = float("inf")
    g[1, c // 2] = 0  # inf * 0 = NaN in y only
    x[1, 0, 20], x[1, c - 1, 20] = float("inf"), -float("inf")  # the sum NaN, the max inf
    y = x.to(_acc(dtype)) * g[:, :, None]
    pooled = ops.spatial_pool(x, g)
    torch.testing.assert_close(pooled[:, 1], y.max(dim=1).values, equal_nan=True, rtol=0, atol=0)
    assert pooled[1, 1, 20] == float("inf") and pooled[0, 1, 3].isnan() and pooled[1, 1, 5].isnan()


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scale_rounds_like_the_formula(ops: object, residual: bool, dtype: torch.dtype) -> None:
    """In float32, then (for bf16 x) one rounding to bf16."""
    x, g, s = torch.randn(2, 5, 37).to(dtype), torch.rand(2, 5), torch.rand(2, 37)
    expected = x.float() * g[:, :, None] * s[:, None]
    expected = expected + x.float() if residual else expected
    out = ops.scale(x, g, s, residual)
    assert out.dtype == dtype and torch.equal(out, expected.to(dtype))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("residual", [False, True])
def test_backward_passes(ops: object, shape: tuple[int, ...], residual: bool) -> None:
    _backward_passes(ops, shape, residual, torch.float64)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("residual", [False, True])
def test_backward_passes_bf16(ops: object, shape: tuple[int, ...], residual: bool) -> None:
    """x and G in bf16, the rest in float32: dL/dg in float32, dL/dx within one bf16 rounding."""
    _backward_passes(ops, shape, residual, torch.bfloat16)


def _backward_passes(ops: object, shape: tuple[int, ...], residual: bool, dtype: torch.dtype) -> None:
    n, c, hw = shape
    torch.manual_seed(0)
    x, grad = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    g, s = torch.rand(n, c, dtype=torch.float64), torch.rand(n, hw, dtype=torch.float64)
    d_pooled = torch.randn(n, 2, hw, dtype=torch.float64)
    d_avg, d_max = torch.randn(n, c, dtype=torch.float64), torch.randn(n, c, dtype=torch.float64)
    idx_s = torch.randint(0, c, (n, hw))
    idx_c = torch.randint(0, hw, (n, c))
    x_at = x.gather(1, idx_s[:, None]).squeeze(1)
    at_s = torch.zeros(shape, dtype=torch.float64).scatter_(1, idx_s[:, None], 1.0)
    at_c = torch.zeros(shape, dtype=torch.float64).scatter_(2, idx_c[:, :, None], 1.0)

    if dtype == torch.bfloat16:  # the values the kernels see, exactly, and their small operands
        x, grad = x.bfloat16().double(), grad.bfloat16().double()
        g, s, d_pooled, d_avg, d_max = (t.float().double() for t in (g, s, d_pooled, d_avg, d_max))
        x_at = x.gather(1, idx_s[:, None]).squeeze(1)
    acc = _acc(dtype)

    def run(t: torch.Tensor, full_size: bool = False) -> torch.Tensor:
        return t.to(dtype if full_size else acc)

    expected = (x * d_pooled[:, :1]).sum(dim=2) / c + (x * at_s * d_pooled[:, 1:]).sum(dim=2)
    d_g = ops.pool_gate_grad(run(x, True), run(d_pooled), run(idx_s), run(x_at))
    assert d_g.dtype == acc
    _close(d_g, expected.to(acc))

    d_y = grad * s[:, None] + d_pooled[:, :1] / c + at_s * d_pooled[:, 1:]
    expected = d_y * g[:, :, None] + d_avg[:, :, None] / hw + at_c * d_max[:, :, None]
    expected = expected + grad if residual else expected
    dx = ops.input_grad(
        run(grad, True), run(g), run(s), run(d_pooled), run(idx_s), run(d_avg), run(d_max), idx_c, residual
    )
    assert dx.dtype == dtype
    if dtype == torch.bfloat16:
        err = ((dx.double() - expected).norm() / expected.norm()).item()
        assert err <= 2**-8, f"relative error {err:.3g}"
    else:
        _close(dx, expected)


@pytest.mark.parametrize("kernel_size", [1, 3, 7])
@pytest.mark.parametrize("size", [(5, 3), (9, 70)])  # narrower than the kernel; wider than a block
def test_spatial_conv_and_its_backward(ops: object, kernel_size: int, size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    pooled = torch.randn(3, 2, *size, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(1, 2, kernel_size, kernel_size, dtype=torch.float64, requires_grad=True)
    z = torch.nn.functional.conv2d(pooled, weight, padding=kernel_size // 2)
    d_z = torch.randn_like(z)
    expected = torch.autograd.grad(z, [pooled, weight], d_z)
    _close(ops.spatial_conv(pooled.detach(), weight.detach()), z.detach())
    for actual, wanted in zip(ops.spatial_conv_backward(d_z, pooled.detach(), weight.detach()), expected):
        _close(actual, wanted)


def test_bad_input_names_the_argument(ops: object) -> None:
    x = torch.randn(2, 4, 6)
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        ops.channel_pool(x.transpose(1, 2), False)
    with pytest.raises(RuntimeError, match="g must have 2 dims"):
        ops.spatial_pool(x, torch.rand(2, 4, 1))


def test_cbam_infer_refuses_what_it_does_not_take(ops: object) -> None:
    torch.manual_seed(0)
    module = CBAM(8, reduction=4, mlp_bias=True).eval()
    first, _, second = module.channel.mlp
    conv = module.spatial.conv
    params = [first.weight, first.bias, second.weight, second.bias, conv.weight, conv.bias]

    def infer(x: torch.Tensor, *, inplace: bool = False, swap: dict | None = None) -> torch.Tensor:
        args = [(swap or {}).get(i, p) for i, p in enumerate(params)]
        return kernels.cbam_infer(x, *args, 1.0, 0.0, False, inplace)

    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        expected = module.forward_reference(x)
        _close(infer(x), expected)
        y, version = x.clone(), x._version
        assert infer(y, inplace=True) is y and y._version == version + 1
        _close(y, expected)
        bad_x = "cbam_infer: x must be a non-empty NCHW- or channels_last-contiguous"
        bad_parameters = "cbam_infer: the parameters must be contiguous CPU tensors of x's dtype"
        refused = {
            "neither layout": (x.clone().transpose(2, 3), {}, bad_x),
            "float16": (x.half(), {}, bad_x),
            "empty": (x[:0].clone(), {}, bad_x),
            "3-d": (x[0].clone(), {}, bad_x),
            "other channels": (torch.randn(2, 4, 6, 6), {}, "cbam_infer: x has 4 channels, the MLP 8"),
            "double weight": (x.clone(), {0: first.weight.double()}, bad_parameters),
            "double bias": (x.clone(), {5: conv.bias.double()}, bad_parameters),
        }
        # a channels_last weight (a model moved to that layout) is made contiguous, not refused
        _close(infer(x, swap={4: conv.weight.contiguous(memory_format=torch.channels_last)}), expected)
        for name, (bad, swap, message) in refused.items():
            version = bad._version
            with pytest.raises(RuntimeError, match=re.escape(message)):
                infer(bad, inplace=True, swap=swap)  # refused before anything is written
            assert bad._version == version, name


def _module_and_params(c: int, dtype: torch.dtype, residual: bool) -> tuple[CBAM, list[torch.Tensor]]:
    """A float64 CBAM with every bias, and its parameters in the kernels' compute type for ``dtype``
    (w1, b1, w2, b2, the spatial weight and bias)."""
    module = CBAM(c, reduction=2, mlp_bias=True, residual=residual).double()
    first, _, second = module.channel.mlp
    conv = module.spatial.conv
    layers = (first.weight, first.bias, second.weight, second.bias, conv.weight, conv.bias)
    return module, [p.detach().to(_acc(dtype)) for p in layers]


# channels: below one vector, a multiple of it below the four the descriptor pass keeps in
# registers (24), above four and then a tail of a vector and more (37, 44, 130); pixels above a
# chunk (1024); one vector of channels exactly (16); more than one tile of pixel rows and several
# blocks of channels with a tail (130 x 144 pixels), and with more than one chunk (80 x 1089);
# with AVX512 the spatial pool combines 16 pixels at a time (fewer in the last group)
CL_SHAPES = [
    (2, 3, 5, 7), (2, 24, 7, 5), (2, 37, 6, 9), (2, 44, 6, 9), (1, 64, 50, 50), (3, 130, 4, 3),
    (1, 16, 40, 41), (2, 130, 12, 12), (1, 80, 33, 33),
]  # fmt: skip


@pytest.mark.parametrize("shape", CL_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("residual", [False, True])
def test_cbam_infer_takes_channels_last(
    shape: tuple[int, ...], dtype: torch.dtype, residual: bool, ops: object
) -> None:
    module, params = _module_and_params(shape[1], dtype, residual)
    conv = module.spatial.conv
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(dtype)
    x[0, 0, 0, 1] = 40.0  # one channel's max far above the rest
    nchw = kernels.cbam_infer(x, *params, 0.75, -0.25, residual, False)
    cl = x.contiguous(memory_format=torch.channels_last)
    out = kernels.cbam_infer(cl, *params, 0.75, -0.25, residual, False)
    assert out.is_contiguous(memory_format=torch.channels_last) and out.dtype == dtype
    with torch.no_grad():  # the formula, with the spatial gate sigmoid(a (conv(P) + bias) + b)
        x64 = x.double()
        y = x64 * module.channel.gate(x64)
        pooled = torch.cat([y.mean(1, keepdim=True), y.amax(1, keepdim=True)], 1)
        s = torch.sigmoid(0.75 * conv(pooled) - 0.25)
        expected = y * s + x64 if residual else y * s
    if dtype == torch.bfloat16:  # one rounding of the output, as the NCHW kernel
        torch.testing.assert_close(out.double(), expected, rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(out, nchw, rtol=1e-2, atol=1e-2)
    else:
        _close(out, expected.to(dtype))
        _close(out, nchw)
    y = cl.clone(memory_format=torch.channels_last)
    version = y._version
    assert kernels.cbam_infer(y, *params, 0.75, -0.25, residual, True) is y and y._version == version + 1
    assert torch.equal(y, out)


@pytest.mark.parametrize("c", [8, 16, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channels_last_finds_each_channels_first_max_pixel(c: int, dtype: torch.dtype, ops: object) -> None:
    # the channels_last descriptor pass keeps each channel's running max and its pixel in vector
    # lanes, a tile of pixels at a time: the max pixel is the first (as torch.max gives it), across
    # ties, NaNs, tiles and chunks of pixels
    _, params = _module_and_params(c, dtype, False)
    x = torch.randn(2, c, 40, 30, generator=torch.Generator().manual_seed(0)).to(dtype)
    flat = x.view(2, c, -1)
    flat[:, 0, [7, 10]] = 9.0  # ties: an odd pixel first
    flat[:, 1, [6, 9]] = 9.0  # an even pixel first
    flat[:, 2, [1100, 3]] = 9.0  # the first in the second chunk of pixels, the second in the first
    flat[:, 3, [5, 8]] = float("nan")  # the first NaN
    flat[:, 4] = 1.0  # every pixel ties
    flat[:, 5, 1199] = 9.0  # the last pixel
    flat[:, 6, [1198, 1199]] = 9.0
    expected = torch.tensor([7, 6, 3, 5, 0, 1199, 1198]).expand(2, -1)
    cl = x.contiguous(memory_format=torch.channels_last)
    index = kernels.cbam_train(cl, *params, False).channel_index
    assert torch.equal(index[:, :7], expected)
    assert torch.equal(index, kernels.cbam_train(x, *params, False).channel_index)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channels_last_nan_like_nchw(dtype: torch.dtype, ops: object) -> None:
    # NaN in one image: it reaches every gate of that image, so every output, and the other image
    # stays finite (the pooled max's own NaN handling cannot be seen through the gates: the
    # formula tests cover its values); in the other image a tail channel's element far above the
    # rest (the pooled max from the tail); 40 channels: two vectors and a tail, 7 x 9 pixels
    _, params = _module_and_params(40, dtype, False)
    x = torch.randn(2, 40, 7, 9, generator=torch.Generator().manual_seed(0)).to(dtype)
    x[0, 5, 3, 4] = float("nan")
    x[1, 38, 2, 2] = 50.0
    nchw = kernels.cbam_infer(x, *params, 1.0, 0.0, False, False)
    cl = kernels.cbam_infer(x.contiguous(memory_format=torch.channels_last), *params, 1.0, 0.0, False, False)
    assert cl[0].isnan().all() and nchw[0].isnan().all() and cl[1].isfinite().all()
    tol = {"rtol": 1e-2, "atol": 1e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(cl[1], nchw[1], **tol)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("shape", [(1, 300, 5, 5), (3, 40, 9, 7), (1, 16, 40, 41)])
def test_the_forward_does_not_depend_on_the_thread_count(
    shape: tuple[int, ...], layout: torch.memory_format, ops: object
) -> None:
    # the thread count decides how the passes split channels and rows among tasks (channels_last,
    # 300 channels, one image: four groups of blocks on two threads); every pixel and channel is
    # summed the same way in any split, so a run's numbers do not depend on its thread count
    # through CBAM
    _, params = _module_and_params(shape[1], torch.float32, False)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).contiguous(memory_format=layout)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(1)).contiguous(memory_format=layout)
    w1, _, w2, _, weight, _ = params
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            train = kernels.cbam_train(x, *params, False)
            backward = kernels.cbam_backward(grad, x, train, w1, w2, weight, False, True)
            results.append((kernels.cbam_infer(x, *params, 1.0, 0.0, False, False), train, backward))
    finally:
        torch.set_num_threads(threads)
    (infer_1, train_1, backward_1), (infer_2, train_2, backward_2) = results
    assert torch.equal(infer_1, infer_2)
    for name in kernels.TrainForward._fields:
        assert torch.equal(getattr(train_1, name), getattr(train_2, name)), name
    if layout == torch.channels_last:
        # and its backward (which combines pixels' lanes in groups within fixed tiles), but for
        # dL/dbias, ATen's sum of the spatial map's gradient; the NCHW backward's dL/dx does depend
        # on the thread count
        for name in kernels.TrainGrads._fields:
            if name != "bias":
                assert torch.equal(getattr(backward_1, name), getattr(backward_2, name)), name


@pytest.mark.parametrize("shape", CL_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("residual", [False, True])
def test_cbam_train_and_backward_take_channels_last(
    shape: tuple[int, ...], dtype: torch.dtype, residual: bool, ops: object
) -> None:
    # the channels_last passes against the NCHW ones: every saved tensor and gradient, the max
    # pixels and channels (first maximal; bf16's coarse values tie often) exactly
    _, params = _module_and_params(shape[1], dtype, residual)
    w1, _, w2, _, weight, _ = params
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64, generator=generator).to(dtype)
    x[0, 0, 0, 1] = 40.0  # one channel's max far above the rest
    x[-1, :, -1, -1] = 3.0  # a pixel where every channel of x ties
    x[0, :, -1, 0] = 0.0  # and one where every channel of x g ties: its max channel is the first
    grad = torch.randn(shape, dtype=torch.float64, generator=generator).to(dtype)
    cl = x.contiguous(memory_format=torch.channels_last)
    nchw = kernels.cbam_train(x, *params, residual)
    saved = kernels.cbam_train(cl, *params, residual)
    assert saved.out.is_contiguous(memory_format=torch.channels_last) and saved.out.dtype == dtype
    assert torch.equal(saved.channel_index, nchw.channel_index)
    tol = {"rtol": 1e-2, "atol": 1e-2} if dtype == torch.bfloat16 else {}
    for name in kernels.TrainForward._fields:
        if name != "channel_index":
            torch.testing.assert_close(getattr(saved, name), getattr(nchw, name), **tol, msg=name)
    # G arrives in either layout
    for g in (grad, grad.contiguous(memory_format=torch.channels_last)):
        got = kernels.cbam_backward(g, cl, saved, w1, w2, weight, residual, True)
        expected = kernels.cbam_backward(grad, x, nchw, w1, w2, weight, residual, True)
        assert got.x.is_contiguous(memory_format=torch.channels_last) and got.x.dtype == dtype
        for name in kernels.TrainGrads._fields:
            a, b = getattr(got, name), getattr(expected, name)
            scale = b.abs().max().double().clamp_min(1e-12)
            # dL/dbias sums float32 terms over every pixel in the two layouts' orders: up to
            # 1.5e-5 of its size at 64 x 2500 in 50 random draws
            bound = 2e-2 if tol else (4e-5 if dtype == torch.float32 else 1e-5)
            assert ((a.double() - b.double()).abs().max() / scale).item() <= bound, name
    assert kernels.cbam_backward(grad, cl, saved, w1, w2, weight, residual, False).x.numel() == 0


def test_build_failure_warns_and_cbam_still_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail() -> None:
        raise RuntimeError("no compiler")

    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setattr(kernels, "_build", fail)
    module = CBAM(8, reduction=2)
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="could not build the CPU kernels.*no compiler"):
        out = module(x)
    assert type(out.grad_fn).__name__ == "FusedCBAMBackward"  # impl="auto" falls back
    module.impl = "reference"
    torch.testing.assert_close(out, module(x))
    assert kernels.available() is False  # decided once: no second build, no second warning
    module.impl = "kernels"  # asked for explicitly: an error, not another path
    with pytest.raises(ValueError, match="impl='kernels' does not take input while the kernels are not built"):
        module(x)


def test_env_switch_skips_the_build(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setattr(kernels, "_build", lambda: pytest.fail("built despite SMP_CBAM_KERNELS=0"))
    monkeypatch.setenv("SMP_CBAM_KERNELS", "0")
    assert kernels.available() is False


@pytest.mark.slow
def test_default_capability_build_matches_the_formula(tmp_path: Path) -> None:
    """The kernels built for a CPU without AVX2 (ATen's scalar Vectorized), in a fresh process."""
    code = """
import torch
from smp_cbam import CBAM
from smp_cbam.attention import kernels
torch.backends.cpu.get_cpu_capability = lambda: "DEFAULT"
assert kernels.available()
assert "-DCPU_CAPABILITY=DEFAULT" in kernels._capability_flags("DEFAULT")
torch.manual_seed(0)
for spatial_bn, function in [(False, "KernelCBAMBackward"), (True, "KernelBatchNormCBAMBackward")]:
    module = CBAM(6, reduction=2, spatial_bn=spatial_bn).double()
    x = torch.randn(2, 6, 11, 9, dtype=torch.float64, requires_grad=True)
    out = module(x)
    assert type(out.grad_fn).__name__ == function
    grads = torch.autograd.grad(out.sum(), [x, *module.parameters()])
    module.impl = "reference"
    expected = module(x)
    torch.testing.assert_close(out, expected)
    for got, want in zip(grads, torch.autograd.grad(expected.sum(), [x, *module.parameters()])):
        torch.testing.assert_close(got, want)
    module.eval()
    module.impl = "auto"
    with torch.no_grad():
        torch.testing.assert_close(module(x.detach()), module.forward_reference(x.detach()))
# bf16 under autocast: ATen's scalar bf16 conversions, within one bf16 rounding of the formula
for residual in (False, True):
    module = CBAM(6, reduction=2, residual=residual)
    x = torch.randn(2, 6, 11, 9).bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x)
    assert type(out.grad_fn).__name__ == "KernelCBAMBackward" and out.dtype == torch.bfloat16
    out.float().sum().backward()
    module.impl = "reference"
    x64 = x.detach().double().requires_grad_()
    expected = module.double()(x64)
    expected.sum().backward()
    for got, want in ((out, expected), (x.grad, x64.grad)):
        assert ((got.double() - want).norm() / want.norm()).item() <= 2**-8
print("ok")
"""
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    env.pop("SMP_CBAM_KERNELS", None)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-1] == "ok"
    assert any(p.name == "smp_cbam_cpu_default" for p in tmp_path.iterdir())


# The eager binding (cbam_infer_eager, through cbam_fused.eager_infer): CBAM's no-grad call without
# the dispatcher. It must take exactly what CBAM's chooser sends to the kernels, and leave to the
# operator's path whatever a mode or a transform has to see.


def _binding_cases() -> dict[str, tuple[torch.Tensor, str | None]]:
    """Input for an 8-channel CBAM, each with the autocast it runs under (None: none)."""
    x = torch.randn(2, 8, 5, 6)
    return {
        "float32": (x, None),
        "float64": (x.double(), None),
        "channels_last": (x.contiguous(memory_format=torch.channels_last), None),
        "float32 under autocast": (x, "cpu"),
        "bfloat16 under autocast": (x.bfloat16(), "cpu"),
        "bfloat16 outside autocast": (x.bfloat16(), None),
        "float16": (x.half(), None),
        "neither layout": (x.transpose(2, 3), None),
        "empty": (x[:0], None),
        "3-d": (x[0], None),
        "meta": (x.to("meta"), None),
        "other channels": (torch.randn(2, 4, 5, 6), None),
    }


@pytest.mark.parametrize("case", list(_binding_cases()))
@pytest.mark.parametrize("grad", ["no_grad", "inference_mode"])
def test_eager_binding_takes_what_the_chooser_sends_to_the_kernels(case: str, grad: str) -> None:
    from smp_cbam.attention import cbam_fused

    assert kernels.available()
    torch.manual_seed(0)
    module = CBAM(8, reduction=2, mlp_bias=True).eval()
    x, autocast = _binding_cases()[case]
    context = torch.no_grad() if grad == "no_grad" else torch.inference_mode()
    with context, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast is not None):
        x = x.clone()
        if x.dtype == torch.float64:
            module.double()
        out = cbam_fused.eager_infer(module, module.channel, module.spatial, x)
        chosen = module._choose(x, False) == "kernels" and x.dim() == 4 and x.shape[1] == 8
        assert (out is not None) == chosen, case
        if out is not None:
            # the same kernels as the operator's path, bit for bit
            torch.testing.assert_close(
                out, kernels.cbam_infer(x, *_params(module), 1.0, 0.0, False, False), rtol=0, atol=0
            )
            assert out.stride() == x.stride()
            module.impl = "fused"
            torch.testing.assert_close(out, module(x), rtol=2e-2 if x.dtype == torch.bfloat16 else 1e-5, atol=1e-2)


def _params(module: CBAM) -> list[torch.Tensor | None]:
    first, _, second = module.channel.mlp
    conv = module.spatial.conv
    return [first.weight, first.bias, second.weight, second.bias, conv.weight, conv.bias]


def test_eager_binding_declines_a_gradient_and_other_parameters() -> None:
    assert kernels.available()
    module = CBAM(8, reduction=2).eval()
    binding = kernels.extension()
    x = torch.randn(2, 8, 5, 6)
    params = _params(module)
    with torch.enable_grad():
        assert binding.cbam_infer_eager(x, *params, 1.0, 0.0, False, False) is None  # parameters learn
        detached = [p if p is None else p.detach() for p in params]
        assert binding.cbam_infer_eager(x.requires_grad_(), *detached, 1.0, 0.0, False, False) is None
        assert binding.cbam_infer_eager(x.detach(), *detached, 1.0, 0.0, False, False) is not None
    with torch.no_grad():
        assert (
            binding.cbam_infer_eager(x, *[p if p is None else p.double() for p in params], 1.0, 0.0, False, False)
            is None
        )
        # a channels_last spatial weight (a model moved to that layout) is taken as it is
        cl = [*params[:4], params[4].contiguous(memory_format=torch.channels_last), params[5]]
        torch.testing.assert_close(
            binding.cbam_infer_eager(x, *cl, 1.0, 0.0, False, False), module.forward_reference(x)
        )


def test_eager_binding_writes_in_place_and_shows_in_the_profiler() -> None:
    assert kernels.available()
    module = CBAM(8, reduction=2, inplace=True).eval()
    x = torch.randn(2, 8, 5, 6)
    with torch.no_grad():
        expected = module.forward_reference(x.clone())
        version = x._version
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
            out = module(x)
    assert out is x and x._version == version + 1
    torch.testing.assert_close(out, expected)
    assert "smp_cbam_cpu::cbam_infer" in {event.name for event in profiler.events()}


def test_modes_and_transforms_see_the_operators_not_the_binding() -> None:
    """A dispatch or function mode (a FLOP counter, a debug mode) sees the operator's path, and a
    parametrized weight, computed on access, is read as such."""
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    from smp_cbam.attention import cbam_fused

    assert kernels.available()
    torch.manual_seed(0)
    module = CBAM(8, reduction=2).eval()
    x = torch.randn(2, 8, 5, 6)
    seen: list[str] = []

    class Dispatch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    class Function(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            seen.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    with torch.no_grad():
        expected = module.forward_reference(x)
        for mode in (Dispatch(), Function()):
            seen.clear()
            with mode:
                assert cbam_fused.eager_infer(module, module.channel, module.spatial, x) is None
                torch.testing.assert_close(module(x), expected)
            assert seen, type(mode).__name__
        torch.nn.utils.parametrizations.weight_norm(module.spatial.conv)
        torch.testing.assert_close(module(x), expected, rtol=1e-5, atol=1e-6)
        module.spatial.conv.parametrizations.weight.original0.mul_(2)  # the magnitude: the weight doubles
        torch.testing.assert_close(module(x), module.forward_reference(x))
        assert not torch.allclose(module(x), expected)


@pytest.mark.parametrize("case", list(_binding_cases()))
def test_training_binding_takes_what_the_chooser_sends_to_the_kernels(case: str) -> None:
    """``cbam_takes`` (CBAM's first check for a call that records a gradient) against ``_choose``."""
    from smp_cbam.attention import cbam_fused

    assert kernels.available()
    torch.manual_seed(0)
    module = CBAM(8, reduction=2, mlp_bias=True)
    x, autocast = _binding_cases()[case]
    x = x.clone()
    if x.dtype == torch.float64:
        module.double()
    if x.is_floating_point() and x.device.type == "cpu":
        x.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast is not None):
        takes = kernels.extension().cbam_takes(x, *cbam_fused.infer_params(module.channel, module.spatial))
        chosen = module._choose(x, True) == "kernels" and x.dim() == 4 and x.shape[1] == 8
        assert takes == chosen, case
        if takes:
            out = cbam_fused.eager_train(module, module.channel, module.spatial, x)
            assert type(out.grad_fn).__name__ == "KernelCBAMBackward"


def test_training_reaches_a_parametrized_weight() -> None:
    """The kernels' training function takes the weights as computed, so that the gradient flows on
    into a parametrization's own parameters, as the formula's does."""
    assert kernels.available()
    torch.manual_seed(0)
    module = CBAM(8, reduction=2, mlp_bias=True, residual=True).double()
    torch.nn.utils.parametrizations.weight_norm(module.spatial.conv)
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64, requires_grad=True)
    grads = []
    for impl in ("auto", "reference"):
        module.impl = impl
        out = module(x)
        assert (type(out.grad_fn).__name__ == "KernelCBAMBackward") == (impl == "auto")
        grads.append(torch.autograd.grad(out.square().sum(), [x, *module.parameters()]))
    for fast, plain in zip(*grads, strict=True):
        torch.testing.assert_close(fast, plain, rtol=1e-10, atol=1e-12)


def test_eager_binding_first_called_under_inference_mode_takes_ordinary_tensors_after() -> None:
    """The binding's notion of an ordinary tensor does not depend on where it is first called (a
    tensor made under inference_mode lacks the autograd keys), in a fresh process."""
    code = """
import torch
from smp_cbam import CBAM
from smp_cbam.attention import cbam_fused, kernels
assert kernels.available()
m = CBAM(8).eval()
with torch.inference_mode():
    assert cbam_fused.eager_infer(m, m.channel, m.spatial, torch.randn(2, 8, 4, 4)) is not None
with torch.no_grad():
    assert cbam_fused.eager_infer(m, m.channel, m.spatial, torch.randn(2, 8, 4, 4)) is not None
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
