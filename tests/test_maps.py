from functools import partial

import pytest
import segmentation_models_pytorch as smp
import torch
from segmentation_models_pytorch.base.modules import Attention, SCSEModule

import smp_cbam
from smp_cbam import CBAM, ECA, AttentionMaps, ChannelAttention, SpatialAttention, SqueezeExcite, capture_attention

DECODER_CHANNELS = (32, 16, 16, 16, 16)
TYPES = ["cbam", "scse", "se", "eca", "cbam_channel", "cbam_spatial"]
HAS_CHANNEL = {"cbam", "scse", "se", "eca", "cbam_channel"}
HAS_SPATIAL = {"cbam", "scse", "cbam_spatial"}


def make_model(arch: str, attention: str | None) -> torch.nn.Module:
    torch.manual_seed(0)
    return smp.create_model(
        arch, "resnet18", encoder_weights=None, decoder_attention_type=attention,
        decoder_channels=list(DECODER_CHANNELS), classes=3,
    )  # fmt: skip


def images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def hand_gates(m: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The gates written out from each paper's formula: (N, C) channel, (N, H, W) spatial."""
    avg, mx = x.mean(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)

    def spatial(s: SpatialAttention, y: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([y.mean(dim=1, keepdim=True), y.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(s.bn(s.conv(pooled)))[:, 0]

    if isinstance(m, CBAM):
        c = torch.sigmoid(m.channel.mlp(avg) + m.channel.mlp(mx))
        return c.flatten(1), spatial(m.spatial, x * c)
    if isinstance(m, ChannelAttention):
        return torch.sigmoid(m.mlp(avg) + m.mlp(mx)).flatten(1), None
    if isinstance(m, SpatialAttention):
        return None, spatial(m, x)
    if isinstance(m, SCSEModule):
        fc1, fc2, conv = m.cSE[1], m.cSE[3], m.sSE[0]
        return torch.sigmoid(fc2(torch.relu(fc1(avg)))).flatten(1), torch.sigmoid(conv(x))[:, 0]
    if isinstance(m, SqueezeExcite):
        return torch.sigmoid(m.fc[2](torch.relu(m.fc[0](avg)))).flatten(1), None
    if isinstance(m, ECA):
        return torch.sigmoid(m.conv(avg.flatten(2).transpose(1, 2))).flatten(1), None
    raise TypeError(type(m))


def apply_maps(attention: str, x: torch.Tensor, maps: AttentionMaps) -> torch.Tensor:
    """What the module outputs according to the captured maps."""
    c = None if maps.channel is None else maps.channel[:, :, None, None]
    s = None if maps.spatial is None else maps.spatial[:, None]
    if attention == "scse":
        return x * c + x * s
    return x * (1 if c is None else c) * (1 if s is None else s)


def record_wrappers(model: torch.nn.Module) -> tuple[dict, list]:
    """Inputs (copied before the forward: the decoders' CBAM overwrites them at inference) and
    outputs of every smp Attention wrapper that runs, by name of its attention module."""
    inputs: dict[str, torch.Tensor] = {}
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for name, wrapper in model.named_modules():
        if isinstance(wrapper, Attention):
            key = f"{name}.attention"
            handles.append(
                wrapper.register_forward_pre_hook(lambda m, a, key=key: inputs.__setitem__(key, a[0].clone()))
            )
            handles.append(
                wrapper.register_forward_hook(lambda m, a, out, key=key: seen.__setitem__(key, (inputs[key], out)))
            )
    return seen, handles


def run_captured(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict, dict]:
    seen, handles = record_wrappers(model)
    with capture_attention(model) as maps:
        out = model(x)
    for handle in handles:
        handle.remove()
    return out, dict(maps), seen


@pytest.mark.parametrize("arch", ["unet", "unetplusplus"])
@pytest.mark.parametrize("attention", TYPES)
def test_maps_equal_hand_computed_gates_and_reproduce_the_output(arch: str, attention: str) -> None:
    model = make_model(arch, attention).train()
    out, maps, seen = run_captured(model, images())
    out.sum().backward()  # the training forward (CBAM's fused autograd path) stays differentiable
    assert maps.keys() == seen.keys() and len(maps) >= 9
    modules = dict(model.named_modules())
    for name, (x, y) in seen.items():
        got = maps[name]
        assert (got.channel is not None, got.spatial is not None) == (
            attention in HAS_CHANNEL,
            attention in HAS_SPATIAL,
        )
        if got.channel is not None:
            assert got.channel.shape == x.shape[:2] and not got.channel.requires_grad
        if got.spatial is not None:
            assert got.spatial.shape == (x.shape[0], *x.shape[2:]) and not got.spatial.requires_grad
        with torch.no_grad():
            channel, spatial = hand_gates(modules[name], x)
        for captured, expected in ((got.channel, channel), (got.spatial, spatial)):
            if expected is not None:
                torch.testing.assert_close(captured, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(apply_maps(attention, x, got), y.detach(), rtol=1e-4, atol=1e-5)


def test_unet_stage_names_and_shapes() -> None:
    model = make_model("unet", "cbam").eval()
    with torch.no_grad(), capture_attention(model) as maps:
        model(images(3))
    expected = {}
    for i, size in enumerate([4, 8, 16, 32, 64]):
        block = model.decoder.blocks[i]
        if i < 4:  # the last block has no skip connection, so attention1 never runs
            expected[f"decoder.blocks.{i}.attention1.attention"] = (block.conv1[0].in_channels, size)
        expected[f"decoder.blocks.{i}.attention2.attention"] = (DECODER_CHANNELS[i], size)
    assert set(maps) == set(expected)
    for name, (channels, size) in expected.items():
        assert maps[name].channel.shape == (3, channels)
        assert maps[name].spatial.shape == (3, size, size)
        assert ((maps[name].spatial > 0) & (maps[name].spatial < 1)).all()


def test_unetplusplus_names_its_dense_nodes() -> None:
    model = make_model("unetplusplus", "scse").eval()
    with torch.no_grad(), capture_attention(model) as maps:
        model(images(1))
    assert "decoder.blocks.x_0_0.attention1.attention" in maps
    assert all(name.startswith("decoder.blocks.x_") for name in maps)
    assert {m.spatial.shape[-1] for m in maps.values()} == {4, 8, 16, 32, 64}


@pytest.mark.parametrize("attention", ["cbam", "scse"])
def test_eval_mode_maps_equal_hand_computed_gates(attention: str) -> None:
    model = make_model("unet", attention).eval()
    with torch.no_grad():
        _, maps, seen = run_captured(model, images())
    modules = dict(model.named_modules())
    for name, (x, _) in seen.items():
        channel, spatial = hand_gates(modules[name], x)
        torch.testing.assert_close(maps[name].channel, channel, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(maps[name].spatial, spatial, rtol=1e-5, atol=1e-6)


def test_hooks_are_removed_and_the_record_stops_filling() -> None:
    model = make_model("unet", "cbam").eval()
    with torch.no_grad(), capture_attention(model) as maps:
        model(images(1))
        model(images(2))  # every forward updates the record
        assert {m.channel.shape[0] for m in maps.values()} == {2}
    before = {name: m.channel for name, m in maps.items()}
    with torch.no_grad():
        model(images(4))
    assert {name: m.channel for name, m in maps.items()} == before
    assert not any(m._forward_hooks for m in model.modules())


def test_capture_changes_neither_outputs_nor_batchnorm_statistics(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(smp_cbam.registry, "_FACTORIES", dict(smp_cbam.registry._FACTORIES))
    smp_cbam.register_attention("cbam_bn_maps_test", partial(CBAM, spatial_bn=True))
    plain, captured = make_model("unet", "cbam_bn_maps_test").train(), make_model("unet", "cbam_bn_maps_test").train()
    expected = plain(images())
    with capture_attention(captured) as maps:
        out = captured(images())
    assert all(m.spatial is not None for m in maps.values())
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    for (name, a), b in zip(plain.state_dict().items(), captured.state_dict().values()):
        assert torch.equal(a, b), name


def test_models_without_supported_attention_record_nothing() -> None:
    model = make_model("unet", None).eval()
    with torch.no_grad(), capture_attention(model) as maps:
        model(images(1))
    assert maps == {}


@pytest.mark.parametrize("attention", ["cbam", "se"])
def test_added_attention_maps_equal_hand_computed_gates(attention: str) -> None:
    """Modules that add_attention put in a decoder and an encoder are captured like smp's own."""
    torch.manual_seed(0)
    model = smp_cbam.add_attention(
        smp.FPN("resnet18", encoder_weights=None, decoder_pyramid_channels=32, decoder_segmentation_channels=32),
        attention, where="both",
    ).eval()  # fmt: skip
    modules = dict(model.named_modules())
    inputs: dict[str, torch.Tensor] = {}
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for name in smp_cbam.insertion_points(model, "both"):  # copies: CBAM and the blocks run in place
        handles.append(
            modules[name].register_forward_pre_hook(lambda m, a, name=name: inputs.__setitem__(name, a[0].clone()))
        )
        handles.append(
            modules[name].register_forward_hook(
                lambda m, a, out, name=name: seen.__setitem__(name, (inputs[name], out.clone()))
            )
        )
    with torch.no_grad(), capture_attention(model) as maps:
        model(images())
    for handle in handles:
        handle.remove()
    assert set(maps) == set(seen) and len(maps) == 4 + 8
    assert "encoder.layer1.0.bn2.attention" in maps and "decoder.p2.attention" in maps
    for name, (x, y) in seen.items():
        channel, spatial = hand_gates(modules[name], x)
        torch.testing.assert_close(maps[name].channel, channel, rtol=1e-5, atol=1e-6)
        if spatial is not None:
            torch.testing.assert_close(maps[name].spatial, spatial, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(apply_maps(attention, x, maps[name]), y, rtol=1e-4, atol=1e-5)
