"""Data for training and comparing attention types: one LightningDataModule, four dataset types.

``dataset=``

- ``"synthetic"``: generated in memory (:mod:`smp_cbam.synthetic`), 4 classes, 64x64 RGB.
- ``"camvid"``: SegNet layout ``ROOT/{train,trainannot,val,valannot,test,testannot}/*.png``,
  11 classes; label 11 is void and is the default ``ignore_index``.
- ``"pets"``: Oxford-IIIT Pet as smp's ``OxfordPetDataset`` reads it (``ROOT/images/*.jpg``,
  ``ROOT/annotations/trimaps/*.png``, ``ROOT/annotations/{trainval,test}.txt``). Trimap 1 (pet)
  and 3 (border) become class 1 like in smp, 2 becomes background; with an explicit
  ``ignore_index`` the border becomes ``ignore_index`` instead. trainval is split into
  train/val with a seeded split; ``test.txt`` is optional.
- ``"folder"``: ``ROOT/images/*`` with ``ROOT/masks/<stem>.png``, split with a seeded split, or
  ``ROOT/{train,val,test}/{images,masks}`` (val and test optional: missing ones are split off
  train). Masks hold class indices; with ``num_classes=2``, masks holding only 0 and 255 are
  read as 0/1. Grayscale images give ``in_channels=1``, colour ones 3 (from the first image, or
  pass ``in_channels``).

Images are read with OpenCV and converted to RGB (or grayscale); 16-bit images become 8-bit.

``ignore_index`` is always an int after ``__init__``: the given one, else the dataset's void label
(CamVid 11), else ``PAD_INDEX`` (255), which marks only padding. Padded pixels (random crops,
padding to a multiple of 32 for evaluation) get ``ignore_index`` in the mask, so losses and
metrics that honour ``ignore_index`` never count them.

Transforms (albumentations): training does ``resize`` (if given), a random scale in ``scale``,
a random crop to ``crop`` (padded where needed), a horizontal flip, brightness/contrast jitter for
RGB, then normalization (ImageNet statistics; their channel means for grayscale). ``crop``
defaults to the image size rounded up to a multiple of 32. Evaluation does ``resize`` (if given)
and then pads to a multiple of 32 (bottom and right, ``eval_mode="pad"``) or nothing more
(``eval_mode="resize"``, which needs ``resize``). Pets default to ``resize=(256, 256)``.

Determinism: the training loader's :class:`SeededSampler` derives the order from
``(seed, epoch)`` and a seed for each sample's augmentation from ``(seed, epoch, index)``; the
dataset seeds the albumentations pipeline with it. So a given ``seed`` gives the same batches
whatever the model, ``num_workers`` or RNG state, and Lightning's ``set_epoch`` call makes a run
resumed at epoch e see the same batches as an uninterrupted one. Splits use ``split_seed``, so
every training seed sees the same split.

:meth:`SegmentationDataModule.setup` reads every file once and raises one :class:`DatasetError`
per kind of problem (listing the first files); results are cached in memory per file.
"""

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations checks PyPI on import otherwise

import functools
import random
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import albumentations as A
import cv2
import numpy as np
import pytorch_lightning as pl
import torch
from albumentations.pytorch import ToTensorV2
from torch.utils.data import DataLoader, Dataset, Sampler

from .synthetic import CLASS_NAMES as SYNTHETIC_CLASSES
from .synthetic import DEFAULTS as SYNTHETIC_DEFAULTS
from .synthetic import SyntheticSet, generate_splits

DATASETS = ("synthetic", "camvid", "pets", "folder")
CAMVID_CLASSES = (
    "sky", "building", "pole", "road", "pavement", "tree",
    "signsymbol", "fence", "car", "pedestrian", "bicyclist",
)  # fmt: skip
CAMVID_VOID = 11
CAMVID_SPLITS = {"train": ("train", "trainannot"), "val": ("val", "valannot"), "test": ("test", "testannot")}
PETS_CLASSES = ("background", "pet")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
PAD_INDEX = 255
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY_MEAN = (0.449,)
GRAY_STD = (0.226,)
DIVISOR = 32
MAX_LISTED = 10
FOLDER_LAYOUT = "ROOT/images/* with ROOT/masks/<stem>.png, or ROOT/{train,val,test}/{images,masks} (val, test optional)"
CAMVID_LAYOUT = "ROOT/{train,trainannot,val,valannot,test,testannot}/*.png"
PETS_LAYOUT = "ROOT/images/<name>.jpg, ROOT/annotations/trimaps/<name>.png, ROOT/annotations/{trainval,test}.txt"

T = TypeVar("T")


class DatasetError(ValueError):
    """Bad input found before training; the message names the file(s) and the fix."""


@dataclass(frozen=True)
class Pair:
    """An image file and its mask file."""

    image: Path
    mask: Path


@dataclass(frozen=True)
class PairInfo:
    """What reading a pair found: shapes (None when unreadable), the mask's values, a mask
    format problem."""

    image_shape: tuple[int, ...] | None
    mask_shape: tuple[int, ...] | None
    mask_values: tuple[int, ...] = ()
    mask_problem: str | None = None


def read_image(path: Path, channels: int) -> np.ndarray | None:
    """An RGB (H, W, 3) or grayscale (H, W) uint8 image; None when OpenCV cannot read it."""
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE if channels == 1 else cv2.IMREAD_COLOR)
    if image is None or channels == 1:
        return image
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_mask(path: Path) -> np.ndarray | None:
    """The mask as stored (IMREAD_UNCHANGED); a colour mask whose channels agree becomes (H, W)."""
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if mask is not None and mask.ndim == 3 and (mask == mask[..., :1]).all():
        return mask[..., 0]
    return mask


def _stamp(path: Path) -> tuple[int, int]:
    try:
        stat = path.stat()
    except OSError:
        return (-1, -1)
    return (stat.st_mtime_ns, stat.st_size)


def scan_pair(pair: Pair) -> PairInfo:
    """Read a pair once (cached per file version) and report shapes, mask values and problems."""
    return _scan_cached(pair.image, _stamp(pair.image), pair.mask, _stamp(pair.mask))


@functools.lru_cache(maxsize=50_000)
def _scan_cached(image_path: Path, image_stamp: tuple[int, int], mask_path: Path, mask_stamp: tuple[int, int]) -> PairInfo:
    # the stamps are part of the cache key, so a changed file is read again
    image = cv2.imread(str(image_path), cv2.IMREAD_UNCHANGED)
    mask = read_mask(mask_path)
    image_shape = None if image is None else image.shape
    if mask is None:
        return PairInfo(image_shape, None)
    if mask.ndim != 2:
        return PairInfo(image_shape, mask.shape, mask_problem=f"{mask.shape[2]} channels that differ")
    if mask.dtype not in (np.uint8, np.uint16):
        return PairInfo(image_shape, mask.shape, mask_problem=f"dtype {mask.dtype}")
    return PairInfo(image_shape, mask.shape, tuple(np.unique(mask).tolist()))


def _listing(lines: Sequence[str]) -> str:
    shown = "\n".join(f"  {line}" for line in lines[:MAX_LISTED])
    more = f"\n  ... and {len(lines) - MAX_LISTED} more" if len(lines) > MAX_LISTED else ""
    return shown + more


def _fail(what: str, lines: Sequence[str], fix: str) -> None:
    if lines:
        raise DatasetError(f"{len(lines)} {what}:\n{_listing(lines)}\nFix: {fix}")


def mask_lut(mapping: dict[int, int]) -> np.ndarray:
    """Lookup table from stored (8- or 16-bit) mask value to class index or ignore index; values
    not in ``mapping`` give -1 (invalid)."""
    lut = np.full(1 << 16, -1, np.int16)
    lut[list(mapping)] = list(mapping.values())
    return lut


def validate(pairs: dict[str, list[Pair]], infos: dict[str, list[PairInfo]], lut: np.ndarray, valid: str) -> None:
    """Raise a DatasetError for the first kind of problem found (unreadable files, bad mask format,
    image/mask size mismatch, invalid mask values), listing the files; ``valid`` describes the
    valid mask values for the message."""
    rows = [(p, i) for split in pairs for p, i in zip(pairs[split], infos[split])]
    unreadable = [str(p.image) for p, i in rows if i.image_shape is None]
    unreadable += [str(p.mask) for p, i in rows if i.mask_shape is None]
    _fail(
        "files could not be read (cv2.imread returned None: missing, corrupt or not an image)",
        unreadable,
        "replace the files with readable images, or remove them together with their image/mask partner.",
    )
    _fail(
        "masks are not single-channel 8- or 16-bit images",
        [f"{p.mask}: {i.mask_problem}" for p, i in rows if i.mask_problem],
        "save masks as single-channel PNGs holding class indices (not colours).",
    )
    _fail(
        "image/mask pairs differ in size",
        [
            f"{p.image} ({i.image_shape[0]}x{i.image_shape[1]}) vs {p.mask} ({i.mask_shape[0]}x{i.mask_shape[1]})"
            for p, i in rows
            if i.image_shape[:2] != i.mask_shape[:2]
        ],
        "make every mask the same height and width as its image.",
    )
    bad = []
    for p, i in rows:
        values = [v for v in i.mask_values if lut[v] < 0]
        if values:
            bad.append(f"{p.mask}: {values[:MAX_LISTED]}")
    _fail(
        f"masks hold values that are not valid ({valid})",
        bad,
        "fix these masks, or pass num_classes / ignore_index that match how the masks are stored.",
    )


def seeded_split(items: Sequence[T], fractions: dict[str, float], seed: int) -> dict[str, list[T]]:
    """Split ``items`` reproducibly: ``round(n * fraction)`` items (at least 1) go to each named
    split with a positive fraction, the rest to ``"train"``; each split keeps the input order."""
    order = np.random.default_rng(seed).permutation(len(items))
    splits, start = {}, 0
    for name, fraction in fractions.items():
        if fraction > 0:
            count = max(1, round(len(items) * fraction))
            splits[name] = [items[i] for i in sorted(order[start : start + count])]
            start += count
    splits["train"] = [items[i] for i in sorted(order[start:])]
    return splits


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def pair_folder(images_dir: Path, masks_dir: Path, mask_suffix: str = ".png") -> list[Pair]:
    """Pair every image with ``masks_dir/<stem><mask_suffix>``; raise if an image has no mask,
    warn about masks without an image."""
    images = _image_files(images_dir)
    if not images:
        raise DatasetError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {images_dir}. Fix: add images or remove the folder.")
    stems: dict[str, list[Path]] = {}
    for image in images:
        stems.setdefault(image.stem, []).append(image)
    _fail(
        f"image stems in {images_dir} are used by several files, so their masks are ambiguous",
        [", ".join(map(str, paths)) for paths in stems.values() if len(paths) > 1],
        "keep one image per stem.",
    )
    _fail(
        f"images have no mask (expected {masks_dir}/<stem>{mask_suffix})",
        [str(image) for image in images if not (masks_dir / f"{image.stem}{mask_suffix}").is_file()],
        "add the missing masks or remove these images.",
    )
    orphans = sorted(str(m) for m in masks_dir.glob(f"*{mask_suffix}") if m.stem not in stems)
    if orphans:
        warnings.warn(f"{len(orphans)} masks have no image and are not used:\n{_listing(orphans)}", stacklevel=2)
    return [Pair(image, masks_dir / f"{image.stem}{mask_suffix}") for image in images]


def _require_dirs(root: Path, names: Sequence[str], layout: str) -> None:
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist or is not a folder. Fix: pass root= a folder laid out as {layout}.")
    missing = [str(root / name) for name in names if not (root / name).is_dir()]
    _fail(f"required folders are missing in {root}", missing, f"lay the dataset out as {layout}.")


def camvid_pairs(root: Path) -> dict[str, list[Pair]]:
    """The train/val/test pairs of a SegNet-layout CamVid folder."""
    _require_dirs(root, [d for dirs in CAMVID_SPLITS.values() for d in dirs], CAMVID_LAYOUT)
    return {split: pair_folder(root / images, root / masks) for split, (images, masks) in CAMVID_SPLITS.items()}


def pets_pairs(root: Path, val_fraction: float, split_seed: int) -> dict[str, list[Pair]]:
    """Oxford-IIIT Pet pairs: trainval.txt split into train/val, and test.txt when present."""
    _require_dirs(root, ["images", "annotations/trimaps"], PETS_LAYOUT)
    lists = {"trainval": root / "annotations" / "trainval.txt", "test": root / "annotations" / "test.txt"}
    if not lists["trainval"].is_file():
        raise DatasetError(f"{lists['trainval']} is missing. Fix: lay the dataset out as {PETS_LAYOUT}.")
    pairs = {}
    for name, list_file in lists.items():
        if not list_file.is_file():
            continue
        names = [line.split()[0] for line in list_file.read_text().splitlines() if line.strip() and not line.startswith("#")]
        if not names:
            raise DatasetError(f"{list_file} lists no images. Fix: list one image name per line.")
        found = [Pair(root / "images" / f"{n}.jpg", root / "annotations" / "trimaps" / f"{n}.png") for n in names]
        _fail(
            f"names in {list_file} have no image",
            [str(p.image) for p in found if not p.image.is_file()],
            f"add the images or remove the names from {list_file.name}.",
        )
        _fail(
            f"images in {list_file} have no trimap",
            [str(p.mask) for p in found if not p.mask.is_file()],
            f"add the trimaps or remove the names from {list_file.name}.",
        )
        pairs[name] = found
    splits = seeded_split(pairs.pop("trainval"), {"val": val_fraction}, split_seed)
    return splits | pairs


def folder_pairs(root: Path, val_fraction: float, test_fraction: float, split_seed: int) -> dict[str, list[Pair]]:
    """Pairs of a user folder, flat (seeded split) or with split folders (missing val/test split
    off train)."""
    _require_dirs(root, [], FOLDER_LAYOUT)
    if (root / "images").is_dir():
        _require_dirs(root, ["masks"], FOLDER_LAYOUT)
        pool = pair_folder(root / "images", root / "masks")
        return seeded_split(pool, {"val": val_fraction, "test": test_fraction}, split_seed)
    present = [s for s in ("train", "val", "test") if s == "train" or (root / s).is_dir()]
    _require_dirs(root, [f"{s}/{d}" for s in present for d in ("images", "masks")], FOLDER_LAYOUT)
    given = {s: pair_folder(root / s / "images", root / s / "masks") for s in present}
    missing = {s: f for s, f in (("val", val_fraction), ("test", test_fraction)) if s not in given}
    return seeded_split(given.pop("train"), missing, split_seed) | given


class SegmentationDataset(Dataset):
    """Base dataset: ``load(index)`` gives the raw (image, mask); ``__getitem__`` applies the
    transform seeded for the sample. Items are an index or an ``(index, sample_seed)`` pair from
    :class:`SeededSampler` (a bare index uses the index as the seed)."""

    def __init__(self, transform: A.Compose):
        self.transform = transform

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, sample_seed = item if isinstance(item, tuple) else (item, item)
        image, mask = self.load(index)
        self.transform.set_random_state(np.random.default_rng(sample_seed), random.Random(sample_seed))
        out = self.transform(image=image, mask=mask)
        return out["image"], out["mask"].long()


class ArrayDataset(SegmentationDataset):
    """Images (N, H, W[, C]) uint8 and masks (N, H, W) of class indices held in memory."""

    def __init__(self, images: np.ndarray, masks: np.ndarray, transform: A.Compose):
        super().__init__(transform)
        self.images, self.masks = images, masks

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self.images[index], self.masks[index]


class FileDataset(SegmentationDataset):
    """Image/mask files; stored mask values are mapped through ``lut`` (see :func:`mask_lut`)."""

    def __init__(self, pairs: Sequence[Pair], lut: np.ndarray, in_channels: int, transform: A.Compose):
        super().__init__(transform)
        self.pairs, self.lut, self.in_channels = list(pairs), lut, in_channels

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        pair = self.pairs[index]
        image, mask = read_image(pair.image, self.in_channels), read_mask(pair.mask)
        if image is None or mask is None:
            raise DatasetError(f"{pair.image} or {pair.mask} could not be read any more. Fix: restore the file.")
        return image, self.lut[mask].astype(np.uint8)


class SeededSampler(Sampler[tuple[int, int]]):
    """Yields ``(index, sample_seed)``: the order depends only on ``(seed, epoch)`` and each
    sample's seed only on ``(seed, epoch, index)``. Lightning calls :meth:`set_epoch` at the start
    of every training epoch, also after resuming from a checkpoint."""

    def __init__(self, length: int, seed: int):
        self.length, self.seed, self.epoch = length, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[tuple[int, int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(self.length)
        sample_seeds = rng.integers(0, 2**32, self.length)
        for index in order:
            yield int(index), int(sample_seeds[index])


def collate(batch: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack samples into an ``(images, masks)`` tuple."""
    images, masks = zip(*batch)
    return torch.stack(images), torch.stack(masks)


def _normalize(in_channels: int) -> list:
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if in_channels == 3 else (GRAY_MEAN, GRAY_STD)
    return [A.Normalize(mean=mean, std=std), ToTensorV2()]


def train_transform(
    crop: tuple[int, int], resize: tuple[int, int] | None, scale: tuple[float, float], in_channels: int, ignore_index: int
) -> A.Compose:
    """Resize (optional), random scale, random crop (padding the mask with ``ignore_index``),
    horizontal flip, brightness/contrast jitter (RGB), normalize, to tensor."""
    steps = [A.Resize(*resize)] if resize else []
    if tuple(scale) != (1.0, 1.0):
        steps.append(A.RandomScale(scale_limit=(scale[0] - 1.0, scale[1] - 1.0), p=1.0))
    steps += [
        A.RandomCrop(*crop, pad_if_needed=True, pad_position="random", fill=0, fill_mask=ignore_index),
        A.HorizontalFlip(p=0.5),
    ]
    if in_channels == 3:
        steps.append(A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.5))
    return A.Compose(steps + _normalize(in_channels))


def eval_transform(resize: tuple[int, int] | None, eval_mode: str, in_channels: int, ignore_index: int) -> A.Compose:
    """Resize (optional), then pad bottom/right to a multiple of 32 with ``ignore_index`` in the
    mask (``"pad"``) or nothing more (``"resize"``); normalize, to tensor."""
    steps = [A.Resize(*resize)] if resize else []
    if eval_mode == "pad":
        steps.append(
            A.PadIfNeeded(
                min_height=None, min_width=None, pad_height_divisor=DIVISOR, pad_width_divisor=DIVISOR,
                position="top_left", fill=0, fill_mask=ignore_index,
            )  # fmt: skip
        )
    return A.Compose(steps + _normalize(in_channels))


@functools.lru_cache(maxsize=4)
def _synthetic_splits(options: tuple[tuple[str, object], ...]) -> dict[str, SyntheticSet]:
    return generate_splits(**dict(options))


def _round_up(size: Sequence[int]) -> tuple[int, int]:
    return tuple(-(-s // DIVISOR) * DIVISOR for s in size)


class SegmentationDataModule(pl.LightningDataModule):
    """Train/val/test loaders for ``dataset`` in ``("synthetic", "camvid", "pets", "folder")``.

    Batches are ``(image, mask)``: float32 (B, C, H, W) normalized images and int64 (B, H, W)
    masks of class indices, ``ignore_index`` where void or padded. ``num_classes``,
    ``ignore_index`` and ``class_names`` are set by ``__init__``; ``in_channels`` too, except for
    ``"folder"`` without ``in_channels``, where :meth:`setup` detects it from the first image.

    Additions to the basic interface: ``split_seed`` seeds the train/val/test splits (separate from
    the training ``seed`` so every run sees the same split), ``in_channels`` (1 or 3) forces
    grayscale or colour reading of file datasets, ``class_names`` names folder classes.
    """

    def __init__(
        self,
        dataset: str = "synthetic",
        root: str | None = None,
        num_classes: int | None = None,
        ignore_index: int | None = None,
        resize: tuple[int, int] | None = None,
        crop: tuple[int, int] | None = None,
        scale: tuple[float, float] = (0.75, 1.25),
        eval_mode: str = "pad",
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        synthetic: dict | None = None,
        split_seed: int = 0,
        in_channels: int | None = None,
        class_names: Sequence[str] | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        if dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
        if dataset != "synthetic" and root is None:
            raise ValueError(f"dataset={dataset!r} needs root= the dataset folder")
        if eval_mode not in ("pad", "resize"):
            raise ValueError(f"eval_mode must be 'pad' or 'resize', got {eval_mode!r}")
        if dataset == "pets" and resize is None:
            resize = (256, 256)
        if eval_mode == "resize" and (resize is None or any(s % DIVISOR for s in resize)):
            raise ValueError(f"eval_mode='resize' needs resize=(H, W) with multiples of {DIVISOR}, got {resize}")
        if crop is not None and any(s % DIVISOR for s in crop):
            raise ValueError(f"crop must be multiples of {DIVISOR} (smp encoders downsample 32x), got {crop}")
        if not (0 < scale[0] <= scale[1]):
            raise ValueError(f"scale must be (low, high) with 0 < low <= high, got {scale}")
        if in_channels not in (None, 1, 3) or (dataset == "synthetic" and in_channels == 1):
            raise ValueError(f"in_channels must be 1 or 3 (3 for synthetic), got {in_channels}")
        self.synthetic_options = {**SYNTHETIC_DEFAULTS, **(synthetic or {})} if dataset == "synthetic" else {}
        if self.synthetic_options.keys() - SYNTHETIC_DEFAULTS.keys():
            unknown = sorted(self.synthetic_options.keys() - SYNTHETIC_DEFAULTS.keys())
            raise ValueError(f"unknown synthetic options {unknown}; valid: {sorted(SYNTHETIC_DEFAULTS)}")

        fixed = {"synthetic": SYNTHETIC_CLASSES, "camvid": CAMVID_CLASSES, "pets": PETS_CLASSES}.get(dataset)
        if fixed is not None and num_classes not in (None, len(fixed)):
            raise ValueError(f"{dataset} has {len(fixed)} classes, got num_classes={num_classes}")
        if fixed is None and num_classes is None:
            raise ValueError("dataset='folder' needs num_classes=")
        self.num_classes = len(fixed) if fixed is not None else num_classes
        if not 2 <= self.num_classes < PAD_INDEX:
            raise ValueError(f"num_classes must be in 2..{PAD_INDEX - 1}, got {self.num_classes}")
        if ignore_index is not None and 0 <= ignore_index < self.num_classes:
            raise ValueError(f"ignore_index {ignore_index} is a class index (num_classes={self.num_classes})")
        if ignore_index is not None and not 0 <= ignore_index <= PAD_INDEX:
            raise ValueError(f"ignore_index must be in {self.num_classes}..{PAD_INDEX}, got {ignore_index}")
        if fixed is not None:
            self.class_names = list(fixed)
        elif class_names is not None:
            if len(class_names) != self.num_classes:
                raise ValueError(f"class_names has {len(class_names)} names for {self.num_classes} classes")
            self.class_names = list(class_names)
        else:
            self.class_names = ["background", "foreground"] if self.num_classes == 2 else [f"class_{i}" for i in range(self.num_classes)]
        self.void = CAMVID_VOID if dataset == "camvid" else ignore_index  # stored value of void pixels
        self.ignore_index = ignore_index if ignore_index is not None else (self.void if self.void is not None else PAD_INDEX)
        self.in_channels = in_channels or (None if dataset == "folder" else 3)

        self.dataset, self.root = dataset, None if root is None else Path(root)
        self.resize, self.crop, self.scale, self.eval_mode = resize, crop, tuple(scale), eval_mode
        self.batch_size, self.num_workers, self.seed, self.split_seed = batch_size, num_workers, seed, split_seed
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.has_test = False
        self.lut: np.ndarray | None = None  # stored mask value -> class index, for file datasets
        self.datasets: dict[str, SegmentationDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        """Build all splits once, reading and validating every file; raise DatasetError on bad input."""
        if self.datasets:
            return
        if self.dataset == "synthetic":
            arrays = _synthetic_splits(tuple(sorted(self.synthetic_options.items())))
            raw = {s: (a.images, a.masks) for s, a in arrays.items() if len(a.images)}
            size = (self.synthetic_options["size"],) * 2
        else:
            raw, size = self._setup_files()
        for split in ("train", "val"):
            if split not in raw:
                fix = f"set synthetic n_{split} > 0" if self.dataset == "synthetic" else f"add a {split} folder or set {split}_fraction > 0"
                raise DatasetError(f"the {split} split of {self.root or 'the synthetic data'} is empty. Fix: {fix}.")
        self.has_test = "test" in raw
        size = self.resize or size
        crop = self.crop or _round_up(size)
        transforms = {
            "train": train_transform(crop, self.resize, self.scale, self.in_channels, self.ignore_index),
            "eval": eval_transform(self.resize, self.eval_mode, self.in_channels, self.ignore_index),
        }
        for split, data in raw.items():
            transform = transforms["train" if split == "train" else "eval"]
            if self.dataset == "synthetic":
                self.datasets[split] = ArrayDataset(*data, transform)
            else:
                self.datasets[split] = FileDataset(data, self.lut, self.in_channels, transform)

    def _setup_files(self) -> tuple[dict[str, list[Pair]], tuple[int, int]]:
        """Find, pair, read and validate the files; set ``lut`` and ``in_channels``. Returns the
        splits and the size of the first training image."""
        root = self.root
        if self.dataset == "camvid":
            pairs = camvid_pairs(root)
        elif self.dataset == "pets":
            pairs = pets_pairs(root, self.val_fraction, self.split_seed)
        else:
            pairs = folder_pairs(root, self.val_fraction, self.test_fraction, self.split_seed)
        _fail(
            f"splits of {root} are empty after splitting",
            [split for split, found in pairs.items() if not found],
            "add images, or lower val_fraction / test_fraction.",
        )

        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            infos = {split: list(pool.map(scan_pair, found)) for split, found in pairs.items()}
        if self.dataset == "pets":
            mapping, valid = {1: 1, 2: 0, 3: 1 if self.void is None else self.void}, "trimap values 1, 2, 3"
        else:
            values = {v for found in infos.values() for info in found for v in info.mask_values}
            if self.num_classes == 2 and self.void != 255 and 255 in values and values <= {0, 255}:
                mapping, valid = {0: 0, 255: 1}, "0 and 255"
            else:
                mapping = {c: c for c in range(self.num_classes)}
                if self.void is not None:
                    mapping[self.void] = self.ignore_index
                void = "" if self.void is None else f" or the void label {self.void}"
                valid = f"class indices 0..{self.num_classes - 1}{void}"
        self.lut = mask_lut(mapping)
        validate(pairs, infos, self.lut, valid)

        first = infos["train"][0].image_shape
        if self.in_channels is None:
            self.in_channels = 1 if len(first) == 2 or first[2] == 1 else 3
        examples: dict[tuple[int, int], str] = {}  # one image per size
        for split in pairs:
            for pair, info in zip(pairs[split], infos[split]):
                examples.setdefault(info.image_shape[:2], str(pair.image))
        if self.resize is None and len(examples) > 1:
            raise DatasetError(
                f"images under {root} differ in size, so they cannot be batched:\n"
                f"{_listing([f'{p}: {h}x{w}' for (h, w), p in examples.items()])}\nFix: pass resize=(H, W)."
            )
        return pairs, first[:2]

    def train_dataloader(self) -> DataLoader:
        train = self.datasets["train"]
        return DataLoader(
            train,
            batch_size=self.batch_size,
            sampler=SeededSampler(len(train), self.seed),
            drop_last=len(train) > self.batch_size,
            collate_fn=collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        if not self.has_test:
            raise DatasetError(f"{self.root or 'the synthetic data'} has no test split. Fix: add one, or set test_fraction / n_test > 0.")
        return self._eval_loader("test")

    def _eval_loader(self, split: str) -> DataLoader:
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size,
            collate_fn=collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
