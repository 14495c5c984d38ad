"""Data for training and comparing attention types: one LightningDataModule over the data sources
of :mod:`smp_cbam.training.sources` (``"synthetic"``, ``"camvid"``, ``"pets"``, ``"folder"``).

Files are read by :mod:`smp_cbam.training.readers` (EXIF orientation, palette masks, grey/colour
rules), both by the check in :meth:`SegmentationDataModule.setup` and by training.

``num_classes``, ``in_channels``, ``class_names`` (a tuple; a list in the hyperparameters, as YAML
and Lightning's CLI give it) and ``ignore_index`` (an int) are resolved by ``__init__`` and saved in
the data module's hyperparameters with their resolved values, so Lightning's merge with a module's
hyperparameters never conflicts (also when the CLI hands the module a checkpoint's values), and
``SegmentationDataModule(**dm.hparams)`` builds the same data module. ``void_label`` is the value
void pixels have in the mask files (CamVid 11; none by default elsewhere); ``ignore_index`` is the
index batches carry for void and padded pixels: the given one, else the void label where masks
store class indices, else ``PAD_INDEX`` (255). ``in_channels`` is the given one, else the source's
(3 for synthetic, CamVid, Pets), else detected from the image headers (folder): 1 when every image
is grey, 3 otherwise. Images whose channels differ from it are converted (grey repeated into RGB,
colour to luma), with a warning naming them unless ``in_channels`` was given.

Training and evaluation see the same kind of input, so nothing reaches the attention's global
pools at test time that training never showed (docs/data.md):

- every image is resized to ``resize`` when given (train and eval);
- training: a random zoom-in by a factor in ``scale`` (low >= 1), cropped back to the frame (or
  to ``crop``), a horizontal flip (``hflip``), brightness/contrast jitter for RGB;
- padding, where needed, reflects the image at its bottom and right borders (never a constant
  black band) and gives the mask ``ignore_index``: evaluation pads every frame to a multiple of 32
  (``eval_mode="pad"``), and so does training on whole frames (``crop=None``), with the same rule
  and position; ``eval_mode="resize"`` (``resize`` multiples of 32) pads nothing anywhere.

Batches are ``(image, mask)``: float32 (B, C, H, W) normalized images, int64 (B, H, W) masks; the
synthetic val/test batches carry a third element, ``context``: bool (B, H, W), the pixels whose
label depends on the image's global cue (padding excluded). Each dataset has ``ids`` (file stems,
or indices for synthetic data) in loader order.

Determinism: the training loader's :class:`SeededSampler` derives the order from ``(seed,
epoch)`` and a seed for each sample's augmentation from ``(seed, epoch, index)``. A given ``seed``
gives the same batches whatever the model, ``num_workers``, RNG state or resumption. Under DDP
every rank draws the same permutation and rank r of R takes positions r, r+R, ... (the tail of
n mod R samples is dropped), so step k of an R-process run with ``batch_size`` b trains on exactly
the samples (and augmentations) of step k of a 1-process run with ``batch_size`` R*b. Splits use
``split_seed``, so every training seed sees the same split.
"""

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations checks PyPI on import otherwise

import functools
import numbers
import random
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pytorch_lightning as pl
import torch
from albumentations.pytorch import ToTensorV2
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .readers import DatasetError, FileInfo, ReadError, check_exif_rule, file_info, read_image, read_mask
from .sources import (
    PAD_INDEX,
    SOURCES,
    Classes,
    DataSource,
    Pair,
    fail,
    get_source,
    listing,
    seeded_split,
)
from .synthetic import DEFAULTS as SYNTHETIC_DEFAULTS
from .synthetic import SyntheticSet, generate_splits

__all__ = [
    "DATASETS", "PAD_INDEX", "DatasetError", "Pair", "ReadError", "SegmentationDataModule", "SeededSampler",
    "read_image", "read_mask", "seeded_split",
]  # fmt: skip

DATASETS = tuple(SOURCES)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY_MEAN = (0.449,)
GRAY_STD = (0.226,)
DIVISOR = 32
EVAL_MODES = ("pad", "resize")
CACHE_BYTES = 512 << 20  # resized file datasets up to this size are kept in memory after first use


# the check: every file read once by the same readers as training


@dataclass(frozen=True)
class PairInfo:
    """What reading a pair found: the headers, the mask's stored values, and per file the
    problem (``ReadError.kind``, message) when it could not be read."""

    image: FileInfo | None
    mask: FileInfo | None
    mask_values: tuple[int, ...] = ()
    image_problem: tuple[str, str] | None = None
    mask_problem: tuple[str, str] | None = None


def _stamp(path: Path) -> tuple[int, int]:
    try:
        stat = path.stat()
    except OSError:
        return (-1, -1)
    return (stat.st_mtime_ns, stat.st_size)


def scan_pair(pair: Pair, exif: str = "apply") -> PairInfo:
    """Read a pair once (cached per file version and EXIF rule) with the training readers."""
    return _scan_cached(pair.image, _stamp(pair.image), pair.mask, _stamp(pair.mask), exif)


def _problem(err: ReadError) -> tuple[str, str]:
    return (err.kind, str(err))


@functools.lru_cache(maxsize=50_000)
def _scan_cached(image_path: Path, image_stamp: tuple, mask_path: Path, mask_stamp: tuple, exif: str) -> PairInfo:
    # the stamps are part of the cache key, so a changed file is read again
    image = mask = image_problem = mask_problem = None
    values: tuple[int, ...] = ()
    try:
        image = file_info(image_path)
        read_image(image_path, image.channels, exif)  # decodes everything: damaged data shows here
    except ReadError as err:
        image_problem = _problem(err)
    try:
        mask = file_info(mask_path)
        values = tuple(np.unique(read_mask(mask_path, exif)).tolist())
    except ReadError as err:
        mask_problem = _problem(err)
    return PairInfo(image, mask, values, image_problem, mask_problem)


def mask_lut(mapping: dict[int, int]) -> np.ndarray:
    """Lookup table from stored (8- or 16-bit) mask value to class index or ignore index; values
    not in ``mapping`` give -1 (invalid)."""
    lut = np.full(1 << 16, -1, np.int16)
    lut[list(mapping)] = list(mapping.values())
    return lut


def validate(
    pairs: dict[str, list[Pair]], infos: dict[str, list[PairInfo]], lut: np.ndarray, valid: str, exif: str
) -> None:
    """Raise a DatasetError for the first kind of problem found, listing the files: unreadable
    files, EXIF orientation refused, bad mask format, image/mask size mismatch, invalid mask
    values. ``valid`` describes the valid mask values for the message."""
    rows = [(p, i) for split in pairs for p, i in zip(pairs[split], infos[split])]
    problems = [problem for _, i in rows for problem in (i.image_problem, i.mask_problem) if problem]
    fail(
        "files could not be read (missing, damaged or not an image)",
        [message for kind, message in problems if kind == "unreadable"],
        "replace the files with readable images, or remove them together with their image/mask partner.",
    )
    fail(
        "files carry an EXIF orientation and exif='refuse'",
        [message for kind, message in problems if kind == "exif"],
        "save the pixels turned (e.g. PIL.ImageOps.exif_transpose) without the tag, or pass exif='apply' / 'ignore'.",
    )
    fail(
        "files are not single-channel or palette masks / 8- or 16-bit images",
        [message for kind, message in problems if kind == "format"],
        "save masks as single-channel or palette (mode P) PNGs holding class indices, images as 8/16-bit.",
    )
    mismatched = [(p, i) for p, i in rows if i.image.size(exif) != i.mask.size(exif)]
    turned = [(p, i) for p, i in mismatched if exif == "apply" and i.image.size("ignore") == i.mask.size("ignore")]
    fail(
        "image/mask pairs match in size only without the EXIF orientation of the image or the mask",
        [
            f"{p.image} (Orientation {i.image.orientation}) vs {p.mask} (Orientation {i.mask.orientation})"
            for p, i in turned
        ],
        "if the masks were drawn on the stored pixels, pass exif='ignore'; otherwise fix these masks.",
    )
    fail(
        "image/mask pairs differ in size",
        [
            f"{p.image} ({'x'.join(map(str, i.image.size(exif)))}) vs {p.mask} ({'x'.join(map(str, i.mask.size(exif)))})"
            for p, i in mismatched
        ],
        "make every mask the same height and width as its image.",
    )
    bad = []
    for p, i in rows:
        values = [v for v in i.mask_values if lut[v] < 0]
        if values:
            bad.append(f"{p.mask}: {values[:10]}")
    fail(
        f"masks hold values that are not valid ({valid})",
        bad,
        "fix these masks, or pass num_classes / void_label (the stored value of void pixels, e.g. 255) that match how the masks are stored.",
    )


# datasets


class SegmentationDataset(Dataset):
    """Base dataset: ``load(index)`` gives the raw (image, mask); ``__getitem__`` applies the
    transform seeded for the sample. Items are an index or an ``(index, sample_seed)`` pair from
    :class:`SeededSampler` (a bare index uses the index as the seed). ``ids`` names the samples."""

    def __init__(self, transform: A.Compose, ignore_index: int):
        self.transform, self.ignore_index = transform, ignore_index

    @property
    def ids(self) -> list[str]:
        raise NotImplementedError

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def image_size(self, index: int) -> tuple[int, int]:
        """(height, width) of a sample's image as stored, before any resize or padding."""
        raise NotImplementedError

    def context(self, index: int) -> np.ndarray | None:
        """The (H, W) bool map of context pixels of a sample, or None when the dataset has none."""
        return None

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, ...]:
        index, sample_seed = item if isinstance(item, tuple) else (item, item)
        image, mask = self.load(index)
        context = self.context(index)
        self.transform.set_random_state(np.random.default_rng(sample_seed), random.Random(sample_seed))
        if context is None:
            out = self.transform(image=image, mask=mask)
            return out["image"], out["mask"].long()
        out = self.transform(image=image, mask=mask, context=context.astype(np.uint8))
        mask = out["mask"].long()
        return out["image"], mask, out["context"].bool() & (mask != self.ignore_index)


class ArrayDataset(SegmentationDataset):
    """Images (N, H, W[, C]) uint8 and masks (N, H, W) of class indices held in memory, and
    optionally ``contexts`` (N, H, W) bool; ids are the indices."""

    def __init__(self, images: np.ndarray, masks: np.ndarray, transform: A.Compose, ignore_index: int = PAD_INDEX,
                 contexts: np.ndarray | None = None):  # fmt: skip
        super().__init__(transform, ignore_index)
        self.images, self.masks, self.contexts = images, masks, contexts

    def __len__(self) -> int:
        return len(self.images)

    @property
    def ids(self) -> list[str]:
        return [str(i) for i in range(len(self))]

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self.images[index], self.masks[index]

    def image_size(self, index: int) -> tuple[int, int]:
        return tuple(self.images.shape[1:3])

    def context(self, index: int) -> np.ndarray | None:
        return None if self.contexts is None else self.contexts[index]


class FileDataset(SegmentationDataset):
    """Image/mask files read by :mod:`readers`, resized to ``resize`` when given; stored mask values
    are mapped through ``lut`` (see :func:`mask_lut`); ids are the image file stems. With
    ``cache`` the decoded, resized pairs are kept in memory after their first use (decoding
    full-size files every epoch would otherwise cost a noticeable share of a small model's step)."""

    def __init__(self, pairs: Sequence[Pair], lut: np.ndarray, in_channels: int, transform: A.Compose,
                 ignore_index: int, exif: str = "apply", resize: tuple[int, int] | None = None,
                 cache: bool = False):  # fmt: skip
        super().__init__(transform, ignore_index)
        self.pairs, self.lut, self.in_channels, self.exif = list(pairs), lut, in_channels, exif
        self.resize = A.Resize(*resize) if resize else None  # the same step the transforms would use
        self.cache: dict[int, tuple[np.ndarray, np.ndarray]] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def ids(self) -> list[str]:
        return [pair.image.stem for pair in self.pairs]

    def image_size(self, index: int) -> tuple[int, int]:
        return file_info(self.pairs[index].image).size(self.exif)  # as read_image turns it

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if self.cache is not None and index in self.cache:
            return self.cache[index]
        pair = self.pairs[index]
        image, mask = read_image(pair.image, self.in_channels, self.exif), read_mask(pair.mask, self.exif)
        mask = self.lut[mask].astype(np.uint8)
        if self.resize is not None:
            out = self.resize(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        if self.cache is not None:
            self.cache[index] = (image, mask)
        return image, mask


# sampling


class SeededSampler(DistributedSampler):
    """Yields ``(index, sample_seed)``: the order depends only on ``(seed, epoch)`` and each
    sample's seed only on ``(seed, epoch, index)``. Lightning calls :meth:`set_epoch` at the start
    of every training epoch, also after resuming from a checkpoint.

    With ``num_replicas`` R > 1 (DDP) every rank draws the same permutation, drops its last
    ``n mod R`` positions and takes positions ``rank, rank + R, ...``: R ranks with batch size b
    train on the same samples per step as one process with batch size R*b.

    A :class:`DistributedSampler` subclass only so that Lightning keeps it under DDP instead of
    wrapping it in one that re-splits (and pads) its output; it calls no process group.
    """

    def __init__(self, length: int, seed: int, num_replicas: int = 1, rank: int = 0):
        # DistributedSampler.__init__ is not called: it needs a dataset and an initialized process group
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in 0..{num_replicas - 1}, got {rank}")
        self.length, self.seed, self.epoch = length, seed, 0
        self.num_replicas, self.rank = num_replicas, rank
        # DistributedSampler's public attributes, for code that reads them
        self.num_samples, self.total_size = length // num_replicas, length - length % num_replicas
        self.shuffle, self.drop_last, self.dataset = True, True, None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[tuple[int, int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(self.length)
        sample_seeds = rng.integers(0, 2**32, self.length)
        for index in order[self.rank : self.total_size : self.num_replicas]:
            yield int(index), int(sample_seeds[index])


def collate(batch: Sequence[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    """Stack samples into an ``(images, masks)`` or ``(images, masks, contexts)`` tuple."""
    return tuple(torch.stack(column) for column in zip(*batch))


# transforms


class ReflectPad(A.DualTransform):
    """Pad bottom and right to at least ``min_size`` and to a multiple of ``divisor``: the image by
    reflection (no constant band the global pools would see), masks with ``fill_mask``."""

    def __init__(
        self, divisor: int = 1, min_size: tuple[int, int] = (0, 0), fill_mask: int = PAD_INDEX, p: float = 1.0
    ):
        super().__init__(p=p)
        self.divisor, self.min_size, self.fill_mask = divisor, tuple(min_size), fill_mask

    def get_params_dependent_on_data(self, params: dict, data: dict) -> dict:
        height, width = params["shape"][:2]
        target = [-(-max(s, m) // self.divisor) * self.divisor for s, m in zip((height, width), self.min_size)]
        return {"pad_h": target[0] - height, "pad_w": target[1] - width}

    def apply(self, img: np.ndarray, pad_h: int = 0, pad_w: int = 0, **params) -> np.ndarray:
        if not (pad_h or pad_w):
            return img
        padded = cv2.copyMakeBorder(img, 0, pad_h, 0, pad_w, cv2.BORDER_REFLECT_101)
        return padded.reshape(padded.shape[:2] + img.shape[2:])  # OpenCV drops a trailing channel axis of 1

    def apply_to_mask(self, mask: np.ndarray, pad_h: int = 0, pad_w: int = 0, **params) -> np.ndarray:
        if not (pad_h or pad_w):
            return mask
        return cv2.copyMakeBorder(mask, 0, pad_h, 0, pad_w, cv2.BORDER_CONSTANT, value=self.fill_mask)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("divisor", "min_size", "fill_mask")


def _finish(in_channels: int) -> list:
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if in_channels == 3 else (GRAY_MEAN, GRAY_STD)
    return [A.Normalize(mean=mean, std=std), ToTensorV2()]


def _compose(steps: list) -> A.Compose:
    return A.Compose(steps, additional_targets={"context": "mask"})


def train_transform(
    frame: tuple[int, int], crop: tuple[int, int] | None, resize: tuple[int, int] | None, scale: tuple[float, float],
    hflip: bool, in_channels: int, ignore_index: int, eval_mode: str = "pad",
) -> A.Compose:  # fmt: skip
    """Resize (optional), zoom in by a factor in ``scale`` and crop back to ``frame`` (or to
    ``crop``, reflect-padding frames smaller than it), flip, jitter (RGB); whole frames are then
    padded exactly like :func:`eval_transform` pads them. ``frame`` is the size after resize."""
    steps = [A.Resize(*resize)] if resize else []
    if tuple(scale) != (1.0, 1.0):
        steps.append(A.RandomScale(scale_limit=(scale[0] - 1.0, scale[1] - 1.0), p=1.0))
        if crop is None:
            steps.append(A.RandomCrop(*frame))
    if crop is not None:
        steps += [ReflectPad(min_size=crop, fill_mask=ignore_index), A.RandomCrop(*crop)]
    if hflip:
        steps.append(A.HorizontalFlip(p=0.5))
    if in_channels == 3:
        steps.append(A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.5))
    if crop is None and eval_mode == "pad":
        steps.append(ReflectPad(DIVISOR, fill_mask=ignore_index))
    return _compose(steps + _finish(in_channels))


def eval_transform(resize: tuple[int, int] | None, eval_mode: str, in_channels: int, ignore_index: int) -> A.Compose:
    """Resize (optional), then reflect-pad bottom/right to a multiple of 32 with ``ignore_index``
    in the mask (``"pad"``) or nothing more (``"resize"``); normalize, to tensor."""
    steps = [A.Resize(*resize)] if resize else []
    if eval_mode == "pad":
        steps.append(ReflectPad(DIVISOR, fill_mask=ignore_index))
    return _compose(steps + _finish(in_channels))


# the data module


@functools.lru_cache(maxsize=4)
def _synthetic_splits(options: tuple[tuple[str, object], ...]) -> dict[str, SyntheticSet]:
    return generate_splits(**dict(options))


def _pair(value: Sequence[float] | None, name: str, kind: type) -> tuple | None:
    """``value`` as a 2-tuple of ``kind`` (YAML and CLIs give lists), or a ValueError naming ``name``."""
    if value is None:
        return None
    try:
        first, second = value
        return kind(first), kind(second)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be two numbers (height, width) / (low, high), got {value!r}") from None


def _check_geometry(resize: tuple | None, crop: tuple | None, scale: tuple, eval_mode: str) -> None:
    if eval_mode not in EVAL_MODES:
        raise ValueError(f"eval_mode must be one of {EVAL_MODES}, got {eval_mode!r}")
    if resize is not None and min(resize) < 1:
        raise ValueError(f"resize must be positive (height, width), got {resize}")
    if eval_mode == "resize" and (resize is None or any(s % DIVISOR for s in resize)):
        raise ValueError(f"eval_mode='resize' needs resize=(H, W) with multiples of {DIVISOR}, got {resize}")
    if crop is not None and (min(crop) < 1 or any(s % DIVISOR for s in crop)):
        raise ValueError(f"crop must be multiples of {DIVISOR} (smp encoders downsample 32x), got {crop}")
    if not 1.0 <= scale[0] <= scale[1]:
        raise ValueError(
            f"scale must be (low, high) zoom factors with 1 <= low <= high, got {scale}: zooming out would show "
            "training a padded border that evaluation never shows"
        )


class SegmentationDataModule(pl.LightningDataModule):
    """Train/val/test loaders for ``dataset`` in :data:`DATASETS` (see :mod:`sources`).

    Args:
        dataset: the data source's name.
        root: the dataset folder (file datasets).
        num_classes / class_names / in_channels: the dataset's own values when not given (folder
            needs ``num_classes``); resolved by ``__init__``.
        ignore_index: the index batches carry where pixels are void or padding (not a class
            index); default: the void label where masks store class indices, else 255.
        void_label: the stored mask value of void pixels: CamVid 11; Pets 3 ignores the border
            (None counts it as pet, like smp); folder any value that is not a class index.
        resize: (H, W) every image is resized to, train and eval.
        crop: (h, w) random training crops (multiples of 32); None trains on whole frames.
        scale: (low, high) random zoom-in for training (1 <= low); None: the source's default.
        hflip: random horizontal flips in training.
        eval_mode: ``"pad"`` (reflect-pad to a multiple of 32) or ``"resize"``.
        exif: EXIF orientation rule, ``"apply"``, ``"ignore"`` or ``"refuse"`` (see readers).
        batch_size / num_workers: per-device loader settings.
        seed: the training order and augmentations; split_seed: the train/val/test split.
        val_fraction / test_fraction: split off train where the dataset has no such split.
        synthetic: options of the synthetic generator.
    """

    def __init__(
        self,
        dataset: str = "synthetic",
        root: str | None = None,
        num_classes: int | None = None,
        ignore_index: int | None = None,
        void_label: int | None = None,
        class_names: Sequence[str] | None = None,
        in_channels: int | None = None,
        resize: tuple[int, int] | None = None,
        crop: tuple[int, int] | None = None,
        scale: tuple[float, float] | None = None,
        hflip: bool = True,
        eval_mode: str = "pad",
        exif: str = "apply",
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        split_seed: int = 0,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        synthetic: dict | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()  # the arguments as given; their resolved values replace them below
        for name, value, least in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        batch_size, num_workers = int(batch_size), int(num_workers)
        self.source: DataSource = get_source(dataset)
        if not self.source.in_memory and root is None:
            raise ValueError(f"dataset={dataset!r} needs root= the dataset folder")
        if self.source.in_channels is not None and in_channels not in (None, self.source.in_channels):
            raise ValueError(f"in_channels of {dataset} must be {self.source.in_channels}, got {in_channels!r}")
        if in_channels not in (None, 1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {in_channels!r}")
        check_exif_rule(exif)
        self.resize = _pair(resize, "resize", int) or self.source.default_resize
        self.crop = _pair(crop, "crop", int)
        self.scale = _pair(scale, "scale", float) or self.source.default_scale
        _check_geometry(self.resize, self.crop, self.scale, eval_mode)
        self.synthetic_options = self._synthetic_options(synthetic) if self.source.in_memory else {}
        classes: Classes = self.source.classes(num_classes, class_names, ignore_index, void_label)
        self.num_classes, self.class_names, self.ignore_index = len(classes.names), classes.names, classes.ignore_index
        self.classes = classes

        self.dataset, self.root = dataset, None if root is None else Path(root)
        self.hflip, self.eval_mode, self.exif = hflip, eval_mode, exif
        self.batch_size, self.num_workers, self.seed, self.split_seed = batch_size, num_workers, seed, split_seed
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.channels_given = in_channels is not None
        self.pairs: dict[str, list[Pair]] = {}
        if not self.source.in_memory:
            self.pairs = self.source.pairs(self.root, val_fraction, test_fraction, split_seed)
        self.in_channels: int = in_channels or self.source.in_channels or self._detect_channels()
        self.has_test = False
        self.lut: np.ndarray | None = None  # stored mask value -> class index, for file datasets
        self.datasets: dict[str, SegmentationDataset] = {}
        resolved = dict(
            num_classes=self.num_classes, class_names=self.class_names, ignore_index=self.ignore_index,
            void_label=classes.void, in_channels=self.in_channels, resize=self.resize, crop=self.crop, scale=self.scale,
        )  # fmt: skip
        # lists, not tuples: the types Lightning's CLI gives the module (its hparams must equal these when
        # both are logged), and what yaml.safe_load reads back from hparams.yaml
        resolved = {key: list(value) if isinstance(value, tuple) else value for key, value in resolved.items()}
        self.save_hyperparameters({**self.hparams, **resolved})

    @staticmethod
    def _synthetic_options(synthetic: dict | None) -> dict:
        options = {**SYNTHETIC_DEFAULTS, **(synthetic or {})}
        unknown = sorted(options.keys() - SYNTHETIC_DEFAULTS.keys())
        if unknown:
            raise ValueError(f"unknown synthetic options {unknown}; valid: {sorted(SYNTHETIC_DEFAULTS)}")
        return options

    def _detect_channels(self) -> int:
        """1 when every image's header says grey, else 3 (the grey ones are warned about in setup)."""
        infos = [self._header(pair.image) for found in self.pairs.values() for pair in found]
        return 1 if infos and all(info is not None and info.channels == 1 for info in infos) else 3

    @staticmethod
    def _header(path: Path) -> FileInfo | None:
        try:
            return file_info(path)
        except ReadError:
            return None  # reported by setup's check

    def setup(self, stage: str | None = None) -> None:
        """Build every split the data has, once, reading and validating every file; then check that
        the splits ``stage`` needs are there (``"fit"`` and ``None``: train and val; ``"validate"``:
        val; ``"test"``: test; ``"predict"``: test or val). Raises DatasetError on bad input."""
        if not self.datasets:
            self._build()
        needed = {"validate": ("val",), "test": ("test",), "predict": (self.predict_split,)}.get(
            stage, ("train", "val")
        )
        for split in needed:
            self._dataset(split)

    def _build(self) -> None:
        if self.source.in_memory:
            raw, frame = self._setup_arrays()
        else:
            raw, frame = self._setup_files()
        self.has_test = "test" in raw
        frame = self.resize or frame
        resize = self.resize if self.source.in_memory else None  # file datasets resize (and cache) as they load
        transforms = {
            "train": train_transform(
                frame, self.crop, resize, self.scale, self.hflip, self.in_channels, self.ignore_index, self.eval_mode
            ),  # fmt: skip
            "eval": eval_transform(resize, self.eval_mode, self.in_channels, self.ignore_index),
        }
        for split, make in raw.items():
            self.datasets[split] = make(transform=transforms["train" if split == "train" else "eval"])

    def _dataset(self, split: str) -> SegmentationDataset:
        """A split's dataset, the splits built first if they are not (the Trainer calls setup; a loader
        asked for by hand does not need it); DatasetError, naming the fix, for a split the data lacks."""
        if not self.datasets:
            self._build()
        if split in self.datasets:
            return self.datasets[split]
        where = self.root or "the synthetic data"
        if self.source.in_memory:
            fix = f"set synthetic n_{split} > 0"
        elif split == "train":
            fix = "add a train folder (training needs one; evaluating a checkpoint does not)"
        else:
            fix = f"add a {split} folder or set {split}_fraction > 0"
        if split == "test":
            raise DatasetError(f"{where} has no test split. Fix: {fix}.")
        raise DatasetError(f"the {split} split of {where} is empty. Fix: {fix}.")

    def _setup_arrays(self) -> tuple[dict, tuple[int, int]]:
        arrays = _synthetic_splits(tuple(sorted(self.synthetic_options.items())))
        raw = {}
        for split, data in arrays.items():
            if len(data.images):
                contexts = None if split == "train" else getattr(data, "context", None)
                raw[split] = functools.partial(ArrayDataset, data.images, data.masks, ignore_index=self.ignore_index,
                                               contexts=contexts)  # fmt: skip
        return raw, arrays["train"].images.shape[1:3]

    def _setup_files(self) -> tuple[dict, tuple[int, int]]:
        """Read and validate every file with the training readers; set ``lut``. Returns a dataset
        factory per split and the size of the first training image."""
        pairs, root = self.pairs, self.root
        fail(
            f"splits of {root} are empty after splitting",
            [split for split, found in pairs.items() if not found],
            "add images, or lower val_fraction / test_fraction.",
        )
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            infos = {
                split: list(pool.map(functools.partial(scan_pair, exif=self.exif), found))
                for split, found in pairs.items()
            }
        values = {v for found in infos.values() for info in found for v in info.mask_values}
        mapping, valid = self.source.mask_mapping(self.classes, values)
        self.lut = mask_lut(mapping)
        validate(pairs, infos, self.lut, valid, self.exif)
        rows = [(p, i) for split in pairs for p, i in zip(pairs[split], infos[split])]
        self._warn_conversions(rows)

        sizes: dict[tuple[int, int], str] = {}  # one image per size
        for pair, info in rows:
            sizes.setdefault(info.image.size(self.exif), str(pair.image))
        if self.resize is None and len(sizes) > 1:
            raise DatasetError(
                f"images under {root} differ in size, so they cannot be batched:\n"
                f"{listing([f'{p}: {h}x{w}' for (h, w), p in sizes.items()])}\nFix: pass resize=(H, W)."
            )
        cached = (
            self.resize is not None
            and len(rows) * self.resize[0] * self.resize[1] * (self.in_channels + 1) <= CACHE_BYTES
        )
        make = functools.partial(FileDataset, lut=self.lut, in_channels=self.in_channels, ignore_index=self.ignore_index,
                                 exif=self.exif, resize=self.resize, cache=cached)  # fmt: skip
        first = next(iter(infos.values()))[0]  # the frame: every image has its size unless resized
        return {split: functools.partial(make, found) for split, found in pairs.items()}, first.image.size(self.exif)

    def _warn_conversions(self, rows: list[tuple[Pair, PairInfo]]) -> None:
        """One warning naming the files turned by their EXIF orientation, one naming the images
        converted to ``in_channels`` without the user asking for it."""
        if self.exif == "apply":
            turned = [
                f"{info.path} (Orientation {info.orientation})"
                for _, i in rows
                for info in (i.image, i.mask)
                if info.turned
            ]
            if turned:
                warnings.warn(
                    f"EXIF orientation applied to {len(turned)} files (turned as photo viewers show them, images and "
                    f"masks alike):\n{listing(turned)}\nPass exif='ignore' to use the stored pixels, or 'refuse'.",
                    stacklevel=3,
                )
        if not self.channels_given:
            other = [str(p.image) for p, i in rows if i.image.channels != self.in_channels]
            if other:
                kind = "grey, repeated into 3 channels" if self.in_channels == 3 else "colour, converted to grey"
                warnings.warn(
                    f"{len(other)} of {len(rows)} images are {kind} to match the others (in_channels="
                    f"{self.in_channels}):\n{listing(other)}\nPass in_channels=1 or 3 to choose.",
                    stacklevel=3,
                )

    def _replicas(self) -> tuple[int, int]:
        """(world size, global rank) of the attached trainer, or of a plain process group."""
        trainer = self.trainer
        if trainer is not None:
            return trainer.world_size, trainer.global_rank
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_world_size(), torch.distributed.get_rank()
        return 1, 0

    def train_dataloader(self) -> DataLoader:
        train = self._dataset("train")
        num_replicas, rank = self._replicas()
        sampler = SeededSampler(len(train), self.seed, num_replicas, rank)
        return DataLoader(
            train,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=len(sampler) > self.batch_size,
            collate_fn=collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        """The test split's loader (the validation split's when there is no test split), for
        ``trainer.predict``; the order is that of the split's ``ids``. Its frames are padded (and
        resized) as for evaluation: :meth:`to_image_size` gives predictions each image's size."""
        return self._eval_loader(self.predict_split)

    @property
    def predict_split(self) -> str:
        """The split :meth:`predict_dataloader` serves: ``"test"``, else ``"val"``."""
        if not self.datasets:
            self._build()
        return "test" if self.has_test else "val"

    def to_image_size(
        self, predictions: torch.Tensor | Sequence[torch.Tensor], split: str | None = None
    ) -> list[torch.Tensor]:
        """Predictions for ``split``'s frames (default :attr:`predict_split`; ``trainer.predict``'s
        list of batches, or one tensor), one per image in the split's order, back at each image's
        own size: cropped to the frame before padding and, where the data module resizes, resized
        to the stored image (nearest for class indices, bilinear for probabilities or logits).
        Each is ``(..., H, W)`` as given: labels ``(H, W)``, probabilities ``(C, H, W)``."""
        split = split or self.predict_split
        if split not in ("val", "test"):  # training frames are cropped and flipped: nothing maps back
            raise ValueError(f"split must be 'val' or 'test', got {split!r}")
        dataset = self._dataset(split)
        batches = [predictions] if isinstance(predictions, torch.Tensor) else list(predictions)
        items = [item for batch in batches for item in batch]
        if len(items) != len(dataset):
            raise ValueError(
                f"{len(items)} predictions for the {len(dataset)} images of the {split} split: pass the predictions "
                f"of its whole loader, in order"
            )
        restored = []
        for index, item in enumerate(items):
            size = tuple(dataset.image_size(index))
            frame = tuple(self.resize) if self.resize else size
            item = item[..., : frame[0], : frame[1]]
            if frame != size:
                flat = item.reshape(-1, 1, *frame).float()  # any leading dims, resized as channels
                if item.is_floating_point():
                    flat = F.interpolate(flat, size=size, mode="bilinear", align_corners=False)
                else:  # class indices: the nearest, as the masks were resized
                    flat = F.interpolate(flat, size=size, mode="nearest-exact")
                item = flat.reshape(*item.shape[:-2], *size).to(item.dtype)
            restored.append(item)
        return restored

    def _eval_loader(self, split: str) -> DataLoader:
        return DataLoader(
            self._dataset(split),
            batch_size=self.batch_size,
            collate_fn=collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
