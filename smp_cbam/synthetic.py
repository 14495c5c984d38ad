"""A small synthetic segmentation task in which image-level context decides the labels.

Every image (64x64 RGB by default) shows 4 to 6 objects on a noisy background. Each object has a
*shape* (disc, square or triangle, randomly rotated and sized), a *texture* (striped or plain) and
a random colour. The classes are ``background``, ``disc``, ``square`` and ``triangle``, but whether
an object counts at all depends on a global cue, the **tint** of the background:

- warm images (background shifted towards red): striped objects are labelled by their shape,
  plain objects are background;
- cool images (background shifted towards blue): plain objects are labelled by their shape,
  striped objects are background.

Two thirds of the images are warm and two thirds of the objects striped, drawn independently, so
texture and tint each hint at the answer (which makes the task learnable step by step) but only
their combination decides it. The tint is an image-level property: the background brightness
varies per image and a low-frequency colour field, pixel noise and the random object colours blur
it locally, so it is read most reliably by pooling over the image. Thin lines and dots are clutter
(always background).

A model that ignores the tint can at best label the striped objects (:meth:`SyntheticSet.cue_blind`):
its mIoU is about 0.65, against 1.0 for a model that uses it; using the tint only as "warm and
striped" (missing the plain objects of cool images) gives about 0.85.

Why attention can help: channel attention pools every channel over the whole image, which is
exactly the statistic that carries the tint, and can switch the "striped" and "plain" feature
channels on or off per image; spatial attention can focus on the objects and suppress clutter.

Generation is deterministic for ``seed``; each split is drawn from its own child seed, so the
size of one split does not change the images of another.
"""

from dataclasses import dataclass

import cv2
import numpy as np

CLASS_NAMES = ("background", "disc", "square", "triangle")
CUES = ("warm", "cool")
SPLITS = ("train", "val", "test")
DEFAULTS = {"size": 64, "n_train": 384, "n_val": 64, "n_test": 64, "seed": 1234, "noise": 10.0}
P_WARM = 2 / 3
P_STRIPED = 2 / 3

_STRIPE_PERIOD = 6
_SHAPE_SCALE = {1: 0.8, 2: 1.0, 3: 1.2}  # disc, square, triangle of similar area


@dataclass(frozen=True)
class SyntheticSet:
    """Images (N, H, W, 3) uint8 RGB, masks (N, H, W) uint8 class indices, the cue of each image
    (N,) (0 warm, 1 cool), ``shapes`` (N, H, W): every object labelled by its shape whether it
    counts or not, and ``striped`` (N, H, W): the pixels of striped objects."""

    images: np.ndarray
    masks: np.ndarray
    cues: np.ndarray
    shapes: np.ndarray
    striped: np.ndarray

    def cue_blind(self) -> np.ndarray:
        """The best masks without the cue: striped objects (targets in most images) by shape."""
        return np.where(self.striped, self.shapes, 0).astype(np.uint8)


def _polygon(shape: int, center: np.ndarray, radius: float, angle: float) -> np.ndarray:
    corners = 4 if shape == 2 else 3
    phis = angle + np.arange(corners) * 2 * np.pi / corners
    points = center + radius * np.stack([np.cos(phis), np.sin(phis)], axis=1)
    return np.round(points).astype(np.int32)


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    hsv = np.array([[[rng.integers(0, 180), rng.integers(120, 256), rng.integers(120, 256)]]], np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def _render(rng: np.random.Generator, size: int, noise: float) -> tuple[np.ndarray, np.ndarray, int, np.ndarray, np.ndarray]:
    cue = int(rng.random() >= P_WARM)
    sign = 1.0 if cue == 0 else -1.0
    tint = rng.uniform(24, 32)
    base = rng.uniform(90, 160)
    field = cv2.resize(rng.normal(0, 10, (4, 4, 3)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
    image = base + field + np.array([sign * tint, 0.0, -sign * tint], np.float32)

    for _ in range(rng.integers(2, 5)):  # clutter: thin lines and dots, always background
        p, q = rng.integers(0, size, (2, 2))
        cv2.line(image, tuple(map(int, p)), tuple(map(int, q)), _random_colour(rng).tolist(), 1)
        c = rng.integers(0, size, 2)
        cv2.circle(image, tuple(map(int, c)), int(rng.integers(1, 3)), _random_colour(rng).tolist(), -1)

    mask = np.zeros((size, size), np.uint8)
    shapes = np.zeros((size, size), np.uint8)
    textures = np.zeros((size, size), bool)
    cell = size / 3
    n_objects = int(rng.integers(4, 7))
    for cell_index in rng.choice(9, n_objects, replace=False):
        is_striped = rng.random() < P_STRIPED
        shape = int(rng.integers(3)) + 1
        radius = rng.uniform(0.32, 0.44) * cell * _SHAPE_SCALE[shape]
        center = (np.array([cell_index % 3, cell_index // 3]) + 0.5) * cell
        center += rng.uniform(-1, 1, 2) * (cell / 2 - radius * 0.8)
        region = np.zeros((size, size), np.uint8)
        if shape == 1:
            cv2.circle(region, tuple(np.round(center).astype(int)), int(round(radius)), 1, -1)
        else:
            cv2.fillPoly(region, [_polygon(shape, center, radius, rng.uniform(0, 2 * np.pi))], 1)
        inside = np.nonzero(region)
        colour = _random_colour(rng)
        if is_striped:
            theta = rng.uniform(0, np.pi)
            phase = (inside[1] * np.cos(theta) + inside[0] * np.sin(theta)) % _STRIPE_PERIOD < _STRIPE_PERIOD / 2
            image[inside] = np.where(phase[:, None], colour, colour * 0.35)
        else:
            image[inside] = colour
        mask[inside] = shape if is_striped == (cue == 0) else 0
        shapes[inside] = shape
        textures[inside] = is_striped

    image += noise * rng.standard_normal(image.shape, dtype=np.float32)
    return np.clip(image, 0, 255).astype(np.uint8), mask, cue, shapes, textures


def generate(n: int, size: int = DEFAULTS["size"], seed: int = DEFAULTS["seed"], noise: float = DEFAULTS["noise"]) -> SyntheticSet:
    """``n`` images of ``size`` x ``size``, deterministic for ``seed``."""
    rng = np.random.default_rng(seed)
    data = SyntheticSet(
        np.empty((n, size, size, 3), np.uint8), np.empty((n, size, size), np.uint8),
        np.empty(n, np.int64), np.empty((n, size, size), np.uint8), np.empty((n, size, size), bool),
    )  # fmt: skip
    for i in range(n):
        data.images[i], data.masks[i], data.cues[i], data.shapes[i], data.striped[i] = _render(rng, size, noise)
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
