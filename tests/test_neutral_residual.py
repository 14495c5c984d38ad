"""CBAM's neutral start (``init="neutral"``) and the residual CBAM (``"cbam_residual"``), alone and
through smp's Unet with ``decoder_attention_type``."""

import copy

import pytest
import segmentation_models_pytorch as smp
import torch

from smp_cbam import CBAM, ChannelAttention, SpatialAttention
from smp_cbam.attention import reset_gates

IMPLS = ["auto", "reference", "fused"]


def _unet(attention: str) -> smp.Unet:
    torch.manual_seed(0)
    return smp.Unet(
        "resnet18", encoder_weights=None, encoder_depth=3, decoder_channels=(32, 16, 8),
        decoder_attention_type=attention, classes=3,
    )  # fmt: skip


def _record_inputs(model: torch.nn.Module) -> dict[CBAM, list[torch.Tensor]]:
    """Each CBAM's inputs, cloned before the module runs (the inplace modules overwrite them)."""
    seen: dict[CBAM, list[torch.Tensor]] = {}
    for module in model.modules():
        if isinstance(module, CBAM):
            seen[module] = []
            module.register_forward_pre_hook(lambda m, args: seen[m].append(args[0].detach().clone()))
    return seen


@pytest.mark.parametrize("spatial_bn", [False, True])
@pytest.mark.parametrize("train", [True, False])
def test_neutral_gates_are_exactly_one_half(spatial_bn: bool, train: bool) -> None:
    x = torch.randn(2, 12, 7, 9) * 5 + 3
    channel = ChannelAttention(12, reduction=4, mlp_bias=True, init="neutral").train(train)
    spatial = SpatialAttention(5, spatial_bn=spatial_bn, init="neutral").train(train)
    assert torch.equal(channel.gate(x), torch.full((2, 12, 1, 1), 0.5))
    assert torch.equal(spatial.gate(x), torch.full((2, 1, 7, 9), 0.5))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("spatial_bn", [False, True])
def test_neutral_cbam_starts_as_a_fixed_scaling(impl: str, residual: bool, spatial_bn: bool) -> None:
    module = CBAM(16, reduction=4, spatial_bn=spatial_bn, residual=residual, init="neutral", impl=impl)
    x = torch.randn(2, 16, 6, 5, requires_grad=True)
    out = module(x)
    torch.testing.assert_close(out, x * (1.25 if residual else 0.25), rtol=0, atol=0)
    out.square().sum().backward()
    # the zeroed layers still learn: their gradients do not vanish at the neutral start
    last = module.channel.mlp[2].weight.grad
    gate = (module.spatial.bn if spatial_bn else module.spatial.conv).weight.grad
    assert last.abs().sum() > 0 and gate.abs().sum() > 0


def test_default_init_gates_depend_on_the_input() -> None:
    torch.manual_seed(0)
    module = CBAM(16, reduction=4)
    out = module(torch.randn(2, 16, 6, 5))
    assert not torch.allclose(out, torch.zeros_like(out)) and module.channel.gate(torch.randn(2, 16, 6, 5)).std() > 0


def test_bad_init_names_the_argument() -> None:
    with pytest.raises(ValueError, match="init.*'default', 'neutral'.*'zeros'"):
        CBAM(8, init="zeros")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("grad", [True, False])
def test_residual_output_is_input_plus_cbam(impl: str, grad: bool) -> None:
    torch.manual_seed(0)
    residual = CBAM(16, reduction=4, mlp_bias=True, residual=True, impl=impl)
    plain = copy.deepcopy(residual)
    plain.residual = False
    x = torch.randn(2, 16, 6, 5)
    with torch.set_grad_enabled(grad):
        torch.testing.assert_close(residual(x), x + plain(x))


def test_unet_builds_cbam_residual_and_adds_the_input() -> None:
    model = _unet("cbam_residual").eval()
    inputs = _record_inputs(model)
    assert len(inputs) == 6 and all(m.residual and m.inplace for m in inputs)
    outputs = {}
    for module in inputs:
        module.register_forward_hook(lambda m, args, out: outputs.__setitem__(m, out.clone()))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
        ran = [m for m in inputs if inputs[m]]  # the last block has no skip: its attention1 never runs
        assert len(ran) == 5
        for module in ran:
            (x,) = inputs[module]
            torch.testing.assert_close(outputs[module], x + module.spatial(module.channel(x)))


def _assert_neutral_unet(model: smp.Unet) -> None:
    inputs = _record_inputs(model)
    outputs = {}
    for module in inputs:
        module.register_forward_hook(lambda m, args, out: outputs.__setitem__(m, out.detach().clone()))
    model.train()(torch.randn(2, 3, 32, 32)).sum().backward()
    ran = [m for m in inputs if inputs[m]]
    assert len(ran) == 5
    for module in ran:
        torch.testing.assert_close(outputs[module], inputs[module][0] * 0.25, rtol=0, atol=0)


def test_reset_gates_restores_a_neutral_start_that_was_overwritten() -> None:
    model = _unet("cbam_neutral")
    for module in model.modules():  # what smp's initialize_decoder does to every decoder conv
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_uniform_(module.weight)
    assert model.decoder.blocks[0].attention2.attention.channel.mlp[2].weight.abs().sum() > 0
    _assert_neutral_unet(reset_gates(model))


def test_unet_keeps_the_neutral_start_without_help() -> None:
    # "cbam_neutral" is registered; smp's initialize_decoder runs first, then reset_gates
    _assert_neutral_unet(_unet("cbam_neutral"))
