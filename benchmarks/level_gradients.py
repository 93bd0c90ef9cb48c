"""Do the alignment levels pull the backbone in different directions? The gradients of each level's loss.

A router can only matter if the levels disagree: if every level's alignment loss pushes the backbone's weights the
same way, any weighting of them is one direction at a different length, and a learned router has nothing to
choose. This trains a multi-uniform run of a study size (the same config, data and cache as benchmarks/study.py),
then, for one fixed batch at each of several noise levels t, takes the gradient of each level's loss and of the
flow loss with respect to the backbone weights that alignment reaches (embeddings and the blocks up to
align.depth), and reports their pairwise cosines and norms. Also at initialisation (step 0), where the heads
are random.

    python benchmarks/level_gradients.py --size pilot --steps 0,1000 --out docs/study/pilot/level-gradients
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

import benchlib
import study
from ahpa.priors.targets import standardise_levels
from ahpa.train import plots
from ahpa.train.loop import Trainer


def gradients(trainer: Trainer, batch_size: int, ts: list[float], seed: int) -> dict:
    """Per t: the cosine matrix of [flow, level_1..level_K] gradients and their norms (lambda not applied)."""
    p = trainer.parts
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(p.source), generator=g)[:batch_size]
    batch = p.source.fetch(idx, None, None)
    x = p.stats.latent.apply(batch.latent, channel_dim=1)
    eps = torch.randn(x.shape, generator=g)
    targets = standardise_levels(batch.levels, p.levels, p.stats)
    p.model.eval()  # no dropout in SiT; eval only keeps the aligner's running statistics untouched
    p.aligner.eval()
    out = {}
    for t_value in ts:
        t = torch.full((x.shape[0],), t_value)
        x_t, velocity = trainer.path.interpolate(x, eps, t), trainer.path.velocity(x, eps, t)
        pred, hidden = p.model(x_t, t, batch.labels, p.aligner.taps)
        losses = [(pred - velocity).pow(2).mean()]
        level = p.aligner.level_losses(p.aligner.predictions(hidden), targets).mean(dim=0)  # [K]
        losses += list(level)
        params = [w for w in p.model.parameters() if w.requires_grad]
        grads = []
        for i, loss in enumerate(losses):
            gs = torch.autograd.grad(loss, params, retain_graph=i < len(losses) - 1, allow_unused=True)
            grads.append(gs)
        # the weights alignment reaches: those with a gradient from the first level
        reached = [j for j, gj in enumerate(grads[1]) if gj is not None]
        # [1+K, P]; float64, so that the cosines of ~1e5-long vectors carry no visible rounding
        flat = torch.stack([torch.cat([gs[j].flatten() for j in reached]) for gs in grads]).double()
        norms = flat.norm(dim=1)
        # at initialisation the flow loss reaches no block (adaLN-Zero): its cosines are 0 there, its norm 0
        cos = (flat @ flat.T) / (norms[:, None] * norms[None, :]).clamp_min(1e-30)
        out[f"{t_value:g}"] = {"names": ["flow", *p.levels], "cos": cos.tolist(), "norm": norms.tolist(),
                               "loss": [v.item() for v in losses], "params": int(flat.shape[1])}
    return out


def plot(rows: list[dict], path: Path) -> None:
    plt = plots.pyplot()
    ts = list(rows[0]["by_t"])
    fig, axes = plt.subplots(len(rows), len(ts), figsize=(2.6 * len(ts), 2.6 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        for c, t in enumerate(ts):
            cell = row["by_t"][t]
            ax = axes[r][c]
            ax.imshow(cell["cos"], vmin=-1, vmax=1, cmap="RdBu_r")
            n = len(cell["names"])
            ax.set_xticks(range(n), cell["names"], rotation=90, fontsize=7)
            ax.set_yticks(range(n), cell["names"], fontsize=7)
            for i in range(n):
                for j in range(n):
                    ax.text(j, i, f"{cell['cos'][i][j]:.2f}", ha="center", va="center", fontsize=6)
            ax.set_title(f"step {row['step']}, t={t}", fontsize=8)
    fig.suptitle("cosine between gradients on the aligned blocks (flow loss, each level's loss)", fontsize=9)
    plots.save_figure(fig, path)


def parser() -> argparse.ArgumentParser:
    """The command line (tests/test_docs_commands.py reads its flags to check the documented commands)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=("smoke", "pilot", "gpu"), default="pilot")
    ap.add_argument("--method", default="multi-uniform", choices=tuple(study.METHODS))
    ap.add_argument("--steps", default="0,1000", help="comma list of training steps to measure at")
    ap.add_argument("--t", default="0.1,0.3,0.5,0.7,0.9", help="noise levels (t = 1 is noise)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True, help="folder for gradients.json and gradients.png")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", type=Path, help="TAEF2 cache directory (default: the study's per-size folder)")
    return ap


def main() -> None:
    args = parser().parse_args()
    torch.set_num_threads(args.threads)
    size = study.SIZES[args.size]
    steps = sorted(int(s) for s in args.steps.split(","))
    sargs = argparse.Namespace(
        cache=args.cache or study.default_cache(size["resolution"], size["limit"]),
        encoder=f"taef2:{study.SHARED / 'weights/taef2'}", steps=steps[-1], seed=args.seed, compile="off", compile_mode="default",
        device="cpu", align_depth=None, align_weight=None, lr=None, level="stage4", variant=[],
        data=study.SHARED / "data/cifar10/train16k.npz", limit=size["limit"], resolution=size["resolution"],
        grid=size["grid"], workers=2)
    study.ensure_cache(sargs, torch.device("cpu"))
    cfg = study.study_config(sargs, size, args.method)
    run_dir = args.out / "run"
    trainer = Trainer(cfg, run_dir)
    ts = [float(v) for v in args.t.split(",")]
    rows, t0 = [], time.perf_counter()
    for step in steps:
        while trainer.step < step:
            trainer.train_step()
        rows.append({"step": step, "by_t": gradients(trainer, args.batch, ts, args.seed)})
        print(f"step {step}: measured ({time.perf_counter() - t0:.0f} s in)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {**benchlib.device_info(torch.device("cpu")), "command": benchlib.command_line(), "size": args.size,
              "method": args.method, "align_depth": cfg.align.depth, "batch": args.batch, "rows": rows}
    (args.out / "gradients.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(rows, args.out / "gradients.png")
    shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
