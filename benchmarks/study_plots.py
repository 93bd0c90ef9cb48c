"""The study report's figures (benchmarks/study_report.py): FD curves, per-level losses, step times, router maps,
the learning-rate sweep, FD against the EMA length; every PNG stored with a palette (`compact_png`)."""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

from ahpa.train.plots import pyplot, save_figure


def seed_sets(series, methods: list[str]) -> tuple[dict[str, list[int]], bool]:
    """The seeds each method's FD curve is the mean over: the seeds every method has, so that no curve differs from
    another by which seeds it averages (a second seed of some methods would move their curves alone); without a seed
    common to all, each method's own seeds, and False (the curves are then not comparable as means)."""
    own = {m: sorted(s for mm, s in series if mm == m) for m in methods}
    common = sorted(set.intersection(*(set(v) for v in own.values()))) if own else []
    return ({m: common for m in methods}, True) if common else (own, False)


def mean_curve(series, metric: str, method: str, seeds: list[int]) -> tuple[list[int], list[float]]:
    """(images, mean FD over `seeds`) at each step all of those seeds reached."""
    by = [{r["step"]: r for r in series[(method, s)]} for s in seeds]
    steps = sorted(set.intersection(*(set(b) for b in by)))
    return [by[0][s]["images"] for s in steps], [statistics.mean(b[s]["fd"][metric] for b in by) for s in steps]


def plot_fd(series, metric: str, batch: int, path: Path, methods: list[str]) -> None:
    """One line per method, the mean over the seeds of `seed_sets`; each seed's own curve faint beside it when the
    mean is over several seeds, or when the method has seeds outside the mean."""
    plt = pyplot()
    chosen, common = seed_sets(series, methods)
    labels, faint = [], False
    for m in methods:
        others = [s for mm, s in sorted(series) if mm == m and s not in chosen[m]]
        labels.append(f"{m} (seed{'s' if len(chosen[m]) > 1 else ''} {', '.join(map(str, chosen[m]))}"
                      + (f"; {', '.join(map(str, others))} faint)" if others else ")"))
    # the legend sits right of the axes: the figure widens with its longest label (~0.055 in per character at 7 pt)
    fig, ax = plt.subplots(figsize=(5.5 + 0.055 * max(map(len, labels), default=0), 4.5))
    for i, (m, label) in enumerate(zip(methods, labels)):
        colour, style = f"C{i % 10}", ("-", "--", ":", "-.")[i // 10 % 4]  # the colour cycle repeats after 10
        ax.plot(*mean_curve(series, metric, m, chosen[m]), marker="o", color=colour, linestyle=style, label=label)
        own = [s for mm, s in sorted(series) if mm == m]
        if len(own) > 1:
            faint = True
            for s in own:
                ax.plot(*mean_curve(series, metric, m, [s]), color=colour, linestyle=style, linewidth=0.8, alpha=0.35)
    ax.set_xlabel("training images seen")
    seeds = chosen[methods[0]] if methods else []
    ax.set_ylabel(f"{metric}, " + (("mean over seeds " if len(seeds) > 1 else "seed ") + ", ".join(map(str, seeds))
                                   if common else "mean over each method's own seeds"))
    notes = ([] if common else ["no seed common to every method: means over different seeds (the paired tables "
                                "compare seed with seed)"]) + (["faint: each seed alone"] if faint else [])
    if notes:
        ax.set_title("; ".join(notes), fontsize=8)
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
    # one panel per run: a pilot's grid of 40 panels at 100 dpi was ~0.4 MB paletted, and the docs travel with
    # every device call (64 MiB with the study's inputs, benchmarks/study_gpu_job.sh)
    save_figure(fig, path, dpi=72)
    return True


def plot_speed(runs: dict, key: str, path: Path, methods: list[str]) -> None:
    """Median steady ms per step of each method over its runs: horizontal bars, so that long labels (a method with
    its variants) stay readable, each with its value."""
    plt = pyplot()
    per = defaultdict(list)
    for (k, m, _), r in runs.items():
        if k == key:
            per[m].append(r["ms_per_step_steady"])
    names = [m for m in methods if m in per]
    ms = [statistics.median(per[m]) for m in names]
    # the labels sit left of the bars: the figure widens with the longest (~0.065 in per character at 8 pt)
    fig, ax = plt.subplots(figsize=(4 + 0.065 * max(map(len, names), default=0), 0.35 * len(names) + 1.2))
    bars = ax.barh(range(len(names)), ms)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()  # the report's method order, top to bottom
    ax.bar_label(bars, [f"{v:.1f}" for v in ms], fontsize=7, padding=2)
    ax.set_xlabel("ms per step (median over runs)")
    ax.set_xlim(0, max(ms, default=1) * 1.15)  # room for the values
    save_figure(fig, path, dpi=100)


def plot_router(rows: list[dict], path: Path, title: str) -> None:
    plt = pyplot()
    # constrained layout: it leaves the shared colourbar its room, which tight_layout cannot
    fig, axes = plt.subplots(1, len(rows), figsize=(3.2 * len(rows) + 0.6, 0.35 * len(rows[0]["router"]["levels"]) + 1.8),
                             squeeze=False, layout="constrained")
    for ax, r in zip(axes[0], rows):
        rt = r["router"]
        t, w = np.array(rt["t"]), np.array(rt["weights"])  # [T], [T, K]
        im = ax.imshow(w.T, aspect="auto", origin="lower", extent=(t[0], t[-1], -0.5, len(rt["levels"]) - 0.5),
                       vmin=0, vmax=1, cmap="viridis")
        ax.set_yticks(range(len(rt["levels"])), rt["levels"], fontsize=7)
        ax.set_xlabel("t (0 data, 1 noise)", fontsize=8)
        ax.set_title(f"step {r['step']} ({rt['mode']})", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.colorbar(im, ax=list(axes[0]), label="weight g_k(t)", fraction=0.03, pad=0.02)
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


def plot_ema_lengths(means: dict, sigmas: list[float], own: dict, metric: str, path: Path) -> None:
    """FD against the EMA's sigma_rel, one line per method ({method: mean FD at each of `sigmas`}), each method's own
    EMA an open marker of its colour at its sigma_rel ({method: (sigma_rel or None, mean FD)}; None: not drawn)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5 + 0.055 * max(map(len, means), default=0), 4))
    for i, (m, fds) in enumerate(means.items()):
        colour, style = f"C{i % 10}", ("-", "--", ":", "-.")[i // 10 % 4]
        ax.plot(sigmas, fds, marker="o", color=colour, linestyle=style, label=m)
        if own[m][0] is not None:
            ax.plot([own[m][0]], [own[m][1]], marker="D", markerfacecolor="none", color=colour, linestyle="none")
    ax.set_xlabel("EMA length sigma_rel (diamond: the run's own EMA)")
    ax.set_ylabel(f"{metric}, mean over the table's seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    save_figure(fig, path, dpi=100)
