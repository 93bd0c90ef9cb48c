"""Metrics to JSONL and TensorBoard, and with train.wandb to W&B too (rank 0 only)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ahpa.atomic import atomic_write_text
from ahpa.jsonl import read_rows
from ahpa.train.distributed import all_reduce_mean_


COUNTS = ("overflow_steps",)  # step counts (fp16's forgiven overflows), logged as the window's totals


def add_to_window(sums: dict[str, torch.Tensor], metrics: dict[str, torch.Tensor]) -> None:
    """Adds a step's metrics to its log window's sums, in place. The window's first step starts them (0 + value: new
    tensors, the sums' own); each later step with the same metrics is one foreach add, a kernel or a few on a GPU where
    one add per metric was a kernel each, every step. The same sums either way: each is the same additions."""
    if sums and sums.keys() == metrics.keys():
        torch._foreach_add_(list(sums.values()), [metrics[k] for k in sums])
        return
    for k, v in metrics.items():
        sums[k] = sums.get(k, 0) + v


def window_means(sums: dict[str, torch.Tensor]) -> tuple[dict, float]:
    """A log window's metric sums -> (their means over the window's good steps, the number of good steps),
    averaged across processes. `sums["good_steps"]` counts the good steps; the others are sums of per-step
    metrics that skipped steps left at zero, except the COUNTS, which are the window's totals. A window whose every
    step was skipped has no means: its row holds the COUNTS alone (a loss of 0 would be drawn and plotted as one).
    One collective and a host sync, at the end of a log window only (the loop reads its skipped-step counters there
    too, already computed; under several processes a stop signal is voted on every 10 steps without a wait,
    schedule.stop_agreed)."""
    sums = dict(sums)
    good = sums.pop("good_steps")
    flat = torch.cat([v.reshape(-1).float() for v in sums.values()] + [good.reshape(1).float()])
    values = all_reduce_mean_(flat).tolist()
    n_good, row, at = values[-1], {}, 0
    for k, v in sums.items():
        if k in COUNTS or n_good >= 0.5:  # n_good: a count, averaged over processes that agree on it
            avg = [x / (1 if k in COUNTS else n_good) for x in values[at : at + v.numel()]]
            row[k] = avg if v.ndim else avg[0]
        at += v.numel()
    return row, n_good


def truncate_jsonl(path: Path, step: int) -> None:
    """On resume: drop rows logged after the checkpoint we resume from (they will be redone)."""
    if not path.exists():
        return
    keep = [row for row in read_rows(path) if row.get("step", 0) <= step]
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in keep))


def logged_at(path: Path, step: int, prefix: str) -> bool:
    """Whether a row of `step` holds a metric whose name starts with `prefix` (e.g. an evaluation's "eval/")."""
    if not path.exists():
        return False
    return any(r.get("step") == step and any(k.startswith(prefix) for k in r) for r in read_rows(path))


def scalars(row: dict) -> dict[str, float]:
    """A metrics row's scalars as TensorBoard and W&B get them: its numbers (not the step or the images count; not
    text, e.g. eval_setup), and the per-level losses as align/level_loss/<level>."""
    out = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k not in ("step", "images")}
    if isinstance(row.get("align/level_loss"), list) and "level_names" in row:
        out.update({f"align/level_loss/{name}": x for name, x in zip(row["level_names"], row["align/level_loss"])})
    return out


class MetricsLogger:
    def __init__(self, run_dir: Path, resume_step: int = 0, wandb=None):
        """`resume_step`: the checkpoint the run resumes from. What was logged after it will be logged again, so it
        is dropped from metrics.jsonl and hidden from TensorBoard (purge_step), which would otherwise draw those
        steps twice. `wandb`: the run's ahpa.train.wandb_sink.WandbRun (train.wandb), which gets what TensorBoard
        gets (the steps a resume redoes: as that module says)."""
        self.wandb = wandb
        self.path = run_dir / "metrics.jsonl"
        truncate_jsonl(self.path, resume_step)
        self.writer = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step + 1 if resume_step else None)
        except ImportError:  # tensorboard is a dependency, but keep the JSONL working without it
            self.writer = None

    def log(self, step: int, row: dict) -> None:
        row = {"step": step, **row}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        values = scalars(row)
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(step, values)

    def image(self, tag: str, png: Path, step: int) -> None:
        """A written plot or sample grid, also in TensorBoard's images tab (and W&B's media)."""
        if self.wandb is not None:
            self.wandb.image(tag, png, step)
        if self.writer is not None:
            import numpy as np
            from PIL import Image

            with Image.open(png) as im:
                self.writer.add_image(tag, np.asarray(im.convert("RGB")), step, dataformats="HWC")

    def close(self, failed: bool = False) -> None:
        """`failed`: the training raised (W&B marks its run failed)."""
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.close(failed)
