"""Reference measurements, cached: they are the slow part of an evaluation and never change.

50,000 training images through a detector cost minutes on a GPU and most of an hour on a laptop, for
statistics that depend only on the images and the detector. `reference_measurement` keeps them as small
files named by the metric and a hash of the reference's identity (path, size, modification time) and of
the detector file, so every evaluation during training, every resumed run and every `ahpa eval` reuses
them, and a changed reference gets a new key rather than stale numbers.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from ahpa.atomic import atomic_path
from ahpa.data.path_table import PathTable
from ahpa.metrics.detectors import Detector, parse_spec
from ahpa.metrics.frechet import FeatureStats
from ahpa.metrics.images import ImageFolder, image_files
from ahpa.metrics.measurement import (Measurement, Progress, check_reference, has_stored_spatial, is_stats_file,
                                      measure, reference_stats, stored_stats_usable)


KEY_VERSION = 2  # raised when how a reference is measured changes: older entries are then measured afresh


def _file_identity(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _folder_identity(path: Path) -> dict:
    """{files, size, mtime_ns} of an image folder (a copy of the kept measurement): a listing and a stat a file, 9 s
    for 1.28M files (measured on a local disk, warm cache: benchmarks/listing_memory.py's tree), so measured once per
    process (a run keys its reference twice per detector when it starts) while the modification times of the folder
    and of its sub-folders, which files added or removed there change, stay the same. Within one process a file
    rewritten in place under its own name is not noticed; a new process notices it."""
    subfolders = sorted(e.path for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))
    return dict(_measured_folder_identity(path, tuple(os.stat(p).st_mtime_ns for p in [path, *subfolders])))


@functools.lru_cache(maxsize=8)
def _measured_folder_identity(path: Path, _signature: tuple[int, ...]) -> dict:
    return _files_identity(image_files(path))


def _files_identity(files: PathTable) -> dict:
    size = mtime_ns = 0
    for f in files.files():  # one stat a file: a reference folder may hold a million
        st = os.stat(f)
        size, mtime_ns = size + st.st_size, max(mtime_ns, st.st_mtime_ns)
    return {"files": len(files), "size": size, "mtime_ns": mtime_ns}


def reference_key(ref: str | Path, detector: Detector) -> str:
    """16 hex digits identifying (reference, detector file), the same from any working directory.

    The reference's resolved path, size and modification time (size alone cannot tell two uncompressed .npz files
    of the same shape apart); for a folder, its files' count, total size and newest modification, prepare's order
    and the resolution it is read at. The detector's kind and file (or folder: a DINOv2's files) enter too, since
    two files can share a stem; and KEY_VERSION, the measurement's.
    """
    folder = ref if isinstance(ref, ImageFolder) else None
    path = (folder.path if folder else Path(ref).expanduser()).resolve()
    if not path.exists():
        raise FileNotFoundError(f"reference {str(path)!r} does not exist (eval.ref / --ref)")
    if path.is_dir():
        ident = _folder_identity(path)
        # in prepare's order (its first N images are the reference's first N: precision/recall's points), and at a
        # resolution when one is given
        ident["listing"] = "prepare"
        if folder and folder.resolution:
            ident["resolution"] = folder.resolution
    else:
        ident = _file_identity(path)
    det: dict = {"name": detector.name}
    try:
        kind, where = parse_spec(detector.spec)
        det_path = Path(where).expanduser().resolve()  # resolved: `ahpa eval`'s relative spec and a run's absolute one
        det.update(kind=kind, path=str(det_path))
        if det_path.is_file():
            det.update(_file_identity(det_path))
        elif det_path.is_dir():  # a DINOv2 folder: its files, so that weights replaced in place are noticed
            det.update(_files_identity(sorted(p for p in det_path.rglob("*") if p.is_file())))
    except (AttributeError, ValueError):
        pass  # a detector object without a spec: its name alone
    blob = json.dumps({"v": KEY_VERSION, "ref": str(path), **ident, "detector": det}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _cache_files(ref, detector: Detector, cache_dir: str | Path, keep: int = 0) -> tuple[Path, Path, Path | None]:
    """(statistics `<metric>-<key>.npz`, first features `<metric>-<key>-first<keep>.npy`, sFID's statistics
    `sFID-<key>.npz` or None for a detector without spatial features) of a reference in a cache."""
    key = reference_key(ref, detector)
    stem = f"{re.sub(r'[^A-Za-z0-9._-]+', '_', detector.name)}-{key}"
    spatial = Path(cache_dir) / f"{detector.spatial_name}-{key}.npz" if detector.has_spatial else None
    return Path(cache_dir) / f"{stem}.npz", Path(cache_dir) / f"{stem}-first{keep}.npy", spatial


def _cached_stats(path: Path, name: str) -> FeatureStats | None:
    """The statistics a cache file holds when it holds those of metric `name`; None otherwise (not there, or another
    metric's: measured afresh)."""
    if not path.is_file():
        return None
    stats = FeatureStats.load(path)
    return stats if stats.detector == name else None


def _cached_first(stats_path: Path, keep: int) -> torch.Tensor | None:
    """The features of the reference's first `keep` images from a cached `-first<M>.npy` beside `stats_path` that holds
    them: M >= keep (its first `keep` rows), or fewer rows than M (the whole reference, however many are asked for).
    None when no such file is there. A precision/recall at another --pr-num thus reuses what an earlier one measured."""
    best = None
    for f in stats_path.parent.glob(f"{glob.escape(stats_path.stem)}-first*.npy"):
        m = re.fullmatch(r"first(\d+)", f.stem[len(stats_path.stem) + 1:])
        if m is None:
            continue
        try:
            rows = np.load(f, mmap_mode="r").shape[0]
        except (OSError, ValueError):  # torn or unreadable: measured afresh, as a missing file is
            continue
        if (int(m[1]) >= keep or rows < int(m[1])) and (best is None or rows < best[1]):
            best = (f, rows)  # the smallest that serves: the least to read
    if best is None:
        return None
    return torch.from_numpy(np.array(np.load(best[0], mmap_mode="r")[:keep]))


def default_cache_dir() -> Path | None:
    """Where reference measurements are kept between calls and runs: $AHPA_CACHE/reference, else
    $XDG_CACHE_HOME/ahpa/reference, else ~/.cache/ahpa/reference; None with AHPA_CACHE=off (or no home)."""
    if os.environ.get("AHPA_CACHE") == "off":
        return None
    if os.environ.get("AHPA_CACHE"):
        return Path(os.environ["AHPA_CACHE"]) / "reference"
    try:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    except RuntimeError:  # no HOME and no passwd entry (some containers)
        return None
    return Path(base) / "ahpa" / "reference"


def stats_file(ref, detector: Detector, cache_dir: str | Path) -> Path:
    """The file in `cache_dir` that holds the statistics of (this reference as it is now, this detector)."""
    return _cache_files(ref, detector, cache_dir)[0]


def share_cached(mine: Path, theirs: Path | None) -> None:
    """Keep a run's statistics file (`mine`, see `stats_file`) and the shared cache's (`theirs`) the same: copied into
    the run's when only the shared one has them (measured by `ahpa eval` or another run), into the shared one when
    only the run's has them. Best effort on the shared side: one that cannot be read or written is left alone."""
    if theirs is None:
        return
    try:
        pull = theirs.is_file() and not mine.is_file()
        if not pull and (not mine.is_file() or theirs.is_file()):
            return
    except OSError:  # an unreadable shared cache (permissions, a stale network mount): the run goes on without it
        return
    src, dst = (theirs, mine) if pull else (mine, theirs)
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)
    except OSError:
        if pull:  # the run's own directory must take it; the shared one need not
            raise


def _measured(ref, detector: Detector, batch_size: int, keep: int, spatial: bool,
              progress: Progress | None) -> Measurement:
    """The reference measured afresh: its images in one pass, or its stored statistics and, where they are not
    enough, the images beside them."""
    if not (is_stats_file(ref) and stored_stats_usable(Path(ref), detector)[0]):
        return measure(ref, detector, batch_size, keep=keep, spatial=spatial, progress=progress)
    # stored statistics (an ADM reference batch: of the full dataset) stand for the reference; the images beside them
    # give the points precision/recall needs, as ADM's evaluator uses them, and sFID's statistics when none are stored
    stats = reference_stats(ref, detector, batch_size)
    sstats = FeatureStats.load(ref, spatial=True) if spatial and has_stored_spatial(ref) else None
    if spatial and sstats is None:
        got = measure(ref, detector, batch_size, keep=keep, spatial=True, progress=progress)
        return Measurement(stats, None, got.features, got.spatial)
    feats = measure(ref, detector, batch_size, keep=keep, max_images=keep, progress=progress).features if keep else None
    return Measurement(stats, None, feats, sstats)


def reference_measurement(
    ref, detector: Detector, cache_dir: str | Path | None, batch_size: int = 250, keep: int = 0,
    progress: Progress | None = None, spatial: bool = False,
) -> Measurement:
    """Statistics of the reference (an image source or stored mu/sigma, see `reference_stats`), with `keep` > 0 the
    features of its first `keep` images, and with `spatial` the statistics of sFID's features (stored `mu_s`/`sigma_s`,
    or measured), cached in `cache_dir` (None: no caching) as `<metric>-<key>.npz`, `<metric>-<key>-first<keep>.npy`
    and `sFID-<key>.npz`. `progress` as `measure`'s, for the pass that runs (if any): the whole reference, its first
    `keep` images (statistics cached or stored), or none (everything cached)."""
    check_reference(ref, detector, keep, spatial)
    if cache_dir is not None:
        stats_path, feat_path, spatial_path = _cache_files(ref, detector, cache_dir, keep)
        stats = _cached_stats(stats_path, detector.name)
        sstats = _cached_stats(spatial_path, detector.spatial_name) if spatial else None
        if stats is not None and (sstats is not None or not spatial):
            if not keep:
                return Measurement(stats, spatial=sstats)
            feats = _cached_first(stats_path, keep)
            if feats is None:
                # the statistics are known: only the first `keep` images are measured, not the whole reference
                # again (another --pr-num against a 1.28M-image folder took the hours of the first pass)
                feats = measure(ref, detector, batch_size, keep=keep, max_images=keep, progress=progress).features
                with atomic_path(feat_path) as tmp, open(tmp, "wb") as f:
                    np.save(f, feats.cpu().numpy())
            return Measurement(stats, None, feats.to(detector.device), sstats)
    got = _measured(ref, detector, batch_size, keep, spatial, progress)
    got.stats.detector = detector.name
    if cache_dir is None:
        return got
    with atomic_path(stats_path) as tmp:  # concurrent ranks never read half a file
        got.stats.save(tmp, detector=detector.name)
    if got.spatial is not None:
        with atomic_path(spatial_path) as tmp:
            got.spatial.save(tmp, detector=detector.spatial_name)
    if keep:
        with atomic_path(feat_path) as tmp, open(tmp, "wb") as f:
            np.save(f, got.features.cpu().numpy())
    return got


def load_reference(ref: str | Path, detector: Detector, cache_dir: str | Path | None, batch_size: int = 250,
                   progress: Progress | None = None) -> FeatureStats:
    """Reference statistics for `detector`, cached in `cache_dir` (see `reference_measurement`; `progress` as
    `measure`'s, not called when they come from the cache)."""
    return reference_measurement(ref, detector, cache_dir, batch_size, progress=progress).stats
