"""CBAM under autocast (bf16 on CPU): the compiled kernels and the fused path with autocast's
numerics, against the fp32 formula within bf16's tolerance, forward and backward, alone and in
smp's Unet; the kernels also against the float64 formula within one bf16 rounding."""

import copy
import os

import pytest
import segmentation_models_pytorch as smp
import torch

from smp_cbam import CBAM
from smp_cbam.attention import cbam_fused

needs_kernels = pytest.mark.skipif(
    os.environ.get("SMP_CBAM_KERNELS") == "0", reason="kernels disabled by SMP_CBAM_KERNELS=0"
)


def _backward_name(path: str, module: CBAM, x: torch.Tensor) -> str:
    """The grad_fn of ``module(x)`` under autocast on ``path``: the kernels take NCHW input, and
    channels_last input where the spatial gate has no BatchNorm."""
    batch_norm = isinstance(module.spatial.bn, torch.nn.BatchNorm2d)
    if path != "kernels" or (not x.is_contiguous() and batch_norm):
        return "FusedCBAMBackward"
    return "KernelBatchNormCBAMBackward" if batch_norm else "KernelCBAMBackward"


def _close_bf16(actual: torch.Tensor, expected: torch.Tensor, rel: float = 2e-2) -> None:
    """Equal within bf16's precision (8 bits): the error's norm relative to the expected norm.
    A norm, not the largest element: where bf16 rounding makes y = x g tie across channels, the
    channel max's gradient goes to another (tied) element than in fp32."""
    assert actual.shape == expected.shape
    err = ((actual.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-12)).item()
    assert err <= rel, f"relative error {err:.3g} > {rel}"


def _error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-12)).item()


def _close_fp32(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to summation order: relative to the largest magnitude (sums may cancel)."""
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def _pair(**kwargs: object) -> tuple[CBAM, CBAM]:
    torch.manual_seed(0)
    module = CBAM(32, reduction=4, **kwargs)
    reference = copy.deepcopy(module)
    reference.impl = "reference"
    return module, reference


def _input(channels_last: bool = False) -> torch.Tensor:
    torch.manual_seed(1)
    x = torch.randn(2, 32, 9, 7)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _train(module: CBAM, x: torch.Tensor, grad: torch.Tensor, autocast: bool) -> list[torch.Tensor]:
    x = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = module(x)
    out.backward(grad.to(out.dtype))
    return [out, x.grad, *(p.grad for p in module.parameters()), *module.buffers()]


@pytest.mark.parametrize("kwargs", [{}, {"mlp_bias": True, "residual": True}, {"spatial_bn": True}])
@pytest.mark.parametrize("channels_last", [False, True])
def test_bf16_training_matches_the_fp32_formula(kwargs: dict, channels_last: bool, path: str) -> None:
    """Within bf16's tolerance of the fp32 formula: at most twice the error of autocast's own run of the
    formula (all in bf16), and 1% where that is smaller."""
    module, reference = _pair(**kwargs)
    autocast_reference = copy.deepcopy(reference)
    x32 = _input(channels_last).bfloat16().float()  # values a bf16 conv under autocast hands over
    grad = torch.randn_like(x32).bfloat16().float()
    x = x32.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = copy.deepcopy(module)(x.requires_grad_())
    assert type(out.grad_fn).__name__ == _backward_name(path, module, x) and out.dtype == torch.bfloat16
    got = _train(module, x, grad, autocast=True)
    assert got[1].dtype == torch.bfloat16 and all(p.grad.dtype == torch.float32 for p in module.parameters())
    expected = _train(reference, x32, grad, autocast=False)
    baseline = _train(autocast_reference, x, grad, autocast=True)
    for a, b, c in zip(got, expected, baseline, strict=True):
        _close_bf16(a, b, rel=max(1e-2, 2 * _error(c, b)))


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("spatial_bn", [False, True])
def test_bf16_inference_matches_the_fp32_formula(inplace: bool, spatial_bn: bool, path: str) -> None:
    module, reference = (m.eval() for m in _pair(inplace=inplace, spatial_bn=spatial_bn))
    x = _input().bfloat16()
    with torch.no_grad():
        expected = reference(x.float())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(x.clone())
    assert out.dtype == torch.bfloat16
    _close_bf16(out, expected)


def test_fp32_input_under_autocast_stays_fp32_and_exact(path: str) -> None:
    """The gates stay in float32 under autocast: fp32 input gives the fp32 formula's results."""
    module, reference = _pair(mlp_bias=True)
    x = _input().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x)
    assert out.dtype == torch.float32 and type(out.grad_fn).__name__ == _backward_name(path, module, x)
    _close_fp32(out, reference(x))
    got = torch.autograd.grad(out.sum(), [x, *module.parameters()])
    want = torch.autograd.grad(reference(x).sum(), [x, *reference.parameters()])
    for a, b in zip(got, want, strict=True):
        _close_fp32(a, b)


@pytest.mark.parametrize("spatial_bn", [False, True])
def test_backward_inside_the_autocast_region(spatial_bn: bool, path: str) -> None:
    module, reference = _pair(spatial_bn=spatial_bn)
    x = _input().bfloat16()
    grads = []
    for inside in (False, True):
        x.grad = None
        x.requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(x)
            if inside:  # the backward's matmuls must not be recast
                out.float().square().sum().backward()
        if not inside:
            out.float().square().sum().backward()
        grads.append(x.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def test_unet_training_step_under_autocast(path: str) -> None:
    torch.manual_seed(0)
    model = smp.Unet(
        "resnet18", encoder_weights=None, encoder_depth=3, decoder_channels=(32, 16, 8),
        decoder_attention_type="cbam", classes=3,
    )  # fmt: skip
    reference = copy.deepcopy(model)
    for m in reference.modules():
        if isinstance(m, CBAM):
            m.impl = "reference"
    names = []
    for m in model.modules():
        if isinstance(m, CBAM):
            m.register_forward_hook(lambda m, a, out: names.append(type(out.grad_fn).__name__))
    images = torch.randn(2, 3, 32, 32)
    losses = []
    for net in (model, reference):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = net(images)
            loss = logits.float().square().mean()
        loss.backward()
        losses.append(loss.item())
    assert names and set(names) == {"KernelCBAMBackward" if path == "kernels" else "FusedCBAMBackward"}
    # the reference runs its gates in bf16, the fast paths in fp32: equal within bf16's precision
    assert losses[0] == pytest.approx(losses[1], rel=5e-2)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None)  # the last block's attention1 never runs
        if p.grad is not None:
            assert torch.isfinite(p.grad).all()


# ---------------------------------------------------------------------------------------------
# the kernels under bf16 autocast against the float64 formula: autocast's numerics are float32
# arithmetic with the full-size tensors rounded to bf16, so the output and dL/dx are within one
# bf16 rounding and the parameters' gradients (float32, from the same bf16 values of x and G) within
# float32's precision

# C not a multiple of 16 (a vector of floats) nor of 4 (the channel pool's step); H*W below a vector,
# odd, and above a tile (1024 pixels); batch 1
SHAPES = [(1, 24, 5, 3), (2, 7, 2, 3), (2, 40, 37, 29), (1, 72, 48, 40)]


def _bf16_pair(channels: int, **kwargs: object) -> tuple[CBAM, CBAM]:
    torch.manual_seed(0)
    module = CBAM(channels, reduction=4, **kwargs)
    reference = copy.deepcopy(module).double()
    reference.impl = "reference"
    return module, reference


def _bf16_data(shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 input and output gradient, what a conv under autocast hands over and gets back."""
    generator = torch.Generator().manual_seed(1)
    return (
        torch.randn(shape, generator=generator).bfloat16(),
        torch.randn(shape, generator=generator).bfloat16(),
    )


def _float64_formula(
    reference: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 reference's output for ``x`` and, after backward of ``grad``, its input (with ``.grad``)."""
    x64 = x.detach().double().requires_grad_()
    expected = reference(x64)
    expected.backward(grad.double())
    return expected, x64


def _within_one_rounding(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """bf16 ``actual`` within one bf16 rounding (2^-9 relative) of the float64 ``expected``, as a norm
    (the largest-index element of dL/dx is rounded twice), with float32's own error as slack."""
    assert actual.dtype == torch.bfloat16
    err = ((actual.double() - expected).norm() / expected.norm()).item()
    assert err <= 2**-8, f"relative error {err:.3g} > 2^-8"


def _within_float32(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == torch.float32
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual.double(), expected, rtol=1e-4, atol=1e-4 * scale)


@needs_kernels
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mlp_bias", [False, True])
@pytest.mark.parametrize("residual", [False, True])
def test_kernels_training_under_bf16_autocast_match_the_float64_formula(
    shape: tuple[int, ...], mlp_bias: bool, residual: bool
) -> None:
    module, reference = _bf16_pair(shape[1], mlp_bias=mlp_bias, residual=residual)
    x, grad = _bf16_data(shape)
    x.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert module._choose(x, training=True) == "kernels"
        out = module(x)
    assert type(out.grad_fn).__name__ == "KernelCBAMBackward" and out.dtype == torch.bfloat16
    out.backward(grad)
    expected, x64 = _float64_formula(reference, x, grad)
    assert out.shape == x.shape and x.grad.dtype == torch.bfloat16
    assert out.is_contiguous() and x.grad.is_contiguous()
    _within_one_rounding(out, expected.detach())
    _within_one_rounding(x.grad, x64.grad)
    for p, q in zip(module.parameters(), reference.parameters(), strict=True):
        _within_float32(p.grad, q.grad)


@needs_kernels
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2]], ids=lambda s: "x".join(map(str, s)))
def test_kernels_with_spatial_batchnorm_under_bf16_autocast(shape: tuple[int, ...]) -> None:
    """Training (batch statistics: the kernels' separate passes, MLP and BatchNorm with autograd
    graphs in float32), then eval mode (folded into the convolution)."""
    module, reference = _bf16_pair(shape[1], spatial_bn=True, mlp_bias=True)
    x, grad = _bf16_data(shape)
    x.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x)
    assert type(out.grad_fn).__name__ == "KernelBatchNormCBAMBackward" and out.dtype == torch.bfloat16
    out.backward(grad)
    expected, x64 = _float64_formula(reference, x, grad)
    _within_one_rounding(out, expected.detach())
    _within_one_rounding(x.grad, x64.grad)
    for p, q in zip(module.parameters(), reference.parameters(), strict=True):
        _within_float32(p.grad, q.grad)
    for a, b in zip(module.buffers(), reference.buffers(), strict=True):  # running statistics
        if a.is_floating_point():
            _within_float32(a, b)
        else:
            assert torch.equal(a, b)
    module.eval()
    reference.eval()
    with torch.no_grad():
        expected = reference(x.detach().double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _within_one_rounding(module(x.detach()), expected)


@needs_kernels
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("inplace", [False, True])
def test_kernels_inference_under_bf16_autocast(
    shape: tuple[int, ...], residual: bool, inplace: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    module, reference = (m.eval() for m in _bf16_pair(shape[1], residual=residual, inplace=inplace, mlp_bias=True))
    calls = []
    infer = cbam_fused.eager_infer
    monkeypatch.setattr(cbam_fused, "eager_infer", lambda *args: calls.append(infer(*args)) or calls[-1])
    x, _ = _bf16_data(shape)
    with torch.no_grad():
        expected = reference(x.double())
        y = x.clone()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(y)
    assert len(calls) == 1 and calls[0] is out  # impl="auto" took the kernels' eager binding
    assert out.dtype == torch.bfloat16 and (out is y) == inplace
    _within_one_rounding(out, expected)


@needs_kernels
def test_bf16_takes_the_kernels_only_under_autocast_with_float32_parameters() -> None:
    """A model cast to bf16 (bf16 parameters), with autocast or without, runs the fused path;
    bf16 input to a float32 model outside autocast is the formula's error, not the kernels' input."""
    module, _ = _bf16_pair(16)
    x = torch.randn(2, 16, 5, 4).bfloat16()
    cl = x.contiguous(memory_format=torch.channels_last)
    for training in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert module._choose(x, training) == "kernels"
            assert module._choose(cl, training) == "kernels"
            assert module._choose(x.half(), training) == "fused"
        cast = copy.deepcopy(module).bfloat16()
        assert cast._choose(x, training) == "fused"
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert cast._choose(x, training) == "fused"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast.impl = "kernels"
        with pytest.raises(ValueError, match="does not take torch.bfloat16 input with torch.bfloat16 parameters"):
            cast(x)
    module.impl = "kernels"
    with pytest.raises(ValueError, match="does not take torch.bfloat16 input outside autocast"):
        module(x)
