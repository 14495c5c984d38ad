import math

import numpy as np
import pytest
import pytorch_lightning as pl
import segmentation_models_pytorch as smp
import torch
from torch.utils.data import DataLoader, TensorDataset

from smp_cbam.training.module import NonFiniteLossError, SegmentationModule, build_model

TINY = dict(in_channels=3, classes=4, decoder_channels=[32, 16, 16, 16, 16])
SMALL = dict(encoder="resnet18", in_channels=3, decoder_channels=[32, 16, 16, 16, 16])


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if ".attention" not in k}


@pytest.mark.parametrize("arch", ["unet", "unetplusplus"])
def test_same_seed_gives_same_weights_outside_attention(arch: str) -> None:
    none = build_model(arch, "resnet18", None, **TINY, seed=3)
    cbam = build_model(arch, "resnet18", "cbam", **TINY, seed=3)
    scse = build_model(arch, "resnet18", "scse", **TINY, seed=3)
    reference = _state(none)
    for model in (cbam, scse):
        state = _state(model)
        assert state.keys() == reference.keys()
        assert all(torch.equal(state[k], reference[k]) for k in reference)
    other = _state(build_model(arch, "resnet18", None, **TINY, seed=4))
    assert not all(torch.equal(other[k], reference[k]) for k in reference)


def _batch(num_classes: int, ignore: int | None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(2, 3, 32, 32, generator=g)
    mask = torch.randint(0, num_classes, (2, 32, 32), generator=g)
    if ignore is not None:
        mask[:, :4] = ignore
    return image, mask


def test_multiclass_loss_is_dice_plus_cross_entropy_ignoring_void() -> None:
    module = SegmentationModule(arch="unet", attention="cbam", num_classes=4, ignore_index=255, **SMALL)
    image, mask = _batch(4, 255)
    logits = module(image)
    expected = smp.losses.DiceLoss("multiclass", ignore_index=255)(logits, mask) + torch.nn.functional.cross_entropy(
        logits, mask, ignore_index=255
    )
    assert torch.allclose(module.compute_loss(logits, mask), expected)
    changed = logits.clone()
    changed[:, :, :4] += 100 * torch.randn_like(changed[:, :, :4])  # only void pixels change
    assert torch.allclose(module.compute_loss(changed, mask), expected)


def test_binary_uses_one_logit_and_dice_plus_bce() -> None:
    module = SegmentationModule(arch="unet", attention="cbam", num_classes=2, **SMALL)
    image, mask = _batch(2, None)
    logits = module(image)
    assert logits.shape == (2, 1, 32, 32)
    expected = smp.losses.DiceLoss("binary")(logits, mask.unsqueeze(1)) + torch.nn.functional.binary_cross_entropy_with_logits(
        logits, mask.unsqueeze(1).float()
    )
    assert torch.allclose(module.compute_loss(logits, mask), expected)
    assert torch.equal(module.predict_labels(logits), (logits[:, 0] > 0).long())


def _iou_by_hand(preds: list[np.ndarray], targets: list[np.ndarray], num_classes: int, ignore: int) -> np.ndarray:
    p = np.concatenate([x.ravel() for x in preds])
    t = np.concatenate([x.ravel() for x in targets])
    keep = t != ignore
    p, t = p[keep], t[keep]
    iou = []
    for c in range(num_classes):
        inter = np.sum((p == c) & (t == c))
        union = np.sum((p == c) | (t == c))
        iou.append(inter / union if union else math.nan)
    return np.array(iou)


class _Fixed(torch.nn.Module):
    """Returns precomputed logits batch by batch, so the metric sees known predictions."""

    def __init__(self, logits: list[torch.Tensor]):
        super().__init__()
        self.logits = logits
        self.calls = 0
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.logits[self.calls % len(self.logits)] + 0 * self.dummy
        self.calls += 1
        return out


def test_epoch_metrics_accumulate_over_the_whole_epoch() -> None:
    num_classes, ignore = 4, 255
    g = torch.Generator().manual_seed(0)
    masks = [torch.randint(0, num_classes - 1, (2, 8, 8), generator=g) for _ in range(3)]  # class 3 never present
    masks[1][0, :2] = ignore
    logits = [torch.randn(2, num_classes, 8, 8, generator=g) for _ in range(3)]
    module = SegmentationModule(arch="unet", attention=None, num_classes=num_classes, ignore_index=ignore, **SMALL)
    module.model = _Fixed(logits)
    loader = DataLoader(TensorDataset(torch.zeros(6, 3, 8, 8), torch.cat(masks)), batch_size=2)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    metrics = trainer.validate(module, loader, verbose=False)[0]
    expected = _iou_by_hand([x.argmax(1).numpy() for x in logits], [m.numpy() for m in masks], num_classes, ignore)
    per_class = np.array([metrics[f"val_iou_class{c}"] for c in range(num_classes)])
    np.testing.assert_allclose(per_class[:3], expected[:3], rtol=1e-6)
    # class 3 is in neither target nor prediction only if argmax never picks it; the mean skips NaN classes
    np.testing.assert_allclose(metrics["val_miou"], np.nanmean(expected), rtol=1e-6)
    np.testing.assert_allclose(metrics["val_dice"], np.nanmean(2 * expected / (1 + expected)), rtol=1e-6)
    batch_means = np.mean(
        [np.nanmean(_iou_by_hand([l.argmax(1).numpy()], [m.numpy()], num_classes, ignore)) for l, m in zip(logits, masks)]
    )
    assert not math.isclose(metrics["val_miou"], batch_means, rel_tol=1e-4)


def test_training_step_updates_weights_and_logs_loss() -> None:
    module = SegmentationModule(arch="unetplusplus", attention="cbam", num_classes=3, **SMALL)
    image, mask = _batch(3, None)
    loader = DataLoader(TensorDataset(image, mask), batch_size=2)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, loader, loader)
    changed = [k for k, v in module.state_dict().items() if v.dtype.is_floating_point and not torch.equal(v, before[k])]
    assert any("attention" in k for k in changed) and any("encoder" in k for k in changed)
    assert math.isfinite(trainer.callback_metrics["train_loss"]) and 0 <= trainer.callback_metrics["val_miou"] <= 1


def test_non_finite_loss_raises() -> None:
    module = SegmentationModule(arch="unet", attention="cbam", num_classes=3, **SMALL)
    image, mask = _batch(3, None)
    image[0, 0, 0, 0] = math.nan
    with pytest.raises(NonFiniteLossError, match="non-finite training loss"):
        module.training_step((image, mask), 0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_classes=1), "num_classes"),
        (dict(scheduler="step"), "scheduler"),
        (dict(num_classes=3, class_names=["a", "b"]), "class_names"),
        (dict(attention="nope"), "unknown decoder attention type 'nope'"),
    ],
)
def test_invalid_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SegmentationModule(**{**SMALL, **kwargs})
