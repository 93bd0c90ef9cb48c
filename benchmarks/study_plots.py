"""The study report's figures (benchmarks/study_report.py): FD curves, per-level losses, step times, router maps,
the learning-rate sweep; every PNG stored with a palette (`compact_png`)."""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

from ahpa.train.plots import pyplot, save_figure


def plot_fd(series, metric: str, batch: int, path: Path, methods: list[str]) -> None:
    """One line per method: the mean over its seeds at each step all of them reached."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, m in enumerate(methods):
        runs = [rs for (mm, _), rs in sorted(series.items()) if mm == m]
        steps = sorted(set.intersection(*({r["step"] for r in rs} for rs in runs)))
        by = [{r["step"]: r for r in rs} for rs in runs]
        ax.plot([by[0][s]["images"] for s in steps], [statistics.mean(b[s]["fd"][metric] for b in by) for s in steps],
                marker="o", linestyle=("-", "--", ":", "-.")[i // 10 % 4],  # the colour cycle repeats after 10
                label=f"{m} ({len(runs)} seed{'s' if len(runs) > 1 else ''})")
    ax.set_xlabel("training images seen")
    ax.set_ylabel(f"{metric}, mean over seeds")
    values = [r["fd"][metric] for rs in series.values() for r in rs]
    if min(values) > 0 and max(values) / min(values) > 3:  # long curves span decades; short ones read better linear
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    save_figure(fig, path, dpi=110)


def plot_levels(series, batch: int, path: Path, methods: list[str]) -> bool:
    aligned = sorted(((k, rs) for k, rs in series.items() if rs[0]["levels"]), key=lambda kv: (methods.index(kv[0][0]), kv[0][1]))
    if not aligned:
        return False
    plt = pyplot()
    cols = min(4, len(aligned))
    rows = -(-len(aligned) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(aligned):]:
        ax.axis("off")
    for ax, ((m, seed), rs) in zip(axes.flat, aligned):
        rs = [r for r in rs if "align/level_loss" in r["metrics"]]  # a run with align.stop_step has none after it
        x = [r["images"] for r in rs]
        losses = np.array([r["metrics"]["align/level_loss"] for r in rs]).reshape(len(rs), -1)  # [points, K]
        for k, name in enumerate(rs[0]["levels"]):
            ax.plot(x, losses[:, k], marker=".", label=name)
        ax.set_title(f"{m} (seed {seed})", fontsize=8)
        ax.set_xlabel("images")
        ax.set_ylabel("level loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path, dpi=100)
    return True


def plot_speed(runs: dict, key: str, path: Path, methods: list[str]) -> None:
    plt = pyplot()
    per = defaultdict(list)
    for (k, m, _), r in runs.items():
        if k == key:
            per[m].append(r["ms_per_step_steady"])
    names = [m for m in methods if m in per]
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.bar(names, [statistics.median(per[m]) for m in names])
    ax.set_ylabel("ms per step")
    ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    save_figure(fig, path, dpi=100)


def plot_router(rows: list[dict], path: Path, title: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(rows), figsize=(3.2 * len(rows), 0.35 * len(rows[0]["router"]["levels"]) + 1.8),
                             squeeze=False)
    for ax, r in zip(axes[0], rows):
        rt = r["router"]
        t, w = np.array(rt["t"]), np.array(rt["weights"])  # [T], [T, K]
        ax.imshow(w.T, aspect="auto", origin="lower", extent=(t[0], t[-1], -0.5, len(rt["levels"]) - 0.5),
                  vmin=0, vmax=1, cmap="viridis")
        ax.set_yticks(range(len(rt["levels"])), rt["levels"], fontsize=7)
        ax.set_xlabel("t (0 data, 1 noise)", fontsize=8)
        ax.set_title(f"step {r['step']} ({rt['mode']})", fontsize=8)
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path, dpi=100)


def compact_png(path: Path) -> bool:
    """Rewrite a full-colour PNG with a 256-colour palette (about 3x smaller for these plots and sample grids).
    The docs travel with every device call, whose payload is limited to 64 MiB with the study's 54 MB of inputs
    (benchmarks/study_gpu_job.sh). Already-paletted files are left as they are."""
    with Image.open(path) as im:
        if im.mode == "P":
            return False
        small = im.convert("RGB").quantize(256)
    small.save(path, optimize=True)
    return True


def plot_sweep(curves: dict, metric: str, path: Path) -> None:
    """FD against training steps, one line per learning rate ({lr: {step: eval row}})."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for lr, by_step in sorted(curves.items()):
        steps = sorted(by_step)
        ax.plot(steps, [by_step[s]["fd"][metric] for s in steps], marker="o", label=f"lr {lr:g}")
    ax.set_xlabel("training step")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path, dpi=100)
