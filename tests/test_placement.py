"""Attention in every smp architecture: ``add_attention``, ``decoder_attention_type``, persistence."""

import json
import warnings

import pytest
import segmentation_models_pytorch as smp
import torch
from segmentation_models_pytorch.base.modules import Attention
from torch import nn

import smp_cbam
import smp_cbam.registry
from smp_cbam import CBAM, SqueezeExcite, add_attention, capture_attention, insertion_points, timm_attention
from smp_cbam.placement import CONFIG_KEY, supports

ENCODER = "tu-test_resnet"  # timm's tiny ResNet: 4 blocks (BasicBlock, BasicBlock, Bottleneck, BasicBlock)
ENCODER_BLOCKS = 4

# arch: (small create_model arguments, decoder modules inserted, two input sizes)
ARCHS = {
    "unet": ({"decoder_channels": (16,) * 5}, 10, (64, 96)),
    "unetplusplus": ({"decoder_channels": (16,) * 5}, 22, (64, 96)),
    "fpn": ({"decoder_pyramid_channels": 32, "decoder_segmentation_channels": 32}, 4, (64, 96)),
    "pspnet": ({"psp_out_channels": 32}, 1, (64, 96)),
    "deeplabv3": ({"decoder_channels": 32}, 2, (64, 96)),
    "deeplabv3plus": ({"decoder_channels": 32}, 3, (64, 96)),
    "linknet": ({}, 5, (64, 96)),
    "manet": ({"decoder_channels": (16,) * 5, "decoder_pab_channels": 16}, 5, (64, 96)),
    "pan": ({"decoder_channels": 32}, 4, (128, 160)),  # its pyramid pools the 1/16 map thrice
    "upernet": ({"decoder_channels": 32}, 4, (64, 96)),
    "segformer": ({"decoder_segmentation_channels": 32}, 5, (64, 96)),
    "dpt": ({"decoder_intermediate_channels": (16,) * 4, "decoder_fusion_channels": 16}, 4, (224, 192)),
}
# as with smp's decoder_attention_type, the last Unet/Unet++ block's attention1 has no skip
# connection to attend to and never runs
IDLE = {"unet": "decoder.blocks.4.attention1.attention", "unetplusplus": "decoder.blocks.x_0_4.attention1.attention"}
WHERES = {arch: ("decoder", "both") for arch in ARCHS} | {"dpt": ("decoder",)}  # DPT: ViT encoders


def make(arch: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    encoder = "tu-test_vit" if arch == "dpt" else ENCODER
    return smp.create_model(arch, encoder, encoder_weights=None, **{**ARCHS[arch][0], **kwargs})


def images(arch: str, size_index: int = 0, n: int = 2) -> torch.Tensor:
    size = ARCHS[arch][2][size_index]
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def count(model: nn.Module, cls: type = CBAM) -> int:
    return sum(isinstance(m, cls) for m in model.modules())


def expected_count(arch: str, where: str) -> int:
    # PSPNet's default encoder_depth is 3: timm's feature extractor keeps layer1 and layer2 only
    encoder = 2 if arch == "pspnet" else ENCODER_BLOCKS
    return ARCHS[arch][1] + (encoder if where == "both" else 0)


# ---------------------------------------------------------------------------------------------
# every architecture: forward/backward, number of modules


@pytest.mark.parametrize(("arch", "where"), [(arch, where) for arch in ARCHS for where in WHERES[arch]])
def test_forward_backward_two_sizes_and_module_count(arch: str, where: str) -> None:
    model = make(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    points = insertion_points(model, where)
    assert add_attention(model, "cbam", where=where) is model
    assert len(points) == count(model) == expected_count(arch, where)
    modules = dict(model.named_modules())
    assert all(type(modules[name]) is CBAM for name in points)
    assert [modules[name].channel.in_channels for name in points] == list(points.values())
    # every existing key and value is kept; the added keys are the attention modules'
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in before.items())
    added = set(state) - set(before)
    assert added and all(any(k.startswith(f"{name}.") for name in points) for k in added)
    for m in model.encoder.modules():  # timm zero-initializes each block's last BatchNorm, which
        if isinstance(m, nn.BatchNorm2d):  # would hand the encoder's attention zeros
            nn.init.ones_(m.weight)
    for size_index in (0, 1):
        model.zero_grad()
        x = images(arch, size_index)
        out = model.train()(x)
        assert out.shape == (2, 1, *x.shape[2:])
        out.square().mean().backward()
        for name in points:  # every inserted module takes part in the forward pass
            grads = [p.grad for p in modules[name].parameters()]
            if name == IDLE.get(arch):
                assert all(g is None for g in grads)
            else:
                # (a tiny MLP's single hidden unit can be dead: some gradients are zero)
                assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads), name
        with torch.no_grad():
            assert torch.isfinite(model.eval()(x)).all()


def test_decoder_points_match_the_documented_stages() -> None:
    assert list(insertion_points(make("fpn"))) == [f"decoder.p{k}.attention" for k in (5, 4, 3, 2)]
    assert list(insertion_points(make("deeplabv3plus"))) == [
        "decoder.aspp.attention", "decoder.block1.attention", "decoder.block2.attention",
    ]  # fmt: skip
    assert insertion_points(make("deeplabv3plus"))["decoder.block1.attention"] == 48
    assert list(insertion_points(make("deeplabv3"))) == ["decoder.aspp.attention", "decoder.attention"]
    assert list(insertion_points(make("pspnet"))) == ["decoder.conv.attention"]
    assert list(insertion_points(make("pan"))) == [f"decoder.{n}.attention" for n in ("fpa", "gau3", "gau2", "gau1")]
    assert set(insertion_points(make("pan", encoder_depth=4))) == {
        f"decoder.{n}.attention" for n in ("fpa", "gau2", "gau1")
    }
    assert list(insertion_points(make("linknet"))) == [f"decoder.blocks.{i}.attention" for i in range(5)]
    assert list(insertion_points(make("upernet")))[0] == "decoder.psp.attention"
    assert set(insertion_points(make("unet"), "decoder").values()) > {16}


@pytest.mark.parametrize("arch", ["unet", "unetplusplus"])
def test_unet_decoder_equals_decoder_attention_type(arch: str) -> None:
    """In Unet and Unet++ add_attention fills smp's own slots: the model decoder_attention_type builds."""
    added = add_attention(make(arch), "cbam")
    native = make(arch, decoder_attention_type="cbam")
    assert list(added.state_dict()) == list(native.state_dict())
    assert [type(m) for m in added.modules()] == [type(m) for m in native.modules()]
    assert not any(m._forward_hooks for m in added.modules())


def test_registered_names_and_factories() -> None:
    model = add_attention(make("fpn"), "se")
    assert count(model, SqueezeExcite) == 4 and count(model) == 0
    widths = []

    def factory(channels: int) -> nn.Module:
        widths.append(channels)
        return CBAM(channels, reduction=4)

    add_attention(make("fpn"), factory, where="both")
    assert widths == list(insertion_points(make("fpn"), "both").values())
    for none in (None, "none"):
        model = make("fpn")
        keys = list(model.state_dict())
        assert list(add_attention(model, none, where="both").state_dict()) == keys
        assert CONFIG_KEY not in model.config


# ---------------------------------------------------------------------------------------------
# encoder placement: inside the residual block, before the shortcut is added


class Zero(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 0


def _residual_blocks(model: nn.Module, types: tuple) -> list[nn.Module]:
    return [m for m in model.encoder.modules() if type(m) in types]


def test_smp_resnet_encoder_modules_sit_before_the_residual_addition() -> None:
    from torchvision.models.resnet import BasicBlock

    model = smp.FPN("resnet18", encoder_weights=None, encoder_depth=3)
    points = insertion_points(model, "encoder")
    # depth 3 runs layer1 and layer2 only (smp keeps layer3 and layer4 unused)
    assert list(points) == [f"encoder.layer{k}.{i}.bn2.attention" for k in (1, 2) for i in (0, 1)]
    assert list(points.values()) == [64, 64, 128, 128]
    add_attention(model, lambda c: Zero(), where="encoder")
    block = model.encoder.layer1[1]
    assert type(block) is BasicBlock and block.downsample is None
    x = torch.randn(2, 64, 8, 8)
    # the residual branch is zeroed out: what is left is relu(shortcut)
    torch.testing.assert_close(block(x), torch.relu(x), rtol=0, atol=0)


def test_timm_encoder_modules_fill_the_attn_layer_slot() -> None:
    from timm.models.resnet import BasicBlock, Bottleneck

    model = make("fpn")
    points = insertion_points(model, "encoder")
    blocks = _residual_blocks(model, (BasicBlock, Bottleneck))
    assert len(points) == len(blocks) == ENCODER_BLOCKS
    assert all(name.endswith(".se") for name in points)
    add_attention(model, lambda c: Zero(), where="encoder")
    block = next(b for b in blocks if b.downsample is None)
    x = torch.randn(2, block.conv1.in_channels, 8, 8)
    torch.testing.assert_close(block.eval()(x), torch.relu(x), rtol=0, atol=0)


def test_timm_attn_layer_convention() -> None:
    """timm builds attn_layer(channels, device=..., dtype=...): the adapter takes that call."""
    layer = timm_attention("cbam")
    module = layer(32, device="cpu", dtype=torch.float64)
    assert type(module) is CBAM and module.channel.mlp[0].weight.dtype == torch.float64
    model = smp.FPN(ENCODER, encoder_weights=None, block_args={"attn_layer": timm_attention("cbam")})
    assert count(model.encoder) == ENCODER_BLOCKS
    with pytest.raises(ValueError, match="already has attention"):
        add_attention(model, "cbam", where="encoder")
    with torch.no_grad(), capture_attention(model.eval()) as maps:
        model(torch.rand(1, 3, 64, 64))
    assert len(maps) == ENCODER_BLOCKS and all(name.endswith(".se") for name in maps)


@pytest.mark.parametrize(
    ("arch", "encoder", "match"),
    [
        ("fpn", "mobilenet_v2", "'mobilenet_v2' of FPN"),
        ("dpt", "tu-test_vit", "'tu-test_vit' of DPT"),
        ("unet", "tu-seresnet18", "'tu-seresnet18' already has attention"),
    ],
)
def test_unsupported_encoders_raise_and_leave_the_model_unchanged(arch: str, encoder: str, match: str) -> None:
    model = smp.create_model(arch, encoder, encoder_weights=None)
    keys = list(model.state_dict())
    with pytest.raises(ValueError, match=match) as info:
        add_attention(model, "cbam", where="both")
    if "already" not in match:
        assert "resnet18" in str(info.value) and "tu-resnet" in str(info.value)  # lists the supported
    assert list(model.state_dict()) == keys and CONFIG_KEY not in model.config
    assert not supports(model, "encoder") and supports(model, "decoder")


def test_argument_errors() -> None:
    model = make("fpn")
    with pytest.raises(ValueError, match="where"):
        add_attention(model, "cbam", where="head")
    with pytest.raises(ValueError, match="Sequential"):
        add_attention(nn.Sequential(nn.Conv2d(3, 3, 1)), "cbam")
    with pytest.raises(ValueError, match="'nope'"):
        add_attention(model, "nope")
    with pytest.raises(ValueError, match="attention"):
        add_attention(model, 3)  # type: ignore[arg-type]
    assert count(model) == 0
    add_attention(model, "cbam")
    with pytest.raises(ValueError, match=r"FPN already has attention at decoder\.p5\.attention"):
        add_attention(model, "se")
    add_attention(model, "se", where="encoder")  # another place is free
    assert count(model) == 4 and count(model, SqueezeExcite) == ENCODER_BLOCKS


def test_supports() -> None:
    for arch in ARCHS:
        assert supports(arch, "decoder") and supports(arch.upper(), "decoder")
        assert supports(arch, "encoder") == (arch != "dpt")
    assert supports("fpn", "both", encoder="resnet34") and supports("fpn", "encoder", encoder="tu-resnet18")
    assert not supports("fpn", "encoder", encoder="tu-seresnet18")  # its blocks hold SE already
    assert not supports("fpn", "encoder", encoder="efficientnet-b0")
    assert not supports("no_such_arch", "decoder")
    assert supports(make("fpn"), "both") and not supports(make("dpt"), "both")
    with pytest.raises(ValueError, match="where"):
        supports("fpn", "middle")


# ---------------------------------------------------------------------------------------------
# decoder_attention_type in every architecture


@pytest.mark.parametrize("arch", [a for a in ARCHS if a not in ("unet", "unetplusplus")])
def test_decoder_attention_type_builds_attention_everywhere(arch: str) -> None:
    built = make(arch, decoder_attention_type="cbam")
    added = add_attention(make(arch), "cbam")
    assert count(built) == ARCHS[arch][1]
    assert list(built.state_dict()) == list(added.state_dict())
    assert built.config["decoder_attention_type"] == "cbam" and CONFIG_KEY not in built.config
    with pytest.raises(ValueError, match="'nope'"):
        make(arch, decoder_attention_type="nope")


def test_decoder_attention_type_scse_and_none() -> None:
    from segmentation_models_pytorch.base.modules import SCSEModule

    assert count(smp.FPN(ENCODER, encoder_weights=None, decoder_attention_type="scse"), SCSEModule) == 4
    plain = smp.FPN(ENCODER, encoder_weights=None)
    assert list(smp.FPN(ENCODER, encoder_weights=None, decoder_attention_type=None).state_dict()) == list(
        plain.state_dict()
    )


# ---------------------------------------------------------------------------------------------
# save_pretrained / from_pretrained


@pytest.mark.parametrize("arch", list(ARCHS))
def test_save_load_round_trip(arch: str, tmp_path) -> None:
    where = WHERES[arch][-1]
    model = add_attention(make(arch), "cbam", where=where)
    model.train()(images(arch))  # BatchNorm statistics away from their initial values
    model.eval()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved[CONFIG_KEY][0] == {"attention": "cbam", "where": where}
    loaded = smp.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    assert list(loaded.state_dict()) == list(model.state_dict())
    x = images(arch, n=1)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded.config[CONFIG_KEY] == saved[CONFIG_KEY]
    loaded.save_pretrained(tmp_path / "again")  # the record is not duplicated by the reload
    assert json.loads((tmp_path / "again" / "config.json").read_text())[CONFIG_KEY] == saved[CONFIG_KEY]


def test_round_trip_of_decoder_attention_type_and_class_loader(tmp_path) -> None:
    model = smp.FPN(ENCODER, encoder_weights=None, decoder_attention_type="cbam").eval()
    model.save_pretrained(tmp_path)
    loaded = smp.FPN.from_pretrained(tmp_path).eval()
    assert count(loaded) == 4
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


LOAD_SCRIPT = """
import sys
import torch
import segmentation_models_pytorch as smp
if sys.argv[2] == "with":
    import smp_cbam
try:
    model = smp.from_pretrained(sys.argv[1]).eval()
except Exception as error:
    print(type(error).__name__, error)
    sys.exit(3)
with torch.no_grad():
    torch.save(model(torch.load(sys.argv[1] + "/x.pt")), sys.argv[1] + "/out.pt")
"""


@pytest.mark.slow
def test_fresh_process_loads_with_smp_cbam_and_fails_loudly_without(tmp_path) -> None:
    import os
    import subprocess
    import sys
    from pathlib import Path

    model = add_attention(make("fpn"), "cbam", where="both").eval()
    model.save_pretrained(tmp_path)
    x = images("fpn", n=1)
    torch.save(x, tmp_path / "x.pt")
    env = dict(os.environ, PYTHONPATH=str(Path(smp_cbam.__file__).resolve().parents[1]))
    runs = {
        mode: subprocess.run(
            [sys.executable, "-c", LOAD_SCRIPT, str(tmp_path), mode],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        for mode in ("without", "with")
    }
    assert runs["without"].returncode == 3 and "Unexpected key" in runs["without"].stdout
    assert runs["with"].returncode == 0, runs["with"].stderr
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "out.pt"), model(x))


def test_unregistered_factory_saves_with_a_warning_and_loading_names_it(tmp_path) -> None:
    model = add_attention(make("fpn"), lambda c: CBAM(c, reduction=4))
    with pytest.warns(UserWarning, match="unregistered factory .*<lambda> \\(decoder\\): from_pretrained cannot"):
        model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()  # the weights are kept
    with pytest.raises(ValueError, match="register_attention"):
        smp.from_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # by name: no warning
        add_attention(make("fpn"), "cbam").save_pretrained(tmp_path / "named")


def test_registered_user_name_round_trips(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(smp_cbam.registry, "_FACTORIES", dict(smp_cbam.registry._FACTORIES))
    smp_cbam.register_attention("cbam_r4", lambda c: CBAM(c, reduction=4))
    model = add_attention(make("linknet"), "cbam_r4", where="both").eval()
    model.save_pretrained(tmp_path)
    loaded = smp.from_pretrained(tmp_path).eval()
    x = images("linknet", n=1)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


# ---------------------------------------------------------------------------------------------
# capture_attention


def test_capture_attention_finds_the_added_modules() -> None:
    model = add_attention(make("fpn"), "cbam", where="both").eval()
    with torch.no_grad(), capture_attention(model) as maps:
        model(images("fpn"))
    assert set(maps) == set(insertion_points(make("fpn"), "both"))
    for name, channels in insertion_points(make("fpn"), "both").items():
        assert maps[name].channel.shape == (2, channels)
    assert maps["decoder.p2.attention"].spatial.shape == (2, 16, 16)


def test_added_modules_are_not_smp_wrappers_outside_unet() -> None:
    model = add_attention(make("deeplabv3plus"), "cbam")
    assert not any(isinstance(m, Attention) for m in model.modules())


# ---------------------------------------------------------------------------------------------
# smp's own model tests (tests/models/base.py of smp) for FPN and DeepLabV3+ with CBAM added in
# the decoder and the encoder: same checks, same sample sizes, the model built the smp way


SMP_MODELS = ["fpn", "deeplabv3plus"]


def smp_model(arch: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return add_attention(smp.create_model(arch, ENCODER, encoder_weights=None, **kwargs), "cbam", where="both")


def smp_sample(arch: str, in_channels: int = 3, height: int = 64, width: int = 64) -> torch.Tensor:
    batch = 2 if arch == "deeplabv3plus" else 1  # smp's default_batch_size per test class
    return torch.rand(batch, in_channels, height, width, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", SMP_MODELS)
def test_smp_forward_backward(arch: str) -> None:
    model = smp_model(arch)
    output = model(smp_sample(arch))
    assert output.shape[1] == 1
    output.mean().backward()
    # every added CBAM takes part in the forward: its MLP's last layer gets a gradient, non-zero in
    # the decoder (in the encoder's blocks a CBAM follows the last BatchNorm, which timm starts at
    # zero: its input and so its gradient are zero at the start)
    cbams = {name: m for name, m in model.named_modules() if isinstance(m, CBAM)}
    assert any(name.startswith("decoder") for name in cbams) and any(name.startswith("encoder") for name in cbams)
    for name, cbam in cbams.items():
        grad = cbam.channel.mlp[2].weight.grad
        assert grad is not None, name
        assert grad.abs().sum() > 0 or name.startswith("encoder"), name


@pytest.mark.parametrize("arch", SMP_MODELS)
def test_smp_in_channels_and_depth_and_out_classes(arch: str) -> None:
    model = smp_model(arch, encoder_depth=3, in_channels=1, classes=7).eval()
    assert count(model.encoder) == 2  # layer1 and layer2 at depth 3
    with torch.inference_mode():
        assert model(smp_sample(arch, in_channels=1)).shape[1] == 7


@pytest.mark.parametrize("arch", SMP_MODELS)
def test_smp_classification_head(arch: str) -> None:
    aux = {"pooling": "avg", "classes": 10, "dropout": 0.5, "activation": "sigmoid"}
    model = smp_model(arch, aux_params=aux).eval()
    assert isinstance(model.classification_head[3], nn.Linear)
    with torch.inference_mode():
        _, probs = model(smp_sample(arch))
    assert probs.shape[1] == 10


@pytest.mark.parametrize("arch", SMP_MODELS)
def test_smp_any_resolution(arch: str) -> None:
    model = smp_model(arch)
    assert model.requires_divisible_input_shape
    with pytest.raises(RuntimeError, match="Wrong input shape"):
        model(smp_sample(arch, height=67, width=71))


@pytest.mark.parametrize("arch", SMP_MODELS)
def test_smp_save_load_with_hub_mixin(arch: str, tmp_path) -> None:
    model = smp_model(arch).eval()
    model.save_pretrained(tmp_path, dataset="test_dataset", metrics={"my_awesome_metric": 0.99})
    restored = smp.from_pretrained(tmp_path).eval()
    readme = (tmp_path / "README.md").read_text()
    sample = smp_sample(arch)
    with torch.inference_mode():
        output, restored_output = model(sample), restored(sample)
    assert output.shape == restored_output.shape and output.shape[1] == 1
    torch.testing.assert_close(restored_output, output, rtol=0, atol=0)
    assert "test_dataset" in readme and "my_awesome_metric" in readme


@pytest.mark.slow
@pytest.mark.parametrize("arch", SMP_MODELS)
def test_smp_compile(arch: str) -> None:
    sample = smp_sample(arch)
    model = smp_model(arch).eval()
    torch.compiler.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="eager")
    with torch.inference_mode():
        torch.testing.assert_close(compiled(sample), model(sample), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("arch", SMP_MODELS)
def test_smp_torch_export(arch: str) -> None:
    sample = smp_sample(arch)
    model = smp_model(arch).eval()
    exported = torch.export.export(model, args=(sample,), strict=True)
    with torch.inference_mode():
        eager, out = model(sample), exported.module().forward(sample)
    assert eager.shape == out.shape
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("arch", SMP_MODELS)
def test_onnx_matches_onnxruntime(arch: str, tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    sample = smp_sample(arch)
    model = smp_model(arch).eval()
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, (sample,), str(path), dynamo=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: sample.numpy()})
    with torch.inference_mode():
        torch.testing.assert_close(torch.from_numpy(out), model(sample), rtol=1e-4, atol=1e-5)
