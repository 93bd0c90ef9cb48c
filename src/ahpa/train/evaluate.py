"""Fréchet distance of a model's samples during training: generated, measured and dropped, never written.

As in EDM2, generation is an iterator the metric consumes: `ahpa.sample.iter_samples` yields uint8 batches
that go straight into the detector and a float64 `FeatureStats`, so an evaluation costs no disk and no PNG
encoding. Samples are class-balanced (index i has class i % num_classes) and seeded per sample by
(seed, i), so the figure does not depend on the batch size or on the number of processes; with several
processes each takes every world_size-th batch and the sums are all-reduced.

Reference statistics are the slow part (50k training images) and never change during a run: `load_reference`
caches them as a small .npz (mean, covariance, count) named by the detector and a hash of the reference's
identity, so every evaluation and every resumed run reuses them.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch

from ahpa.atomic import atomic_path
from ahpa.config import SampleCfg
from ahpa.metrics.detectors import Detector, parse_spec
from ahpa.metrics.frechet import FeatureStats
from ahpa.metrics.images import image_files, reference_stats
from ahpa.sample import SamplerBundle, iter_samples


def sample_stats(
    bundle: SamplerBundle, detectors: Detector | list[Detector], num: int, seed: int, cfg: SampleCfg, batch: int,
    *, rank: int = 0, world_size: int = 1,
) -> FeatureStats | list[FeatureStats]:
    """Detector statistics of this rank's share of samples [0, num) (batch b goes to rank b % world_size).

    Each sample batch is generated once and fed to every detector; a single detector gives a single result.
    """
    single = not isinstance(detectors, (list, tuple))
    dets = [detectors] if single else list(detectors)
    if num < 2:
        raise ValueError(f"an evaluation needs at least 2 samples for a covariance, got eval.num={num}")
    if batch < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need batch >= 1 and 0 <= rank < world_size; got {batch}, {rank}, {world_size}")
    stats = [FeatureStats(dim=d.dim, device=d.device) for d in dets]
    for b, lo in enumerate(range(0, num, batch)):
        if b % world_size != rank:
            continue
        for _, images, _ in iter_samples(bundle, lo, min(lo + batch, num), seed, batch, cfg):
            nchw = images.permute(0, 3, 1, 2)  # uint8 NHWC -> NCHW view
            for d, st in zip(dets, stats):
                st.update(d.features(nchw))
    for d, st in zip(dets, stats):
        st.detector = d.name
    return stats[0] if single else stats


def evaluate_fd(
    bundle: SamplerBundle, detector: Detector | list[Detector], ref_stats: FeatureStats | list[FeatureStats],
    num: int, seed: int, cfg: SampleCfg, batch: int, *, rank: int = 0, world_size: int = 1,
) -> dict[str, float]:
    """{detector.name: FD} of `num` class-balanced samples against `ref_stats`, e.g. {"FD-r20": 3.1}.

    Several detectors (with their references, in the same order) share one set of samples. Call it on
    every rank with the same arguments when world_size > 1 (it all-reduces); every rank returns the same.
    """
    dets = list(detector) if isinstance(detector, (list, tuple)) else [detector]
    refs = list(ref_stats) if isinstance(ref_stats, (list, tuple)) else [ref_stats]
    for det, ref in zip(dets, refs):
        if ref.detector is not None and ref.detector != det.name:
            raise ValueError(f"reference statistics were computed for {ref.detector}, not {det.name}: "
                             "load them with load_reference(ref, detector, ...)")
    results = {}
    for det, ref, stats in zip(dets, refs, sample_stats(bundle, dets, num, seed, cfg, batch, rank=rank, world_size=world_size)):
        if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            flat = stats.to_tensor()
            torch.distributed.all_reduce(flat)
            stats = FeatureStats.from_tensor(flat)
        results[det.name] = stats.frechet_distance(ref)
    return results


# ---- reference statistics, cached ----

def _file_identity(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def reference_key(ref: str | Path, detector: Detector) -> str:
    """16 hex digits identifying (reference, detector file).

    The reference's resolved path, size and modification time: size alone cannot tell two uncompressed
    .npz files of the same shape apart. The detector's file enters too, since two files can share a stem.
    """
    path = Path(ref).expanduser().resolve()
    if not path.exists():
        raise FileNotFoundError(f"reference {str(path)!r} does not exist (eval.ref)")
    if path.is_dir():
        files = image_files(path)
        ident = {"files": len(files), "size": sum(f.stat().st_size for f in files),
                 "mtime_ns": max((f.stat().st_mtime_ns for f in files), default=0)}
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


def load_reference(ref: str | Path, detector: Detector, cache_dir: str | Path | None, batch_size: int = 250) -> FeatureStats:
    """Reference statistics for `detector`: an image source or stored mu/sigma (see metrics.reference_stats),
    cached in `cache_dir` as `<metric>-<reference_key>.npz` (no caching when cache_dir is None)."""
    if cache_dir is None:
        return reference_stats(ref, detector, batch_size)
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", detector.name)
    path = Path(cache_dir) / f"{name}-{reference_key(ref, detector)}.npz"
    if path.is_file():
        stats = FeatureStats.load(path)
        if stats.detector == detector.name:
            return stats
    stats = reference_stats(ref, detector, batch_size)
    with atomic_path(path) as tmp:  # concurrent ranks never read half a file
        stats.save(tmp, detector=detector.name)
    stats.detector = detector.name
    return stats
