"""Reference measurements, cached: they are the slow part of an evaluation and never change.

50,000 training images through a detector cost minutes on a GPU and most of an hour on a laptop, for
statistics that depend only on the images and the detector. `reference_measurement` keeps them as small
files named by the metric and a hash of the reference's identity (path, size, modification time) and of
the detector file, so every evaluation during training, every resumed run and every `ahpa eval` reuses
them, and a changed reference gets a new key rather than stale numbers.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ahpa.atomic import atomic_path
from ahpa.metrics.detectors import Detector, parse_spec
from ahpa.metrics.frechet import FeatureStats
from ahpa.metrics.images import ImageFolder, image_files, npz_image_key
from ahpa.metrics.measurement import Measurement, stored_stats_usable, is_stats_file, measure, reference_stats


def _file_identity(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def reference_key(ref: str | Path, detector: Detector) -> str:
    """16 hex digits identifying (reference, detector file).

    The reference's resolved path, size and modification time: size alone cannot tell two uncompressed
    .npz files of the same shape apart. The detector's file enters too, since two files can share a stem.
    """
    folder = ref if isinstance(ref, ImageFolder) else None
    path = (folder.path if folder else Path(ref).expanduser()).resolve()
    if not path.exists():
        raise FileNotFoundError(f"reference {str(path)!r} does not exist (eval.ref / --ref)")
    if path.is_dir():
        files = image_files(path)
        ident = {"files": len(files), "size": sum(f.stat().st_size for f in files),
                 "mtime_ns": max((f.stat().st_mtime_ns for f in files), default=0)}
        # in prepare's order (its first N images are the reference's first N: precision/recall's points), and at a
        # resolution when one is given
        ident["listing"] = "prepare"
        if folder and folder.resolution:
            ident["resolution"] = folder.resolution
    else:
        ident = _file_identity(path)
    det: dict = {"name": detector.name, "spec": getattr(detector, "spec", None)}
    try:
        det_path = Path(parse_spec(detector.spec)[1]).expanduser().resolve()
        det.update(path=str(det_path), **(_file_identity(det_path) if det_path.is_file() else {}))
    except (AttributeError, ValueError):
        pass  # a detector object without a spec: its name alone
    blob = json.dumps({"ref": str(path), **ident, "detector": det}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _cache_stem(ref, detector: Detector, cache_dir) -> Path:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", detector.name)
    return Path(cache_dir) / f"{name}-{reference_key(ref, detector)}"


def default_cache_dir() -> Path:
    """Where reference measurements are kept between calls and runs: $AHPA_CACHE/reference, else the XDG cache."""
    if os.environ.get("AHPA_CACHE"):
        return Path(os.environ["AHPA_CACHE"]) / "reference"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ahpa" / "reference"


def _stats_file(ref, detector: Detector, cache_dir: str | Path) -> Path:
    stem = _cache_stem(ref, detector, cache_dir)
    return stem.with_name(stem.name + ".npz")


def is_cached(ref, detector: Detector, cache_dir: str | Path) -> bool:
    """Whether `cache_dir` holds the statistics of (this reference as it is now, this detector)."""
    return _stats_file(ref, detector, cache_dir).is_file()


def share_cached(ref, detector: Detector, run_cache: str | Path, shared: str | Path) -> None:
    """Keep a run's and the shared cache's statistics of (reference, detector) the same file: copied into the run's
    when only the shared one has them (measured by `ahpa eval` or another run), and into the shared one when only the
    run's has them. Best effort: a shared cache that cannot be written is left alone."""
    mine, theirs = _stats_file(ref, detector, run_cache), _stats_file(ref, detector, shared)
    src, dst = (theirs, mine) if theirs.is_file() and not mine.is_file() else (mine, theirs)
    if not src.is_file() or dst.is_file():
        return
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)
    except OSError:
        if dst == mine:
            raise


def reference_measurement(
    ref, detector: Detector, cache_dir: str | Path | None, batch_size: int = 250, keep: int = 0,
    on_batch: Callable[[int], None] | None = None,
) -> Measurement:
    """Statistics of the reference (an image source or stored mu/sigma, see `reference_stats`) and, with
    `keep` > 0, the features of its first `keep` images, cached in `cache_dir` (None: no caching) as
    `<metric>-<key>.npz` and `<metric>-<key>-first<keep>.npy`."""
    stored = is_stats_file(ref) and stored_stats_usable(Path(ref), detector)[0]
    if keep and stored and npz_image_key(ref) is None:
        raise ValueError(f"precision/recall needs reference images, but {str(ref)!r} holds statistics (mu, sigma) only; "
                         "give the image source (folder or images .npz) as the reference")
    if cache_dir is not None:
        stem = _cache_stem(ref, detector, cache_dir)
        stats_file, feat_file = stem.with_name(stem.name + ".npz"), stem.with_name(f"{stem.name}-first{keep}.npy")
        if stats_file.is_file() and (not keep or feat_file.is_file()):
            stats = FeatureStats.load(stats_file)
            if stats.detector == detector.name:
                feats = torch.from_numpy(np.load(feat_file)).to(detector.device) if keep else None
                return Measurement(stats, None, feats)
    if not keep:
        got = Measurement(reference_stats(ref, detector, batch_size, on_batch=on_batch))
    elif stored:
        # an ADM reference batch: its stored statistics (of the full dataset) stand for the reference, and
        # its images give the points precision/recall needs, as ADM's evaluator uses them
        feats = measure(ref, detector, batch_size, keep=keep, max_images=keep, on_batch=on_batch).features
        got = Measurement(reference_stats(ref, detector, batch_size), None, feats)
    else:
        got = measure(ref, detector, batch_size, keep=keep, on_batch=on_batch)
    got.stats.detector = detector.name
    if cache_dir is None:
        return got
    with atomic_path(stats_file) as tmp:  # concurrent ranks never read half a file
        got.stats.save(tmp, detector=detector.name)
    if keep:
        with atomic_path(feat_file) as tmp, open(tmp, "wb") as f:
            np.save(f, got.features.cpu().numpy())
    return got


def load_reference(ref: str | Path, detector: Detector, cache_dir: str | Path | None, batch_size: int = 250) -> FeatureStats:
    """Reference statistics for `detector`, cached in `cache_dir` (see `reference_measurement`)."""
    return reference_measurement(ref, detector, cache_dir, batch_size).stats
