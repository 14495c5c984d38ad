"""One data source per dataset: its classes, void label, how its files pair up into splits, how its
stored mask values map to class indices, and its training defaults.

:class:`SegmentationDataModule <smp_cbam.training.data.SegmentationDataModule>` looks its
``dataset=`` name up in :data:`SOURCES`; a new dataset is a new :class:`DataSource` subclass
registered with :func:`register_source`.

- ``"synthetic"``: generated in memory (:mod:`smp_cbam.training.synthetic`), RGB.
- ``"camvid"``: SegNet layout ``ROOT/{train,trainannot,val,valannot,test,testannot}/*.png``,
  11 classes; label 11 is void (ignored).
- ``"pets"``: Oxford-IIIT Pet as smp's ``OxfordPetDataset`` reads it. Trimap 1 (pet) and 3
  (border) become class 1 like in smp, 2 becomes background; with an explicit ``ignore_index`` the
  border becomes ``ignore_index`` instead. trainval is split into train/val with a seeded split;
  ``test.txt`` is optional.
- ``"folder"``: ``ROOT/images/*`` with ``ROOT/masks/<stem>.png`` (seeded split), or
  ``ROOT/{train,val,test}/{images,masks}`` (val and test optional: missing ones are split off
  train). Masks hold class indices; with ``num_classes=2``, masks holding only 0 and 255 are read
  as 0/1.
"""

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, TypeVar

import numpy as np

from .readers import DatasetError
from .synthetic import CLASS_NAMES as SYNTHETIC_CLASSES

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
PAD_INDEX = 255
MAX_LISTED = 10

T = TypeVar("T")


@dataclass(frozen=True)
class Pair:
    """An image file and its mask file."""

    image: Path
    mask: Path


def listing(lines: Sequence[str]) -> str:
    shown = "\n".join(f"  {line}" for line in lines[:MAX_LISTED])
    more = f"\n  ... and {len(lines) - MAX_LISTED} more" if len(lines) > MAX_LISTED else ""
    return shown + more


def fail(what: str, lines: Sequence[str], fix: str) -> None:
    """Raise one DatasetError listing ``lines`` (the files of one kind of problem), if any."""
    if lines:
        raise DatasetError(f"{len(lines)} {what}:\n{listing(lines)}\nFix: {fix}")


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
        raise DatasetError(
            f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {images_dir}. Fix: add images or remove the folder."
        )
    stems: dict[str, list[Path]] = {}
    for image in images:
        stems.setdefault(image.stem, []).append(image)
    fail(
        f"image stems in {images_dir} are used by several files, so their masks are ambiguous",
        [", ".join(map(str, paths)) for paths in stems.values() if len(paths) > 1],
        "keep one image per stem.",
    )
    fail(
        f"images have no mask (expected {masks_dir}/<stem>{mask_suffix})",
        [str(image) for image in images if not (masks_dir / f"{image.stem}{mask_suffix}").is_file()],
        "add the missing masks or remove these images.",
    )
    orphans = sorted(str(m) for m in masks_dir.glob(f"*{mask_suffix}") if m.stem not in stems)
    if orphans:
        warnings.warn(f"{len(orphans)} masks have no image and are not used:\n{listing(orphans)}", stacklevel=2)
    return [Pair(image, masks_dir / f"{image.stem}{mask_suffix}") for image in images]


def require_dirs(root: Path, names: Sequence[str], layout: str) -> None:
    if not root.is_dir():
        raise DatasetError(
            f"dataset root {root} does not exist or is not a folder. Fix: pass root= a folder laid out as {layout}."
        )
    missing = [str(root / name) for name in names if not (root / name).is_dir()]
    fail(f"required folders are missing in {root}", missing, f"lay the dataset out as {layout}.")


@dataclass(frozen=True)
class Classes:
    """A dataset's resolved classes: names, the ``ignore_index`` batches carry, and the stored mask
    value of void pixels (None when the masks have none)."""

    names: tuple[str, ...]
    ignore_index: int
    void: int | None


class DataSource:
    """A dataset: classes, void label, training defaults. Subclasses set the class attributes and
    implement :meth:`pairs` (file datasets) and :meth:`mask_mapping` where masks are not stored as
    class indices, or are ``in_memory``."""

    name: ClassVar[str]
    layout: ClassVar[str] = ""
    class_names: ClassVar[tuple[str, ...] | None] = None  # None: the user gives num_classes
    void_labels: ClassVar[tuple[int | None, ...] | None] = (None,)  # allowed void labels (first: default); None: any
    indexed_masks: ClassVar[bool] = True  # masks store class indices (so the void label can stay as it is)
    in_channels: ClassVar[int | None] = None  # None: detected from the images
    in_memory: ClassVar[bool] = False
    default_resize: ClassVar[tuple[int, int] | None] = None
    default_scale: ClassVar[tuple[float, float]] = (1.0, 1.25)

    def classes(
        self,
        num_classes: int | None,
        class_names: Sequence[str] | None,
        ignore_index: int | None,
        void_label: int | None,
    ) -> Classes:
        """Resolve the classes from the dataset's own and the user's values; ValueError names the
        argument that does not fit. ``ignore_index`` defaults to the void label where masks keep
        their stored values (class indices), else to ``PAD_INDEX``."""
        fixed = self.class_names
        if fixed is not None and num_classes not in (None, len(fixed)):
            raise ValueError(f"{self.name} has {len(fixed)} classes, got num_classes={num_classes}")
        if fixed is None and num_classes is None:
            raise ValueError(f"dataset={self.name!r} needs num_classes=")
        count = len(fixed) if fixed is not None else num_classes
        if not isinstance(count, int) or isinstance(count, bool) or not 2 <= count < PAD_INDEX:
            raise ValueError(f"num_classes must be an int in 2..{PAD_INDEX - 1}, got {count!r}")
        if class_names is not None:
            if len(class_names) != count:
                raise ValueError(f"class_names has {len(class_names)} names for {count} classes")
            if fixed is not None and tuple(class_names) != fixed:
                raise ValueError(f"class_names of {self.name} are {fixed}, got {tuple(class_names)}")
            names = tuple(str(n) for n in class_names)
        elif fixed is not None:
            names = fixed
        else:
            names = ("background", "foreground") if count == 2 else tuple(f"class_{i}" for i in range(count))
        void = self._void(void_label, count)
        if ignore_index is None:
            ignore_index = void if void is not None and self.indexed_masks else PAD_INDEX
        if (
            isinstance(ignore_index, bool)
            or not isinstance(ignore_index, int)
            or not count <= ignore_index <= PAD_INDEX
        ):
            raise ValueError(
                f"ignore_index must be an int in {count}..{PAD_INDEX} (not a class index), got {ignore_index!r}"
            )
        return Classes(names, ignore_index, void)

    def _void(self, void_label: int | None, count: int) -> int | None:
        allowed = self.void_labels
        if void_label is None and allowed is not None:
            return allowed[0]
        if allowed is not None and void_label not in allowed:
            raise ValueError(f"void_label of {self.name} must be one of {allowed}, got {void_label!r}")
        if void_label is not None and not count <= void_label < 1 << 16:
            raise ValueError(
                f"void_label must be a stored mask value that is not a class index ({count}..65535), got {void_label}"
            )
        return void_label

    def pairs(self, root: Path, val_fraction: float, test_fraction: float, split_seed: int) -> dict[str, list[Pair]]:
        raise NotImplementedError

    def mask_mapping(self, classes: Classes, values: set[int]) -> tuple[dict[int, int], str]:
        """Stored mask value -> class index (or ignore index) for masks holding ``values``, and a
        description of the valid values for error messages. By default masks hold class indices
        and the void label."""
        mapping = {c: c for c in range(len(classes.names))}
        if classes.void is not None:
            mapping[classes.void] = classes.ignore_index
        void = "" if classes.void is None else f" or the void label {classes.void}"
        return mapping, f"class indices 0..{len(classes.names) - 1}{void}"


SOURCES: dict[str, type[DataSource]] = {}


def register_source(cls: type[DataSource]) -> type[DataSource]:
    """Class decorator: make ``cls`` available as ``dataset=cls.name``."""
    SOURCES[cls.name] = cls
    return cls


def get_source(name: str) -> DataSource:
    if name not in SOURCES:
        raise ValueError(f"dataset must be one of {tuple(SOURCES)}, got {name!r}")
    return SOURCES[name]()


@register_source
class SyntheticSource(DataSource):
    name = "synthetic"
    class_names = SYNTHETIC_CLASSES
    in_channels = 3
    in_memory = True
    # no zoom: the labels depend on a cue the whole image shows, which a zoomed crop may cut off
    default_scale = (1.0, 1.0)


@register_source
class CamVidSource(DataSource):
    name = "camvid"
    layout = "ROOT/{train,trainannot,val,valannot,test,testannot}/*.png"
    class_names = (
        "sky", "building", "pole", "road", "pavement", "tree",
        "signsymbol", "fence", "car", "pedestrian", "bicyclist",
    )  # fmt: skip
    void_labels = (11,)
    in_channels = 3
    folders = {"train": ("train", "trainannot"), "val": ("val", "valannot"), "test": ("test", "testannot")}

    def pairs(self, root: Path, val_fraction: float, test_fraction: float, split_seed: int) -> dict[str, list[Pair]]:
        require_dirs(root, [d for dirs in self.folders.values() for d in dirs], self.layout)
        return {split: pair_folder(root / images, root / masks) for split, (images, masks) in self.folders.items()}


@register_source
class PetsSource(DataSource):
    name = "pets"
    layout = "ROOT/images/<name>.jpg, ROOT/annotations/trimaps/<name>.png, ROOT/annotations/{trainval,test}.txt"
    class_names = ("background", "pet")
    void_labels = (None, 3)  # 3: the border is ignored instead of counted as pet
    indexed_masks = False  # trimaps: 1 pet, 2 background, 3 border
    in_channels = 3
    default_resize = (256, 256)

    def pairs(self, root: Path, val_fraction: float, test_fraction: float, split_seed: int) -> dict[str, list[Pair]]:
        require_dirs(root, ["images", "annotations/trimaps"], self.layout)
        lists = {"trainval": root / "annotations" / "trainval.txt", "test": root / "annotations" / "test.txt"}
        if not lists["trainval"].is_file():
            raise DatasetError(f"{lists['trainval']} is missing. Fix: lay the dataset out as {self.layout}.")
        pairs = {}
        for name, list_file in lists.items():
            if not list_file.is_file():
                continue
            names = [
                line.split()[0]
                for line in list_file.read_text().splitlines()
                if line.strip() and not line.startswith("#")
            ]
            if not names:
                raise DatasetError(f"{list_file} lists no images. Fix: list one image name per line.")
            found = [Pair(root / "images" / f"{n}.jpg", root / "annotations" / "trimaps" / f"{n}.png") for n in names]
            fail(
                f"names in {list_file} have no image",
                [str(p.image) for p in found if not p.image.is_file()],
                f"add the images or remove the names from {list_file.name}.",
            )
            fail(
                f"images in {list_file} have no trimap",
                [str(p.mask) for p in found if not p.mask.is_file()],
                f"add the trimaps or remove the names from {list_file.name}.",
            )
            pairs[name] = found
        return seeded_split(pairs.pop("trainval"), {"val": val_fraction}, split_seed) | pairs

    def mask_mapping(self, classes: Classes, values: set[int]) -> tuple[dict[int, int], str]:
        border = classes.ignore_index if classes.void == 3 else 1
        return {1: 1, 2: 0, 3: border}, "trimap values 1, 2, 3"


@register_source
class FolderSource(DataSource):
    name = "folder"
    layout = "ROOT/images/* with ROOT/masks/<stem>.png, or ROOT/{train,val,test}/{images,masks} (val, test split off train where absent)"
    void_labels = None  # any stored value that is not a class index

    def pairs(self, root: Path, val_fraction: float, test_fraction: float, split_seed: int) -> dict[str, list[Pair]]:
        require_dirs(root, [], self.layout)
        if (root / "images").is_dir():
            require_dirs(root, ["masks"], self.layout)
            pool = pair_folder(root / "images", root / "masks")
            return seeded_split(pool, {"val": val_fraction, "test": test_fraction}, split_seed)
        # without train/ the folder serves evaluation only (setup("fit") names what is missing)
        present = [s for s in ("train", "val", "test") if (root / s).is_dir()] or ["train"]
        require_dirs(root, [f"{s}/{d}" for s in present for d in ("images", "masks")], self.layout)
        given = {s: pair_folder(root / s / "images", root / s / "masks") for s in present}
        if "train" not in given:
            return given
        missing = {s: f for s, f in (("val", val_fraction), ("test", test_fraction)) if s not in given}
        return seeded_split(given.pop("train"), missing, split_seed) | given

    def mask_mapping(self, classes: Classes, values: set[int]) -> tuple[dict[int, int], str]:
        if len(classes.names) == 2 and classes.void != 255 and 255 in values and values <= {0, 255}:
            # a binary mask saved as an 8-bit picture (255 = foreground), not background + void
            return {0: 0, 255: 1}, "0 and 255"
        return super().mask_mapping(classes, values)
