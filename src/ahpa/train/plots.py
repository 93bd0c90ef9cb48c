"""Pictures of a run: sample grids, the router's weights against t, loss curves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ahpa.jsonl import read_rows
from ahpa.train import eval_setup


def save_grid(images: np.ndarray, path: str | Path, nrow: int | None = None, pad: int = 2) -> Path:
    """uint8 [N, H, W, 3] -> one PNG grid (images under 64 pixels enlarged by a whole factor)."""
    n, h, w, _ = images.shape
    if h < 64:  # small images (CIFAR's 32, a tiny run's 16) at 1:1 are too small to judge: nearest-neighbour, whole
        k = -(-64 // h)
        images = images.repeat(k, axis=1).repeat(k, axis=2)  # [N, kH, kW, 3]
        n, h, w, _ = images.shape
    nrow = nrow or int(np.ceil(np.sqrt(n)))
    ncol = int(np.ceil(n / nrow))
    canvas = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad, 3), 255, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, nrow)
        canvas[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = img
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(path)
    return path


def class_columns(classes: int) -> int | None:
    """Images per row of a grid of class-balanced samples (sample i has class i mod `classes`): a multiple of the
    classes, so that each column holds one class, and at least 8 where that fits in 16 (2 classes: 8 columns, not a
    strip 2 wide); None (a square grid) for more than 16 classes."""
    if classes > 16:
        return None
    return max(classes, 1) * -(-8 // max(classes, 1))


def columns_note(names: list[str]) -> str:
    """Which class each column of a class-balanced grid (class_columns) holds, said beside the grid's path: the image
    itself names none. '' for one class, and for more than 16, whose grid is square."""
    wide = class_columns(len(names))
    if len(names) < 2 or wide is None:
        return ""
    again = f", {wide // len(names)} times along each row" if wide > len(names) else ""
    return f"; its columns, left to right: {', '.join(names)}{again}"


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed), imported when first drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Lay out (unless the figure has a layout engine of its own), write and close a figure (closing frees it: long
    runs draw many)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


def router_heatmap(t: np.ndarray, weights: np.ndarray, names: list[str], path: str | Path, title: str = "") -> Path:
    """weights [T, K] of the router for t [T] (0 = data, 1 = noise)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(names) + 1.6))
    im = ax.imshow(weights.T, aspect="auto", origin="lower", extent=(t[0], t[-1], -0.5, len(names) - 0.5), vmin=0, vmax=1, cmap="viridis")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("t (0 = data, 1 = noise)")
    ax.set_title(title or "router weight per level")
    fig.colorbar(im, ax=ax, label="g_k(t)")
    return save_figure(fig, path)


def loss_curves(metrics_file: str | Path, path: str | Path, level_names: list[str] | None = None) -> Path:
    """Flow and alignment losses (and per-level losses) against images seen, from metrics.jsonl."""
    rows = read_rows(metrics_file)
    rows = [r for r in rows if "loss/flow" in r]
    plt = pyplot()
    leveled = [r for r in rows if "align/level_loss" in r]
    # vanilla SiT has no per-level losses: one panel, not an empty second one
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6)) if leveled else plt.subplots(1, 1, figsize=(6, 3.6))
    axes = axes if leveled else [axes]
    x = [r["images"] for r in rows]
    axes[0].plot(x, [r["loss/flow"] for r in rows], label="flow")
    # alignment rows end where align.stop_step ends alignment
    aligned = [r for r in rows if "loss/align" in r]
    if aligned:
        axes[0].plot([r["images"] for r in aligned], [r["loss/align"] for r in aligned], label="align (weighted)")
    axes[0].set_xlabel("training images")
    axes[0].set_yscale("log")
    axes[0].legend()
    axes[0].set_title("losses")
    if leveled:
        per = np.array([r["align/level_loss"] for r in leveled])  # [T, K]
        for k in range(per.shape[1]):
            axes[1].plot([r["images"] for r in leveled], per[:, k], label=(level_names or [str(i) for i in range(per.shape[1])])[k])
        axes[1].legend(fontsize=8)
        axes[1].set_title("per-level alignment loss")
        axes[1].set_xlabel("training images")
    return save_figure(fig, path)


def eval_curves(metrics_file: str | Path, path: str | Path) -> Path:
    """Each eval/* metric against training images seen; where a resume changed how the run is evaluated (the rows'
    eval_setup), the line breaks, and each later part is named by what changed."""
    rows = [r for r in read_rows(metrics_file) if any(k.startswith("eval/") for k in r)]
    names = sorted({k for r in rows for k in r if k.startswith("eval/")})
    first = rows[0].get("eval_setup", "") if rows else ""
    series: dict[str, list[tuple[float, float]]] = {}
    for name in names:
        for r in rows:
            if name in r:
                setup = r.get("eval_setup", first)
                changed = eval_setup.changed(setup, first)
                series.setdefault(f"{name[len('eval/'):]}{f' [{changed}]' if changed else ''}", []).append(
                    (r["images"], r[name]))
    # one line has no legend (line_plot draws one for several): the title names what it measures (FD-r20, FID)
    title = next(iter(series)) if len(series) == 1 else ""
    return line_plot(series, path, "training images", "Fréchet distance", title=title, figsize=(6, 3.6))


def line_plot(series: dict[str, list[tuple[float, float]]], path: str | Path, xlabel: str, ylabel: str,
              title: str = "", logy: bool = False, markers: bool = True, figsize: tuple[float, float] = (7, 4),
              highlight: str = "", faint: dict[str, list[list[tuple[float, float]]]] | None = None) -> Path:
    """One line per named series of (x, y) points (a run's evaluations; one per run in `ahpa compare`). Ten colours,
    then the same ten dashed, dotted, ...: no two lines alike; `highlight` (the baseline) in black, on top. `faint`:
    more series of a name (the seeds a mean is over), drawn thin and pale in its style. The legend sits beside the
    axes, where it hides no line."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=figsize)
    colours, dashes = plt.rcParams["axes.prop_cycle"].by_key()["color"], ["-", "--", ":", "-."]
    for i, (name, pts) in enumerate(series.items()):
        style = dict(color="black", linewidth=2.2, zorder=3) if name == highlight else dict(
            color=colours[i % len(colours)], linestyle=dashes[(i // len(colours)) % len(dashes)], linewidth=1.3)
        for seed in (faint or {}).get(name, []):
            ax.plot([p[0] for p in seed], [p[1] for p in seed], **{**style, "linewidth": 0.8, "alpha": 0.35, "zorder": 1})
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if markers else None, markersize=3,
                label=f"{name} (baseline)" if name == highlight else name, **style)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        from matplotlib.ticker import FormatStrFormatter

        ax.set_yscale("log")
        for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):  # 1.95, not 1.95x10^0
            axis(FormatStrFormatter("%g"))
    if title:
        ax.set_title(title)
    if len(series) > 1:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    return save_figure(fig, path)
