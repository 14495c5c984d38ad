"""Tests for smp_cbam.training.readers and the data module's use of them, on tiny generated files:
EXIF orientation, palette masks, grey/colour images, in_channels, and errors that name the file."""

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from smp_cbam.training.data import DatasetError, SegmentationDataModule
from smp_cbam.training.readers import ReadError, file_info, read_image, read_mask

ORIENTATION = 0x0112
VOC_PALETTE = [0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * (3 * 252) + [224, 224, 192]  # 0, 1, 2 and 255


def exif(orientation: int) -> Image.Exif:
    tags = Image.Exif()
    tags[ORIENTATION] = orientation
    return tags


def save(path: Path, array: np.ndarray, orientation: int | None = None, **options) -> Path:
    """Save ``array`` as stored pixels, with an EXIF Orientation tag when given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    if orientation is not None:
        options["exif"] = exif(orientation)
    image.save(path, **options)
    return path


def save_palette(path: Path, indices: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(indices.astype(np.uint8), mode="P")
    image.putpalette(VOC_PALETTE)
    image.save(path)
    return path


def scene(height: int, width: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An RGB image and its 2-class mask: bright blocks (class 1) on a dark background, so the image
    says where the mask is, even after JPEG compression."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((height, width), np.uint8)
    for _ in range(3):
        y, x = rng.integers(0, height - 8), rng.integers(0, width - 8)
        mask[y : y + 8, x : x + 8] = 1
    mask[:4, :4] = 1  # a corner block, so a turn or flip always moves something
    image = np.where(mask[..., None] == 1, 230, 25).astype(np.uint8).repeat(3, axis=2)
    return image, mask


# the readers


@pytest.mark.parametrize("orientation", range(1, 9))
def test_read_image_applies_every_orientation_like_pillow(tmp_path, orientation):
    stored = np.random.default_rng(orientation).integers(0, 256, (12, 20, 3), dtype=np.uint8)
    path = save(tmp_path / "photo.png", stored, orientation)  # PNG: lossless, so pixels compare exactly
    raw = read_image(path, exif="ignore")
    assert np.array_equal(raw, stored)
    turned = read_image(path)
    expected = {1: raw, 2: raw[:, ::-1], 3: raw[::-1, ::-1], 4: raw[::-1], 5: raw.transpose(1, 0, 2),
                6: np.rot90(raw, -1), 7: np.rot90(raw, -1)[::-1], 8: np.rot90(raw, 1)}[orientation]  # fmt: skip
    assert np.array_equal(turned, expected)
    info = file_info(path)
    assert (info.orientation, info.turned, info.size("apply")) == (orientation, orientation > 1, turned.shape[:2])
    if orientation > 1:
        with pytest.raises(ReadError, match=rf"photo.png: carries EXIF Orientation {orientation}") as error:
            read_image(path, exif="refuse")
        assert error.value.kind == "exif" and error.value.path == path


def test_read_mask_applies_the_masks_own_orientation(tmp_path):
    stored = np.arange(6 * 10, dtype=np.uint8).reshape(6, 10) % 3
    path = save(tmp_path / "mask.png", stored, orientation=6)
    assert np.array_equal(read_mask(path), np.rot90(stored, -1))
    assert np.array_equal(read_mask(path, exif="ignore"), stored)


def test_palette_masks_are_read_as_indices(tmp_path):
    indices = np.array([[0, 1, 2, 255], [2, 2, 1, 0]], np.uint8)
    path = save_palette(tmp_path / "voc.png", indices)
    assert Image.open(path).mode == "P"
    mask = read_mask(path)
    assert mask.dtype == np.uint8 and np.array_equal(mask, indices)


def test_mask_modes(tmp_path):
    values = np.array([[0, 1], [300, 2]], np.uint16)
    assert np.array_equal(read_mask(save(tmp_path / "m16.png", values)), values)
    bilevel = tmp_path / "m1.png"
    Image.fromarray(np.array([[0, 255], [255, 0]], np.uint8)).convert("1").save(bilevel)
    assert np.array_equal(read_mask(bilevel), [[0, 1], [1, 0]])
    grey_rgb = np.repeat(np.array([[0, 1], [2, 0]], np.uint8)[..., None], 3, axis=2)
    assert np.array_equal(read_mask(save(tmp_path / "same.png", grey_rgb)), [[0, 1], [2, 0]])
    colour = grey_rgb.copy()
    colour[0, 0] = (255, 0, 0)
    with pytest.raises(
        ReadError, match=r"colour.png: 3 channels that differ \(a colour mask, 4 distinct colours\)"
    ) as error:
        read_mask(save(tmp_path / "colour.png", colour))
    assert error.value.kind == "format"


def test_grey_and_colour_images_follow_in_channels(tmp_path):
    grey = np.arange(20, dtype=np.uint8).reshape(4, 5) * 10
    grey_path = save(tmp_path / "grey.png", grey)
    assert np.array_equal(read_image(grey_path, in_channels=1), grey)
    assert np.array_equal(read_image(grey_path, in_channels=3), np.repeat(grey[..., None], 3, axis=2))
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[..., 0] = 200  # pure red: luma 0.299 * 200
    rgb_path = save(tmp_path / "red.png", rgb)
    assert np.array_equal(read_image(rgb_path), rgb)
    assert np.array_equal(read_image(rgb_path, in_channels=1), np.full((4, 5), 60, np.uint8))
    rgba = np.concatenate([rgb, np.full((4, 5, 1), 7, np.uint8)], axis=2)
    assert np.array_equal(read_image(save(tmp_path / "alpha.png", rgba)), rgb)  # alpha dropped
    sixteen = (np.arange(20, dtype=np.uint16).reshape(4, 5) * 3000).astype(np.uint16)
    assert np.array_equal(read_image(save(tmp_path / "g16.png", sixteen), 1), (sixteen >> 8).astype(np.uint8))
    assert file_info(grey_path).channels == 1 and file_info(rgb_path).channels == 3
    with pytest.raises(ValueError, match="in_channels must be 1 or 3, got 2"):
        read_image(rgb_path, in_channels=2)


def test_read_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.png"
    with pytest.raises(ReadError, match=r"missing.png: file not found"):
        read_image(missing)
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image at all")
    with pytest.raises(ReadError, match=r"junk.jpg: not a readable image"):
        read_mask(junk)
    image, _ = scene(32, 32)
    whole = save(tmp_path / "whole.jpg", image)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(whole.read_bytes()[:-40])  # the header is intact, the scan data ends early
    with pytest.raises(ReadError, match=r"cut.jpg: image data is damaged") as error:
        read_image(cut)
    assert error.value.kind == "unreadable" and error.value.path == cut
    floats = tmp_path / "float.tif"
    Image.fromarray(np.zeros((4, 4), np.float32)).save(floats)
    with pytest.raises(ReadError, match=r"float.tif: floating-point image"):
        read_image(floats)
    with pytest.raises(ValueError, match="exif must be one of"):
        read_image(whole, exif="rotate")


# the data module: the check and training read alike


def make_folder(root: Path, n: int = 6, size: tuple[int, int] = (32, 32), orientation: int | None = None,
                mask_layout: str = "displayed", grey: tuple[int, ...] = ()) -> Path:  # fmt: skip
    """A folder dataset whose images are saved as JPEGs (stored pixels turned back from the
    displayed scene when ``orientation`` is 6) and whose masks show the displayed scene (or the
    stored layout)."""
    for i in range(n):
        image, mask = scene(*size, seed=i)
        stored_image, stored_mask = image, mask
        if orientation == 6:  # the camera stored the scene turned 90 degrees counter-clockwise
            stored_image = np.ascontiguousarray(np.rot90(image, 1))
            if mask_layout == "stored":
                stored_mask = np.ascontiguousarray(np.rot90(mask, 1))
        if i in grey:
            stored_image = np.ascontiguousarray(stored_image[..., 0])
        save(root / "images" / f"img{i}.jpg", stored_image, orientation if i % 2 == 0 else None, quality=95)
        if orientation == 6 and i % 2:  # odd images carry no tag: their stored pixels are the scene
            save(root / "images" / f"img{i}.jpg", image if i not in grey else image[..., 0], quality=95)
            stored_mask = mask
        save(root / "masks" / f"img{i}.png", stored_mask)
    return root


def aligned(dm: SegmentationDataModule) -> bool:
    """Whether the bright pixels of every validation image are exactly its class-1 pixels."""
    for image, mask in dm.val_dataloader():
        bright = image.mean(dim=1) > 0
        valid = mask != dm.ignore_index
        if not torch.equal(bright[valid], mask[valid] == 1):
            return False
    return True


@pytest.mark.parametrize("size", [(32, 32), (32, 64)], ids=["square", "non-square"])
def test_exif_rotated_jpegs_are_turned_with_a_warning_naming_them(tmp_path, size):
    root = make_folder(tmp_path / "data", size=size, orientation=6)
    dm = SegmentationDataModule("folder", str(root), num_classes=2, val_fraction=0.5, test_fraction=0, batch_size=3)
    with pytest.warns(
        UserWarning, match=r"EXIF orientation applied to 3 files[^\n]*\n[\s\S]*img0.jpg \(Orientation 6\)"
    ) as record:
        dm.setup()
    message = next(str(w.message) for w in record if "EXIF" in str(w.message))
    assert all(f"img{i}.jpg" in message for i in (0, 2, 4)) and "img1.jpg" not in message, message
    assert aligned(dm)
    image, mask = next(iter(dm.train_dataloader()))
    assert image.shape[2:] == mask.shape[1:] == size  # displayed layout: (32, 64) for the non-square scene

    ignored = SegmentationDataModule(
        "folder", str(root), num_classes=2, val_fraction=0.5, test_fraction=0, exif="ignore"
    )
    if size[0] == size[1]:
        ignored.setup()  # square: the sizes match, the content does not (the silent case this rule prevents)
        assert not aligned(ignored)
    else:
        with pytest.raises(DatasetError, match=r"differ in size:\n[\s\S]*img0.jpg \(64x32\) vs .*img0.png \(32x64\)"):
            ignored.setup()


def test_masks_drawn_on_the_stored_layout_need_exif_ignore(tmp_path):
    root = make_folder(tmp_path / "data", size=(32, 64), orientation=6, mask_layout="stored")
    dm = SegmentationDataModule("folder", str(root), num_classes=2, val_fraction=0.5, test_fraction=0)
    with pytest.raises(
        DatasetError, match=r"match in size only without the EXIF[^\n]*\n[\s\S]*img0.jpg \(Orientation 6\)"
    ) as error:
        dm.setup()
    assert "exif='ignore'" in str(error.value) and "img1.jpg" not in str(error.value)
    ignored = SegmentationDataModule(
        "folder", str(root), num_classes=2, val_fraction=0.5, test_fraction=0, exif="ignore", resize=(64, 64)
    )
    ignored.setup()
    assert ignored.datasets["train"][0][0].shape[1:] == (64, 64)


def test_exif_refuse_names_the_files(tmp_path):
    root = make_folder(tmp_path / "data", orientation=6)
    dm = SegmentationDataModule("folder", str(root), num_classes=2, exif="refuse")
    with pytest.raises(DatasetError, match=r"3 files carry an EXIF orientation and exif='refuse'") as error:
        dm.setup()
    assert all(str(root / "images" / f"img{i}.jpg") in str(error.value) for i in (0, 2, 4))
    with pytest.raises(ValueError, match="exif must be one of"):
        SegmentationDataModule("folder", str(root), num_classes=2, exif="yes")


def test_folder_with_palette_masks(tmp_path):
    root = tmp_path / "voc"
    for i in range(5):
        image, mask = scene(32, 32, seed=i)
        mask[-2:] = 255  # void border, as in Pascal VOC
        mask[5:9, 20:24] = 2
        save(root / "images" / f"img{i}.png", image)
        save_palette(root / "masks" / f"img{i}.png", mask)
    dm = SegmentationDataModule("folder", str(root), num_classes=3, void_label=255, val_fraction=0.4, test_fraction=0)
    dm.setup()
    masks = torch.cat([m for _, m in dm.val_dataloader()])
    assert set(masks.unique().tolist()) == {0, 1, 2, 255}
    with pytest.raises(DatasetError, match=r"not valid \(class indices 0..2\)[^\n]*\n[\s\S]*img0.png: \[255\]"):
        SegmentationDataModule("folder", str(root), num_classes=3).setup()


def test_mixed_grey_and_colour_images_are_read_as_rgb_with_a_warning(tmp_path):
    root = make_folder(tmp_path / "data", grey=(1, 4))
    dm = SegmentationDataModule("folder", str(root), num_classes=2, val_fraction=0.5, test_fraction=0)
    assert dm.in_channels == 3  # resolved from the headers right after __init__
    with pytest.warns(UserWarning, match=r"2 of 6 images are grey, repeated into 3 channels") as record:
        dm.setup()
    message = str(record[0].message)
    assert "img1.jpg" in message and "img4.jpg" in message and "img0.jpg" not in message
    assert aligned(dm)
    assert all(dm.datasets[s][i][0].shape[0] == 3 for s in dm.datasets for i in range(len(dm.datasets[s])))

    grey = SegmentationDataModule("folder", str(make_folder(tmp_path / "grey", grey=tuple(range(6)))), num_classes=2)
    assert grey.in_channels == 1


def test_explicit_in_channels_converts_without_warning(tmp_path):
    root = make_folder(tmp_path / "data", grey=(1, 4))
    for channels in (1, 3):
        dm = SegmentationDataModule(
            "folder", str(root), num_classes=2, in_channels=channels, val_fraction=0.5, test_fraction=0
        )
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            dm.setup()
        assert {dm.datasets["train"][i][0].shape[0] for i in range(len(dm.datasets["train"]))} == {channels}
        assert dm.hparams["in_channels"] == channels and aligned(dm)
    with pytest.raises(ValueError, match="in_channels of camvid must be 3, got 1"):
        SegmentationDataModule("camvid", str(root), in_channels=1)


def test_damaged_files_are_named_by_the_check(tmp_path):
    root = make_folder(tmp_path / "data")
    jpeg = root / "images" / "img3.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[:-40])
    colour = np.zeros((32, 32, 3), np.uint8)
    colour[..., 0] = 1
    save(root / "masks" / "img5.png", colour)
    with pytest.raises(DatasetError, match=r"1 files could not be read[^\n]*\n.*img3.jpg: image data is damaged"):
        SegmentationDataModule("folder", str(root), num_classes=2).setup()
    save(root / "images" / "img3.jpg", scene(32, 32)[0])
    with pytest.raises(DatasetError, match=r"single-channel or palette[^\n]*\n.*img5.png: 3 channels that differ"):
        SegmentationDataModule("folder", str(root), num_classes=2).setup()


def test_a_grey_photo_in_an_rgb_dataset_is_named(tmp_path):
    root = tmp_path / "camvid"
    for split in ("train", "val", "test"):
        for i in range(2):
            image, mask = scene(32, 32, seed=i)
            save(root / split / f"{split}_{i}.png", image[..., 0] if (split, i) == ("val", 1) else image)
            save(root / f"{split}annot" / f"{split}_{i}.png", mask)
    dm = SegmentationDataModule("camvid", str(root))
    with pytest.warns(UserWarning, match=r"1 of 6 images are grey, repeated into 3 channels[^\n]*\n.*val_1.png"):
        dm.setup()
    assert dm.datasets["val"][1][0].shape == (3, 32, 32)
