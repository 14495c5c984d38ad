"""A small synthetic segmentation task in which a far-away cue decides the labels.

Every image (64x64 RGB by default) has three horizontal zones:

- the **cue band**, the top ``cue_rows`` rows: a solid, noisy colour band, warm (red to orange)
  or cool (blue). Nothing else in the image depends on it;
- a gap of ``gap`` rows of background;
- the **object zone** below it: 2 or 3 objects (discs, squares, triangles of random size, rotation
  and colour). An object's *texture* is horizontal stripes, vertical stripes, dots or plain.

The background (a random grey with a low-frequency colour field and pixel noise) and clutter
(thin lines and small dots, always background) cover everything below the band. The classes are
``background``, ``hstripes``, ``vstripes`` and ``dots``; the cue decides which texture means
which class:

- warm band: each textured object's class is its texture;
- cool band: the textures rotate, so horizontal stripes are labelled ``vstripes``, vertical
  stripes ``dots`` and dots ``hstripes``;
- plain objects and clutter are always background.

The pixels of textured objects are the **context pixels** (``SyntheticSet.context``): their label
depends on the cue. Two thirds of the bands are warm, so the texture alone already hints at the
class (which makes the task learnable step by step), but only texture and cue together decide it.

Why a model without global pooling cannot use the cue: every object pixel lies at least
``cue_rows + gap`` rows below the top of the image, so at least ``gap + 1`` rows below the band.
A convolutional network's output at a pixel depends only on the input inside its receptive field;
for the main job's ``none`` model (resnet18 encoder of depth 2, Unet or Unet++ decoder) the field
reaches 31 rows up, less than the default gap of 32 (``tests/test_synthetic.py`` checks both with
gradients and by swapping the cue). In eval mode, where every metric is measured, the model is
such a fixed convolutional function, so its prediction for an object cannot depend on the band:
it is *cue-blind*. Channel attention (CBAM, SCSE) pools every channel over the whole feature map,
band included, and can re-weight the texture channels per image: that is the path this task
rewards.

The ceiling of a cue-blind model: for each context pixel the label is the warm class with
probability 2/3 and the cool class with 1/3 whatever the rest of the image shows, so no cue-blind
rule beats labelling every textured object as in a warm image (:meth:`SyntheticSet.cue_blind`):
pixel accuracy 2/3 on the context pixels and mIoU 0.5 over their three classes
(:func:`context_miou`; each class gets 2/3 of its texture right, loses 1/3 to the next class and
takes 1/3 of the previous texture's pixels). A model that reads the cue can reach 1.0.

Generation is deterministic for ``seed``; each split is drawn from its own child seed, so the
size of one split does not change the images of another. Horizontal flips keep the layout and the
stripe orientation; vertical flips, 90-degree rotations or crops that drop the band would not.
"""

from dataclasses import dataclass
from itertools import product

import cv2
import numpy as np

CLASS_NAMES = ("background", "hstripes", "vstripes", "dots")
SPLITS = ("train", "val", "test")
DEFAULTS = {
    "size": 64,
    "n_train": 384,
    "n_val": 64,
    "n_test": 64,
    "seed": 1234,
    "noise": 10.0,
    "cue_rows": 6,
    "gap": 32,
}
P_WARM = 2 / 3
P_PLAIN = 1 / 4
PLAIN = 4  # texture code of plain objects; 1..3 are the textures of CLASS_NAMES[1:]
CELL = 21  # the object zone is cut into cells of about this size, one object per chosen cell

_SHAPE_SCALE = (0.8, 1.2, 1.0)  # disc, triangle, square of similar area
_CUE_HUES = ((0, 15), (100, 120))  # OpenCV hue (0..180) of warm (red-orange) and cool (blue) bands


@dataclass(frozen=True)
class SyntheticSet:
    """Images (N, H, W, 3) uint8 RGB, masks (N, H, W) uint8 class indices, the cue of each image
    (N,) (0 warm, 1 cool), ``textures`` (N, H, W) uint8: 0 off objects, 1..3 the texture
    (horizontal stripes, vertical stripes, dots), ``PLAIN`` for plain objects, and ``context``
    (N, H, W) bool: the pixels whose label depends on the cue (textured objects).

    The cue is drawn in rows ``0 .. cue_rows - 1``; objects lie in rows ``object_top ..`` only."""

    images: np.ndarray
    masks: np.ndarray
    cues: np.ndarray
    textures: np.ndarray
    context: np.ndarray
    cue_rows: int
    object_top: int

    def cue_blind(self) -> np.ndarray:
        """The best masks without the cue: every textured object labelled as in a warm image."""
        return np.where(self.textures == PLAIN, 0, self.textures).astype(np.uint8)


def label(texture: int, cue: int) -> int:
    """The class of an object with ``texture`` (0..3, ``PLAIN``) in an image with ``cue``."""
    if texture in (0, PLAIN):
        return 0
    return texture if cue == 0 else texture % 3 + 1


def context_miou(
    pred: np.ndarray, masks: np.ndarray, context: np.ndarray, num_classes: int = len(CLASS_NAMES)
) -> float:
    """Mean IoU over the ``context`` pixels only, averaged over the classes present there in
    ``masks`` (a class that is only predicted there is an error of the classes it is taken from)."""
    pred, true = pred[context], masks[context]
    ious = [
        ((pred == c) & (true == c)).sum() / ((pred == c) | (true == c)).sum()
        for c in range(num_classes)
        if (true == c).any()
    ]
    return float(np.mean(ious)) if ious else float("nan")


def best_cue_blind_mapping(data: SyntheticSet) -> tuple[tuple[int, int, int], float]:
    """The texture -> class mapping (for textures 1..3; background allowed) with the highest
    :func:`context_miou` on ``data``, found by trying all of them, and its score."""
    textures = data.textures[data.context]
    true = data.masks[data.context]
    ones = np.ones(len(true), bool)
    scores = {}
    for mapping in product(range(len(CLASS_NAMES)), repeat=3):
        pred = np.asarray((0,) + mapping, np.uint8)[textures]
        scores[mapping] = context_miou(pred, true, ones)
    best = max(scores, key=scores.get)
    return best, scores[best]


def _pattern(texture: int, ys: np.ndarray, xs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Which of the pixels (ys, xs) of an object show its bright colour (the rest are dark)."""
    ys, xs = ys + rng.integers(0, 8), xs + rng.integers(0, 8)
    if texture == 1:  # horizontal stripes
        return ys % 6 < 3
    if texture == 2:  # vertical stripes
        return xs % 6 < 3
    if texture == 3:  # sparse 2x2 dots on a 6-pixel grid
        return (ys % 6 < 2) & (xs % 6 < 2)
    return np.ones(len(ys), bool)


def _colour(rng: np.random.Generator, hues: tuple[int, int] = (0, 180)) -> np.ndarray:
    hsv = np.array([[[rng.integers(*hues), rng.integers(120, 256), rng.integers(120, 256)]]], np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def _render(
    rng: np.random.Generator, size: int, noise: float, cue_rows: int, object_top: int
) -> tuple[np.ndarray, np.ndarray, int, np.ndarray]:
    """One image: (image, mask, cue, textures)."""
    cue = int(rng.random() >= P_WARM)
    base = rng.uniform(90, 160)
    field = cv2.resize(rng.normal(0, 10, (4, 4, 3)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
    image = base + field
    image[:cue_rows] = _colour(rng, _CUE_HUES[cue])

    for _ in range(rng.integers(2, 5)):  # clutter below the band: thin lines and dots
        p, q = rng.integers((0, cue_rows), size, (2, 2))
        cv2.line(image, tuple(map(int, p)), tuple(map(int, q)), _colour(rng).tolist(), 1)
        c = rng.integers((2, cue_rows + 2), size, 2)
        cv2.circle(image, tuple(map(int, c)), int(rng.integers(1, 3)), _colour(rng).tolist(), -1)

    mask = np.zeros((size, size), np.uint8)
    textures = np.zeros((size, size), np.uint8)
    zone = size - object_top
    rows, cols = max(1, zone // CELL), max(1, size // CELL)
    cell = np.array([size / cols, zone / rows])  # (x, y)
    for cell_index in rng.choice(rows * cols, int(rng.integers(2, rows * cols + 1)), replace=False):
        texture = PLAIN if rng.random() < P_PLAIN else int(rng.integers(1, 4))
        shape = int(rng.integers(3))
        radius = rng.uniform(0.32, 0.44) * cell.min() * _SHAPE_SCALE[shape]
        center = (np.array([cell_index % cols, cell_index // cols]) + 0.5) * cell + (0, object_top)
        center += rng.uniform(-1, 1, 2) * np.maximum(cell / 2 - radius * 0.8, 0)
        region = np.zeros((size, size), np.uint8)
        if shape == 0:
            cv2.circle(region, tuple(np.round(center).astype(int)), int(round(radius)), 1, -1)
        else:
            phis = rng.uniform(0, 2 * np.pi) + np.arange(shape + 2) * 2 * np.pi / (shape + 2)
            corners = center + radius * np.stack([np.cos(phis), np.sin(phis)], axis=1)
            cv2.fillPoly(region, [np.round(corners).astype(np.int32)], 1)
        region[:object_top] = 0  # a shape near the zone's edge is cut, never moved towards the cue
        inside = np.nonzero(region)
        colour = _colour(rng)
        image[inside] = np.where(_pattern(texture, *inside, rng)[:, None], colour, colour * 0.25)
        mask[inside] = label(texture, cue)
        textures[inside] = texture

    image += noise * rng.standard_normal(image.shape, dtype=np.float32)
    return np.clip(image, 0, 255).astype(np.uint8), mask, cue, textures


def generate(
    n: int,
    size: int = DEFAULTS["size"],
    seed: int = DEFAULTS["seed"],
    noise: float = DEFAULTS["noise"],
    cue_rows: int = DEFAULTS["cue_rows"],
    gap: int = DEFAULTS["gap"],
) -> SyntheticSet:
    """``n`` images of ``size`` x ``size``, deterministic for ``seed``; the cue band has
    ``cue_rows`` rows and ``gap`` rows separate it from the object zone."""
    if cue_rows < 1:
        raise ValueError(f"cue_rows must be >= 1, got {cue_rows}")
    if gap < 0:
        raise ValueError(f"gap must be >= 0, got {gap}")
    object_top = cue_rows + gap
    if size - object_top < CELL:
        raise ValueError(
            f"size must leave at least {CELL} rows for objects below cue_rows + gap = {object_top}, got size={size}"
        )
    rng = np.random.default_rng(seed)
    images = np.empty((n, size, size, 3), np.uint8)
    masks = np.empty((n, size, size), np.uint8)
    cues = np.empty(n, np.int64)
    textures = np.empty((n, size, size), np.uint8)
    for i in range(n):
        images[i], masks[i], cues[i], textures[i] = _render(rng, size, noise, cue_rows, object_top)
    context = (textures >= 1) & (textures <= 3)
    return SyntheticSet(images, masks, cues, textures, context, cue_rows, object_top)


def generate_splits(
    size: int = DEFAULTS["size"],
    n_train: int = DEFAULTS["n_train"],
    n_val: int = DEFAULTS["n_val"],
    n_test: int = DEFAULTS["n_test"],
    seed: int = DEFAULTS["seed"],
    noise: float = DEFAULTS["noise"],
    cue_rows: int = DEFAULTS["cue_rows"],
    gap: int = DEFAULTS["gap"],
) -> dict[str, SyntheticSet]:
    """The train, val and test splits; each split has its own child seed of ``seed``."""
    counts = {"train": n_train, "val": n_val, "test": n_test}
    children = np.random.SeedSequence(seed).spawn(len(SPLITS))
    return {
        split: generate(counts[split], size, int(child.generate_state(1)[0]), noise, cue_rows, gap)
        for split, child in zip(SPLITS, children)
    }
