"""Fréchet distance of a model's samples during training: generated, measured and dropped, never written.

As in EDM2, generation is an iterator the metric consumes: `ahpa.sample.iter_samples` yields uint8 batches
that go straight into the detector and a float64 `FeatureStats`, so an evaluation costs no disk and no PNG
encoding. Samples are class-balanced (index i has class i % num_classes) and seeded per sample by
(seed, i), so the figure does not depend on the batch size or on the number of processes; with several
processes each takes every world_size-th batch and the sums are all-reduced.

Reference statistics are the slow part (50k training images) and never change during a run:
`ahpa.metrics.reference.load_reference` caches them (the trainer keeps them in the run's eval_ref/).
"""

from __future__ import annotations

from typing import Callable

import torch

from ahpa.config import SampleCfg
from ahpa.metrics.detectors import Detector
from ahpa.metrics.frechet import FeatureStats
from ahpa.metrics.images import batch_ranges
from ahpa.sample import SamplerBundle, iter_samples


class EvaluationStopped(Exception):
    """An evaluation given up on a stop signal (`reason`: its number), between two batches of samples."""

    def __init__(self, reason: int):
        super().__init__(f"evaluation stopped (signal {reason})")
        self.reason = reason


def sample_stats(
    bundle: SamplerBundle, detectors: Detector | list[Detector], num: int, seed: int, cfg: SampleCfg, batch: int,
    *, rank: int = 0, world_size: int = 1, on_batch: Callable[[int], None] | None = None,
    stop: Callable[[], int] | None = None,
) -> FeatureStats | list[FeatureStats]:
    """Detector statistics of this rank's share of samples [0, num) (batch b goes to rank b % world_size).

    Each sample batch is generated once and fed to every detector; a single detector gives a single result.
    `on_batch(n)` after each of this rank's batches of n samples (a progress bar's update; `rank_share` is its total).
    `stop()` after each batch that every rank has (the last rank has the fewest), so that a collective inside it is
    called alike on every rank: a reason to stop (a signal number) raises EvaluationStopped, and a scheduler's short
    grace period is not spent on the rest of 10,000 or 50,000 samples.
    """
    single = not isinstance(detectors, (list, tuple))
    dets = [detectors] if single else list(detectors)
    if num < 2:
        raise ValueError(f"an evaluation needs at least 2 samples for a covariance, got eval.num={num}")
    if batch < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need batch >= 1 and 0 <= rank < world_size; got {batch}, {rank}, {world_size}")
    stats = [FeatureStats(dim=d.dim, device=d.device) for d in dets]
    common = sum(1 for _ in batch_ranges(num, batch, world_size - 1, world_size))  # the batches every rank has
    for i, (lo, hi) in enumerate(batch_ranges(num, batch, rank, world_size)):
        for _, images, _ in iter_samples(bundle, lo, hi, seed, batch, cfg):
            nchw = images.permute(0, 3, 1, 2)  # uint8 NHWC -> NCHW view
            for d, st in zip(dets, stats):
                st.update(d.features(nchw))
            if on_batch is not None:
                on_batch(len(images))
        reason = stop() if stop is not None and i < common else 0
        if reason:
            raise EvaluationStopped(reason)
    for d, st in zip(dets, stats):
        st.detector = d.name
    return stats[0] if single else stats


def rank_share(num: int, batch: int, rank: int = 0, world_size: int = 1) -> int:
    """How many of samples [0, num) `sample_stats` generates on `rank`: its batches are b = rank, rank + world, ..."""
    return sum(hi - lo for lo, hi in batch_ranges(num, batch, rank, world_size))


def evaluate_fd(
    bundle: SamplerBundle, detector: Detector | list[Detector], ref_stats: FeatureStats | list[FeatureStats],
    num: int, seed: int, cfg: SampleCfg, batch: int, *, rank: int = 0, world_size: int = 1,
    on_batch: Callable[[int], None] | None = None, stop: Callable[[], int] | None = None,
) -> dict[str, float]:
    """{detector.name: FD} of `num` class-balanced samples against `ref_stats`, e.g. {"FD-r20": 3.1}.

    Several detectors (with their references, in the same order) share one set of samples. Call it on
    every rank with the same arguments when world_size > 1 (it all-reduces); every rank returns the same.
    `stop`: as in sample_stats.
    """
    dets = list(detector) if isinstance(detector, (list, tuple)) else [detector]
    refs = list(ref_stats) if isinstance(ref_stats, (list, tuple)) else [ref_stats]
    for det, ref in zip(dets, refs):
        if ref.detector is not None and ref.detector != det.name:
            raise ValueError(f"reference statistics were computed for {ref.detector}, not {det.name}: "
                             "load them with load_reference(ref, detector, ...)")
    results = {}
    shares = sample_stats(bundle, dets, num, seed, cfg, batch, rank=rank, world_size=world_size, on_batch=on_batch,
                          stop=stop)
    for det, ref, stats in zip(dets, refs, shares):
        if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            flat = stats.to_tensor()
            torch.distributed.all_reduce(flat)
            stats = FeatureStats.from_tensor(flat)
        results[det.name] = stats.frechet_distance(ref)
    return results
