"""The one image reader and the one mask reader: the pre-training check and training both use them,
so what the check accepts is exactly what training sees.

Both read with Pillow.

EXIF orientation (``exif=``), applied to images and masks alike, each by its own tag:

- ``"apply"`` (default): the pixels are turned the way the Orientation tag says, as photo viewers
  and annotation tools (CVAT, labelme) show them. The data module warns once, naming the files it
  turned, and a mask whose size matches only the unturned image is refused with a hint to use
  ``"ignore"``.
- ``"ignore"``: the stored pixels as they are (for masks drawn on the stored layout, e.g. produced
  by code that read the images with OpenCV's ``IMREAD_UNCHANGED``).
- ``"refuse"``: a file whose tag asks for a turn (Orientation 2..8) is an error naming it.

Images: every colour mode (RGB, RGBA, CMYK, palette, ...) is read as RGB (alpha dropped); every
grey mode (L, LA, 1, I;16, I) as grey; 16-bit values are scaled to 8 bits (the high byte);
floating-point images are refused. With ``in_channels=3`` a grey image is repeated into three
channels; with ``in_channels=1`` a colour image becomes its luma (ITU-R 601, Pillow's ``L``).

Masks hold class indices: palette PNGs (mode P, the Pascal VOC convention) are read as their
indices, never as colours; 8- and 16-bit single-channel masks as stored; bilevel (mode 1) as 0/1;
a colour mask whose three channels agree as one channel; any other colour mask is refused.

Every error is a :class:`ReadError` that names the file.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

EXIF_RULES = ("apply", "ignore", "refuse")
GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_SIXTEEN_BIT = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
_TURNS = frozenset(range(2, 9))  # Orientation values that move pixels; 1 (and junk) mean none


class DatasetError(ValueError):
    """Bad input found before training; the message names the file(s) and the fix."""


class ReadError(DatasetError):
    """One file could not be read as an image or mask; ``path`` and ``problem`` say which and why,
    ``kind`` is ``"unreadable"`` (missing, damaged, not an image), ``"exif"`` (refused orientation)
    or ``"format"`` (readable but not usable as it is stored)."""

    def __init__(self, path: Path, problem: str, kind: str = "unreadable"):
        super().__init__(f"{path}: {problem}")
        self.path, self.problem, self.kind = Path(path), problem, kind


@dataclass(frozen=True)
class FileInfo:
    """What a file's header says: its stored size, its channels (1 grey, 3 colour), its mode and
    its EXIF Orientation (1 when none)."""

    path: Path
    height: int
    width: int
    channels: int
    mode: str
    orientation: int

    @property
    def turned(self) -> bool:
        """Whether the Orientation tag asks for a turn or flip."""
        return self.orientation in _TURNS

    def size(self, exif: str = "apply") -> tuple[int, int]:
        """(height, width) as :func:`read_image` / :func:`read_mask` return it under ``exif``."""
        swapped = exif == "apply" and self.orientation in (5, 6, 7, 8)  # the 90-degree turns
        return (self.width, self.height) if swapped else (self.height, self.width)


def check_exif_rule(exif: str) -> None:
    if exif not in EXIF_RULES:
        raise ValueError(f"exif must be one of {EXIF_RULES}, got {exif!r}")


def _open(path: Path) -> Image.Image:
    try:
        return Image.open(path)
    except FileNotFoundError:
        raise ReadError(path, "file not found") from None
    except (UnidentifiedImageError, OSError) as err:
        raise ReadError(path, f"not a readable image ({err.__class__.__name__}: {err})") from None


def _orientation(image: Image.Image) -> int:
    try:
        value = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # a damaged EXIF block must not make the pixels unreadable; it then says nothing
        return 1
    return value if isinstance(value, int) else 1


def file_info(path: str | Path) -> FileInfo:
    """Read only the header of ``path`` (no pixel decoding)."""
    path = Path(path)
    with _open(path) as image:
        channels = 1 if image.mode in GREY_MODES else 3
        return FileInfo(path, image.height, image.width, channels, image.mode, _orientation(image))


def _decoded(path: Path, exif: str) -> Image.Image:
    """The decoded image of ``path``, turned by its EXIF Orientation when ``exif="apply"``."""
    check_exif_rule(exif)
    image = _open(path)
    try:
        image.load()
    except (OSError, ValueError, SyntaxError) as err:  # truncated or corrupt data
        raise ReadError(path, f"image data is damaged ({err})") from None
    orientation = _orientation(image)
    if orientation in _TURNS and exif == "refuse":
        raise ReadError(path, f"carries EXIF Orientation {orientation} (exif='refuse')", "exif")
    if orientation in _TURNS and exif == "apply":
        image = ImageOps.exif_transpose(image)
    return image


def _grey_array(image: Image.Image, path: Path) -> np.ndarray:
    """An 8-bit (H, W) array of a grey-mode image."""
    if image.mode == "F":
        raise ReadError(path, "floating-point image (mode F); save it as 8- or 16-bit", "format")
    if image.mode in ("1", "LA", "La"):
        image = image.convert("L")
    array = np.asarray(image)
    if image.mode in _SIXTEEN_BIT or (image.mode == "I" and array.max(initial=0) > 255):
        if array.min(initial=0) < 0 or array.max(initial=0) > 65535:
            raise ReadError(path, f"values {array.min()}..{array.max()} do not fit 16 bits", "format")
        return (array.astype(np.uint32) >> 8).astype(np.uint8)
    return array.astype(np.uint8)


def read_image(path: str | Path, in_channels: int = 3, exif: str = "apply") -> np.ndarray:
    """An RGB (H, W, 3) uint8 image (``in_channels=3``) or a grey (H, W) uint8 one (``1``)."""
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels must be 1 or 3, got {in_channels!r}")
    path = Path(path)
    image = _decoded(path, exif)
    if image.mode in GREY_MODES:
        grey = _grey_array(image, path)
        return grey if in_channels == 1 else np.repeat(grey[..., None], 3, axis=2)
    rgb = image.convert("RGB")
    return np.asarray(rgb.convert("L") if in_channels == 1 else rgb).copy()


def read_mask(path: str | Path, exif: str = "apply") -> np.ndarray:
    """A (H, W) uint8 or uint16 array of the stored class indices of a mask file."""
    path = Path(path)
    image = _decoded(path, exif)
    mode = image.mode
    if mode == "1":
        return np.asarray(image).astype(np.uint8)
    if mode in ("P", "L") or mode in _SIXTEEN_BIT:
        return np.asarray(image).copy()  # a palette image's array holds its indices
    if mode in ("LA", "La", "PA"):
        return np.asarray(image.getchannel(0)).copy()
    if mode == "I":
        array = np.asarray(image)
        if array.min(initial=0) < 0 or array.max(initial=0) > 65535:
            raise ReadError(path, f"mask values {array.min()}..{array.max()} do not fit 16 bits", "format")
        return array.astype(np.uint16)
    if mode in ("RGB", "RGBA", "RGBX"):
        array = np.asarray(image)[..., :3]
        if (array == array[..., :1]).all():
            return array[..., 0].copy()
        colours = len(np.unique(array.reshape(-1, 3), axis=0))
        raise ReadError(
            path,
            f"3 channels that differ (a colour mask, {colours} distinct colours); masks must hold "
            "class indices: save single-channel or palette (mode P) PNGs",
            "format",
        )
    raise ReadError(path, f"mask mode {mode} is not a single-channel or palette image", "format")
