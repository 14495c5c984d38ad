import math
import sys
import types

import numpy as np
import pytest
import pytorch_lightning as pl
import segmentation_models_pytorch as smp
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from smp_cbam.training.module import (
    NonFiniteLossError,
    SegmentationModule,
    build_model,
    confusion_counts,
    count_parameters,
    distributed_order,
)
from smp_cbam.training.synthetic import context_miou

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


@pytest.mark.parametrize("arch", ["unet", "unetplusplus"])
def test_a_shallower_encoder_without_decoder_channels_is_named(arch: str) -> None:
    # smp's own error speaks of decoder_channels the user never passed
    with pytest.raises(ValueError, match=r"encoder_depth=3 needs decoder_channels with 3 entries"):
        SegmentationModule(arch=arch, encoder="resnet18", num_classes=3, encoder_depth=3).configure_model()
    module = SegmentationModule(
        arch=arch, encoder="resnet18", num_classes=3, encoder_depth=3, decoder_channels=[32, 16, 8]
    )
    module.configure_model()
    assert module(torch.zeros(1, 3, 32, 32)).shape == (1, 3, 32, 32)


def test_init_seed_leaves_the_callers_random_state() -> None:
    # the module builds its model inside fit (configure_model), after the user's seed_everything:
    # the weights follow init_seed, everything else that draws from torch still follows the user's seed
    draws = []
    for user_seed in (123, 123, 999):
        pl.seed_everything(user_seed, verbose=False)
        module = SegmentationModule(arch="unet", encoder="resnet18", num_classes=3, attention="cbam", init_seed=7)
        module.configure_model()
        draws.append((torch.rand(3), _state(module.model)))
    assert torch.equal(draws[0][0], draws[1][0]) and not torch.equal(draws[0][0], draws[2][0])
    assert all(torch.equal(draws[0][1][k], draws[2][1][k]) for k in draws[0][1])


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


@pytest.mark.parametrize("num_classes", [2, 11])
def test_the_loss_is_float32_under_bf16_autocast(num_classes: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # CPU autocast leaves softmax in bf16: the Dice loss of a bf16 softmax was rounded to three
    # digits, where CUDA's autocast (softmax in float32) and fp32 training compute it in full
    module = SegmentationModule(arch="unet", attention="cbam", num_classes=num_classes, ignore_index=255, **SMALL)
    image, mask = _batch(num_classes, 255)
    with torch.no_grad():
        logits = module(image).bfloat16()  # what a model's last layer gives under autocast
    monkeypatch.setattr(module, "_model", lambda: lambda x: logits)
    monkeypatch.setattr(module, "log", lambda *args, **kwargs: None)  # no Trainer here
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = module._step((image, mask), "train")
    expected = module.compute_loss(logits.float(), mask)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)


def test_binary_uses_one_logit_and_dice_plus_bce() -> None:
    module = SegmentationModule(arch="unet", attention="cbam", num_classes=2, **SMALL)
    image, mask = _batch(2, None)
    logits = module(image)
    assert logits.shape == (2, 1, 32, 32)
    expected = smp.losses.DiceLoss("binary")(
        logits, mask.unsqueeze(1)
    ) + torch.nn.functional.binary_cross_entropy_with_logits(logits, mask.unsqueeze(1).float())
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
    per_class = np.array([metrics[f"val_iou_class_{c}"] for c in range(num_classes)])
    np.testing.assert_allclose(per_class[:3], expected[:3], rtol=1e-6)
    # class 3 is in neither target nor prediction only if argmax never picks it; the mean skips NaN classes
    np.testing.assert_allclose(metrics["val_miou"], np.nanmean(expected), rtol=1e-6)
    np.testing.assert_allclose(metrics["val_dice"], np.nanmean(2 * expected / (1 + expected)), rtol=1e-6)
    batch_means = np.mean(
        [
            np.nanmean(_iou_by_hand([lg.argmax(1).numpy()], [m.numpy()], num_classes, ignore))
            for lg, m in zip(logits, masks)
        ]
    )
    assert not math.isclose(metrics["val_miou"], batch_means, rel_tol=1e-4)


def test_training_step_updates_weights_and_logs_loss() -> None:
    module = SegmentationModule(arch="unetplusplus", attention="cbam", num_classes=3, **SMALL)
    image, mask = _batch(3, None)
    loader = DataLoader(TensorDataset(image, mask), batch_size=2)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
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
        (dict(placement="middle"), "placement"),
        (dict(predict_output="logits"), "predict_output"),
        (dict(aux_weight=-1.0), "aux_weight"),
        (dict(encoder="resnet81"), "unknown encoder 'resnet81'"),
        (dict(arch="segnet"), "unknown arch 'segnet'"),
    ],
)
def test_invalid_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SegmentationModule(**{**SMALL, **kwargs})


# ---------------------------------------------------------------- per-image counts (C2), context (C3)


def _counts_by_hand(pred: np.ndarray, target: np.ndarray, num_classes: int, ignore: int | None) -> np.ndarray:
    keep = np.ones_like(target, bool) if ignore is None else target != ignore
    p, t = pred[keep], target[keep]
    return np.array(
        [[np.sum((p == c) & (t == c)) for c in range(num_classes)],
         [np.sum((p == c) & (t != c)) for c in range(num_classes)],
         [np.sum((p != c) & (t == c)) for c in range(num_classes)]]
    )  # fmt: skip


@pytest.mark.parametrize("ignore", [255, None])
def test_confusion_counts_match_a_brute_force_count(ignore: int | None) -> None:
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 5, (3, 7, 9), generator=g)
    target = torch.randint(0, 5, (3, 7, 9), generator=g)
    if ignore is not None:
        target[torch.rand(3, 7, 9, generator=g) < 0.2] = ignore
    counts = confusion_counts(labels, target, 5, ignore)
    assert counts.dtype == torch.int64 and counts.shape == (3, 3, 5)
    for i in range(3):
        np.testing.assert_array_equal(
            counts[i].numpy(), _counts_by_hand(labels[i].numpy(), target[i].numpy(), 5, ignore)
        )


def test_test_run_keeps_per_image_counts_and_context_miou() -> None:
    num_classes, ignore = 3, 255
    g = torch.Generator().manual_seed(2)
    masks = torch.randint(0, num_classes, (5, 8, 8), generator=g)
    masks[1, :3] = ignore
    context = torch.rand(5, 8, 8, generator=g) < 0.3
    logits = torch.randn(5, num_classes, 8, 8, generator=g)
    module = SegmentationModule(arch="unet", attention=None, num_classes=num_classes, ignore_index=ignore, **SMALL)
    module.model = _Fixed([logits[:2], logits[2:4], logits[4:]])
    loader = DataLoader(TensorDataset(torch.zeros(5, 3, 8, 8), masks, context), batch_size=2)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    metrics = trainer.test(module, loader, verbose=False)[0]

    pred = logits.argmax(1).numpy()
    expected = np.stack([_counts_by_hand(pred[i], masks[i].numpy(), num_classes, ignore) for i in range(5)])
    assert module.per_image_counts.dtype == np.int64
    np.testing.assert_array_equal(module.per_image_counts, expected)
    # over the classes present in the context targets, as synthetic.context_miou defines it
    keep = context.numpy() & (masks.numpy() != ignore)
    expected_context = context_miou(pred, masks.numpy(), keep, num_classes)
    np.testing.assert_allclose(metrics["test_context_miou"], expected_context, rtol=1e-6)
    assert not math.isclose(metrics["test_context_miou"], metrics["test_miou"], rel_tol=1e-3)

    module.model.calls = 0
    metrics = trainer.test(
        module, DataLoader(TensorDataset(torch.zeros(5, 3, 8, 8), masks), batch_size=2), verbose=False
    )[0]
    np.testing.assert_array_equal(module.per_image_counts, expected)  # reset, not appended
    assert "test_context_miou" not in metrics  # two-element batches have no context


def test_distributed_order_undoes_the_distributed_sampler() -> None:
    dataset = list(range(11))
    world = 3
    per_rank = [list(DistributedSampler(dataset, num_replicas=world, rank=r, shuffle=False)) for r in range(world)]
    gathered = torch.tensor(per_rank).unsqueeze(-1)  # (world, n_per_rank, 1), as all_gather stacks them
    assert distributed_order(gathered, len(dataset)).squeeze(-1).tolist() == dataset


def test_aux_presence_target_lists_the_classes_in_each_mask() -> None:
    module = SegmentationModule(arch="unet", attention=None, num_classes=4, ignore_index=255, **SMALL)
    mask = torch.zeros(2, 4, 4, dtype=torch.long)
    mask[0, 0, 0], mask[1] = 3, 255
    mask[1, 0, :2] = 1
    assert module.presence(mask, 4).tolist() == [[1, 0, 0, 1], [0, 1, 0, 0]]
    binary = SegmentationModule(arch="unet", attention=None, num_classes=2, **SMALL)
    assert binary.presence(torch.tensor([[[0, 1]], [[0, 0]]]), 1).tolist() == [[1], [0]]


# ---------------------------------------------------------------- parameters in the forward pass


@pytest.mark.parametrize("attention", [None, "cbam"])
def test_count_parameters_leaves_out_unused_encoder_stages(attention: str | None) -> None:
    model = build_model(
        "unet", "resnet18", attention, in_channels=3, classes=2, encoder_depth=3, decoder_channels=[32, 16, 16]
    )
    total = sum(p.numel() for p in model.parameters())
    # smp keeps the stages a depth-3 encoder never runs, and builds an attention before the last
    # decoder block's skip concatenation although that block has no skip
    never_run = (model.encoder.layer3, model.encoder.layer4, model.decoder.blocks[-1].attention1)
    unused = sum(p.numel() for part in never_run for p in part.parameters())
    assert unused > 0
    x = torch.randn(1, 3, 32, 32)
    assert count_parameters(model, x) == total - unused
    model.encoder.layer1.requires_grad_(False)  # frozen parameters still take part
    model.train()
    running = model.encoder.bn1.running_mean.clone()
    assert count_parameters(model, x) == total - unused
    assert model.training and not model.encoder.layer1[0].conv1.weight.requires_grad
    assert torch.equal(model.encoder.bn1.running_mean, running) and model.encoder.conv1.weight.grad is None


# ---------------------------------------------------------------- build_model placement (C5)


def _stand_in_placement(monkeypatch, calls: list, unsupported: tuple[str, ...] = ()) -> None:
    """Stand-ins for smp_cbam.add_attention and smp_cbam.placement.supports (the arch helper's C5)."""
    import smp_cbam

    def add_attention(model, attention="cbam", where="decoder"):
        calls.append((type(model).__name__, attention, where))
        model.added = torch.nn.Linear(1, 1)  # stands in for the attention modules
        return model

    placement = types.ModuleType("smp_cbam.placement")
    placement.supports = lambda arch, where: arch not in unsupported
    monkeypatch.setattr(smp_cbam, "add_attention", add_attention, raising=False)
    monkeypatch.setitem(sys.modules, "smp_cbam.placement", placement)


def test_placement_other_than_the_decoder_goes_through_add_attention(monkeypatch) -> None:
    calls = []
    _stand_in_placement(monkeypatch, calls, unsupported=("pan",))
    fpn = build_model("fpn", "resnet18", "cbam", in_channels=3, classes=2, seed=5)
    plain = build_model("fpn", "resnet18", None, in_channels=3, classes=2, seed=5)
    assert calls == [("FPN", "cbam", "decoder")]
    reference = plain.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in fpn.state_dict().items() if not k.startswith("added"))
    build_model("unet", "resnet18", "scse", "encoder", in_channels=3, classes=2)
    assert calls[-1] == ("Unet", "scse", "encoder")
    with pytest.raises(ValueError, match="placement='both' is not supported for arch 'pan'"):
        SegmentationModule(arch="pan", attention="cbam", placement="both", num_classes=3)
    assert len(calls) == 2  # refused before anything was built


def test_without_add_attention_other_placements_are_refused(monkeypatch) -> None:
    import smp_cbam

    monkeypatch.delattr(smp_cbam, "add_attention", raising=False)
    monkeypatch.setitem(sys.modules, "smp_cbam.placement", None)  # import fails
    with pytest.raises(ValueError, match="arch 'fpn' with placement='decoder' needs smp_cbam.add_attention"):
        build_model("fpn", "resnet18", "cbam", in_channels=3, classes=2)
    assert build_model("fpn", "resnet18", "none", in_channels=3, classes=2) is not None  # no attention: plain


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        (("unet", "resnet18", "cbam", "middle"), {}, "placement must be one of"),
        (("segnet", "resnet18", None), {}, "unknown arch 'segnet'"),
        (("unet", "resnet18", "nope"), {}, "unknown decoder attention type 'nope'"),
        (("unet", "resnet18", "cbam"), {"decoder_attention_type": "scse"}, "attention="),
        (("unet", "resnet81", "cbam"), {}, "unknown encoder 'resnet81'"),
        (("unet", "tu-nonet", "cbam"), {}, "unknown encoder 'tu-nonet'"),
    ],
)
def test_build_model_names_bad_arguments(args: tuple, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_model(*args, **kwargs)
