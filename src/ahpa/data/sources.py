"""Image sources held in memory as uint8 NHWC: the procedural set and `.npz` files."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ahpa.config import DataCfg, shown
from ahpa.data.procedural import make_shapes


@dataclass
class ImageSet:
    images: torch.Tensor  # uint8 [N, H, W, 3]
    labels: torch.Tensor  # int64 [N]
    num_classes: int

    def __len__(self) -> int:
        return self.images.shape[0]


def load_npz_images(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """`images`/`labels` (our layout) or `arr_0`/`arr_1` (ADM layout), uint8 NHWC RGB."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{str(path)!r} is a folder; here an .npz of uint8 [N, H, W, 3] images is read. A folder of "
                         "images is encoded by `ahpa prepare --images FOLDER` and trained on as data.source=cache (for REPA, "
                         "prepare it with --store-images)")
    if not path.is_file():
        raise FileNotFoundError(f"image file {shown(path)} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            key = "images" if "images" in f else "arr_0" if "arr_0" in f else None
            images = f[key] if key else None
            labels = f["labels"] if "labels" in f else f["arr_1"] if "arr_1" in f else None
            found = list(f.keys())
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:  # np.load takes a non-zip for a pickle
        raise ValueError(f"{str(path)!r} is not a readable .npz of images ({type(e).__name__}); write one with "
                         "np.savez(path, images=uint8 [N, H, W, 3], labels=int [N])") from None
    if key is None:
        raise ValueError(f"{path}: no 'images' or 'arr_0' array (found {found})")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{path}: {key} must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}; a torch batch x "
                         "of floats [N, 3, H, W] in [0, 1] is (x * 255).round().byte().permute(0, 2, 3, 1).numpy()")
    return images, labels


def load_image_set(cfg: DataCfg, seed: int) -> ImageSet:
    if cfg.source == "procedural":
        images, labels = make_shapes(cfg.procedural_size, cfg.resolution, seed=seed)
    elif cfg.source == "npz":
        if not cfg.path:
            raise ValueError("data.source=npz needs data.path=FILE.npz")
        images, labels = load_npz_images(cfg.path)
        if labels is None:
            labels = np.zeros(len(images), dtype=np.int64)
    else:
        raise ValueError(f"data.source={cfg.source!r} is not an in-memory image source")
    if cfg.limit:
        images, labels = images[: cfg.limit], labels[: cfg.limit]
    num_classes = cfg.num_classes or int(labels.max()) + 1
    if labels.max() >= num_classes or labels.min() < 0:
        raise ValueError(f"labels must lie in [0, {num_classes}); found {labels.min()}..{labels.max()} (set data.num_classes)")
    return ImageSet(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels.astype(np.int64)), num_classes)
