"""Registration of the attention types with smp's decoder ``Attention``."""

import functools
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import segmentation_models_pytorch as smp
import torch
from segmentation_models_pytorch.base import modules as smp_modules
from segmentation_models_pytorch.base.modules import SCSEModule
from torch import nn

import smp_cbam
import smp_cbam.registry
from smp_cbam import (
    CBAM,
    ECA,
    ChannelAttention,
    SpatialAttention,
    SqueezeExcite,
    available_attentions,
    build_attention,
    register_attention,
)

BUILTIN = {
    "cbam": CBAM,
    "cbam_residual": CBAM,
    "cbam_neutral": CBAM,
    "cbam_channel": ChannelAttention,
    "cbam_spatial": SpatialAttention,
    "se": SqueezeExcite,
    "eca": ECA,
}
ARCHS = ["Unet", "UnetPlusPlus"]

# Shared by this process (smp_cbam imported) and a subprocess that never imports smp_cbam.
BUILD_NATIVE = """
def build_native(smp, torch):
    results = {}
    for arch in ("Unet", "UnetPlusPlus"):
        for name in (None, "scse"):
            torch.manual_seed(0)
            model = getattr(smp, arch)(
                "resnet18", encoder_weights=None, decoder_attention_type=name
            ).eval()
            x = torch.randn(1, 3, 64, 64)
            with torch.no_grad():
                out = model(x)
            results[f"{arch}-{name}"] = {
                "types": [f"{type(m).__module__}.{type(m).__qualname__}" for m in model.modules()],
                "state": model.state_dict(),
                "out": out,
            }
    return results
"""

SCRIPT = (
    """
import json
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
mode, out_dir = sys.argv[1], Path(sys.argv[2])
if mode == "before":
    import smp_cbam
import segmentation_models_pytorch as smp
"""
    + BUILD_NATIVE
    + """
result = {"smp_version": smp.__version__}
if mode == "after":
    assert "smp_cbam" not in sys.modules
    torch.save(build_native(smp, torch), out_dir / "native.pt")
    try:
        smp.Unet("resnet18", encoder_weights=None, decoder_attention_type="cbam")
    except ValueError as e:
        result["without_smp_cbam"] = str(e)
    import smp_cbam
from smp_cbam import CBAM

for arch in ("Unet", "UnetPlusPlus"):
    model = getattr(smp, arch)("resnet18", encoder_weights=None, decoder_attention_type="cbam")
    with torch.no_grad():
        out = model.eval()(torch.randn(1, 3, 64, 64))
    result[arch] = [sum(isinstance(m, CBAM) for m in model.modules()), list(out.shape)]
(out_dir / "result.json").write_text(json.dumps(result))
"""
)


@pytest.fixture(scope="module")
def script_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict, Path]]:
    """SCRIPT run in two fresh interpreters at once: smp_cbam imported before smp, and after it.

    The "after" run first uses smp without smp_cbam and saves that to ``native.pt``.
    """
    package_root = str(Path(smp_cbam.__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    dirs = {mode: tmp_path_factory.mktemp(mode) for mode in ("before", "after")}
    procs = {
        mode: subprocess.Popen(
            [sys.executable, "-c", SCRIPT, mode, str(d)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for mode, d in dirs.items()
    }
    runs = {}
    for mode, proc in procs.items():
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
        result = json.loads((dirs[mode] / "result.json").read_text())
        runs[mode] = (result, dirs[mode] / "native.pt")
    return runs


@pytest.fixture(autouse=True)
def _isolated_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registrations made by a test are dropped after it."""
    monkeypatch.setattr(smp_cbam.registry, "_FACTORIES", dict(smp_cbam.registry._FACTORIES))


def _decoder_modules(model: nn.Module, cls: type) -> list[nn.Module]:
    decoder = getattr(model, "decoder", model)
    return [m for m in decoder.modules() if isinstance(m, cls)]


def _attention_channels(model: nn.Module) -> list[int]:
    """Input channels of every decoder ``Attention`` (read from smp's SCSE cSE first conv)."""
    return [m.cSE[1].in_channels for m in _decoder_modules(model, SCSEModule)]


# ---------------------------------------------------------------------------------------------
# the registered names in smp's models


@pytest.mark.parametrize("name", list(BUILTIN))
@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda **kw: smp.Unet("resnet18", **kw), id="Unet"),
        pytest.param(lambda **kw: smp.UnetPlusPlus("resnet18", **kw), id="UnetPlusPlus"),
        pytest.param(lambda **kw: smp.create_model("unet", "resnet18", **kw), id="create_model"),
    ],
)
def test_registered_names_build_and_run(name: str, make) -> None:
    model = make(encoder_weights=None, decoder_attention_type=name).eval()
    attentions = _decoder_modules(model, smp_modules.Attention)
    assert attentions
    assert all(type(a.attention) is BUILTIN[name] for a in attentions)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 1, 64, 64)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_cbam_count_and_widths_match_scse(arch: str) -> None:
    """One CBAM wherever smp puts an SCSEModule, with the same input channels."""
    scse = getattr(smp, arch)("resnet18", encoder_weights=None, decoder_attention_type="scse")
    cbam = getattr(smp, arch)("resnet18", encoder_weights=None, decoder_attention_type="cbam")
    cbams = _decoder_modules(cbam, CBAM)
    assert len(cbams) == len(_decoder_modules(scse, SCSEModule)) > 0
    widths = [_decoder_modules(c, ChannelAttention)[0].in_channels for c in cbams]
    assert widths == _attention_channels(scse)
    # only the attention modules differ: same keys outside the attentions
    outside = [{k for k in m.state_dict() if ".attention" not in k} for m in (cbam, scse)]
    assert outside[0] == outside[1]


# ---------------------------------------------------------------------------------------------
# smp's own types are untouched


@pytest.mark.slow
def test_native_types_identical_to_smp_without_smp_cbam(
    script_runs: dict[str, tuple[dict, Path]],
) -> None:
    _, native_path = script_runs["after"]
    reference = torch.load(native_path, weights_only=False)
    namespace: dict = {}
    exec(BUILD_NATIVE, namespace)
    ours = namespace["build_native"](smp, torch)
    assert set(ours) == set(reference) == {f"{a}-{n}" for a in ARCHS for n in (None, "scse")}
    for key, ref in reference.items():
        got = ours[key]
        assert got["types"] == ref["types"], key
        assert list(got["state"]) == list(ref["state"]), key
        for name, tensor in ref["state"].items():
            assert torch.equal(got["state"][name], tensor), (key, name)
        assert torch.equal(got["out"], ref["out"]), key
    assert "segmentation_models_pytorch.base.modules.SCSEModule" in reference["Unet-scse"]["types"]
    assert "torch.nn.modules.linear.Identity" in reference["Unet-None"]["types"]


@pytest.mark.parametrize("mode", ["before", "after"])
def test_import_order(mode: str, script_runs: dict[str, tuple[dict, Path]]) -> None:
    result = script_runs[mode][0]
    assert result["smp_version"] == smp.__version__
    for arch in ARCHS:
        model = getattr(smp, arch)("resnet18", encoder_weights=None, decoder_attention_type="cbam")
        assert result[arch] == [len(_decoder_modules(model, CBAM)), [1, 1, 64, 64]]
    if mode == "after":  # smp alone rejects the name: smp_cbam is what makes it valid
        assert "cbam" in result["without_smp_cbam"]


# ---------------------------------------------------------------------------------------------
# install() and reload


def _wrapping_depth() -> int:
    """How many smp_cbam wrappers sit between ``Attention.__init__`` and smp's own one."""
    depth, fn = 0, smp_modules.Attention.__init__
    while getattr(fn, "_smp_cbam", False):
        depth += 1
        inner = [
            c.cell_contents
            for c in fn.__closure__ or ()
            if callable(c.cell_contents) and getattr(c.cell_contents, "__name__", "") == "__init__"
        ]
        assert len(inner) == 1
        fn = inner[0]
    assert fn.__qualname__ == "Attention.__init__"
    return depth


def _check_all_types_work() -> None:
    for name in (None, "scse", *BUILTIN):
        module = build_attention(name, 32)
        assert module(torch.randn(1, 32, 4, 4)).shape == (1, 32, 4, 4)
    assert type(build_attention("scse", 32)) is SCSEModule
    assert type(build_attention(None, 32)) is nn.Identity


def test_install_is_idempotent() -> None:
    init = smp_modules.Attention.__init__
    assert _wrapping_depth() == 1
    smp_cbam.install()
    smp_cbam.install()
    assert smp_modules.Attention.__init__ is init
    assert _wrapping_depth() == 1
    _check_all_types_work()


def test_reload_does_not_double_wrap() -> None:
    init = smp_modules.Attention.__init__
    old_register = smp_cbam.register_attention
    importlib.reload(smp_cbam.registry)
    smp_cbam.registry.install()
    importlib.reload(smp_cbam)
    assert smp_modules.Attention.__init__ is init
    assert _wrapping_depth() == 1
    _check_all_types_work()
    model = smp.Unet("resnet18", encoder_weights=None, decoder_attention_type="scse")
    assert len(_decoder_modules(model, SCSEModule)) == 10
    # the function bound before the reload still registers into the live registry
    old_register("after_reload", CBAM)
    assert "after_reload" in smp_cbam.available_attentions()
    assert type(build_attention("after_reload", 8)) is CBAM


# ---------------------------------------------------------------------------------------------
# register_attention / available_attentions / build_attention


def test_available_attentions() -> None:
    assert available_attentions() == [None, "scse", *BUILTIN]
    register_attention("mine", CBAM)
    assert available_attentions()[-1] == "mine"


def test_register_user_type_used_in_unet() -> None:
    register_attention("cbam_r8", functools.partial(CBAM, reduction=8, kernel_size=3))
    model = smp.Unet("resnet18", encoder_weights=None, decoder_attention_type="cbam_r8")
    cbams = _decoder_modules(model, CBAM)
    assert len(cbams) == 10
    for module in cbams:
        (channel,) = [m for m in module.modules() if isinstance(m, ChannelAttention)]
        (spatial,) = [m for m in module.modules() if isinstance(m, SpatialAttention)]
        hidden = max(channel.in_channels // 8, 1)
        assert sum(p.numel() for p in channel.parameters()) == 2 * channel.in_channels * hidden
        assert sum(p.numel() for p in spatial.parameters()) == 2 * 3 * 3 + 1
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 1, 32, 32)


def test_register_positional_factory() -> None:
    """A factory is called as ``factory(in_channels)``, whatever its parameter is called."""
    seen: list[int] = []

    def factory(c: int) -> nn.Module:
        seen.append(c)
        return nn.Identity()

    register_attention("positional", factory)
    assert type(build_attention("positional", 24)) is nn.Identity
    smp.Unet("resnet18", encoder_weights=None, decoder_attention_type="positional")
    assert seen[0] == 24
    scse = smp.Unet("resnet18", encoder_weights=None, decoder_attention_type="scse")
    assert seen[1:] == _attention_channels(scse)


def test_register_duplicate_needs_overwrite() -> None:
    register_attention("dup", CBAM)
    with pytest.raises(ValueError, match="dup"):
        register_attention("dup", SqueezeExcite)
    assert type(build_attention("dup", 16)) is CBAM
    register_attention("dup", SqueezeExcite, overwrite=True)
    assert type(build_attention("dup", 16)) is SqueezeExcite
    with pytest.raises(ValueError, match="cbam"):
        register_attention("cbam", SqueezeExcite)
    register_attention("cbam", SqueezeExcite, overwrite=True)  # undone by _isolated_registry
    assert type(build_attention("cbam", 16)) is SqueezeExcite


@pytest.mark.parametrize("name", ["scse", None, ""])
def test_register_native_or_empty_name_raises(name: str | None) -> None:
    with pytest.raises(ValueError):
        register_attention(name, CBAM)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        register_attention(name, CBAM, overwrite=True)  # type: ignore[arg-type]
    assert available_attentions().count(name) == (0 if name == "" else 1)


def test_register_non_callable_raises_type_error() -> None:
    with pytest.raises(TypeError, match="callable"):
        register_attention("broken", 42)  # type: ignore[arg-type]
    assert "broken" not in available_attentions()


UNKNOWN = {"encoder_weights": None, "decoder_attention_type": "nope"}


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda: build_attention("nope", 16), id="build_attention"),
        pytest.param(lambda: smp.Unet(**UNKNOWN), id="Unet"),
        pytest.param(lambda: smp.UnetPlusPlus(**UNKNOWN), id="UnetPlusPlus"),
    ],
)
def test_unknown_name_lists_available(build) -> None:
    with pytest.raises(ValueError) as info:
        build()
    message = str(info.value)
    assert "'nope'" in message
    for name in available_attentions():
        assert repr(name) in message


@pytest.mark.parametrize("name", list(BUILTIN))
@pytest.mark.parametrize("channels", [1, 3, 16, 64])
def test_build_attention(name: str, channels: int) -> None:
    module = build_attention(name, channels)
    assert type(module) is BUILTIN[name]
    x = torch.randn(2, channels, 5, 6)
    assert module(x).shape == x.shape
    if name != "cbam_spatial":
        with pytest.raises((ValueError, RuntimeError)):
            module(torch.randn(2, channels + 1, 5, 6))


def test_build_attention_native() -> None:
    assert type(build_attention(None, 8)) is nn.Identity
    scse = build_attention("scse", 32)
    assert type(scse) is SCSEModule
    assert scse.cSE[1].in_channels == 32
