"""Guided evaluation in the convergence study: `study.py --eval-cfg` and its section of the report.

The protocol measures FD without guidance (Euler, 50 steps, cfg 1), where a model's own distribution shows. The DiT,
SiT and REPA tables quote FID with classifier-free guidance, which trades diversity for fidelity and can shrink or
grow a training method's gain. `--eval-cfg 1.5,1.8@0.7` therefore also evaluates the final EMA with guidance scale
1.5 over the whole trajectory and 1.8 for t <= 0.7 only (REPA's interval; t = 1 is noise), on the same samples' seeds
as the unguided row. Each is a row of kind `eval_cfg` keyed by its scale and interval, so that a reader of the run's
own rows ("eval") never takes one for them; the run's training, its own rows and its study key are unchanged.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections import defaultdict

from study_tables import BASE, fmt


def guidance_list(text: str) -> list[tuple[float, float]]:
    """--eval-cfg's value: comma-separated SCALE or SCALE@HIGH (guided for t <= HIGH only), each scale > 1 and HIGH in
    (0, 1]; e.g. 1.5,1.8@0.7 -> [(1.5, 1.0), (1.8, 0.7)]."""
    out = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        scale, _, high = item.partition("@")
        try:
            pair = (float(scale), float(high) if high else 1.0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r}: expected SCALE or SCALE@HIGH, e.g. 1.5 or 1.8@0.7") from None
        if not pair[0] > 1 or not 0 < pair[1] <= 1:
            raise argparse.ArgumentTypeError(f"{item!r}: a guidance scale is above 1 (1 is no guidance) and the "
                                             "interval's upper end HIGH in (0, 1]")
        out.append(pair)
    if not out:
        raise argparse.ArgumentTypeError(f"{text!r}: no guidance scale given")
    return out


def label(scale: float, high: float) -> str:
    return f"cfg {scale:g}" + ("" if high == 1 else f", t <= {high:g}")


def guided_rows(bundle, evaluate, args, detectors, refs, scfg):
    """One eval_cfg row per (scale, high) of --eval-cfg: FD of the bundle's samples under that guidance, same seeds as
    the unguided evaluation (`evaluate` is study.py's one-pass FD over several detectors)."""
    for scale, high in args.eval_cfg:
        t0 = time.perf_counter()
        guided = dataclasses.replace(scfg, cfg_scale=scale, guidance_low=0.0, guidance_high=high)
        fd = evaluate(bundle, detectors, refs, args.eval_num, args.eval_batch, guided)
        eval_s = time.perf_counter() - t0
        print(f"  {label(scale, high)}: " + ", ".join(f"{k} {v:.4f}" for k, v in fd.items()) + f" (eval {eval_s:.1f} s)",
              flush=True)
        yield {"kind": "eval_cfg", "cfg_scale": scale, "guidance_interval": [0.0, high], "fd": fd,
               "eval_s": round(eval_s, 2)}


def guided_key(row: dict) -> tuple:
    """The key of an eval_cfg row: (study, method, seed, step, scale, interval's upper end)."""
    return (row["study"], row["method"], row["seed"], row["step"], row["cfg_scale"], row["guidance_interval"][1])


def cfg_section(key: str, series: dict, guided: dict, methods: list[str], metrics: list[str]) -> list[str]:
    """The report's "With classifier-free guidance" section for study `key`: FD per method (mean over seeds) unguided
    and under each guidance evaluated, then each method minus vanilla SiT of the same seed; [] without eval_cfg rows."""
    mine = {k: r for k, r in guided.items() if k[0] == key}
    if not mine:
        return []
    unguided = {(m, s): {r["step"]: r for r in rs} for (m, s), rs in series.items()}
    lines = ["### With classifier-free guidance", "",
             "The final EMA also evaluated with guidance (`study.py --eval-cfg`; same samples' seeds as the unguided "
             "column, guided for t in the interval given; t = 1 is noise), mean over the seeds listed:", ""]
    for step in sorted({k[3] for k in mine}):
        columns = sorted({(k[4], k[5]) for k in mine if k[3] == step})
        for metric in metrics:
            lines += [f"**{metric}** at step {step}:", "",
                      "| method | seeds | no guidance | " + " | ".join(label(*c) for c in columns) + " |",
                      "|---|---|---|" + "---|" * len(columns)]
            values = defaultdict(dict)  # (method, column or None) -> {seed: fd}
            for (_, m, seed, at, scale, high), r in mine.items():
                if at == step:
                    values[(m, (scale, high))][seed] = r["fd"][metric]
                    own = unguided.get((m, seed), {}).get(step)
                    if own is not None:
                        values[(m, None)][seed] = own["fd"][metric]
            for m in (m for m in methods if any(k[0] == m for k in values)):
                seeds = sorted(set().union(*(values[(m, c)] for c in [None, *columns])))
                cells = [_mean(values[(m, c)], seeds) for c in [None, *columns]]
                lines.append(f"| {m} | {', '.join(map(str, seeds))} | " + " | ".join(cells) + " |")
            lines.append("")
            if BASE in methods:
                lines += _paired(values, methods, columns, metric, step)
    return lines


def _mean(by_seed: dict, seeds: list) -> str:
    if not by_seed:
        return "—"
    missing = [s for s in seeds if s not in by_seed]
    return fmt(statistics.fmean(by_seed.values())) + (f" (no seed {', '.join(map(str, missing))})" if missing else "")


def _paired(values: dict, methods: list[str], columns: list, metric: str, step: int) -> list[str]:
    """Each method minus vanilla SiT of the same seed (runs of one seed share initial weights, batches and noise), mean
    over the seeds both have, and how many of them favour the method."""
    lines = [f"{metric} minus vanilla SiT of the same seed at step {step} (negative: the method is ahead; mean, and "
             "the seeds where it is ahead):", "",
             "| method | no guidance | " + " | ".join(label(*c) for c in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for m in (m for m in methods if m != BASE and any(k[0] == m for k in values)):
        cells = []
        for c in [None, *columns]:
            mine, base = values.get((m, c), {}), values.get((BASE, c), {})
            seeds = sorted(set(mine) & set(base))
            d = [mine[s] - base[s] for s in seeds]
            cells.append(f"{statistics.fmean(d):+.3f} ({sum(x < 0 for x in d)}/{len(d)})" if d else "—")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines + [""]
