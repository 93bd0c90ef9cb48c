"""The study report's "EMA length" subsection (benchmarks/study_report.py writes it): the FD of EMAs of several
lengths, reconstructed after training from a run's post-hoc EMA snapshots (EDM2, Sec. 3; benchmarks/study.py
--ema-lengths), beside the run's own EMA. EDM2 found the best EMA length differs between configurations, so one fixed
EMA may favour some methods; here each method is also compared with vanilla SiT at its own best length.

`series` maps (method, seed) to a run's eval rows in step order (as in study_tables.py); `ema` maps (study, method,
seed, step, ema_sigma) to an "eval_ema" row (one reconstruction, evaluated as the eval rows are) or an "ema_refused"
row (a sigma_rel the snapshots cannot represent, with its reason)."""

from __future__ import annotations

import statistics
from functools import lru_cache
from pathlib import Path

from study_plots import plot_ema_lengths
from study_tables import BASE, fmt

from ahpa.train.ema import ema_sigma_rel

OWN = None  # the column of the run's own EMA, beside the sigma_rel columns


@lru_cache(maxsize=None)
def _sigma(decay: float, warmup: bool, step: int) -> float:
    return ema_sigma_rel(decay, warmup, step)


def run_sigma(row: dict) -> float | None:
    """sigma_rel of the run's own EMA at the row's step, from its config (train.ema_decay, train.ema_warmup): the
    library's EMA counts one update per step. None when the config lacks them (rows made up, or older fields)."""
    cfg = row.get("config", {})
    if cfg.get("train.ema_decay") is None or cfg.get("train.ema_warmup") is None:
        return None
    return _sigma(float(cfg["train.ema_decay"]), bool(cfg["train.ema_warmup"]), int(row["step"]))


def own_label(sigmas: set) -> str:
    known = sorted(s for s in sigmas if s is not None)
    if not known:
        return "run's EMA"
    span = f"{known[0]:.3f}" if known[-1] - known[0] < 5e-4 else f"{known[0]:.3f}–{known[-1]:.3f}"
    return f"run's EMA (σ_rel≈{span})"


def cell(d: list[float]) -> str:
    return f"{statistics.mean(d):+.3f} (" + " / ".join(f"{x:+.3f}" for x in d) + ")"


def ema_section(key: str, series: dict, ema: dict, methods: list[str], metrics: list[str], out: Path) -> list[str]:
    """The subsection for study `key`, empty when it has no post-hoc EMA rows: for each step with reconstructions,
    per metric the FD of each method at the run's EMA and at each sigma_rel (mean over the seeds that have every
    column), then each method minus vanilla SiT paired by seed; the fits' residuals, a check of the reconstruction
    nearest the run's own EMA against it, and the refused sigma_rel."""
    mine = {k[1:]: r for k, r in ema.items() if k[0] == key}
    if not mine:
        return []
    lines = ["### EMA length (post-hoc reconstruction)", "",
             "Each run below also tracked EDM2's power-function EMAs (`train.posthoc_ema`) and, at its last evaluation, "
             "reconstructed from their snapshots the EMA of each σ_rel (EDM2's relative length of the averaging "
             "window; `ahpa.train.posthoc_export.reconstruct`), each evaluated as the run's own EMA is. The run's EMA's "
             "σ_rel is computed from its decay, warm-up and step (`ahpa.train.ema.ema_sigma_rel`). FD, lower is better; "
             "each cell is the mean over the seeds that have every column of the table (n seeds); **bold**: the "
             "method's best σ_rel among the reconstructions.", ""]
    steps = sorted({st for (_, _, st, _), r in mine.items() if r["kind"] == "eval_ema"})
    for step in steps:
        lines += step_tables(key, step, series, mine, methods, metrics, out, plot=step == steps[-1])
    lines += refused_notes(mine)
    return lines


def step_tables(key, step, series, mine, methods, metrics, out, plot) -> list[str]:
    own = {(m, s): r for (m, s), rs in series.items() for r in rs if r["step"] == step}
    recs = {(m, s, sig): r for (m, s, st, sig), r in mine.items() if st == step and r["kind"] == "eval_ema"}
    sigmas = sorted({sig for _, _, sig in recs})
    rows = [m for m in methods if any(k[0] == m for k in recs)]
    rows += sorted({m for m, _, _ in recs} - set(rows))  # a method with reconstructions but no eval row: still shown
    complete, left = {}, []
    for m in rows:
        complete[m] = []
        for s in sorted({s for mm, s, _ in recs if mm == m}):
            missing = [f"σ_rel {sig:g} ({'refused' if mine.get((m, s, step, sig), {}).get('kind') == 'ema_refused' else 'no row'})"
                       for sig in sigmas if (m, s, sig) not in recs]
            if (m, s) not in own:
                missing.insert(0, f"the run's own EMA (no eval row at step {step})")
            if missing:
                left.append(f"{m} seed {s} (lacks {', '.join(missing)})")
            else:
                complete[m].append(s)
    label = own_label({run_sigma(own[(m, s)]) for m in rows for s in complete[m]})
    lines = [f"At step {step} ({len(sigmas)} σ_rel):", ""]
    if left:
        lines += ["Seeds left out of the means (a seed counts only with every column): " + "; ".join(left) + ".", ""]

    def value(m, s, col, metric):
        return (own[(m, s)] if col is OWN else recs[(m, s, col)])["fd"][metric]
    for metric in metrics:
        mean = {m: {c: statistics.mean(value(m, s, c, metric) for s in complete[m]) for c in [OWN, *sigmas]}
                for m in rows if complete[m]}
        best = {m: min(sigmas, key=lambda c: mean[m][c]) for m in mean}  # ties: the shorter EMA
        lines += [f"**{metric}** by EMA length at step {step}:", "",
                  f"| method | n seeds | {label} | " + " | ".join(f"σ_rel {sig:g}" for sig in sigmas) + " | best σ_rel |",
                  "|---|---|---|" + "---|" * len(sigmas) + "---|"]
        for m in rows:
            if m not in mean:
                lines.append(f"| {m} | 0 | — | " + " | ".join("—" for _ in sigmas) + " | — |")
                continue
            cells = [f"**{fmt(mean[m][c])}**" if c == best[m] else fmt(mean[m][c]) for c in sigmas]
            lines.append(f"| {m} | {len(complete[m])} ({', '.join(map(str, complete[m]))}) | {fmt(mean[m][OWN])} | "
                         + " | ".join(cells) + f" | {best[m]:g} |")
        lines.append("")
        if BASE in mean:
            lines += paired_table(metric, step, sigmas, complete, mean, best, value, label)
        if plot and len(sigmas) > 1 and mean:
            name = f"ema-length-{metric}-{key}.png"
            own_at = {m: (run_sigma(own[(m, complete[m][0])]), mean[m][OWN]) for m in mean}
            plot_ema_lengths({m: [mean[m][c] for c in sigmas] for m in mean}, sigmas, own_at, metric, out / name)
            lines += [f"![{metric} against the EMA length]({name})", ""]
    lines += fit_notes(recs, sigmas, own, metrics)
    return lines


def paired_table(metric, step, sigmas, complete, mean, best, value, label) -> list[str]:
    """Each method minus vanilla SiT of the same seed, over the seeds both have complete: at the run's EMA, at each
    sigma_rel, and each at its own best sigma_rel; and which methods' sign against vanilla the choice of length flips."""
    rows, flips = [], []
    for m in (m for m in mean if m != BASE):
        seeds = [s for s in complete[m] if s in complete[BASE]]
        if not seeds:
            continue

        def diff(cm, cb):
            return [value(m, s, cm, metric) - value(BASE, s, cb, metric) for s in seeds]
        at_own, at_best = diff(OWN, OWN), diff(best[m], best[BASE])
        rows.append(f"| {m} | {', '.join(map(str, seeds))} | {cell(at_own)} | "
                    + " | ".join(cell(diff(sig, sig)) for sig in sigmas)
                    + f" | {cell(at_best)} at {best[m]:g} vs {best[BASE]:g} |")
        if (statistics.mean(at_own) < 0) != (statistics.mean(at_best) < 0):
            flips.append(f"{m} ({statistics.mean(at_own):+.3f} → {statistics.mean(at_best):+.3f})")
    if not rows:
        return []
    return [f"**{metric} minus vanilla SiT, paired by seed** at step {step}: a method's FD minus `none`'s of the same "
            f"seed (the seeds both have complete): (a) both at the run's own EMA, (b) both at the same σ_rel, (c) each "
            "at its own best σ_rel, chosen per method from its seed means in the table above (the best of several "
            "lengths, chosen on the evaluation's own samples, is a little optimistic for every method alike). Mean, "
            "then each seed; negative = better than vanilla SiT:", "",
            f"| method | seeds | (a) {label} | " + " | ".join(f"(b) σ_rel {sig:g}" for sig in sigmas)
            + " | (c) each at its best (method vs none) |", "|---|---|---|" + "---|" * len(sigmas) + "---|", *rows, "",
            ("The sign against vanilla SiT changes from (a) to (c) for: " + ", ".join(flips) if flips else
             "No method's sign against vanilla SiT changes from (a) to (c)."), ""]


def fit_notes(recs, sigmas, own, metrics) -> list[str]:
    """The fits' residuals per sigma_rel, and the reconstruction nearest each run's own sigma_rel against that EMA."""
    worst = {sig: max(r["ema_residual"] for (_, _, sg), r in recs.items() if sg == sig) for sig in sigmas}
    snaps = sorted({r.get("ema_snapshots") for r in recs.values()} - {None})
    text = ("Profile residuals of the reconstructions (the fit's relative L2 error of the averaging profile, the bound "
            "on the weights' error; `ahpa.train.posthoc_ema.solve_weights`), largest per σ_rel: "
            + ", ".join(f"{sig:g}: {worst[sig]:.2%}" for sig in sigmas)
            + (f"; from {snaps[0]}" + (f"–{snaps[-1]}" if len(snaps) > 1 else "") + " snapshots" if snaps else "") + ".")
    checks = []  # (metric, |reconstruction - own|, difference, method, seed, nearest sigma, own sigma)
    for (m, s), row in sorted(own.items()):
        theirs = run_sigma(row)
        near = None if theirs is None else min(sigmas, key=lambda sig: abs(sig - theirs))
        if (m, s, near) not in recs:
            continue
        for metric in metrics:
            d = recs[(m, s, near)]["fd"][metric] - row["fd"][metric]
            checks.append((metric, abs(d), d, m, s, near, theirs))
    if checks:
        nears = sorted({(c[5], round(c[6], 3)) for c in checks})
        largest = [max((c for c in checks if c[0] == metric), key=lambda c: c[1]) for metric in metrics
                   if any(c[0] == metric for c in checks)]
        gap = max(abs(a - b) for a, b in nears)
        text += (" Check: the reconstruction nearest each run's own σ_rel ("
                 + ", ".join(f"{a:g} for {b:.3f}" for a, b in nears) + ") minus the run's own EMA, largest |difference| "
                 + ", ".join(f"{c[2]:+.4f} ({c[0]}; {c[3]} seed {c[4]})" for c in largest)
                 + f" over {len({(c[3], c[4]) for c in checks})} runs"
                 + (f": the two lengths differ by up to {gap:.3f}, so they need not agree exactly." if gap >= 0.005
                    else ": the same length, so they should agree up to the residual and the sampling."))
    return [text, ""]


def refused_notes(mine: dict) -> list[str]:
    """The sigma_rel the snapshots could not represent, grouped by (step, sigma_rel), with the first run's reason."""
    groups: dict = {}
    for (m, s, st, sig), r in sorted(mine.items(), key=lambda kv: (kv[0][2], kv[0][3], kv[0][0], kv[0][1])):
        if r["kind"] == "ema_refused":
            groups.setdefault((st, sig), []).append((m, s, r.get("reason", "no reason recorded")))
    if not groups:
        return []
    lines = ["Refused (σ_rel the snapshots cannot represent; not evaluated):", ""]
    for (st, sig), runs in groups.items():
        seeds: dict = {}
        for m, s, _ in runs:
            seeds.setdefault(m, []).append(str(s))
        who = "; ".join(f"{m} seed{'s' if len(v) > 1 else ''} {', '.join(v)}" for m, v in seeds.items())
        reasons = {reason for _, _, reason in runs}
        lines.append(f"- σ_rel {sig:g} at step {st}: {who}. Reason ({runs[0][0]} seed {runs[0][1]}"
                     + (", the others' differ" if len(reasons) > 1 else "") + f"): {runs[0][2]}")
    return lines + [""]


def orphan_notes(ema: dict, keys: set[str]) -> list[str]:
    """Post-hoc EMA rows of study keys without eval rows (whose section would hold them): listed, not lost."""
    runs: dict = {}
    for (k, m, s, st, sig), r in sorted(ema.items()):
        if k not in keys:
            runs.setdefault((k, m, s, st), []).append(f"{sig:g}" + (" refused" if r["kind"] == "ema_refused" else ""))
    if not runs:
        return []
    return ["## Post-hoc EMA rows of studies without evaluation rows", "",
            *(f"- study `{k}`, {m}, seed {s}, step {st}: σ_rel {', '.join(sigs)}" for (k, m, s, st), sigs in runs.items()), ""]
