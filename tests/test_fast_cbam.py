"""The fast CBAM path against the plain formula: outputs, gradients, ties, variants, fallbacks."""

import copy

import pytest
import torch
import torch.nn.utils.parametrizations
import torch.nn.utils.prune

from smp_cbam import CBAM
from smp_cbam.attention import cbam_fused, kernels
from smp_cbam.attention.cbam_fused import (
    FusedCBAM,
    KernelBatchNormCBAM,
    KernelCBAM,
    channel_argmax_,
    channel_max_indexed,
)
from smp_cbam.benchmarks.cbam_bench import build_bench_model, params_and_macs

VARIANTS = [
    {},
    {"mlp_bias": True},
    {"spatial_bn": True},
    {"residual": True},
    {"kernel_size": 3},
    {"kernel_size": 1, "mlp_bias": True, "spatial_bn": True, "residual": True},
]


def _backward_name(path: str, module: CBAM, x: torch.Tensor) -> str:
    """The grad_fn a fast CBAM's output should have on ``path`` for input ``x``: the kernels take
    NCHW input, and channels_last input where the spatial gate has no BatchNorm."""
    batch_norm = isinstance(module.spatial.bn, torch.nn.BatchNorm2d)
    if path != "kernels" or (not x.is_contiguous() and batch_norm) or x.dtype == torch.bfloat16:
        return "FusedCBAMBackward"
    return "KernelBatchNormCBAMBackward" if batch_norm else "KernelCBAMBackward"


def _pair(channels: int, dtype: torch.dtype = torch.float32, **kwargs: object) -> tuple[CBAM, CBAM]:
    torch.manual_seed(0)
    fast = CBAM(channels, reduction=4, **kwargs).to(dtype)
    plain = copy.deepcopy(fast)
    plain.impl = "reference"
    return fast, plain


def _run(module: CBAM, x: torch.Tensor, grad: torch.Tensor, path: str | None = None) -> list[torch.Tensor]:
    x = x.detach().clone().requires_grad_()
    out = module(x)
    if path is not None:
        assert type(out.grad_fn).__name__ == _backward_name(path, module, x)
    params = [p for p in module.parameters() if p.requires_grad]
    return [out.detach(), *torch.autograd.grad(out, [x, *params], grad)]


def _spy_inference(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The no-grad paths a CBAM takes from now on, by name, in call order: "kernel_infer" for the
    kernels (through their eager binding, ``eager_infer``, or their operator), "fused_infer"."""
    calls: list[str] = []
    for name, label in (
        ("eager_infer", "kernel_infer"),
        ("kernel_infer", "kernel_infer"),
        ("fused_infer", "fused_infer"),
    ):
        original = getattr(cbam_fused, name)

        def spy(*args: object, _label: str = label, _f: object = original, **kwargs: object) -> object:
            out = _f(*args, **kwargs)
            if out is not None:  # eager_infer's None: it did not take the call
                calls.append(_label)
            return out

        monkeypatch.setattr(cbam_fused, name, spy)
    return calls


# the no-grad function each path runs for an eval-mode CBAM (BatchNorm with running statistics)
INFERENCE_ON = {"kernels": "kernel_infer", "eager": "fused_infer"}


def _assert_close(fast: list[torch.Tensor], plain: list[torch.Tensor], rtol: float = 1e-5) -> None:
    assert len(fast) == len(plain)
    for a, b in zip(fast, plain, strict=True):
        assert a.shape == b.shape
        scale = b.abs().max().clamp_min(1e-12)
        assert ((a - b).abs().max() / scale).item() <= rtol


@pytest.mark.parametrize("kwargs", VARIANTS, ids=lambda k: "-".join(k) or "default")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_fast_matches_plain_float32(kwargs: dict, channels_last: bool, train: bool, path: str) -> None:
    fast, plain = _pair(32, **kwargs)
    fast.train(train)
    plain.train(train)
    x = torch.randn(3, 32, 9, 13)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(3, 32, 9, 13)
    _assert_close(_run(fast, x, grad, path), _run(plain, x, grad))
    for a, b in zip(fast.buffers(), plain.buffers(), strict=True):
        # BatchNorm statistics updated exactly once, the same way (up to float rounding)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kwargs", [{}, {"mlp_bias": True, "residual": True}, {"spatial_bn": True}],
                         ids=lambda k: "-".join(k) or "default")  # fmt: skip
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_a_model_moved_to_channels_last(kwargs: dict, train: bool, path: str) -> None:
    # model.to(memory_format=torch.channels_last), PyTorch's recipe for the layout, makes the
    # spatial convolution's weight channels_last too; with NCHW input as well as channels_last
    torch.manual_seed(0)
    fast = torch.nn.Sequential(torch.nn.Conv2d(3, 24, 3, padding=1), CBAM(24, reduction=4, **kwargs))
    plain = copy.deepcopy(fast)
    plain[1].impl = "reference"
    for model in (fast, plain):
        model.train(train).to(memory_format=torch.channels_last)
    assert not fast[1].spatial.conv.weight.is_contiguous()
    for x in (torch.randn(2, 3, 9, 11), torch.randn(2, 3, 9, 11).contiguous(memory_format=torch.channels_last)):
        grad = torch.randn(2, 24, 9, 11)
        # the conv hands CBAM its output in the weight's layout: channels_last
        layout = fast[0](x).detach().contiguous(memory_format=torch.channels_last)
        assert type(fast[1](layout.requires_grad_()).grad_fn).__name__ == _backward_name(path, fast[1], layout)
        _assert_close(_run(fast, x, grad), _run(plain, x, grad))
        with torch.no_grad():
            _assert_close([fast(x)], [plain(x)])


@pytest.mark.parametrize(
    ("kwargs", "fast_mode"),
    [
        ({"kernel_size": 3}, False),
        ({}, True),
        ({"mlp_bias": True, "residual": True}, True),
        (VARIANTS[-1], True),
        ({"spatial_bn": True}, True),
    ],
)
@pytest.mark.parametrize("kernel", [True, False], ids=["kernels", "eager"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_gradcheck_float64(kwargs: dict, fast_mode: bool, kernel: bool, channels_last: bool) -> None:
    channels = 8 if fast_mode else 4  # the full check perturbs every element one by one
    module, _ = _pair(channels, torch.float64, **kwargs)
    function = FusedCBAM
    if kernel:
        assert kernels.available()
        if kwargs.get("spatial_bn") and channels_last:
            pytest.skip("with a spatial BatchNorm in training the kernels read NCHW")
        function = KernelBatchNormCBAM if kwargs.get("spatial_bn") else KernelCBAM
    x = torch.randn(2, channels, 4, 3, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    # KernelCBAM takes the weights and biases as the kernels read them (None for an absent bias)
    params = cbam_fused.infer_params(module.channel, module.spatial) if function is KernelCBAM else module.parameters()
    assert torch.autograd.gradcheck(lambda x, *p: function.apply(x, module, *p), (x, *params), fast_mode=fast_mode)


def test_float64_matches_plain(path: str) -> None:
    fast, plain = _pair(16, torch.float64, spatial_bn=True, mlp_bias=True)
    x = torch.randn(2, 16, 7, 7, dtype=torch.float64)
    grad = torch.randn_like(x)
    _assert_close(_run(fast, x, grad, path), _run(plain, x, grad), rtol=1e-12)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_ties_route_gradients_like_plain(channels_last: bool, path: str) -> None:
    fast, plain = _pair(8, torch.float64)
    for module in (fast, plain):  # equal channel weights make y = x * g tie where x ties
        torch.nn.init.zeros_(module.channel.mlp[2].weight)
    x = torch.randn(2, 8, 6, 5, dtype=torch.float64).round()  # many ties within channels
    x[:, :, 2:4] = 1.5  # channel max attained in several places
    x[0, :, 0, 0] = 4.0  # every channel ties at this pixel and holds its channel's maximum
    x[1, 3:6, 1, 1] = 7.0  # ties across some channels
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(2, 8, 6, 5, dtype=torch.float64)
    _assert_close(_run(fast, x, grad, path), _run(plain, x, grad), rtol=1e-12)


def test_ties_from_all_equal_input(path: str) -> None:
    fast, plain = _pair(4)
    x = torch.ones(2, 4, 5, 5)
    grad = torch.randn(2, 4, 5, 5)
    _assert_close(_run(fast, x, grad, path), _run(plain, x, grad))


def test_nan_propagates_like_plain(path: str) -> None:
    fast, plain = _pair(6)
    x = torch.randn(2, 6, 5, 4)
    x[0, 2, 1, 3] = float("nan")
    x[1, 4] = float("inf")  # a whole channel at inf: its mean and max are inf, no NaN
    for module in (fast, plain):
        module.eval()
    with torch.no_grad():
        out, expected = fast(x), plain(x)
    assert torch.equal(out.isnan(), expected.isnan())
    finite = expected.isfinite()
    torch.testing.assert_close(out[finite], expected[finite], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("channels", [1, 5, 300])
def test_index_helpers_pick_torch_max_index(dtype: torch.dtype, channels: int) -> None:
    # integers tie often; 300 channels exceed what bfloat16 counts exactly (256)
    x = torch.randint(-3, 4, (2, channels, 6, 5)).to(dtype)
    x[0, :, 1, 1] = 9  # all channels tie at one pixel
    mx_hw, idx_hw = channel_max_indexed(x)
    ref_hw = x.flatten(2).max(dim=2, keepdim=True)
    assert torch.equal(mx_hw, ref_hw.values.flatten(1)) and torch.equal(idx_hw, ref_hw.indices)
    mx_c = x.amax(dim=1, keepdim=True)
    assert torch.equal(channel_argmax_(x.clone(), mx_c), x.max(dim=1, keepdim=True).indices)


def test_channel_argmax_stays_in_range_on_nan() -> None:
    x = torch.randn(1, 4, 3, 3)
    x[0, 2, 1, 1] = float("nan")
    idx = channel_argmax_(x.clone(), x.amax(dim=1, keepdim=True))
    assert idx.min() >= 0 and idx.max() <= 3
    assert torch.equal(idx[0, 0, 0], x.max(dim=1).indices[0, 0])


def test_only_parameters_need_grad(path: str) -> None:
    fast, plain = _pair(16, mlp_bias=True)
    x = torch.randn(2, 16, 8, 8)
    grads = []
    for module in (fast, plain):
        out = module(x)
        grads.append(torch.autograd.grad(out, list(module.parameters()), torch.ones_like(out)))
    _assert_close(list(grads[0]), list(grads[1]))


def test_frozen_parameters_and_backward_into_grad(path: str) -> None:
    fast, plain = _pair(16, spatial_bn=True)
    for module in (fast, plain):
        module.spatial.conv.weight.requires_grad_(False)
        x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
        module(x).square().sum().backward()
        module.x_grad = x.grad
    assert fast.spatial.conv.weight.grad is None
    _assert_close(
        [fast.x_grad, *(p.grad for p in fast.parameters() if p.requires_grad)],
        [plain.x_grad, *(p.grad for p in plain.parameters() if p.requires_grad)],
    )


@pytest.mark.parametrize("kwargs", [{}, VARIANTS[-1]], ids=["default", "all"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_inference_path(kwargs: dict, channels_last: bool, path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    fast, plain = _pair(16, **kwargs)
    fast.eval()
    plain.eval()
    x = torch.randn(2, 16, 8, 8)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    calls = _spy_inference(monkeypatch)
    with torch.no_grad():
        out = fast(x)
        assert torch.allclose(out, plain(x), rtol=1e-5, atol=1e-6)
    with torch.inference_mode():
        assert torch.allclose(fast(x), out, rtol=1e-5, atol=1e-6)
    assert calls == [INFERENCE_ON[path]] * 2
    # an eval-mode module with grad enabled records a graph: its parameters still learn
    recorded = fast(x)
    assert recorded.requires_grad and type(recorded.grad_fn).__name__ == _backward_name(path, fast, x)
    assert len(calls) == 2


def test_fallbacks_still_match() -> None:
    fast, plain = _pair(8)
    wide = torch.randn(2, 8, 6, 12)
    x = wide[..., ::2].contiguous()
    grad = torch.randn(2, 8, 6, 6)
    expected = _run(plain, x, grad)
    # neither NCHW- nor channels_last-contiguous: a strided view, and a transposed layout
    for odd in (wide[..., ::2], x.transpose(2, 3).contiguous().transpose(2, 3)):
        assert not odd.is_contiguous() and not odd.is_contiguous(memory_format=torch.channels_last)
        assert type(fast(odd.requires_grad_()).grad_fn).__name__ == "MulBackward0"  # the plain formula
        _assert_close(_run(fast, odd, grad), expected)
    maps = []
    handle = fast.spatial.register_forward_hook(lambda m, i, o: maps.append(o))
    assert type(fast(x.requires_grad_()).grad_fn).__name__ == "MulBackward0"  # a hook on a part: the parts
    _assert_close(_run(fast, x, grad), expected)
    handle.remove()
    assert len(maps) == 2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fast(x)
        reference = fast.forward_reference(x)
    assert out.dtype == reference.dtype and type(out.grad_fn).__name__ != "MulBackward0"
    torch.testing.assert_close(out.float(), reference.float(), rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match="channels"):
        fast(torch.randn(1, 4, 6, 6))


def test_inference_reads_pruned_and_parametrized_weights(path: str) -> None:
    fast, _ = _pair(16, mlp_bias=True)
    torch.nn.utils.prune.l1_unstructured(fast.spatial.conv, "weight", amount=0.5)
    torch.nn.utils.parametrizations.weight_norm(fast.channel.mlp[2])
    with torch.no_grad():
        fast.channel.mlp[2].parametrizations.weight.original0.mul_(3)  # weight = g v / |v| changes
    fast.eval()
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        assert torch.allclose(fast(x), fast.forward_reference(x), rtol=1e-5, atol=1e-6)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the fused path, gates in float32
            out = fast(x)
        assert torch.allclose(out, fast.forward_reference(x), rtol=1e-5, atol=1e-6)
        with pytest.raises(ValueError, match="expected an input with 16 channels, got 4"):
            fast(torch.randn(1, 4, 6, 6))


def test_torchscript_falls_back_to_plain() -> None:
    fast, plain = _pair(8, spatial_bn=True)
    scripted = torch.jit.script(fast)
    x = torch.randn(2, 8, 6, 6)
    assert torch.allclose(scripted(x), plain(x), rtol=1e-5, atol=1e-6)


def test_compile_fullgraph_train() -> None:
    fast, plain = _pair(8)
    compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 8, 6, 6)
    grad = torch.randn(2, 8, 6, 6)
    _assert_close(_run(compiled, x, grad), _run(plain, x, grad))


def test_table_params_and_macs() -> None:
    none_params, none_macs = params_and_macs("Unet", "none", size=64)
    scse_params, _ = params_and_macs("Unet", "scse", size=64)
    cbam_params, cbam_macs = params_and_macs("Unet", "cbam", size=64)
    assert none_params < scse_params and none_params < cbam_params
    model = build_bench_model("Unet", "cbam")
    expected, expected_macs = 0, 0
    sizes: dict[CBAM, tuple[int, int]] = {}
    cbams = [m for m in model.modules() if isinstance(m, CBAM)]
    hooks = [m.register_forward_pre_hook(lambda m, a: sizes.update({m: a[0].shape[2:]})) for m in cbams]
    model.eval()(torch.randn(1, 3, 64, 64))
    for hook in hooks:
        hook.remove()
    for module in cbams:
        c, hidden = module.channel.in_channels, max(module.channel.in_channels // 16, 1)
        expected += 2 * c * hidden + 2 * 7 * 7 + 1  # shared MLP, 2 -> 1 conv + bias
    for module, (h, w) in sizes.items():  # MLP on both descriptors, conv at every pixel
        c, hidden = module.channel.in_channels, max(module.channel.in_channels // 16, 1)
        expected_macs += 2 * 2 * c * hidden + 2 * 7 * 7 * h * w
    assert cbam_params - none_params == expected
    assert cbam_macs - none_macs == expected_macs


def _with_running_stats(module: CBAM) -> CBAM:
    """Eval-mode CBAM whose spatial BatchNorm, if any, has non-trivial statistics and affine."""
    if isinstance(module.spatial.bn, torch.nn.BatchNorm2d):
        bn = module.spatial.bn
        bn.running_mean.fill_(0.3)
        bn.running_var.fill_(2.5)
        bn.weight.data.fill_(1.5)
        bn.bias.data.fill_(-0.2)
    return module.eval()


# row segments and blocks of the no-grad kernel: tall maps split across threads, rows wider
# than a tile, many channels, single pixels
INFERENCE_SHAPES = [(2, 16, 8, 8), (1, 8, 50, 70), (3, 5, 40, 9), (1, 3, 3, 1100), (2, 300, 4, 4), (1, 4, 1, 1)]


@pytest.mark.parametrize("shape", INFERENCE_SHAPES, ids=str)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("kwargs", VARIANTS, ids=lambda k: "-".join(k) or "default")
def test_inference_matches_plain_float64(
    shape: tuple, threads: int, kwargs: dict, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    fast, plain = (_with_running_stats(m) for m in _pair(shape[1], torch.float64, **kwargs))
    x = torch.randn(shape, dtype=torch.float64)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            expected = plain(x)
            calls = _spy_inference(monkeypatch)
            torch.testing.assert_close(fast(x), expected, rtol=1e-12, atol=1e-12)
    finally:
        torch.set_num_threads(before)
    assert calls == [INFERENCE_ON[path]]


@pytest.mark.parametrize("shape", [*INFERENCE_SHAPES, (1, 6, 41, 9)], ids=str)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("kernel_size", [7, 19])  # 19: a segment's border rows outnumber its minimum
def test_training_matches_plain_float64(shape: tuple, threads: int, kernel_size: int, path: str) -> None:
    """The streamed backward: row segments with borders read across tasks, short last segments."""
    fast, plain = _pair(shape[1], torch.float64, kernel_size=kernel_size, mlp_bias=True)
    x = torch.randn(shape, dtype=torch.float64)
    grad = torch.randn(shape, dtype=torch.float64)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _assert_close(_run(fast, x, grad, path), _run(plain, x, grad), rtol=1e-12)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("kwargs", VARIANTS, ids=lambda k: "-".join(k) or "default")
def test_inference_matches_plain_float32(kwargs: dict, path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    fast, plain = (_with_running_stats(m) for m in _pair(32, **kwargs))
    x = torch.randn(2, 32, 37, 45).relu()
    with torch.no_grad():
        expected = plain(x)
        calls = _spy_inference(monkeypatch)
        torch.testing.assert_close(fast(x), expected, rtol=1e-5, atol=1e-6)
    assert calls == [INFERENCE_ON[path]]


@pytest.mark.parametrize("residual", [False, True])
def test_inplace_writes_over_the_input_only_without_grad(residual: bool, path: str) -> None:
    fast, plain = (m.eval() for m in _pair(8, inplace=True, residual=residual))
    x = torch.randn(2, 8, 12, 10)
    with torch.no_grad():
        expected = plain(x)
        y = x.clone()
        version = y._version
        out = fast(y)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    # the eager path keeps the input for the residual; everything else overwrites it
    overwritten = not (residual and path == "eager")
    assert (out.data_ptr() == y.data_ptr()) == overwritten
    assert (y._version > version) == overwritten
    z = x.clone().requires_grad_()
    fast(z).sum().backward()  # with gradients the input is kept: the backward reads it
    assert torch.equal(z.detach(), x) and z.grad is not None


def test_inplace_bumps_the_version_autograd_checks(path: str) -> None:
    fast = CBAM(8, inplace=True).eval()
    a = torch.randn(2, 8, 6, 6, requires_grad=True)
    y = a.exp()  # exp's backward reads its output
    with torch.no_grad():
        fast(y)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_no_grad_train_mode_batchnorm_uses_batch_statistics(path: str) -> None:
    fast, plain = _pair(8, spatial_bn=True, inplace=True)
    x = torch.randn(2, 8, 9, 7)
    with torch.no_grad():
        torch.testing.assert_close(fast(x.clone()), plain(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast.spatial.bn.running_mean, plain.spatial.bn.running_mean)
    torch.testing.assert_close(fast.spatial.bn.running_var, plain.spatial.bn.running_var)
    assert fast.spatial.bn.running_mean.abs().sum() > 0


@pytest.mark.parametrize("arch", ["Unet", "UnetPlusPlus"])
def test_decoders_build_inplace_cbam_with_plain_outputs(arch: str, path: str) -> None:
    model = build_bench_model(arch, "cbam", encoder_depth=3, decoder_channels=(32, 16, 8)).eval()
    modules = [m for m in model.modules() if isinstance(m, CBAM)]
    assert modules and all(m.inplace for m in modules)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(images)
        for m in modules:
            m.impl = "reference"
        torch.testing.assert_close(out, model(images), rtol=1e-5, atol=1e-5)
