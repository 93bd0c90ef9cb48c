"""Fréchet distance of a model's samples during training: generated, measured and dropped, never written.

As in EDM2, generation is an iterator the metric consumes: `ahpa.sample.iter_samples` yields uint8 batches
that go straight into the detector and a float64 `FeatureStats`, so an evaluation costs no disk and no PNG
encoding. Samples are class-balanced (index i has class i % num_classes) and seeded per sample by
(seed, i), so the figure does not depend on the batch size or on the number of processes; with several
processes each takes every world_size-th batch and the sums are all-reduced.

Reference statistics are the slow part (50k training images) and never change during a run:
`ahpa.metrics.reference.load_reference` caches them (the trainer keeps them in the run's eval_ref/).

A run's `Evaluator` holds its detectors and reference (checked and measured before the first step, so that a bad
file fails then, not hours later), knows which step lacks its evaluation after a stop, and `log_evaluation` writes
each result into metrics.jsonl and eval.png.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable

import torch

from ahpa.config import Config, EvalCfg, SampleCfg
from ahpa.jsonl import read_rows
from ahpa.metrics.detectors import Detector
from ahpa.metrics.frechet import FeatureStats
from ahpa.metrics.images import batch_ranges, share_count
from ahpa.sample import SamplerBundle, iter_samples
from ahpa.train import eval_setup, plots
from ahpa.train.distributed import barrier, from_main
from ahpa.train.logger import logged_at


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
    `on_batch(n)` after each of this rank's batches of n samples (a progress bar's update; `share_count` is its total).
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


def last_evaluation_missing(run_dir: Path, step: int, rank: int) -> bool:
    """Whether a run at its last step lacks that step's evaluation and was not completed (no DONE): it stopped or
    died between its last checkpoint and its last evaluation. A completed run is not evaluated again. Rank 0 reads
    the run's files; every process takes its answer."""
    return from_main(rank == 0 and not (run_dir / "DONE").exists()
                     and not logged_at(run_dir / "metrics.jsonl", step, "eval/"))


class Evaluator:
    """Fréchet distances of EMA samples for each configured detector. Every process calls it with the
    same arguments: each generates its share of the samples and the statistics are all-reduced."""

    def __init__(self, cfg: EvalCfg, device: torch.device, run_dir: Path, rank: int = 0, world: int = 1,
                 resolution: int | None = None, progress: Callable | None = None):
        """Built before the first training step, so that what would fail the first evaluation (no detector, no
        reference, a missing or wrong file) fails then, not after hours of training. A reference folder is read at
        `resolution` (the run's data.resolution) as `ahpa prepare` reads training images: its photos may be of
        any size, and it is measured as the training data was made."""
        from ahpa.metrics.detectors import load_detector
        from ahpa.data.listing import default_workers
        from ahpa.metrics.images import check_image_source, folder_source, npz_image_key
        from ahpa.metrics.measurement import check_reference, is_stats_file

        fix = "or set eval.every=0 to train without evaluating"
        if not cfg.detectors:
            raise ValueError(f"eval.every={cfg.every} but eval.detectors is empty: name at least one "
                             f"(eval.detectors=[torchscript:FILE], inception:FILE or dinov2:DIR), {fix}")
        if not cfg.ref:
            raise ValueError(f"eval.every={cfg.every} but eval.ref is empty: name the reference images (.npz or a "
                             f"folder) or their statistics (.npz), {fix}")
        try:
            ref = check_image_source(cfg.ref, "eval.ref")
        except (FileNotFoundError, ValueError) as e:
            raise type(e)(f"{e}: name another, {fix}") from None
        self.cfg, self.device, self.run_dir, self.rank, self.world = cfg, device, run_dir, rank, world
        self._ref_source = folder_source(ref, resolution, default_workers())
        self._detectors = [load_detector(spec, device) for spec in cfg.detectors]
        self._stats_only = is_stats_file(ref) and npz_image_key(ref) is None
        if self._stats_only:  # statistics alone: they must be the detectors' own (as `ahpa eval` checks them)
            for det in self._detectors:
                try:
                    check_reference(ref, det)
                except ValueError as e:
                    raise ValueError(f"eval.ref: {e}") from None
        # where rank 0 keeps each detector's statistics in the run (one key each: a folder's key lists and stats it)
        from ahpa.metrics.reference import stats_file

        cache = run_dir / "eval_ref"
        self._files = [stats_file(self._ref_source, det, cache) for det in self._detectors] if rank == 0 else []
        self.notes = self._remeasure_notes(cache)
        # measured (or read from the run's cache) now, not at the first evaluation: a reference that cannot be read
        # fails before training
        self._load(progress)
        sizes = sorted({r.image_size for r in self._refs if r.image_size is not None})
        if rank == 0 and resolution and sizes and sizes != [(resolution, resolution)]:
            (h, w), side = sizes[0], resolution
            self.notes.append(f"eval.ref holds {h}x{w} images and the samples are {side}x{side}: detectors resize both to "
                              "their input size, so the FD mixes the resolution gap with sample quality (the same gap "
                              "for every run compared)")
        if rank == 0:  # as `ahpa eval` warns after measuring; a run says it before training, where eval.num can change
            from ahpa.metrics.evaluation import rank_deficient

            for det, ref in zip(self._detectors, self._refs):
                if cfg.num <= det.dim:
                    self.notes.append(f"{rank_deficient(cfg.num, 'samples', det.dim, det.name)} (eval.num above "
                                      f"{det.dim} avoids it)")
                if ref.count and ref.count <= det.dim:
                    self.notes.append(f"eval.ref: {rank_deficient(ref.count, 'reference images', det.dim, det.name)}")

    @classmethod
    def for_run(cls, cfg: Config, step: int, device: torch.device, run_dir: Path, rank: int, world: int,
                progress: Callable | None = None) -> "Evaluator | None":
        """The evaluator of a run at `step`, or None when it evaluates nothing: eval.every=0, or a finished run rerun
        to export or sample (its evaluation settings are not held against it), unless it stopped before its last
        evaluation."""
        if not cfg.eval.every:
            return None
        if step >= cfg.train.steps and not last_evaluation_missing(run_dir, step, rank):
            return None
        evaluator = cls(cfg.eval, device, run_dir, rank, world, cfg.data.resolution, progress)
        evaluator.notes += evaluator._setup_notes(eval_setup.describe(cfg))
        return evaluator

    def _setup_notes(self, setup: str) -> list[str]:
        """A resumed run evaluated otherwise than before (eval.* or sample.* changed) says so when it starts: its FD
        curve will mix two ways of measuring (the plots break the line there, and `ahpa compare` names it)."""
        metrics = self.run_dir / "metrics.jsonl"
        if self.rank != 0 or not metrics.is_file():
            return []
        earlier = [r["eval_setup"] for r in read_rows(metrics) if "eval_setup" in r]
        if not earlier or earlier[-1] == setup:
            return []
        return [f"this run's earlier evaluations used {earlier[-1]}; from now on {setup}: its FD curve mixes two ways of "
                "measuring, and points on either side of the change do not compare (resume with the earlier eval.* and "
                "sample.* settings to keep one curve)"]

    def _remeasure_notes(self, cache: Path) -> list[str]:
        """A resumed run whose reference statistics will be measured afresh says so: its earlier evaluations used
        other statistics (the reference changed, or how it is read: a folder at data.resolution since 0.1.0)."""
        if self.rank != 0 or not cache.is_dir() or not any(cache.glob("*.npz")):
            return []
        fresh = [d.name for d, f in zip(self._detectors, self._files) if not f.is_file()]
        return [f"eval.ref is measured afresh for {', '.join(fresh)}: the reference or detector changed since the run's "
                "earlier evaluations, or how this version of ahpa reads them (a folder at data.resolution, as prepare "
                "reads it); metrics.jsonl's earlier eval rows used the earlier statistics"] if fresh else []

    def _load(self, progress: Callable | None = None) -> None:
        from ahpa.metrics.reference import default_cache_dir, load_reference, share_cached

        # statistics given alone are already the cheap form: not copied into the shared cache
        e, cache, shared = self.cfg, self.run_dir / "eval_ref", None if self._stats_only else default_cache_dir()
        # rank 0 fills the reference cache first (from the shared one that `ahpa eval` and other runs fill, when it
        # has them: 50,000 images are measured once per machine, not once per run); the others then read it
        for turn in ((0,), tuple(range(1, self.world))) if self.world > 1 else ((0,),):
            if self.rank in turn:
                self._refs = []
                for i, det in enumerate(self._detectors):
                    theirs = shared / self._files[i].name if self.rank == 0 and shared is not None else None
                    if self.rank == 0:
                        share_cached(self._files[i], theirs)  # theirs -> the run's, when only the shared one has them
                    # a bar, with the number of images of the pass, only when one runs: none for a cached reference
                    bar = functools.partial(progress, f"reference [{det.name}]") if progress is not None else None
                    self._refs.append(load_reference(self._ref_source, det, cache, e.batch, progress=bar))
                    if self.rank == 0:
                        share_cached(self._files[i], theirs)  # the run's -> theirs, when it was measured here
            barrier()

    def missing(self, step: int, last_step: int) -> bool:
        """Whether `step` (a resumed run's) was due an evaluation (every `eval.every` steps, and the last step) that
        metrics.jsonl lacks: the process stopped or died after its checkpoint."""
        due = step > 0 and (step % self.cfg.every == 0 or step == last_step)
        return due and from_main(self.rank == 0 and not logged_at(self.run_dir / "metrics.jsonl", step, "eval/"))

    def share(self) -> int:
        """How many of the evaluation's samples this process generates (a progress bar's total)."""
        return share_count(self.cfg.num, self.cfg.batch, self.rank, self.world)

    def __call__(self, bundle: SamplerBundle, sample_cfg: SampleCfg, on_batch: Callable[[int], None] | None = None,
                 stop: Callable[[], int] | None = None) -> dict[str, float]:
        """`stop`: asked between batches; a reason raises EvaluationStopped."""
        e = self.cfg
        # one set of samples feeds every detector
        return evaluate_fd(bundle, self._detectors, self._refs, e.num, e.seed, sample_cfg, e.batch,
                           rank=self.rank, world_size=self.world, on_batch=on_batch, stop=stop)


def log_evaluation(logger, run_dir: Path, step: int, images: int, fd: dict[str, float], setup: str = "") -> None:
    """One metrics row of `eval/<detector>` values (and `eval_setup`, ahpa.train.eval_setup), and eval.png redrawn from
    metrics.jsonl."""
    row = {"images": images, **{f"eval/{k}": v for k, v in fd.items()}}
    logger.log(step, {**row, "eval_setup": setup} if setup else row)
    plots.eval_curves(run_dir / "metrics.jsonl", run_dir / "eval.png")
