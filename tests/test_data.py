"""Tests for smp_cbam.training.data and smp_cbam.training.synthetic on tiny generated data."""

import random
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DistributedSampler

from smp_cbam.training.data import (
    PAD_INDEX,
    DatasetError,
    SeededSampler,
    SegmentationDataModule,
    seeded_split,
)
from smp_cbam.training.synthetic import CLASS_NAMES

SMALL = {"n_train": 24, "n_val": 8, "n_test": 8}


def write_image(path: Path, height: int, width: int, channels: int = 3, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (height, width) if channels == 1 else (height, width, channels)
    assert cv2.imwrite(str(path), np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8))


def write_mask(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), mask.astype(np.uint8))


def class_mask(height: int, width: int, values: list[int], seed: int = 0) -> np.ndarray:
    """A mask that holds every value in ``values`` (in stripes) and random ones from them elsewhere."""
    mask = np.random.default_rng(seed).choice(values, (height, width))
    mask[0, : len(values)] = values
    return mask


def make_folder(
    root: Path, names: list[str], ext: str = ".png", channels: int = 3, size: tuple[int, int] = (40, 50),
    values: tuple[int, ...] = (0, 1, 2),
) -> Path:  # fmt: skip
    for i, name in enumerate(names):
        write_image(root / "images" / f"{name}{ext}", *size, channels, seed=i)
        write_mask(root / "masks" / f"{name}.png", class_mask(*size, list(values), seed=i))
    return root


def make_camvid(root: Path, counts: dict[str, int] | None = None, size: tuple[int, int] = (40, 50)) -> Path:
    counts = counts or {"train": 4, "val": 2, "test": 2}
    for split, n in counts.items():
        for i in range(n):
            write_image(root / split / f"{split}_{i:03d}.png", *size, seed=i)
            write_mask(root / f"{split}annot" / f"{split}_{i:03d}.png", class_mask(*size, list(range(12)), seed=i))
    return root


def make_pets(root: Path, trainval: int = 10, test: int = 3) -> Path:
    names = [f"Abyssinian_{i}" for i in range(trainval + test)]
    rng = np.random.default_rng(0)
    for i, name in enumerate(names):
        height, width = rng.integers(30, 70, 2)
        write_image(root / "images" / f"{name}.jpg", height, width, seed=i)
        write_mask(root / "annotations" / "trimaps" / f"{name}.png", class_mask(height, width, [1, 2, 3], seed=i))
    (root / "annotations" / "trainval.txt").write_text("".join(f"{n} 1 1 1\n" for n in names[:trainval]))
    if test:
        (root / "annotations" / "test.txt").write_text("".join(f"{n} 1 1 1\n" for n in names[trainval:]))
    return root


def batches(loader, epoch: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if epoch is not None:
        loader.sampler.set_epoch(epoch)
    return list(loader)


def assert_same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for batch_a, batch_b in zip(a, b):  # (image, mask) or (image, mask, context)
        assert len(batch_a) == len(batch_b)
        assert all(torch.equal(ta, tb) for ta, tb in zip(batch_a, batch_b))


def differs(a: list, b: list) -> bool:
    return any(not torch.equal(xa, xb) for (xa, _), (xb, _) in zip(a, b))


def split_images(dm: SegmentationDataModule) -> dict[str, list[str]]:
    return {split: [p.image.name for p in ds.pairs] for split, ds in dm.datasets.items()}


# datamodule: synthetic


def test_synthetic_datamodule_batches():
    dm = SegmentationDataModule(batch_size=4, synthetic=SMALL)
    assert (dm.num_classes, dm.in_channels, dm.ignore_index, dm.class_names) == (4, 3, PAD_INDEX, CLASS_NAMES)
    dm.setup("fit")
    assert dm.has_test
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, tuple)
    image, mask = batch
    assert image.shape == (4, 3, 64, 64) and image.dtype == torch.float32
    assert mask.shape == (4, 64, 64) and mask.dtype == torch.int64
    assert set(mask.unique().tolist()) <= {0, 1, 2, 3, PAD_INDEX}
    assert -2.2 < image.min() and image.max() < 2.7 and abs(image.mean()) < 0.6
    val = list(dm.val_dataloader())
    assert len(val) == 2 and set(torch.cat([b[1] for b in val]).unique().tolist()) == {0, 1, 2, 3}
    assert len(list(dm.test_dataloader())) == 2
    with pytest.raises(ValueError, match="unknown synthetic options"):
        SegmentationDataModule(synthetic={"n_trian": 3})


def test_no_test_split():
    dm = SegmentationDataModule(synthetic={**SMALL, "n_test": 0})
    dm.setup()
    assert not dm.has_test
    assert dm.predict_dataloader().dataset is dm.datasets["val"]  # trainer.predict falls back to val
    with pytest.raises(DatasetError, match="no test split"):
        dm.test_dataloader()


# datamodule: file layouts


def test_camvid_layout_and_eval_padding(tmp_path):
    root = make_camvid(tmp_path / "camvid")
    dm = SegmentationDataModule("camvid", str(root), batch_size=2, crop=(32, 32))
    assert (dm.num_classes, dm.ignore_index, dm.in_channels, dm.class_names[0]) == (11, 11, 3, "sky")
    dm.setup()
    assert {s: len(d) for s, d in dm.datasets.items()} == {"train": 4, "val": 2, "test": 2}
    image, mask = next(iter(dm.train_dataloader()))
    assert image.shape == (2, 3, 32, 32) and mask.shape == (2, 32, 32)
    image, mask = next(iter(dm.val_dataloader()))
    assert image.shape == (2, 3, 64, 64)  # 40x50 padded to multiples of 32, bottom and right
    stored = cv2.imread(str(root / "valannot" / "val_000.png"), cv2.IMREAD_UNCHANGED)
    assert torch.equal(mask[0, :40, :50], torch.from_numpy(stored).long())
    assert (mask[:, 40:] == 11).all() and (mask[:, :, 50:] == 11).all()
    # the padding reflects the frame (no black band that training never shows)
    rows, cols = torch.arange(38, 14, -1), torch.arange(48, 34, -1)
    assert torch.equal(image[:, :, 40:], image[:, :, rows]) and torch.equal(image[..., 50:], image[..., cols])

    dm = SegmentationDataModule("camvid", str(root), ignore_index=255, eval_mode="resize", resize=(32, 64))
    dm.setup()
    image, mask = next(iter(dm.val_dataloader()))
    assert image.shape == (2, 3, 32, 64) and set(mask.unique().tolist()) == set(range(11)) | {255}


def test_predictions_back_at_each_images_size(tmp_path):
    root = make_camvid(tmp_path / "camvid")  # 40x50 frames
    dm = SegmentationDataModule("camvid", str(root), batch_size=2)
    assert dm.predict_split == "test"  # no setup() by hand: the loaders and this build the splits
    batches = [mask for _, mask in dm.predict_dataloader()]
    assert batches[0].shape == (2, 64, 64)  # padded for the network
    labels = dm.to_image_size(batches)
    stored = cv2.imread(str(root / "testannot" / "test_001.png"), cv2.IMREAD_UNCHANGED)
    assert len(labels) == 2 and torch.equal(labels[1], torch.from_numpy(stored).long())
    probabilities = dm.to_image_size(torch.rand(2, 11, 64, 64))
    assert probabilities[0].shape == (11, 40, 50)
    with pytest.raises(ValueError, match="3 predictions for the 2 images of the test split"):
        dm.to_image_size(torch.zeros(3, 64, 64, dtype=torch.long))

    resized = SegmentationDataModule("camvid", str(root), batch_size=2, resize=(32, 32))
    frames = torch.full((2, 32, 32), 7)
    frames[:, :16] = 3  # top half 3, bottom half 7
    labels = resized.to_image_size(frames, split="val")
    assert labels[0].dtype == torch.long and labels[0].shape == (40, 50)
    assert (labels[0][:20] == 3).all() and (labels[0][20:] == 7).all()
    uniform = resized.to_image_size(torch.full((2, 11, 32, 32), 1 / 11))[1]
    assert uniform.shape == (11, 40, 50) and torch.allclose(uniform.sum(0), torch.ones(40, 50))


def test_pets_layout(tmp_path):
    root = make_pets(tmp_path / "pets")
    dm = SegmentationDataModule("pets", str(root), batch_size=2, resize=(32, 32), val_fraction=0.2)
    assert (dm.num_classes, dm.class_names, dm.ignore_index) == (2, ("background", "pet"), PAD_INDEX)
    dm.setup()
    assert {s: len(d) for s, d in dm.datasets.items()} == {"train": 8, "val": 2, "test": 3}
    image, mask = dm.datasets["test"][0]
    assert image.shape == (3, 32, 32)
    name = dm.datasets["test"].pairs[0].mask
    trimap = cv2.resize(cv2.imread(str(name), cv2.IMREAD_UNCHANGED), (32, 32), interpolation=cv2.INTER_NEAREST)
    assert torch.equal(mask, torch.from_numpy(np.where(trimap == 2, 0, 1)).long())  # border counts as pet

    for ignore_index in (255, 7):  # void_label=3 ignores the border
        dm = SegmentationDataModule("pets", str(root), void_label=3, ignore_index=ignore_index, resize=(32, 32))
        dm.setup()
        _, mask = dm.datasets["test"][0]
        expected = np.select([trimap == 1, trimap == 2], [1, 0], ignore_index)
        assert torch.equal(mask, torch.from_numpy(expected).long())
    with pytest.raises(ValueError, match="void_label of pets must be one of"):
        SegmentationDataModule("pets", str(root), void_label=2)

    dm = SegmentationDataModule("pets", str(make_pets(tmp_path / "no_test", test=0)), resize=(32, 32))
    dm.setup()
    assert not dm.has_test and set(dm.datasets) == {"train", "val"}


@pytest.mark.parametrize(("ext", "channels"), [(".png", 3), (".jpg", 3), (".tif", 1), (".bmp", 1)])
def test_folder_flat_formats(tmp_path, ext, channels):
    root = make_folder(tmp_path / "data", [f"img{i}" for i in range(10)], ext=ext, channels=channels)
    dm = SegmentationDataModule("folder", str(root), num_classes=3, batch_size=3, val_fraction=0.2, test_fraction=0.1)
    assert dm.in_channels == channels  # from the headers, right after __init__
    dm.setup()
    assert {s: len(d) for s, d in dm.datasets.items()} == {"train": 7, "val": 2, "test": 1}
    image, mask = next(iter(dm.train_dataloader()))
    assert image.shape == (3, channels, 64, 64) and mask.shape == (3, 64, 64)
    image, mask = next(iter(dm.val_dataloader()))
    assert image.shape == (2, channels, 64, 64)
    assert set(mask[:, :40, :50].unique().tolist()) == {0, 1, 2} and (mask[:, 40:] == PAD_INDEX).all()


def test_folder_in_channels_override(tmp_path):
    root = make_folder(tmp_path / "data", [f"img{i}" for i in range(6)], channels=3)
    dm = SegmentationDataModule("folder", str(root), num_classes=3, in_channels=1)
    assert dm.in_channels == 1
    dm.setup()
    assert dm.datasets["train"][0][0].shape == (1, 64, 64)


def test_folder_binary_0_255_masks(tmp_path):
    root = make_folder(tmp_path / "data", [f"img{i}" for i in range(6)], values=(0, 255))
    dm = SegmentationDataModule("folder", str(root), num_classes=2)
    dm.setup()
    stored = cv2.imread(str(dm.datasets["val"].pairs[0].mask), cv2.IMREAD_UNCHANGED)
    _, mask = dm.datasets["val"][0]
    assert torch.equal(mask[:40, :50], torch.from_numpy(stored // 255).long())
    assert (mask[40:] == PAD_INDEX).all()


def test_folder_multiclass_with_ignore_index(tmp_path):
    root = make_folder(tmp_path / "data", [f"img{i}" for i in range(6)], values=(0, 1, 2, 255))
    dm = SegmentationDataModule("folder", str(root), num_classes=3, void_label=255)
    assert (dm.ignore_index, dm.hparams["void_label"]) == (255, 255)
    dm.setup()
    assert set(torch.cat([m for _, m in dm.val_dataloader()]).unique().tolist()) == {0, 1, 2, 255}
    dm = SegmentationDataModule("folder", str(root), num_classes=3, void_label=255, ignore_index=100)
    dm.setup()
    assert set(torch.cat([m for _, m in dm.val_dataloader()]).unique().tolist()) == {0, 1, 2, 100}
    for ignore_index in (None, 255):  # ignore_index alone says what batches carry, not what masks store
        with pytest.raises(DatasetError, match=r"not valid.*\n.*: \[255\][\s\S]*void_label"):
            SegmentationDataModule("folder", str(root), num_classes=3, ignore_index=ignore_index).setup()


def test_folder_split_folders(tmp_path):
    root = tmp_path / "data"
    make_folder(root / "train", [f"a{i}" for i in range(10)])
    make_folder(root / "val", ["v0", "v1"])
    dm = SegmentationDataModule("folder", str(root), num_classes=3, test_fraction=0.2)
    dm.setup()
    names = split_images(dm)
    assert names["val"] == ["v0.png", "v1.png"]
    assert len(names["test"]) == 2 and len(names["train"]) == 8 and not set(names["test"]) & set(names["train"])
    make_folder(root / "test", ["t0"])
    dm = SegmentationDataModule("folder", str(root), num_classes=3)
    dm.setup()
    assert split_images(dm)["test"] == ["t0.png"] and len(dm.datasets["train"]) == 10


def test_a_folder_without_train_serves_evaluation_only(tmp_path):
    root = tmp_path / "held_out"
    make_folder(root / "test", ["t0", "t1", "t2"])
    dm = SegmentationDataModule("folder", str(root), num_classes=3, batch_size=2)  # a checkpoint to evaluate
    dm.setup("test")
    assert sorted(dm.datasets) == ["test"] and dm.predict_split == "test"
    assert [m.shape for _, m in dm.test_dataloader()] == [(2, 64, 64), (1, 64, 64)]
    dm.setup("predict")
    with pytest.raises(DatasetError, match=r"the train split of .*held_out is empty. Fix: add a train folder"):
        dm.setup("fit")
    with pytest.raises(DatasetError, match="the val split of .*held_out is empty"):
        dm.val_dataloader()
    with pytest.raises(DatasetError, match="the train split"):
        dm.setup()  # None, like the runner's "fit" before it writes anything: every split training needs
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="(?s)required folders are missing.*empty/train/images"):
        SegmentationDataModule("folder", str(tmp_path / "empty"), num_classes=3)


def test_seeded_split_is_deterministic_and_disjoint(tmp_path):
    root = make_folder(tmp_path / "data", [f"img{i:02d}" for i in range(20)], size=(8, 8))
    runs = []
    for split_seed in (0, 0, 1):
        dm = SegmentationDataModule("folder", str(root), num_classes=3, split_seed=split_seed, seed=split_seed + 5)
        dm.setup()
        runs.append(split_images(dm))
    assert runs[0] == runs[1] and runs[0] != runs[2]
    for names in runs:
        assert sorted(sum(names.values(), [])) == [f"img{i:02d}.png" for i in range(20)]
        assert [len(names[s]) for s in ("train", "val", "test")] == [14, 3, 3]
    assert seeded_split(list(range(5)), {"val": 0.0, "test": 0.5}, 0).keys() == {"test", "train"}


# validation


def test_unreadable_files_are_listed(tmp_path):
    root = make_folder(tmp_path / "data", [f"img{i}" for i in range(6)])
    (root / "images" / "img1.png").write_bytes(b"not a png")
    (root / "masks" / "img4.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DatasetError, match="could not be read") as error:
        SegmentationDataModule("folder", str(root), num_classes=3).setup()
    assert str(root / "images" / "img1.png") in str(error.value) and str(root / "masks" / "img4.png") in str(
        error.value
    )


def test_size_mismatch(tmp_path):
    root = make_folder(tmp_path / "data", [f"img{i}" for i in range(6)])
    write_mask(root / "masks" / "img2.png", np.zeros((39, 50)))
    with pytest.raises(DatasetError, match=r"differ in size:\n.*img2.png \(40x50\) vs .*img2.png \(39x50\)"):
        SegmentationDataModule("folder", str(root), num_classes=3).setup()


def test_bad_mask_values_report_values_and_files(tmp_path):
    root = make_folder(tmp_path / "data", [f"img{i:02d}" for i in range(14)])
    for i in range(12):
        write_mask(root / "masks" / f"img{i:02d}.png", class_mask(40, 50, [0, 3, 7], seed=i))
    with pytest.raises(DatasetError) as error:
        SegmentationDataModule("folder", str(root), num_classes=3).setup()
    message = str(error.value)
    assert message.startswith("12 masks hold values that are not valid (class indices 0..2)")
    assert f"{root / 'masks' / 'img00.png'}: [3, 7]" in message and "... and 2 more" in message
    assert "num_classes" in message  # the fix


def test_camvid_void_label_is_only_valid_for_camvid(tmp_path):
    root = make_camvid(tmp_path / "camvid")
    write_mask(root / "testannot" / "test_001.png", class_mask(40, 50, [0, 12], seed=1))
    with pytest.raises(DatasetError, match=r"or the void label 11\)[^\n]*\n.*test_001.png: \[12\]"):
        SegmentationDataModule("camvid", str(root)).setup()


def test_colour_mask(tmp_path):
    root = make_folder(tmp_path / "data", [f"img{i}" for i in range(4)])
    colour = np.zeros((40, 50, 3), np.uint8)
    colour[..., 2] = 1
    assert cv2.imwrite(str(root / "masks" / "img3.png"), colour)
    with pytest.raises(DatasetError, match=r"single-channel[^\n]*\n.*img3.png: 3 channels"):
        SegmentationDataModule("folder", str(root), num_classes=3).setup()


def test_image_without_mask_and_mask_without_image(tmp_path):
    root = make_folder(tmp_path / "data", [f"img{i}" for i in range(6)])
    (root / "masks" / "img2.png").unlink()
    (root / "masks" / "img5.png").rename(root / "masks" / "orphan.png")
    with pytest.raises(DatasetError, match=r"2 images have no mask.*\n.*img2.png\n.*img5.png"):
        SegmentationDataModule("folder", str(root), num_classes=3).setup()
    write_mask(root / "masks" / "img2.png", np.zeros((40, 50)))
    write_mask(root / "masks" / "img5.png", np.zeros((40, 50)))
    with pytest.warns(UserWarning, match=r"1 masks have no image.*\n.*orphan.png"):
        SegmentationDataModule("folder", str(root), num_classes=3).setup()


def test_pets_missing_files(tmp_path):
    root = make_pets(tmp_path / "pets")
    (root / "annotations" / "trimaps" / "Abyssinian_3.png").unlink()
    with pytest.raises(DatasetError, match=r"trainval.txt have no trimap.*\n.*Abyssinian_3.png"):
        SegmentationDataModule("pets", str(root)).setup()
    write_mask(root / "annotations" / "trimaps" / "Abyssinian_3.png", np.ones((30, 30)))
    (root / "images" / "Abyssinian_11.jpg").unlink()
    with pytest.raises(DatasetError, match=r"test.txt have no image.*\n.*Abyssinian_11.jpg"):
        SegmentationDataModule("pets", str(root)).setup()


def test_missing_root_and_folders(tmp_path):
    with pytest.raises(DatasetError, match=r"nowhere does not exist.*ROOT/images"):
        SegmentationDataModule("folder", str(tmp_path / "nowhere"), num_classes=2).setup()
    root = make_camvid(tmp_path / "camvid")
    for path in (root / "valannot").iterdir():
        path.unlink()
    (root / "valannot").rmdir()
    with pytest.raises(DatasetError, match=r"folders are missing.*\n.*valannot\nFix: .*testannot"):
        SegmentationDataModule("camvid", str(root)).setup()
    (root / "images").mkdir()
    with pytest.raises(DatasetError, match="folders are missing.*\n.*masks"):
        SegmentationDataModule("folder", str(root), num_classes=2).setup()
    with pytest.raises(DatasetError, match=r"train/images"):
        SegmentationDataModule("folder", str(tmp_path), num_classes=2).setup()
    (root / "annotations" / "trimaps").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"annotations/trainval.txt is missing"):
        SegmentationDataModule("pets", str(root)).setup()


def test_empty_dataset_and_empty_split(tmp_path):
    (tmp_path / "data" / "images").mkdir(parents=True)
    (tmp_path / "data" / "masks").mkdir()
    with pytest.raises(DatasetError, match=r"no images .* in .*data/images"):
        SegmentationDataModule("folder", str(tmp_path / "data"), num_classes=2).setup()
    root = make_folder(tmp_path / "two", ["a", "b"])
    with pytest.raises(DatasetError, match=r"empty after splitting:\n  train"):
        SegmentationDataModule("folder", str(root), num_classes=3).setup()
    with pytest.raises(DatasetError, match="val split .* is empty"):
        SegmentationDataModule(synthetic={**SMALL, "n_val": 0}).setup()


def test_images_of_different_sizes_need_resize(tmp_path):
    root = make_folder(tmp_path / "data", [f"img{i}" for i in range(4)])
    make_folder(root, ["big"], size=(60, 70))
    with pytest.raises(DatasetError, match=r"cannot be batched:\n(  .*\n){2}Fix: pass resize") as error:
        SegmentationDataModule("folder", str(root), num_classes=3).setup()
    assert "big.png: 60x70" in str(error.value) and ".png: 40x50" in str(error.value)
    dm = SegmentationDataModule("folder", str(root), num_classes=3, resize=(32, 32), test_fraction=0)
    dm.setup()
    assert next(iter(dm.val_dataloader()))[0].shape[-2:] == (32, 32)


def test_bad_arguments():
    with pytest.raises(ValueError, match="needs num_classes"):
        SegmentationDataModule("folder", "somewhere")
    with pytest.raises(ValueError, match="camvid has 11 classes"):
        SegmentationDataModule("camvid", "somewhere", num_classes=12)
    with pytest.raises(ValueError, match="multiples of 32"):
        SegmentationDataModule(crop=(48, 48))
    with pytest.raises(ValueError, match="eval_mode='resize' needs resize"):
        SegmentationDataModule(eval_mode="resize")
    with pytest.raises(ValueError, match="not a class index"):
        SegmentationDataModule("folder", "somewhere", num_classes=3, ignore_index=2)


# determinism and the paired design


def test_same_seed_same_batches_whatever_the_global_rng():
    first = SegmentationDataModule(batch_size=4, seed=7, synthetic=SMALL)
    first.setup()
    expected = batches(first.train_dataloader())
    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    torch.rand(1000), np.random.rand(1000)
    second = SegmentationDataModule(batch_size=4, seed=7, synthetic=SMALL)
    second.setup()
    assert_same(batches(second.train_dataloader()), expected)
    assert differs(batches(second.train_dataloader(), epoch=1), expected)
    other = SegmentationDataModule(batch_size=4, seed=8, synthetic=SMALL)
    other.setup()
    assert differs(batches(other.train_dataloader()), expected)


def test_augmentations_change_the_samples():
    dm = SegmentationDataModule(batch_size=4, synthetic=SMALL)
    dm.setup()
    train, val = dm.datasets["train"], dm.datasets["val"]
    assert not torch.equal(train[(0, 1)][0], train[(0, 2)][0])
    assert torch.equal(train[(0, 1)][0], train[(0, 1)][0])
    assert torch.equal(val[(0, 1)][0], val[(0, 2)][0])  # evaluation is not random


def test_num_workers_do_not_change_batches():
    dms = [SegmentationDataModule(batch_size=4, num_workers=w, synthetic=SMALL) for w in (0, 2)]
    for dm in dms:
        dm.setup()
    assert_same(batches(dms[0].train_dataloader(), epoch=2), batches(dms[1].train_dataloader(), epoch=2))
    assert_same(list(dms[0].val_dataloader()), list(dms[1].val_dataloader()))


def test_resumed_epoch_matches_uninterrupted_run():
    through = SegmentationDataModule(batch_size=4, seed=3, synthetic=SMALL)
    through.setup()
    loader = through.train_dataloader()
    for epoch in range(3):
        batches(loader, epoch)
    fresh = SegmentationDataModule(batch_size=4, seed=3, synthetic=SMALL)
    fresh.setup()
    assert_same(batches(fresh.train_dataloader(), epoch=3), batches(loader, epoch=3))


class Recorder(pl.LightningModule):
    """A 1x1 conv that records a fingerprint of every training batch per epoch."""

    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(3, 4, 1)
        self.seen: dict[int, list[float]] = {}

    def training_step(self, batch, batch_idx):
        image, mask = batch
        self.seen.setdefault(self.current_epoch, []).append(float(image.sum() + mask.sum()))
        torch.rand(17)  # the model consuming RNG must not matter
        return nn.functional.cross_entropy(self.head(image), mask, ignore_index=PAD_INDEX)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit(max_epochs: int, root: Path, ckpt_path: str | None = None) -> Recorder:
    model = Recorder()
    trainer = pl.Trainer(
        max_epochs=max_epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, default_root_dir=root,
    )  # fmt: skip
    trainer.fit(model, SegmentationDataModule(batch_size=8, seed=5, synthetic=SMALL), ckpt_path=ckpt_path)
    trainer.save_checkpoint(root / "last.ckpt")
    return model


def test_lightning_resume_sees_the_same_batches(tmp_path):
    uninterrupted = fit(3, tmp_path / "a")
    fit(1, tmp_path / "b")
    resumed = fit(3, tmp_path / "c", ckpt_path=str(tmp_path / "b" / "last.ckpt"))
    assert set(resumed.seen) == {1, 2}
    assert resumed.seen[1] == uninterrupted.seen[1] and resumed.seen[2] == uninterrupted.seen[2]
    assert uninterrupted.seen[0] != uninterrupted.seen[1]


# contracts: ids (C2), context (C3), resolved attributes and hyperparameters (C4)


def test_test_datasets_expose_ids_in_loader_order(tmp_path):
    root = make_camvid(tmp_path / "camvid", {"train": 3, "val": 2, "test": 3})
    dm = SegmentationDataModule("camvid", str(root), batch_size=2)
    dm.setup()
    assert dm.datasets["test"].ids == ["test_000", "test_001", "test_002"]
    first = next(iter(dm.test_dataloader()))[1][0]
    stored = cv2.imread(str(root / "testannot" / "test_000.png"), cv2.IMREAD_UNCHANGED)
    assert torch.equal(first[:40, :50], torch.from_numpy(stored).long())
    synthetic = SegmentationDataModule(synthetic=SMALL)
    synthetic.setup()
    assert synthetic.datasets["test"].ids == [str(i) for i in range(SMALL["n_test"])]
    assert synthetic.predict_dataloader().dataset is synthetic.datasets["test"]


@dataclass(frozen=True)
class WithContext:
    """A synthetic split with the ``context`` array of contract C3."""

    images: np.ndarray
    masks: np.ndarray
    context: np.ndarray


def fake_splits(size: int = 40, n: int = 4) -> dict[str, WithContext]:
    rng = np.random.default_rng(0)
    splits = {}
    for split in ("train", "val", "test"):
        images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
        masks = rng.integers(0, 4, (n, size, size), dtype=np.uint8)
        splits[split] = WithContext(images, masks, masks >= 2)
    return splits


def test_synthetic_eval_items_carry_the_context_pixels(monkeypatch):
    monkeypatch.setattr("smp_cbam.training.data._synthetic_splits", lambda options: fake_splits())
    dm = SegmentationDataModule(batch_size=4)
    dm.setup()
    assert len(dm.datasets["train"][0]) == 2  # training batches stay (image, mask)
    for split, loader in (("val", dm.val_dataloader()), ("test", dm.test_dataloader())):
        image, mask, context = next(iter(loader))
        assert image.shape == (4, 3, 64, 64) and context.shape == mask.shape == (4, 64, 64)
        assert context.dtype == torch.bool
        expected = torch.from_numpy(fake_splits()[split].context)
        assert torch.equal(context[:, :40, :40], expected) and not context[:, 40:].any() and not context[..., 40:].any()


def test_resolved_attributes_right_after_init_and_in_the_hparams(tmp_path):
    cases = {
        "synthetic": SegmentationDataModule(synthetic=SMALL),
        "camvid": SegmentationDataModule("camvid", str(make_camvid(tmp_path / "camvid"))),
        "folder": SegmentationDataModule(
            "folder", str(make_folder(tmp_path / "folder", [f"i{k}" for k in range(5)])), num_classes=3
        ),
    }
    for name, dm in cases.items():
        resolved = (dm.num_classes, dm.in_channels, dm.class_names, dm.ignore_index)
        assert all(value is not None for value in resolved), name
        assert isinstance(dm.class_names, tuple) and isinstance(dm.ignore_index, int)
        assert (
            tuple(dm.hparams_initial[k] for k in ("num_classes", "in_channels", "class_names", "ignore_index"))
            == (*resolved[:2], list(resolved[2]), resolved[3])  # a list in the hparams, as YAML reads it back
        )
        again = SegmentationDataModule(**dm.hparams_initial)  # the saved values re-create the same data module
        assert dict(again.hparams_initial) == dict(dm.hparams_initial), name
    assert cases["camvid"].hparams_initial["ignore_index"] == 11 and cases["folder"].hparams_initial["in_channels"] == 3


def test_module_and_data_module_in_a_users_trainer_with_a_logger(tmp_path):
    from pytorch_lightning.loggers import CSVLogger

    from smp_cbam.training.module import SegmentationModule

    dm = SegmentationDataModule(
        batch_size=8, synthetic={"size": 48, "cue_rows": 2, "gap": 8, "n_train": 8, "n_val": 8, "n_test": 8}
    )
    module = SegmentationModule(
        arch="unet", encoder="resnet18", attention="scse", encoder_depth=3, decoder_channels=[32, 16, 16],
        num_classes=dm.num_classes, in_channels=dm.in_channels, class_names=dm.class_names, ignore_index=dm.ignore_index,
    )  # fmt: skip
    trainer = pl.Trainer(
        max_epochs=1, logger=CSVLogger(tmp_path), accelerator="cpu", enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)  # raised "Error while merging hparams" when the data module saved raw arguments
    logged = (Path(trainer.logger.log_dir) / "hparams.yaml").read_text()
    assert "num_classes: 4" in logged and "dots" in logged


# evaluation matches training


def test_whole_frames_train_with_the_padding_evaluation_uses(tmp_path):
    root = make_camvid(tmp_path / "camvid", size=(40, 50))
    dm = SegmentationDataModule("camvid", str(root), batch_size=4, scale=(1.0, 1.5))
    dm.setup()
    train_image, train_mask = next(iter(dm.train_dataloader()))
    val_image, val_mask = next(iter(dm.val_dataloader()))
    assert train_image.shape[1:] == val_image.shape[1:] == (3, 64, 64)
    for image, mask in ((train_image, train_mask), (val_image, val_mask)):
        # the same rule: the frame's 40x50 pixels top left, reflected below and to the right, void there
        assert (mask[:, 40:] == 11).all() and (mask[:, :, 50:] == 11).all()
        assert torch.equal(image[:, :, 40:], image[:, :, torch.arange(38, 14, -1)])
    assert (train_mask[:, :40, :50] != 11).float().mean() > 0.8  # zooming in shows no padding inside the frame


def test_resized_frames_are_never_padded(tmp_path):
    root = make_camvid(tmp_path / "camvid", size=(45, 60))
    dm = SegmentationDataModule("camvid", str(root), batch_size=4, resize=(96, 128), eval_mode="resize")
    dm.setup()
    train_image, _ = next(iter(dm.train_dataloader()))
    val_image, _ = next(iter(dm.val_dataloader()))
    assert train_image.shape[2:] == val_image.shape[2:] == (96, 128)  # the resized frame: nothing padded


def test_zooming_out_is_refused():
    with pytest.raises(ValueError, match=r"scale must be \(low, high\) zoom factors with 1 <= low"):
        SegmentationDataModule(scale=(0.75, 1.25))


# DDP: the same permutation split across ranks


@pytest.mark.parametrize("length", [37, 40])
def test_ranks_split_the_single_process_order(length):
    batch = 3
    single = list(SeededSampler(length, seed=4))
    for world in (1, 2, 3, 4):
        ranks = [list(SeededSampler(length, seed=4, num_replicas=world, rank=r)) for r in range(world)]
        assert len({len(r) for r in ranks}) == 1 and len(ranks[0]) == length // world
        steps = len(ranks[0]) // batch  # drop_last, as the training loader does
        for step in range(steps):
            together = sorted(item for r in ranks for item in r[step * batch : (step + 1) * batch])
            assert together == sorted(single[step * batch * world : (step + 1) * batch * world]), (world, step)
        used = {i for r in ranks for i, _ in r}
        assert len(used) == length - length % world  # no sample twice, none padded in
    other_epoch = SeededSampler(length, seed=4, num_replicas=2, rank=0)
    other_epoch.set_epoch(1)
    assert list(other_epoch) != list(SeededSampler(length, seed=4, num_replicas=2, rank=0))
    with pytest.raises(ValueError, match="rank must be in 0..1, got 2"):
        SeededSampler(length, seed=4, num_replicas=2, rank=2)


def test_the_training_loader_follows_the_trainers_world_size():
    dm = SegmentationDataModule(batch_size=2, seed=3, synthetic=SMALL)
    dm.setup()
    whole = [i for i, _ in dm.train_dataloader().sampler]
    dm.trainer = SimpleNamespace(world_size=2, global_rank=1)
    sampler = dm.train_dataloader().sampler
    # a DistributedSampler, so that Lightning's DDP keeps it instead of wrapping it
    assert isinstance(sampler, DistributedSampler) and (sampler.num_replicas, sampler.rank) == (2, 1)
    assert [i for i, _ in sampler] == whole[1::2]


def test_resized_files_are_cached_after_first_use(tmp_path):
    root = make_camvid(tmp_path / "camvid", size=(45, 60))
    dm = SegmentationDataModule("camvid", str(root), batch_size=4, resize=(32, 64), eval_mode="resize")
    dm.setup()
    first = list(dm.val_dataloader())
    for path in (root / "val").iterdir():
        path.unlink()  # later epochs use the decoded, resized frames
    assert_same(list(dm.val_dataloader()), first)
    stored = cv2.imread(str(root / "valannot" / "val_000.png"), cv2.IMREAD_UNCHANGED)
    resized = cv2.resize(stored, (64, 32), interpolation=cv2.INTER_NEAREST)
    assert torch.equal(first[0][1][0], torch.from_numpy(resized).long())
