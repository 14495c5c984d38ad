"""CBAM's implementation selector (``impl``), its kernels as ``torch.library`` operators under
``torch.compile``/``torch.export``, and input that must never build the kernels."""

import copy
import os
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from smp_cbam import CBAM
from smp_cbam.attention import cbam_fused, kernels, ops

needs_kernels = pytest.mark.skipif(
    os.environ.get("SMP_CBAM_KERNELS") == "0", reason="kernels disabled by SMP_CBAM_KERNELS=0"
)


def _module(**kwargs: object) -> CBAM:
    torch.manual_seed(0)
    return CBAM(16, reduction=4, **kwargs)


def _grads(module: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    x = x.detach().clone().requires_grad_()
    out = module(x)
    return [out.detach(), *torch.autograd.grad(out.square().sum(), [x, *module.parameters()])]


def _spy_kernels(monkeypatch: pytest.MonkeyPatch, **wrappers: object) -> None:
    """Wraps the kernels' functions that the operators' implementations call (``ops._cpu()``, the
    built module): each wrapper takes the function and returns its stand-in."""
    assert kernels.available()
    module = kernels.extension()
    names = ("cbam_infer", "cbam_train", "cbam_backward")
    spy = SimpleNamespace(**{name: wrappers.get(name, lambda f: f)(getattr(module, name)) for name in names})
    monkeypatch.setattr(ops, "_cpu", lambda: spy)


class _Recorder:
    """A ``torch.compile`` backend that keeps the captured FX graphs' operator targets."""

    def __init__(self) -> None:
        self.targets: list[object] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        self.targets += [node.target for node in gm.graph.nodes if node.op == "call_function"]
        return gm.forward


# ---------------------------------------------------------------------------------------------
# the selector


@pytest.mark.parametrize(
    ("impl", "x", "backward"),
    [
        ("auto", torch.randn(2, 16, 5, 4), "KernelCBAMBackward"),
        ("kernels", torch.randn(2, 16, 5, 4), "KernelCBAMBackward"),
        ("auto", torch.randn(2, 16, 5, 4).to(memory_format=torch.channels_last), "KernelCBAMBackward"),
        ("kernels", torch.randn(2, 16, 5, 4).to(memory_format=torch.channels_last), "KernelCBAMBackward"),
        ("fused", torch.randn(2, 16, 5, 4), "FusedCBAMBackward"),
        ("auto", torch.randn(2, 16, 5, 4).bfloat16(), "FusedCBAMBackward"),
        ("reference", torch.randn(2, 16, 5, 4), "MulBackward0"),
        ("auto", torch.randn(2, 16, 5, 4)[:, :, ::2], "MulBackward0"),  # neither layout
    ],
)
@needs_kernels
def test_impl_routes_input_by_the_table(impl: str, x: torch.Tensor, backward: str) -> None:
    module = _module(impl=impl).to(x.dtype)
    out = module(x.requires_grad_())
    assert type(out.grad_fn).__name__ == backward
    reference = copy.deepcopy(module)
    reference.impl = "reference"
    tol = {"rtol": 2e-2, "atol": 2e-2} if x.dtype == torch.bfloat16 else {}
    torch.testing.assert_close(out, reference(x), **tol)


@needs_kernels
@pytest.mark.parametrize("autocast", [False, True])
def test_channels_last_inference_takes_the_kernels(autocast: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # the no-grad kernel reads channels_last as it is (training: test_channels_last_training_...)
    module = _module(residual=True).eval()
    calls = []
    infer = cbam_fused.eager_infer

    def spy(*args: object) -> torch.Tensor | None:
        out = infer(*args)
        if out is not None:
            calls.append(args[3].stride())
        return out

    monkeypatch.setattr(cbam_fused, "eager_infer", spy)
    x = torch.randn(2, 16, 5, 4).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = module(x.bfloat16() if autocast else x)
    assert calls == [x.stride()] and out.is_contiguous(memory_format=torch.channels_last)
    tol = {"rtol": 2e-2, "atol": 2e-2} if autocast else {}
    torch.testing.assert_close(out.float(), module.forward_reference(x).detach(), **tol)
    assert len(calls) == 1


@pytest.mark.parametrize(
    ("impl", "x", "message"),
    [
        ("kernels", torch.randn(2, 16, 5, 4).double()[:, :, :0], "empty input"),
        ("kernels", torch.randn(2, 16, 5, 4).half(), "torch.float16 input"),
        ("kernels", torch.randn(2, 16, 5, 4).bfloat16(), "torch.bfloat16 input outside autocast"),
        ("fused", torch.randn(16, 5, 4), "3-d input"),
        ("fused", torch.randn(2, 16, 5, 4)[:, :, ::2], "input that is neither NCHW- nor channels_last"),
    ],
)
def test_an_explicit_impl_refuses_input_it_cannot_take(impl: str, x: torch.Tensor, message: str) -> None:
    module = _module(impl=impl).to(x.dtype)
    with pytest.raises(ValueError, match=f"impl='{impl}' does not take {message}"):
        module(x)


@needs_kernels
def test_channels_last_training_takes_the_kernels_without_copies(monkeypatch: pytest.MonkeyPatch) -> None:
    # the training kernels read channels_last as it is and give the output and dL/dx in it; with a
    # spatial BatchNorm on batch statistics (separate passes, NCHW) "kernels" refuses it
    module = _module(mlp_bias=True, residual=True)
    strides = []
    train, backward = kernels.cbam_train, kernels.cbam_backward
    monkeypatch.setattr(kernels, "cbam_train", lambda x, *a: strides.append(x.stride()) or train(x, *a))
    monkeypatch.setattr(kernels, "cbam_backward", lambda g, x, *a: strides.append(x.stride()) or backward(g, x, *a))
    x = torch.randn(2, 16, 5, 4).contiguous(memory_format=torch.channels_last).requires_grad_()
    out = module(x)
    out.backward(torch.randn_like(out))
    assert strides == [x.stride(), x.stride()]
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert x.grad.is_contiguous(memory_format=torch.channels_last)
    bn = _module(impl="kernels", spatial_bn=True)
    with pytest.raises(ValueError, match="does not take channels_last input with a spatial BatchNorm"):
        bn(x)
    with torch.no_grad():  # inference on running statistics: taken
        assert bn.eval()(x.detach()).is_contiguous(memory_format=torch.channels_last)


def test_bad_impl_names_the_argument() -> None:
    with pytest.raises(ValueError, match="impl must be one of 'auto', 'reference', 'fused', 'kernels', got 'fast'"):
        CBAM(8, impl="fast")


# ---------------------------------------------------------------------------------------------
# never a build for input the kernels do not take


@pytest.fixture
def no_build(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernels as if never built in this process, and any build attempt a test failure."""
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setattr(kernels, "_build", lambda: pytest.fail("CBAM asked for the CPU kernels' build"))


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("spatial_bn", [False, True])
def test_meta_device_forward_works_without_a_build(no_build: None, grad: bool, spatial_bn: bool) -> None:
    module = _module(spatial_bn=spatial_bn, residual=True).to("meta")
    x = torch.empty(2, 16, 5, 4, device="meta", requires_grad=grad)
    out = module(x)
    assert out.device.type == "meta" and out.shape == x.shape
    if grad:
        out.sum().backward()
        assert x.grad.shape == x.shape
    assert kernels._state == {}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_other_dtypes_run_without_a_build(no_build: None, dtype: torch.dtype) -> None:
    module = _module().to(dtype)
    x = torch.randn(2, 16, 5, 4, dtype=dtype, requires_grad=True)
    module(x).sum().backward()
    with torch.no_grad():
        module.eval()(x)
    assert kernels._state == {}


def test_fake_tensors_run_without_a_build(no_build: None) -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    module = _module()
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        out = module(mode.from_tensor(torch.randn(2, 16, 5, 4)))
    assert out.shape == (2, 16, 5, 4)
    assert kernels._state == {}


# ---------------------------------------------------------------------------------------------
# the custom operators


@needs_kernels
@pytest.mark.parametrize("bias", [False, True])
def test_opcheck(bias: bool) -> None:
    module = _module(mlp_bias=bias).double()
    first, _, second = module.channel.mlp
    conv = module.spatial.conv
    x = torch.randn(2, 16, 5, 4, dtype=torch.float64, requires_grad=True)
    args = (x, first.weight, first.bias, second.weight, second.bias, conv.weight, conv.bias, True)
    torch.library.opcheck(ops.cbam_train, args)
    cl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    torch.library.opcheck(ops.cbam_train, (cl, *args[1:]))
    assert ops.cbam_train(cl, *args[1:])[0].is_contiguous(memory_format=torch.channels_last)
    # both layouts at once (H = W = 1) with channels_last strides: the fake gives the real strides
    from torch._subclasses.fake_tensor import FakeTensorMode

    one = CBAM(1, reduction=1, mlp_bias=bias).double()
    first, _, second = one.channel.mlp
    both = torch.randn(2, 5, 4, 1, dtype=torch.float64).permute(0, 3, 1, 2)  # C = 1, channels_last strides
    assert both.stride() != torch.empty_like(both, memory_format=torch.contiguous_format).stride()
    with torch.no_grad():
        params = [first.weight, first.bias, second.weight, second.bias, one.spatial.conv.weight, one.spatial.conv.bias]
        params = [*(p if p is None else p.detach() for p in params), True]
        real = [ops.cbam_train(both, *params)[0].stride(), ops.cbam_infer(both, *params).stride()]
        with FakeTensorMode() as mode:
            fakes = [mode.from_tensor(a) if torch.is_tensor(a) else a for a in (both, *params)]
            fake = [ops.cbam_train(*fakes)[0].stride(), ops.cbam_infer(*fakes).stride()]
    assert fake == real
    with torch.no_grad():
        infer_args = tuple(a.detach() if torch.is_tensor(a) else a for a in args)
        torch.library.opcheck(ops.cbam_infer, infer_args)
        # channels_last in, channels_last out: the fake implementation says the kernel's strides
        cl = infer_args[0].contiguous(memory_format=torch.channels_last)
        torch.library.opcheck(ops.cbam_infer, (cl, *infer_args[1:]))
        assert ops.cbam_infer(cl, *infer_args[1:]).is_contiguous(memory_format=torch.channels_last)


@needs_kernels
@pytest.mark.parametrize("kwargs", [{}, {"mlp_bias": True, "residual": True}])
def test_compile_fullgraph_keeps_the_training_operator(kwargs: dict) -> None:
    module = _module(**kwargs)
    recorder = _Recorder()
    compiled = torch.compile(module, fullgraph=True, backend=recorder)
    x = torch.randn(2, 16, 5, 4)
    got = _grads(compiled, x)
    assert torch.ops.smp_cbam.cbam_train.default in recorder.targets
    reference = copy.deepcopy(module)
    reference.impl = "reference"
    for a, b in zip(got, _grads(reference, x), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # and through AOTAutograd, which traces the registered backward
    aot = torch.compile(copy.deepcopy(module), fullgraph=True, backend="aot_eager")
    for a, b in zip(_grads(aot, x), got, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@needs_kernels
def test_compile_fullgraph_keeps_the_inference_operator() -> None:
    module = _module(residual=True).eval()
    recorder = _Recorder()
    compiled = torch.compile(module, fullgraph=True, backend=recorder)
    x = torch.randn(2, 16, 5, 4)
    with torch.no_grad():
        out = compiled(x)
        torch.testing.assert_close(out, module.forward_reference(x), rtol=1e-5, atol=1e-6)
    assert recorder.targets == [torch.ops.smp_cbam.cbam_infer.default]


def _conv_cbam_conv() -> nn.Module:
    """CBAM between two convolutions, whose activations inductor lays out channels_last on CPU."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), CBAM(32, reduction=4, residual=True), nn.Conv2d(32, 8, 3, padding=1)
    )


@needs_kernels
def test_inductor_hands_the_inference_operator_its_channels_last_activations(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # inductor lays convolution activations out channels_last on CPU; an operator that took only
    # NCHW cost a copy into NCHW before every CBAM and one back after it
    model = _conv_cbam_conv().eval()
    layouts = []
    _spy_kernels(monkeypatch, cbam_infer=lambda f: lambda x, *a: layouts.append(x.stride()) or f(x, *a))
    x = torch.randn(2, 3, 16, 12)
    # no cache: a graph compiled before an edit of the operator's layout tag would be reused
    with torch.no_grad(), torch._inductor.config.patch(force_disable_caches=True):
        expected = model(x)
        layouts.clear()
        torch._dynamo.reset()
        out = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert layouts == [torch.empty(2, 32, 16, 12).contiguous(memory_format=torch.channels_last).stride()]


@needs_kernels
def test_inductor_hands_the_training_operators_their_channels_last_activations(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # as in inference: the forward and backward kernels get inductor's layout, no copies around them
    model = _conv_cbam_conv()
    layouts = []
    _spy_kernels(
        monkeypatch,
        cbam_train=lambda f: lambda x, *a: layouts.append(x.stride()) or f(x, *a),
        cbam_backward=lambda f: lambda g, x, *a: layouts.append(x.stride()) or f(g, x, *a),
    )
    x = torch.randn(2, 3, 16, 12)
    expected = _grads(copy.deepcopy(model), x)
    layouts.clear()
    with torch._inductor.config.patch(force_disable_caches=True):
        torch._dynamo.reset()
        got = _grads(torch.compile(model, fullgraph=True), x)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    channels_last = torch.empty(2, 32, 16, 12).contiguous(memory_format=torch.channels_last).stride()
    assert layouts == [channels_last, channels_last]


class _ReadAgain(nn.Module):
    """An in-place CBAM whose input is read again after it: eager mode then reads the output there
    (as with ``nn.ReLU(inplace=True)``), and a compiled graph must do the same."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 32, 3, padding=1)
        self.cbam = CBAM(32, reduction=4, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.cbam(y) * 2 + y


@needs_kernels
@pytest.mark.parametrize("residual", [False, True])
def test_compiled_inplace_cbam_writes_over_its_activations(residual: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # CBAM(inplace=True), as smp's decoders build it: compiled inference calls the mutating operator
    # on inductor's channels_last activation buffer itself (no output allocated, no copy around it),
    # as eager mode writes over its input
    from torch._inductor.utils import run_and_get_code

    model = _conv_cbam_conv().eval()
    model[2].inplace = True
    model[2].residual = residual
    x = torch.randn(2, 3, 16, 12)
    recorder = _Recorder()
    with torch.no_grad():
        expected = model(x)
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(model, fullgraph=True, backend=recorder)(x), expected)
        assert [t for t in recorder.targets if "smp_cbam" in str(t)] == [torch.ops.smp_cbam.cbam_infer_.default]
        written = []
        _spy_kernels(monkeypatch, cbam_infer=lambda f: lambda x, *a: written.append((x.stride(), a[-1])) or f(x, *a))
        with torch._inductor.config.patch(force_disable_caches=True):
            torch._dynamo.reset()
            out, (code, *_) = run_and_get_code(torch.compile(model, fullgraph=True), x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    channels_last = torch.empty(2, 32, 16, 12).contiguous(memory_format=torch.channels_last).stride()
    assert written == [(channels_last, True)]  # inplace=True reaches the kernel
    assert "smp_cbam.cbam_infer_" in code and "clone" not in code and "copy_" not in code


@needs_kernels
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
def test_the_inplace_operator_writes_the_output_over_x(layout: str) -> None:
    module = _module(mlp_bias=True, residual=True).double()
    first, _, second = module.channel.mlp
    conv = module.spatial.conv
    params = [first.weight, first.bias, second.weight, second.bias, conv.weight, conv.bias]
    params = [p.detach() for p in params]
    x = torch.randn(2, 16, 5, 8, dtype=torch.float64)
    x = {
        "nchw": x,
        "channels_last": x.contiguous(memory_format=torch.channels_last),
        "strided": x[..., ::2],  # neither layout: a dense copy is written back
    }[layout]
    expected = module.forward_reference(x).detach()
    with torch.no_grad():
        torch.library.opcheck(ops.cbam_infer_, (x.clone(), *params, True))
        ops.cbam_infer_(x, *params, True)
    torch.testing.assert_close(x, expected)


@needs_kernels
def test_compiled_inplace_cbam_overwrites_a_graph_input_as_eager_does() -> None:
    module = _module(inplace=True).eval()
    x = torch.randn(2, 16, 5, 4)
    eager_x, compiled_x = x.clone(), x.clone()
    with torch.no_grad():
        out = module(eager_x)
        torch._dynamo.reset()
        got = torch.compile(module, fullgraph=True)(compiled_x)
    torch.testing.assert_close(got, out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled_x, eager_x, rtol=1e-5, atol=1e-6)
    assert not torch.equal(compiled_x, x)  # the caller's tensor now holds the output


@needs_kernels
def test_compiled_inplace_cbam_keeps_eager_semantics_where_its_input_is_read_again() -> None:
    model = _ReadAgain().eval()
    x = torch.randn(2, 3, 16, 12)
    with torch.no_grad():
        expected = model(x)
        y = model.conv(x)
        # eager mode: y was overwritten, so the sum is three times CBAM's output
        torch.testing.assert_close(expected, 3 * model.cbam.forward_reference(y), rtol=1e-5, atol=1e-6)
        for backend in ("aot_eager", "inductor"):
            torch._dynamo.reset()
            got = torch.compile(copy.deepcopy(model), fullgraph=True, backend=backend)(x)
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@needs_kernels
def test_export_of_an_inplace_cbam_keeps_the_functional_operator() -> None:
    module = _module(inplace=True).eval()
    x = torch.randn(2, 16, 5, 4)
    with torch.no_grad():
        program = torch.export.export(module, (x,))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert {t for t in targets if "smp_cbam" in t} == {"smp_cbam.cbam_infer.default"}, targets
    y = torch.randn(2, 16, 5, 4)
    torch.testing.assert_close(program.module()(y), module.forward_reference(y), rtol=1e-5, atol=1e-6)


def _autocast_grads(module: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    x = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x)
    assert out.dtype == torch.bfloat16
    return [out.detach(), *torch.autograd.grad(out.float().square().sum(), [x, *module.parameters()])]


@needs_kernels
def test_compile_under_autocast_keeps_the_operators() -> None:
    # a convolution under CPU autocast hands CBAM bfloat16 activations: the compiled graph calls
    # the operators on them as eager mode calls the kernels (float32 parameters, gates and MLP),
    # instead of the formula with its MLP and convolution in bfloat16
    model = _conv_cbam_conv()
    x = torch.randn(2, 3, 16, 12)
    eager = _autocast_grads(model, x)
    recorder = _Recorder()
    torch._dynamo.reset()
    got = _autocast_grads(torch.compile(copy.deepcopy(model), fullgraph=True, backend=recorder), x)
    assert [t for t in recorder.targets if "smp_cbam" in str(t)] == [torch.ops.smp_cbam.cbam_train.default]
    for a, b in zip(got, eager, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # AOTAutograd traces the registered backward with the fakes' dtypes (float32 saved tensors)
    torch._dynamo.reset()
    aot = _autocast_grads(torch.compile(copy.deepcopy(model), fullgraph=True, backend="aot_eager"), x)
    for a, b in zip(aot, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    model.eval()
    recorder = _Recorder()
    torch._dynamo.reset()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(x)
        out = torch.compile(model, fullgraph=True, backend=recorder)(x)
    assert [t for t in recorder.targets if "smp_cbam" in str(t)] == [torch.ops.smp_cbam.cbam_infer.default]
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@needs_kernels
@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck_bfloat16(channels_last: bool) -> None:
    # bfloat16 x with float32 parameters (autocast's hand-over): the fakes give the kernels'
    # float32 descriptors, gates and pooled maps, which a compiled backward is planned around
    module = _module(mlp_bias=True)
    first, _, second = module.channel.mlp
    conv = module.spatial.conv
    x = torch.randn(2, 16, 5, 4).bfloat16()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    args = (x.requires_grad_(), first.weight, first.bias, second.weight, second.bias, conv.weight, conv.bias, False)
    torch.library.opcheck(ops.cbam_train, args)
    outputs = ops.cbam_train(*args)
    assert [t.dtype for t in outputs] == [torch.bfloat16] + [torch.float32] * 3 + [torch.long] + [torch.float32] * 2
    with torch.no_grad():
        torch.library.opcheck(ops.cbam_infer, tuple(a.detach() if torch.is_tensor(a) else a for a in args))


@needs_kernels
def test_operators_without_a_gradient_say_so_on_backward() -> None:
    # only cbam_train has a backward; the others must not hand back a silent None gradient
    module = _module(mlp_bias=True)
    first, _, second = module.channel.mlp
    conv = module.spatial.conv
    x = torch.randn(2, 16, 5, 4, requires_grad=True)
    params = (first.weight, first.bias, second.weight, second.bias, conv.weight, conv.bias, False)
    with pytest.raises(RuntimeError, match="smp_cbam::cbam_infer has no gradient"):
        ops.cbam_infer(x, *params).sum().backward()
    out, *saved = ops.cbam_train(x, *params)
    (dx, *_) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="smp_cbam::cbam_backward has no gradient"):
        dx.sum().backward()


@needs_kernels
@pytest.mark.parametrize("layout", ["nchw", "strided"])
def test_the_inplace_operator_bumps_the_version_of_x(layout: str) -> None:
    # autograd's check that a saved tensor was not changed in place reads the version counter
    module = _module()
    first, _, second = module.channel.mlp
    conv = module.spatial.conv
    x = torch.randn(2, 16, 5, 4) if layout == "nchw" else torch.randn(2, 16, 5, 8)[..., ::2]
    before = x._version
    with torch.no_grad():
        ops.cbam_infer_(x, first.weight, first.bias, second.weight, second.bias, conv.weight, conv.bias, False)
    assert x._version > before


def test_reloading_the_operators_module_keeps_them() -> None:
    import importlib

    before = ops.cbam_infer
    importlib.reload(ops)
    assert ops.cbam_infer is torch.ops.smp_cbam.cbam_infer.default and ops.cbam_infer == before
    x = torch.empty(2, 16, 5, 4, device="meta")
    w = [torch.empty(4, 16, device="meta"), None, torch.empty(16, 4, device="meta"), None]
    out = ops.cbam_infer(x, *w, torch.empty(1, 2, 7, 7, device="meta"), None, False)
    assert out.shape == x.shape


@needs_kernels
def test_compile_under_autocast_runs_the_formula_for_bfloat16_parameters() -> None:
    # a model cast to bfloat16 under autocast: the kernels need float32 parameters, as in eager mode
    module = _module().bfloat16()
    recorder = _Recorder()
    x = torch.randn(2, 16, 5, 4, dtype=torch.bfloat16)
    torch._dynamo.reset()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.compile(module, fullgraph=True, backend=recorder)(x)
    assert recorder.targets and not any("smp_cbam" in str(t) for t in recorder.targets)


@needs_kernels
def test_compile_falls_back_to_the_formula_where_the_kernels_do_not_apply() -> None:
    module = _module(spatial_bn=True)
    recorder = _Recorder()
    x = torch.randn(2, 16, 5, 4)
    torch.testing.assert_close(torch.compile(module, fullgraph=True, backend=recorder)(x), module.forward_reference(x))
    assert not any("smp_cbam" in str(t) for t in recorder.targets)


@needs_kernels
@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_export_keeps_the_operator(strict: bool, training: bool) -> None:
    # an eval module exported under no_grad keeps the inference operator, a training one the
    # training operator (whose backward is registered), and either program runs as the formula
    module = _module(mlp_bias=True).train(training)
    x = torch.randn(2, 16, 5, 4)
    with torch.set_grad_enabled(training):
        program = torch.export.export(module, (x,), strict=strict)
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    expected = "smp_cbam.cbam_train.default" if training else "smp_cbam.cbam_infer.default"
    assert {t for t in targets if t.startswith("smp_cbam.")} == {expected}, targets
    y = torch.randn(2, 16, 5, 4)
    torch.testing.assert_close(program.module()(y), module.forward_reference(y), rtol=1e-5, atol=1e-6)
