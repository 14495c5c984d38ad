"""CBAM under autocast (bf16 on CPU): the fused path with autocast's numerics, against the fp32
formula within bf16's tolerance, forward and backward, alone and in smp's Unet."""

import copy

import pytest
import segmentation_models_pytorch as smp
import torch

from smp_cbam import CBAM


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
def test_bf16_training_matches_the_fp32_formula(kwargs: dict, channels_last: bool) -> None:
    """Within bf16's tolerance of the fp32 formula: at most twice the error of autocast's own run of the
    formula (all in bf16), and 1% where that is smaller."""
    module, reference = _pair(**kwargs)
    autocast_reference = copy.deepcopy(reference)
    x32 = _input(channels_last).bfloat16().float()  # values a bf16 conv under autocast hands over
    grad = torch.randn_like(x32).bfloat16().float()
    x = x32.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = copy.deepcopy(module)(x.requires_grad_())
    assert type(out.grad_fn).__name__ == "FusedCBAMBackward" and out.dtype == torch.bfloat16
    got = _train(module, x, grad, autocast=True)
    assert got[1].dtype == torch.bfloat16 and all(p.grad.dtype == torch.float32 for p in module.parameters())
    expected = _train(reference, x32, grad, autocast=False)
    baseline = _train(autocast_reference, x, grad, autocast=True)
    for a, b, c in zip(got, expected, baseline, strict=True):
        _close_bf16(a, b, rel=max(1e-2, 2 * _error(c, b)))


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("spatial_bn", [False, True])
def test_bf16_inference_matches_the_fp32_formula(inplace: bool, spatial_bn: bool) -> None:
    module, reference = (m.eval() for m in _pair(inplace=inplace, spatial_bn=spatial_bn))
    x = _input().bfloat16()
    with torch.no_grad():
        expected = reference(x.float())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(x.clone())
    assert out.dtype == torch.bfloat16
    _close_bf16(out, expected)


def test_fp32_input_under_autocast_stays_fp32_and_exact() -> None:
    """The gates stay in float32 under autocast: fp32 input gives the fp32 formula's results."""
    module, reference = _pair(mlp_bias=True)
    x = _input().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x)
    assert out.dtype == torch.float32 and type(out.grad_fn).__name__ == "FusedCBAMBackward"
    _close_fp32(out, reference(x))
    got = torch.autograd.grad(out.sum(), [x, *module.parameters()])
    want = torch.autograd.grad(reference(x).sum(), [x, *reference.parameters()])
    for a, b in zip(got, want, strict=True):
        _close_fp32(a, b)


def test_backward_inside_the_autocast_region() -> None:
    module, reference = _pair()
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


def test_unet_training_step_under_autocast() -> None:
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
    assert names and set(names) == {"FusedCBAMBackward"}
    # the reference runs its gates in bf16, the fused path in fp32: equal within bf16's precision
    assert losses[0] == pytest.approx(losses[1], rel=5e-2)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None)  # the last block's attention1 never runs
        if p.grad is not None:
            assert torch.isfinite(p.grad).all()
