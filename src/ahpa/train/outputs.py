"""A run's outputs besides checkpoints: sample grids, router plots, Fréchet evaluations, the export and
the closing plots and DONE marker.

Each writer takes the full (unsharded) modules it needs; the loop decides which processes call it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import torch

from ahpa.align.objective import Aligner
from ahpa.align.router import check_weights
from ahpa.atomic import atomic_write_text
from ahpa.config import Config, EvalCfg, SampleCfg
from ahpa.data.class_names import class_names
from ahpa.models.sit import SiT
from ahpa.priors.targets import ChannelStats
from ahpa.sample import SamplerBundle, export_model, generate
from ahpa.train import eval_setup, plots
from ahpa.train.distributed import barrier, from_main
from ahpa.jsonl import read_rows
from ahpa.train.logger import logged_at

GRID_SEED = 1234


def write_samples(bundle: SamplerBundle, cfg: SampleCfg, run_dir: Path, step: int,
                  on_batch: Callable[[int], None] | None = None) -> Path:
    """A class-ordered grid of `cfg.grid_images` samples: samples/step_N.png, copied to samples.png.

    Generated sample.micro_batch images at a time, so that `on_batch(n)` can show progress (a grid is minutes on a
    CPU); each image's noise is its own (seed, index), and every network call has the micro-batch's shape either way.
    """
    n, k = cfg.grid_images, bundle.num_classes
    labels = torch.arange(n) % k
    chunks = []
    for lo in range(0, n, cfg.micro_batch):
        hi = min(lo + cfg.micro_batch, n)
        chunks.append(generate(bundle, list(range(lo, hi)), labels[lo:hi], GRID_SEED, cfg))
        if on_batch is not None:
            on_batch(hi - lo)
    images = torch.cat(chunks)  # uint8 [n, H, W, 3]
    out = plots.save_grid(images.numpy(), run_dir / "samples" / f"step_{step:09d}.png", nrow=plots.class_columns(k))
    shutil.copyfile(out, run_dir / "samples.png")  # the latest grid, under a fixed name
    return out


def write_router_plot(aligner: Aligner, run_dir: Path, step: int) -> Path:
    """The router's weights against t: a row of router.jsonl and plots/router_N.png, copied to router.png."""
    t, w = aligner.router_table()
    row = {"step": step, "t": t.tolist(), "weights": w.tolist(), "levels": aligner.levels}
    with open(run_dir / "router.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    title = f"router ({aligner.router.mode}) at step {step}"
    out = plots.router_heatmap(t.numpy(), w.numpy(), aligner.levels, run_dir / "plots" / f"router_{step:09d}.png", title)
    out = Path(shutil.copyfile(out, run_dir / "router.png"))
    # a learned mode is checked at its uniform start when built; its trained weights here (after the checkpoint: a
    # registered post-processing that forgets to renormalise stops the run with its plot and a resumable checkpoint)
    check_weights(aligner.router.mode, t, w)
    return out


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
                    tick = progress(f"reference [{det.name}]", None) if progress is not None else None
                    self._refs.append(load_reference(self._ref_source, det, cache, e.batch, on_batch=tick))
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
        from ahpa.train.evaluate import rank_share

        return rank_share(self.cfg.num, self.cfg.batch, self.rank, self.world)

    def __call__(self, bundle: SamplerBundle, sample_cfg: SampleCfg, on_batch: Callable[[int], None] | None = None,
                 stop: Callable[[], int] | None = None) -> dict[str, float]:
        """`stop`: asked between batches; a reason raises ahpa.train.evaluate.EvaluationStopped."""
        from ahpa.train.evaluate import evaluate_fd

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


def export(path: str | Path, ema: SiT, latent_stats: ChannelStats, encoder, cfg: Config) -> Path:
    """The EMA backbone alone as a plain SiT (.safetensors, with what sampling needs in its metadata, and the run's
    sampler settings: sampling the export draws what sampling the run draws)."""
    return export_model(path, ema, latent_stats, encoder.spec, cfg.transport.path, cfg.data.resolution,
                        getattr(encoder, "weights_sha256", None), cfg.train.label_dropout, class_names(cfg.data),
                        cfg.sample)


def finish(run_dir: Path, levels: list[str], step: int) -> None:
    """The closing loss curves, then DONE (written last: its presence means the run completed)."""
    if (run_dir / "metrics.jsonl").exists():
        plots.loss_curves(run_dir / "metrics.jsonl", run_dir / "losses.png", levels)
    atomic_write_text(run_dir / "DONE", json.dumps({"step": step}) + "\n")
