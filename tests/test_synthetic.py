"""Tests for smp_cbam.training.synthetic: the generator, the labelling rule, the ceiling of a
cue-blind model, and the proof that the main job's ``none`` model is cue-blind."""

import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import smp_cbam  # noqa: F401  registers the attention names
from smp_cbam.training.module import build_model
from smp_cbam.training.synthetic import (
    CLASS_NAMES,
    DEFAULTS,
    PLAIN,
    best_cue_blind_mapping,
    context_miou,
    generate,
    generate_splits,
    label,
)

MAIN_JOB = yaml.safe_load((Path(__file__).parents[1] / "experiments" / "configs" / "synthetic.yaml").read_text())


def miou(pred: np.ndarray, true: np.ndarray) -> float:
    return float(np.mean([((pred == c) & (true == c)).sum() / ((pred == c) | (true == c)).sum() for c in range(4)]))


def test_synthetic_is_deterministic_and_has_every_class():
    start = time.perf_counter()
    splits = generate_splits()
    assert time.perf_counter() - start < 8.0  # ~1 s on an idle core; slack for a shared CPU
    assert [len(splits[s].images) for s in ("train", "val", "test")] == [384, 64, 64]
    for data in splits.values():
        assert data.images.shape[1:] == (64, 64, 3) and data.images.dtype == np.uint8
        assert data.context.shape == data.masks.shape and data.context.dtype == bool
        assert set(np.unique(data.masks)) == set(range(len(CLASS_NAMES)))
        assert set(data.cues.tolist()) == {0, 1}
    again = generate_splits(n_train=10)  # one split's size does not change another split
    assert np.array_equal(again["val"].images, splits["val"].images)
    assert np.array_equal(again["test"].masks, splits["test"].masks)
    assert np.array_equal(again["train"].images, splits["train"].images[:10])
    assert not np.array_equal(generate(4, seed=1).images, generate(4, seed=2).images)


def test_labels_depend_on_the_cue_band_only():
    data = generate(300, seed=3)
    warm = (data.cues == 0)[:, None, None]
    # the rule: a textured object's class is its texture in warm images, the next texture in cool ones
    assert np.array_equal(data.context, (data.textures >= 1) & (data.textures <= 3))
    assert np.array_equal(data.masks, np.where(data.context, np.where(warm, data.textures, data.textures % 3 + 1), 0))
    assert [label(1, 0), label(1, 1), label(3, 1), label(PLAIN, 0), label(PLAIN, 1)] == [1, 2, 1, 0, 0]
    assert 0.55 < warm.mean() < 0.8 and set(np.unique(data.textures)) == {0, 1, 2, 3, PLAIN}
    # the band's colour is the cue: red above blue in warm images, blue above red in cool ones
    band = data.images[:, : data.cue_rows].astype(float).mean((1, 2))
    assert np.array_equal(band[:, 0] > band[:, 2], data.cues == 0)
    # objects stay in the object zone, far from the band; every image has some
    assert data.object_top == DEFAULTS["cue_rows"] + DEFAULTS["gap"]
    assert not data.textures[:, : data.object_top].any()
    assert data.context.any((1, 2)).mean() > 0.9
    # the colour of everything below the band carries no cue
    below = data.images[:, data.cue_rows :].astype(float).mean((1, 2))
    red_minus_blue = below[:, 0] - below[:, 2]
    assert abs(red_minus_blue[data.cues == 0].mean() - red_minus_blue[data.cues == 1].mean()) < 3


def test_cue_blind_ceiling():
    """No texture -> class mapping beats the warm one on the context pixels, and it scores 0.5
    mIoU and 2/3 accuracy there; the cue itself allows 1.0."""
    test = generate_splits()["test"]
    mapping, ceiling = best_cue_blind_mapping(test)
    assert mapping == (1, 2, 3)
    assert ceiling == context_miou(test.cue_blind(), test.masks, test.context)
    assert 0.48 < ceiling < 0.53
    assert 0.64 < (test.cue_blind() == test.masks)[test.context].mean() < 0.7
    assert context_miou(test.masks, test.masks, test.context) == 1.0
    # in expectation each class's IoU is p / (2 - p) for the warm share p = 2/3 of the pixels
    large = generate(600, seed=11)
    share = (large.cues[:, None, None] == 0).repeat(64, 1).repeat(64, 2)[large.context].mean()
    assert best_cue_blind_mapping(large) == ((1, 2, 3), pytest.approx(share / (2 - share), abs=0.01))
    # the whole-image mIoU of the cue-blind masks, for the docs' comparison with all-background
    assert miou(test.cue_blind(), test.masks) > miou(np.zeros_like(test.masks), test.masks) + 0.3


def test_context_miou_averages_the_classes_present_in_the_context():
    masks = np.array([[0, 1, 1, 2]])
    context = np.array([[False, True, True, True]])
    assert context_miou(np.array([[3, 1, 0, 2]]), masks, context) == pytest.approx((1 / 2 + 1) / 2)
    assert context_miou(np.array([[0, 2, 2, 2]]), masks, context) == pytest.approx((0 + 1 / 3) / 2)
    assert np.isnan(context_miou(masks, masks, np.zeros_like(context)))


def main_job_model(arch: str, attention: str | None = None) -> torch.nn.Module:
    model = MAIN_JOB["model"]
    return build_model(
        arch, model["encoder"], attention, in_channels=3, classes=len(CLASS_NAMES),
        decoder_channels=model["decoder_channels"], encoder_depth=model["encoder_depth"], seed=0,
    ).double().eval()  # fmt: skip


def main_job_size() -> int:
    return MAIN_JOB["data"]["synthetic"].get("size", DEFAULTS["size"])


@pytest.mark.parametrize("arch", sorted({"unet", "unetplusplus", *MAIN_JOB["grid"]["archs"]}))
def test_main_job_none_model_cannot_see_the_cue(arch):
    """The object zone's logits have exactly zero gradient on the band (eval mode, float64, so no
    rounding hides a dependence), and they do not change when the cue is flipped."""
    options = {**DEFAULTS, **MAIN_JOB["data"]["synthetic"]}
    size, cue_rows, top = main_job_size(), options["cue_rows"], options["cue_rows"] + options["gap"]
    model = main_job_model(arch)
    x = torch.randn(2, 3, size, size, dtype=torch.float64, requires_grad=True)
    model(x)[:, :, top:].sum().backward()
    reach = torch.nonzero(x.grad.abs().sum((0, 1)).sum(1))[0, 0].item()  # the highest row that matters
    assert torch.all(x.grad[:, :, :cue_rows] == 0)
    assert cue_rows <= reach < top  # the field reaches into the gap, not to the band

    data = generate(4, size=size, seed=5, cue_rows=cue_rows, gap=options["gap"])
    images = torch.from_numpy(data.images).permute(0, 3, 1, 2).double() / 255
    flipped = images.clone()
    flipped[:, :, :cue_rows] = images.flip(0)[:, :, :cue_rows]  # bands of other images
    assert (data.cues != data.cues[::-1]).any()
    with torch.no_grad():
        assert torch.equal(model(images)[:, :, top:], model(flipped)[:, :, top:])


@pytest.mark.parametrize("attention", ["scse", "cbam"])
def test_global_pooling_attention_can_see_the_cue(attention):
    """The same check fails for a model with channel attention: its pools span the band."""
    options = {**DEFAULTS, **MAIN_JOB["data"]["synthetic"]}
    size, cue_rows, top = main_job_size(), options["cue_rows"], options["cue_rows"] + options["gap"]
    x = torch.randn(1, 3, size, size, dtype=torch.float64, requires_grad=True)
    main_job_model("unet", attention)(x)[:, :, top:].sum().backward()
    assert x.grad[:, :, :cue_rows].abs().sum() > 0


@pytest.mark.parametrize("attention", [None, "scse"])
def test_train_mode_batchnorm_mixes_the_batch_not_the_image(attention):
    """In train mode BatchNorm's statistics span the bands of the whole batch, but they are the same
    numbers for every image: two images that differ only in their band (one warm, one cool) get
    the same object logits in the same batch, so no image can read its own cue through them; they
    do change with the batch's bands. A model with channel attention reads its own band."""
    options = {**DEFAULTS, **MAIN_JOB["data"]["synthetic"]}
    size, cue_rows, top = main_job_size(), options["cue_rows"], options["cue_rows"] + options["gap"]
    data = generate(12, size=size, seed=7, cue_rows=cue_rows, gap=options["gap"])
    warm, cool = int(np.flatnonzero(data.cues == 0)[0]), int(np.flatnonzero(data.cues == 1)[0])
    image = torch.from_numpy(data.images[warm]).permute(2, 0, 1).double() / 255
    other_band = torch.from_numpy(data.images[cool, :cue_rows]).permute(2, 0, 1).double() / 255
    pair = torch.stack([image, image])
    pair[1, :, :cue_rows] = other_band  # the same image with the other cue
    model = main_job_model("unet", attention).train()
    with torch.no_grad():
        logits = model(pair)[:, :, top:]
        both_cool = pair[[1, 1]]
        shifted = model(both_cool)[:, :, top:]
    own_cue_visible = not torch.allclose(logits[0], logits[1], rtol=0, atol=1e-10)
    assert own_cue_visible == (attention is not None)
    assert not torch.allclose(logits[1], shifted[1], rtol=0, atol=1e-10)  # the batch's bands do count


def test_bad_arguments():
    with pytest.raises(ValueError, match="cue_rows"):
        generate(1, cue_rows=0)
    with pytest.raises(ValueError, match="gap"):
        generate(1, gap=-1)
    with pytest.raises(ValueError, match="size"):
        generate(1, size=48)
