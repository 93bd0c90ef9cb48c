"""A run's outputs besides checkpoints and evaluations (ahpa.train.evaluate): sample grids, router plots, the export
and the closing plots and DONE marker.

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
from ahpa.config import Config, SampleCfg
from ahpa.data.class_names import class_names
from ahpa.models.sit import SiT
from ahpa.priors.targets import ChannelStats
from ahpa.sample import SamplerBundle, export_model, generate
from ahpa.train import plots

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


def export(path: str | Path, ema: SiT, latent_stats: ChannelStats, encoder, cfg: Config,
           posthoc: dict | None = None) -> Path:
    """The EMA backbone alone as a plain SiT (.safetensors, with what sampling needs in its metadata, and the run's
    sampler settings: sampling the export draws what sampling the run draws); `posthoc` describes an EMA
    reconstructed after training (ahpa.train.posthoc_export.Reconstruction.metadata)."""
    return export_model(path, ema, latent_stats, encoder.spec, cfg.transport.path, cfg.data.resolution,
                        getattr(encoder, "weights_sha256", None), cfg.train.label_dropout, class_names(cfg.data),
                        cfg.sample, posthoc)


def finish(run_dir: Path, levels: list[str], step: int) -> None:
    """The closing loss curves, then DONE (written last: its presence means the run completed)."""
    if (run_dir / "metrics.jsonl").exists():
        plots.loss_curves(run_dir / "metrics.jsonl", run_dir / "losses.png", levels)
    atomic_write_text(run_dir / "DONE", json.dumps({"step": step}) + "\n")
