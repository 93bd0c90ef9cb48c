"""A procedural class-conditional image set for the demo and tests: no files, no downloads.

Eight classes: four shapes (disc, square, ring, plus) x two palettes (warm, cool), at random
positions, sizes and shades on a dim background gradient. Easy enough to learn in minutes on a
CPU, structured enough that a classifier can tell whether generated samples match their class.
"""

from __future__ import annotations

import numpy as np

SHAPES = ("disc", "square", "ring", "plus")
PALETTES = ("warm", "cool")
CLASS_NAMES = tuple(f"{p} {s}" for p in PALETTES for s in SHAPES)


def make_shapes(n: int, size: int = 32, seed: int = 0, jitter: float = 0.08) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [n, size, size, 3], labels int64 [n]); labels cycle through the 8 classes.

    `jitter` is how far (as a fraction of the side) a shape's centre may move from the middle.
    """
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(CLASS_NAMES)
    shape, palette = labels % len(SHAPES), labels // len(SHAPES)
    coords = np.arange(size, dtype=np.float32) + 0.5
    yy, xx = np.meshgrid(coords, coords, indexing="ij")  # [S, S]
    r = rng.uniform(0.22, 0.34, n).astype(np.float32)[:, None, None] * size
    cx = rng.uniform(0.5 - jitter, 0.5 + jitter, n).astype(np.float32)[:, None, None] * size
    cy = rng.uniform(0.5 - jitter, 0.5 + jitter, n).astype(np.float32)[:, None, None] * size
    dx, dy = xx[None] - cx, yy[None] - cy  # [n, S, S]
    dist = np.sqrt(dx**2 + dy**2)
    adx, ady = np.abs(dx), np.abs(dy)
    masks = np.stack(
        [
            dist < r,
            np.maximum(adx, ady) < 0.8 * r,
            (dist < r) & (dist > 0.55 * r),
            ((adx < 0.3 * r) & (ady < r)) | ((ady < 0.3 * r) & (adx < r)),
        ]
    )  # [4, n, S, S]
    mask = masks[shape, np.arange(n)].astype(np.float32)[..., None]  # [n, S, S, 1]
    warm = np.stack([rng.uniform(0.8, 1.0, n), rng.uniform(0.2, 0.7, n), rng.uniform(0.0, 0.2, n)], 1)
    cool = np.stack([rng.uniform(0.0, 0.2, n), rng.uniform(0.3, 0.8, n), rng.uniform(0.8, 1.0, n)], 1)
    colour = np.where((palette == 0)[:, None], warm, cool).astype(np.float32)[:, None, None, :]  # [n, 1, 1, 3]
    base = rng.uniform(0.08, 0.3, n).astype(np.float32)[:, None, None, None]
    grad = rng.uniform(-0.1, 0.1, n).astype(np.float32)[:, None, None, None] * (yy / size - 0.5)[None, :, :, None]
    background = np.clip(base + grad, 0, 1) * np.ones(3, np.float32)
    img = background * (1 - mask) + colour * mask
    return (img * 255 + 0.5).clip(0, 255).astype(np.uint8), labels.astype(np.int64)
