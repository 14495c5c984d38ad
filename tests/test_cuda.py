"""CBAM on CUDA: what ``impl="auto"`` runs there (the formula) and the eager fused path, in fp32
and under autocast (fp16 and bf16), forward and backward, against the fp32 formula;
torch.compile and a Unet training step on the GPU; and no build of the CPU kernels for CUDA
input. Skipped where no GPU is visible (CI has none): experiments/cuda_check.sh runs them."""

import copy
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest
import segmentation_models_pytorch as smp
import torch

import smp_cbam  # noqa: F401  (registers the attention types with smp)
from smp_cbam import CBAM

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

HALF = [torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _no_tf32() -> Iterator[None]:
    """fp32 comparisons in fp32: cuDNN convolutions default to TF32 (10-bit mantissas) on Ampere
    and later, which the formula and the fused path would each round differently."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-12)).item()


def _pair(impl: str = "auto", **kwargs: object) -> tuple[CBAM, CBAM]:
    torch.manual_seed(0)
    module = CBAM(32, reduction=4, impl=impl, **kwargs).cuda()
    reference = copy.deepcopy(module)
    reference.impl = "reference"
    return module, reference


def _train(module: CBAM, x: torch.Tensor, grad: torch.Tensor, dtype: torch.dtype | None) -> list[torch.Tensor]:
    x = x.detach().clone().requires_grad_()
    with torch.autocast("cuda", dtype=dtype or torch.float16, enabled=dtype is not None):
        out = module(x)
    out.backward(grad.to(out.dtype))
    return [out, x.grad, *(p.grad for p in module.parameters())]


def test_auto_runs_the_formula_on_cuda() -> None:
    """What impl="auto" runs on CUDA is the formula itself; the comparisons below test the fused path."""
    module = CBAM(16, reduction=4).cuda()
    x = torch.randn(2, 16, 8, 8, device="cuda")
    assert module._choose(x, training=True) == module._choose(x, training=False) == "reference"
    with torch.autocast("cuda", dtype=torch.float16):
        assert module._choose(x.half(), training=True) == "reference"
    assert type(CBAM(16, reduction=4, impl="fused").cuda()(x.requires_grad_()).grad_fn).__name__ == "FusedCBAMBackward"


@pytest.mark.parametrize("impl", ["fused"])
@pytest.mark.parametrize("kwargs", [{}, {"mlp_bias": True, "residual": True}, {"spatial_bn": True}])
def test_fp32_on_cuda_matches_the_formula(impl: str, kwargs: dict) -> None:
    module, reference = _pair(impl, **kwargs)
    torch.manual_seed(1)
    x = torch.randn(2, 32, 9, 7, device="cuda")
    grad = torch.randn_like(x)
    got, want = _train(module, x, grad, None), _train(reference, x, grad, None)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())


@pytest.mark.parametrize("impl", ["fused"])
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("kwargs", [{}, {"mlp_bias": True, "residual": True}, {"spatial_bn": True}])
def test_autocast_on_cuda_matches_the_fp32_formula(impl: str, dtype: torch.dtype, kwargs: dict) -> None:
    """Within the half type's tolerance of the fp32 formula: at most twice the error of autocast's
    own run of the formula, and 1% (fp16) or 2% (bf16) where that is smaller."""
    module, reference = _pair(impl, **kwargs)
    autocast_reference = copy.deepcopy(reference)
    torch.manual_seed(1)
    x32 = torch.randn(2, 32, 9, 7, device="cuda").to(dtype).float()  # what a half conv hands over
    grad = torch.randn_like(x32).to(dtype).float()
    x = x32.to(dtype)
    got = _train(module, x, grad, dtype)
    assert got[0].dtype == dtype and got[1].dtype == dtype
    assert all(p.grad.dtype == torch.float32 for p in module.parameters())
    expected = _train(reference, x32, grad, None)
    baseline = _train(autocast_reference, x, grad, dtype)
    floor = 1e-2 if dtype == torch.float16 else 2e-2
    for a, b, c in zip(got, expected, baseline, strict=True):
        assert _relative(a, b) <= max(floor, 2 * _relative(c, b))


@pytest.mark.parametrize("impl", ["fused"])
@pytest.mark.parametrize("dtype", HALF)
def test_autocast_inference_on_cuda(impl: str, dtype: torch.dtype) -> None:
    module, reference = (m.eval() for m in _pair(impl, inplace=True))
    torch.manual_seed(1)
    x = torch.randn(2, 32, 16, 16, device="cuda").to(dtype)
    with torch.no_grad():
        expected = reference(x.float())
        with torch.autocast("cuda", dtype=dtype):
            out = module(x.clone())
    assert out.dtype == dtype and _relative(out, expected) <= 2e-2


def test_compiled_cbam_on_cuda_matches_eager() -> None:
    module, _ = _pair(mlp_bias=True)
    module.eval()
    torch.manual_seed(1)
    x = torch.randn(4, 32, 24, 24, device="cuda")
    compiled = torch.compile(module, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x.clone()), module(x.clone()), rtol=1e-4, atol=1e-5)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got, want = compiled(x.bfloat16()), module(x.bfloat16())
    assert got.dtype == want.dtype == torch.bfloat16 and _relative(got, want) <= 1e-2


@pytest.mark.parametrize("attention", ["cbam", "cbam_residual"])
def test_unet_fp16_training_step_on_cuda(attention: str) -> None:
    torch.manual_seed(0)
    model = smp.Unet("resnet18", encoder_weights=None, decoder_attention_type=attention, classes=3).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda")
    x = torch.randn(4, 3, 64, 64, device="cuda")
    y = torch.randint(0, 3, (4, 64, 64), device="cuda")
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def test_cuda_input_never_builds_the_cpu_kernels() -> None:
    """A fresh process that runs CBAM on CUDA in every mode loads no CPU extension: building it
    needs a C++ compiler and about 20 s, and CUDA input has no use for it."""
    script = textwrap.dedent(
        """
        import torch
        from smp_cbam import CBAM
        from smp_cbam.attention import kernels
        def refuse(*args, **kwargs):
            raise AssertionError("the CPU kernels were built for CUDA input")
        kernels._load = refuse
        x = torch.randn(2, 16, 8, 8, device="cuda")
        for impl in ("auto", "fused"):
            m = CBAM(16, reduction=4, impl=impl).cuda()
            for dtype in (None, torch.float16, torch.bfloat16):
                with torch.autocast("cuda", dtype=dtype or torch.float16, enabled=dtype is not None):
                    with torch.no_grad():
                        m(x.clone())
                    m(x.clone().requires_grad_()).float().sum().backward()
        assert kernels.extension() is None and "ok" not in kernels._state
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
