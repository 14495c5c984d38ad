"""CBAM in smp's Unet and Unet++: training, checkpoints, TorchScript, compile, export, ONNX."""

import copy
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import segmentation_models_pytorch as smp
import torch
from torch import nn

import smp_cbam
from smp_cbam import CBAM

SMALL_DECODER = (64, 32, 16, 16, 16)


def _model(arch: str, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    kwargs = {"decoder_channels": SMALL_DECODER, **kwargs}
    model = getattr(smp, arch)("resnet18", encoder_weights=None, decoder_attention_type="cbam", **kwargs)
    assert any(isinstance(m, CBAM) for m in model.decoder.modules())
    return model


def _attention_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in model.decoder.modules() if isinstance(m, CBAM) for p in m.parameters()]


def _close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


# ---------------------------------------------------------------------------------------------
# forward and backward


@pytest.mark.parametrize(
    ("arch", "in_channels", "classes", "size"),
    [
        ("Unet", 1, 7, (70, 90)),
        ("Unet", 4, 1, (64, 96)),
        ("Unet", 3, 2, (45, 77)),
        ("UnetPlusPlus", 1, 1, (64, 96)),
        ("UnetPlusPlus", 4, 7, (96, 64)),
    ],
)
def test_forward_backward(arch: str, in_channels: int, classes: int, size: tuple[int, int]) -> None:
    model = _model(arch, in_channels=in_channels, classes=classes).train()
    called: list[nn.Module] = []
    for m in model.decoder.modules():
        if isinstance(m, CBAM):
            m.register_forward_hook(lambda module, args, out: called.append(module))
    x = torch.randn(2, in_channels, *size, requires_grad=True)
    out = model(x)
    assert out.shape == (2, classes, *size)
    (out * torch.randn_like(out)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # smp applies attention1 only where there is a skip: one CBAM of Unet's 10 never runs
    cbams = [m for m in model.decoder.modules() if isinstance(m, CBAM)]
    ran = {id(m) for m in called}
    assert (len(cbams), len(ran)) == ((10, 9) if arch == "Unet" else (22, 21))
    for module in cbams:
        grads = [p.grad for p in module.parameters()]
        if id(module) in ran:
            assert all(g is not None and torch.isfinite(g).all() for g in grads)
            assert sum(float(g.abs().sum()) for g in grads) > 0
        else:
            assert all(g is None for g in grads)


def test_unetplusplus_needs_multiple_of_32() -> None:
    with pytest.raises(RuntimeError, match="divisible"):
        _model("UnetPlusPlus").eval()(torch.randn(1, 3, 70, 90))


# ---------------------------------------------------------------------------------------------
# save_pretrained / from_pretrained

LOAD_SCRIPT = """
import sys
import torch

torch.set_num_threads(1)
import smp_cbam
import segmentation_models_pytorch as smp

root = sys.argv[1]
for arch in ("Unet", "UnetPlusPlus"):
    model = smp.from_pretrained(f"{root}/{arch}").eval()
    assert type(model).__name__ == arch, type(model)
    n_cbam = sum(isinstance(m, smp_cbam.CBAM) for m in model.modules())
    with torch.no_grad():
        out = model(torch.load(f"{root}/x.pt"))
    torch.save({"out": out, "n_cbam": n_cbam}, f"{root}/{arch}/loaded.pt")
"""


@pytest.mark.slow
def test_save_pretrained_from_pretrained_in_fresh_process(tmp_path: Path) -> None:
    x = torch.randn(1, 2, 64, 64)
    torch.save(x, tmp_path / "x.pt")
    expected = {}
    for arch in ("Unet", "UnetPlusPlus"):
        model = _model(arch, seed=1, in_channels=2, classes=3).eval()
        with torch.no_grad():  # non-default BatchNorm statistics must survive the round trip
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.1, 0.1)
                    m.running_var.uniform_(0.5, 1.5)
            expected[arch] = (model(x), sum(isinstance(m, CBAM) for m in model.modules()))
        model.save_pretrained(tmp_path / arch)
        config = json.loads((tmp_path / arch / "config.json").read_text())
        assert config["decoder_attention_type"] == "cbam"
        assert config["in_channels"] == 2 and config["classes"] == 3

    env = dict(os.environ)
    package_root = str(Path(smp_cbam.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    for arch, (out, n_cbam) in expected.items():
        loaded = torch.load(tmp_path / arch / "loaded.pt")
        assert loaded["n_cbam"] == n_cbam > 0
        assert torch.equal(loaded["out"], out), arch


# ---------------------------------------------------------------------------------------------
# TorchScript, torch.compile, torch.export


@pytest.mark.parametrize("arch", ["Unet", "UnetPlusPlus"])
def test_jit_script_matches_eager(arch: str) -> None:
    # every architecture smp declares scriptable stays scriptable with CBAM in its decoder
    if not getattr(smp, arch)._is_torch_scriptable:
        pytest.skip(f"smp declares {arch} not scriptable")
    model = _model(arch, in_channels=3, classes=2).eval()
    scripted = torch.jit.script(model)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        _close(scripted(x), model(x))
    scripted.train()
    model.train()
    x.requires_grad_(True)
    out = scripted(x)
    (grad,) = torch.autograd.grad(out.square().mean(), x)
    x_eager = x.detach().requires_grad_(True)
    (expected,) = torch.autograd.grad(model(x_eager).square().mean(), x_eager)
    _close(out, model(x_eager))
    _close(grad, expected, tol=1e-4)


@pytest.fixture
def fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _tiny_unet(seed: int = 0) -> nn.Module:
    # the smallest Unet with CBAM at every decoder stage: three resnet18 stages
    return _model("Unet", seed=seed, encoder_depth=3, decoder_channels=(32, 16, 16), classes=2)


@pytest.mark.slow
def test_compile_inductor_eval_matches_eager(fresh_dynamo: None) -> None:
    model = _tiny_unet().eval()
    compiled = torch.compile(model, fullgraph=True)  # default backend: inductor
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        _close(compiled(x), expected)
        x2 = torch.randn(1, 3, 32, 32)
        _close(compiled(x2), model(x2))


@pytest.mark.slow
def test_compile_train_step_matches_eager(fresh_dynamo: None) -> None:
    eager = _tiny_unet(seed=3).train()
    compiled_model = copy.deepcopy(eager)
    attention_before = [p.detach().clone() for p in _attention_params(eager)]
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 3, 32, 32)
    target = torch.randint(0, 2, (2, 32, 32))
    results = []
    for model, fn in ((eager, eager), (compiled_model, compiled)):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        out = fn(x)
        loss = nn.functional.cross_entropy(out, target)
        loss.backward()
        grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
        optimizer.step()
        results.append((out.detach(), loss.detach(), grads, model.state_dict()))
    (out_e, loss_e, grads_e, state_e), (out_c, loss_c, grads_c, state_c) = results
    _close(out_c, out_e)
    _close(loss_c, loss_e)
    assert [g is None for g in grads_c] == [g is None for g in grads_e]
    for g_c, g_e in zip(grads_c, grads_e):
        if g_e is not None:
            _close(g_c, g_e, tol=1e-4)
    assert list(state_c) == list(state_e)
    for key in state_e:  # parameters after the step and BatchNorm's running statistics
        _close(state_c[key].float(), state_e[key].float(), tol=1e-4)
    # the step moved the attention weights, identically in both
    moved = [not torch.equal(p, b) for p, b in zip(_attention_params(eager), attention_before)]
    assert any(moved)


@pytest.mark.parametrize("arch", ["Unet", "UnetPlusPlus"])
def test_torch_export_matches_eager(arch: str) -> None:
    model = _model(arch, classes=2).eval()
    x = torch.randn(1, 3, 64, 64)
    program = torch.export.export(model, (x,))
    exported = program.module()
    x2 = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        _close(exported(x), model(x))
        _close(exported(x2), model(x2))


# ---------------------------------------------------------------------------------------------
# ONNX


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["Unet", "UnetPlusPlus"])
def test_onnx_export_runs_in_onnxruntime(arch: str, tmp_path: Path) -> None:
    model = _model(arch, classes=3).eval()
    x = torch.randn(1, 3, 64, 64)
    path = tmp_path / f"{arch}.onnx"
    torch.onnx.export(model, (x,), str(path))
    onnx.checker.check_model(str(path), full_check=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (input_meta,) = session.get_inputs()
    assert list(input_meta.shape) == [1, 3, 64, 64]
    x2 = torch.randn(1, 3, 64, 64)  # not the export example: nothing was folded into constants
    (result,) = session.run(None, {input_meta.name: x2.numpy()})
    with torch.no_grad():
        expected = model(x2).numpy()
    assert result.shape == expected.shape == (1, 3, 64, 64)
    np.testing.assert_allclose(result, expected, rtol=1e-4, atol=1e-4)
