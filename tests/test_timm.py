"""The attention modules under timm's ``attn_layer`` calling convention: ``Module(channels,
device=..., dtype=..., rd_ratio=...)``, inside timm's ResNet blocks and smp's ``tu-`` encoders."""

import pytest
import segmentation_models_pytorch as smp
import timm
import torch

import smp_cbam
from smp_cbam import CBAM, ECA, ChannelAttention, SqueezeExcite

LAYERS = [CBAM, ChannelAttention, SqueezeExcite, ECA]


@pytest.mark.parametrize("layer", LAYERS, ids=lambda c: c.__name__)
def test_timm_resnet18_builds_with_attn_layer(layer: type) -> None:
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=4, block_args={"attn_layer": layer})
    modules = [m for m in model.modules() if type(m) is layer]
    assert len(modules) == 8  # one per BasicBlock, before the residual addition
    assert all(block.se is module for block, module in zip(_blocks(model), modules, strict=True))
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    model(x).sum().backward()
    assert all(p.grad is not None for m in modules for p in m.parameters())


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [block for stage in (model.layer1, model.layer2, model.layer3, model.layer4) for block in stage]


@pytest.mark.parametrize("layer", LAYERS, ids=lambda c: c.__name__)
def test_device_and_dtype_keywords(layer: type) -> None:
    module = layer(16, device="meta", dtype=torch.float64)
    assert {p.device.type for p in module.parameters()} == {"meta"}
    assert {p.dtype for p in module.parameters()} == {torch.float64}
    x = torch.randn(2, 16, 5, 4, dtype=torch.float64)
    assert layer(16, dtype=torch.float64)(x).dtype == torch.float64


@pytest.mark.parametrize("layer", [CBAM, ChannelAttention, SqueezeExcite], ids=lambda c: c.__name__)
def test_rd_arguments_set_the_hidden_width(layer: type) -> None:
    def hidden(module: torch.nn.Module) -> int:
        return next(p for p in module.parameters() if p.dim() == 4).shape[0]

    assert hidden(layer(64)) == 4  # reduction 16
    assert hidden(layer(64, rd_ratio=1 / 8)) == 8
    assert hidden(layer(64, rd_ratio=0.001)) == 1
    assert hidden(layer(64, rd_channels=5)) == 5
    with pytest.raises(ValueError, match="rd_ratio must be in"):
        layer(64, rd_ratio=0.0)
    with pytest.raises(ValueError, match="rd_channels must be an integer >= 1"):
        layer(64, rd_channels=0)


def test_smp_tu_encoder_takes_cbam_as_attn_layer() -> None:
    """The paper's placement (inside the encoder's residual blocks), through smp's timm encoder."""
    torch.manual_seed(0)
    model = smp.Unet(
        "tu-resnet18", encoder_weights=None, encoder_depth=3, decoder_channels=(32, 16, 8), classes=2,
        block_args={"attn_layer": smp_cbam.CBAM},
    )  # fmt: skip
    cbams = [m for m in model.encoder.modules() if isinstance(m, CBAM)]
    assert len(cbams) == 4  # layer1 and layer2 at depth 3 (timm builds all; smp keeps what it uses)
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()
    assert all(m.channel.mlp[0].weight.grad is not None for m in cbams)
