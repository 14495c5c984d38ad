"""A small synthetic segmentation task in which image-level context decides the labels.

Every image (64x64 RGB by default) shows 4 to 6 objects (discs, squares, triangles of random size,
rotation and colour) on a noisy background. An object's *texture* is horizontal stripes, vertical
stripes, dots or plain. The classes are ``background``, ``hstripes``, ``vstripes`` and ``dots``,
and a global cue, the **tint** of the background, decides which texture means which class:

- warm images (background shifted towards red): each textured object's class is its texture;
- cool images (background shifted towards blue): the textures rotate, so horizontal stripes are
  labelled ``vstripes``, vertical stripes ``dots`` and dots ``hstripes``;
- plain objects, thin lines and small dots are clutter: always background.

Two thirds of the images are warm, so the texture alone already hints at the class (which makes
the task learnable step by step), but only texture and tint together decide it. Shapes and colours
carry no information. The tint is an image-level property: the background brightness varies per
image and a low-frequency colour field, pixel noise and the object colours blur it locally, so it
is read most reliably by pooling over the image. (Horizontal flips keep the stripe orientation;
rotating the images by 90 degrees would not.)

A model that ignores the tint can at best label every textured object as in a warm image
(:meth:`SyntheticSet.cue_blind`): its mIoU is about 0.64, against 1.0 for a model that uses it;
predicting only background gives about 0.22. Trained from scratch on a CPU with cross-entropy,
a resnet18 Unet reached 0.85 validation mIoU after 10 epochs on the default 384 images, and one
with encoder depth 3 and decoder channels 64/32/16 reached 0.73 after 8 epochs on 256 images.

Why attention can help: channel attention pools every channel over the whole image, which is
exactly the statistic that carries the tint, and can re-weight the texture channels per image;
spatial attention can focus on the objects and suppress clutter.

Generation is deterministic for ``seed``; each split is drawn from its own child seed, so the
size of one split does not change the images of another.
"""

from dataclasses import dataclass

import cv2
import numpy as np

CLASS_NAMES = ("background", "hstripes", "vstripes", "dots")
SPLITS = ("train", "val", "test")
DEFAULTS = {"size": 64, "n_train": 384, "n_val": 64, "n_test": 64, "seed": 1234, "noise": 10.0}
P_WARM = 2 / 3
P_PLAIN = 1 / 4
PLAIN = 4  # texture code of plain objects; 1..3 are the textures of CLASS_NAMES[1:]

_SHAPE_SCALE = (0.8, 1.2, 1.0)  # disc, triangle, square of similar area


@dataclass(frozen=True)
class SyntheticSet:
    """Images (N, H, W, 3) uint8 RGB, masks (N, H, W) uint8 class indices, the cue of each image
    (N,) (0 warm, 1 cool), and ``textures`` (N, H, W) uint8: 0 off objects, 1..3 the texture
    (horizontal stripes, vertical stripes, dots), ``PLAIN`` for plain objects."""

    images: np.ndarray
    masks: np.ndarray
    cues: np.ndarray
    textures: np.ndarray

    def cue_blind(self) -> np.ndarray:
        """The best masks without the cue: every textured object labelled as in a warm image."""
        return np.where(self.textures == PLAIN, 0, self.textures).astype(np.uint8)


def label(texture: int, cue: int) -> int:
    """The class of an object with ``texture`` (0..3, ``PLAIN``) in an image with ``cue``."""
    if texture in (0, PLAIN):
        return 0
    return texture if cue == 0 else texture % 3 + 1


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


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    hsv = np.array([[[rng.integers(0, 180), rng.integers(120, 256), rng.integers(120, 256)]]], np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def _render(rng: np.random.Generator, size: int, noise: float) -> tuple[np.ndarray, np.ndarray, int, np.ndarray]:
    """One image: (image, mask, cue, textures)."""
    cue = int(rng.random() >= P_WARM)
    sign = 1.0 if cue == 0 else -1.0
    tint = rng.uniform(24, 32)
    base = rng.uniform(90, 160)
    field = cv2.resize(rng.normal(0, 10, (4, 4, 3)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
    image = base + field + np.array([sign * tint, 0.0, -sign * tint], np.float32)

    for _ in range(rng.integers(2, 5)):  # clutter: thin lines and dots
        p, q = rng.integers(0, size, (2, 2))
        cv2.line(image, tuple(map(int, p)), tuple(map(int, q)), _random_colour(rng).tolist(), 1)
        c = rng.integers(0, size, 2)
        cv2.circle(image, tuple(map(int, c)), int(rng.integers(1, 3)), _random_colour(rng).tolist(), -1)

    mask = np.zeros((size, size), np.uint8)
    textures = np.zeros((size, size), np.uint8)
    cell = size / 3
    for cell_index in rng.choice(9, int(rng.integers(4, 7)), replace=False):
        texture = PLAIN if rng.random() < P_PLAIN else int(rng.integers(1, 4))
        shape = int(rng.integers(3))
        radius = rng.uniform(0.32, 0.44) * cell * _SHAPE_SCALE[shape]
        center = (np.array([cell_index % 3, cell_index // 3]) + 0.5) * cell
        center += rng.uniform(-1, 1, 2) * (cell / 2 - radius * 0.8)
        region = np.zeros((size, size), np.uint8)
        if shape == 0:
            cv2.circle(region, tuple(np.round(center).astype(int)), int(round(radius)), 1, -1)
        else:
            phis = rng.uniform(0, 2 * np.pi) + np.arange(shape + 2) * 2 * np.pi / (shape + 2)
            corners = center + radius * np.stack([np.cos(phis), np.sin(phis)], axis=1)
            cv2.fillPoly(region, [np.round(corners).astype(np.int32)], 1)
        inside = np.nonzero(region)
        colour = _random_colour(rng)
        image[inside] = np.where(_pattern(texture, *inside, rng)[:, None], colour, colour * 0.25)
        mask[inside] = label(texture, cue)
        textures[inside] = texture

    image += noise * rng.standard_normal(image.shape, dtype=np.float32)
    return np.clip(image, 0, 255).astype(np.uint8), mask, cue, textures


def generate(n: int, size: int = DEFAULTS["size"], seed: int = DEFAULTS["seed"], noise: float = DEFAULTS["noise"]) -> SyntheticSet:
    """``n`` images of ``size`` x ``size``, deterministic for ``seed``."""
    rng = np.random.default_rng(seed)
    data = SyntheticSet(
        np.empty((n, size, size, 3), np.uint8), np.empty((n, size, size), np.uint8),
        np.empty(n, np.int64), np.empty((n, size, size), np.uint8),
    )  # fmt: skip
    for i in range(n):
        data.images[i], data.masks[i], data.cues[i], data.textures[i] = _render(rng, size, noise)
    return data


def generate_splits(
    size: int = DEFAULTS["size"],
    n_train: int = DEFAULTS["n_train"],
    n_val: int = DEFAULTS["n_val"],
    n_test: int = DEFAULTS["n_test"],
    seed: int = DEFAULTS["seed"],
    noise: float = DEFAULTS["noise"],
) -> dict[str, SyntheticSet]:
    """The train, val and test splits; each split has its own child seed of ``seed``."""
    counts = {"train": n_train, "val": n_val, "test": n_test}
    children = np.random.SeedSequence(seed).spawn(len(SPLITS))
    return {
        split: generate(counts[split], size, int(child.generate_state(1)[0]), noise)
        for split, child in zip(SPLITS, children)
    }
