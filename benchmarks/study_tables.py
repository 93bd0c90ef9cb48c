"""The study report's comparisons of runs within one study key (benchmarks/study_report.py writes them): each method
against vanilla SiT and against its baselines at equal steps, the speed-up read off the FD curves (in steps and in
FLOPs), the footnotes for windows of skipped steps, and the compiled evaluation's check. Pure functions of the eval
rows: `series` maps (method, seed) to that run's eval rows in step order."""

from __future__ import annotations

import statistics

from ahpa.compare import images_to_reach
from study_setup import METHODS as TABLE

BASE = "none"  # the method the report's paired sections set every other beside


def fmt(x: float | None, nd: int = 3) -> str:
    return "—" if x is None else f"{x:.{nd}f}"


def skipped_before(rs: list[dict], r: dict) -> str:
    """'skipped S of the N steps before it' when the optimiser skipped non-finite steps in r's window, else ''."""
    # the window's length as recorded (rows before the field: the gap to the previous row, right unless one is missing)
    n = r.get("window_steps") or r["step"] - max((q["step"] for q in rs if q["step"] < r["step"]), default=0)
    skipped = r["metrics"].get("skipped_steps", 0)
    return f"skipped {skipped} of the {n} steps before it" if skipped else ""


def compiled_evaluation(series, metrics: list[str], methods: list[str]) -> list[str]:
    """The check of `study.py --eval-compiled-too`: each point's FD from the compiled sampler against the eager
    protocol's (the same samples' seeds), and the two evaluations' times."""
    rows = [(m, seed, r) for m in methods for (mm, seed), rs in sorted(series.items()) if mm == m for r in rs
            if "fd_compiled" in r]
    if not rows:
        return []
    diffs = {k: [r["fd_compiled"][k] - r["fd"][k] for _, _, r in rows] for k in metrics}
    speed = statistics.median(r["eval_s"] / max(r["eval_s_compiled"], 0.01) for _, _, r in rows)
    lines = ["**Compiled evaluation against the eager protocol** (`--eval-compiled-too`): the largest |compiled − eager| "
             "is " + ", ".join(f"{max(map(abs, d)):.4f} ({k})" for k, d in diffs.items())
             + f" over {len(rows)} points; the compiled evaluation took 1/{speed:.2f} of the eager one's time (median; "
             "its first point includes compiling).", "",
             "| method | seed | step | " + " | ".join(f"{k} eager / compiled" for k in metrics) + " | eval s eager / compiled |",
             "|---|---|---|" + "---|" * len(metrics) + "---|"]
    for m, seed, r in rows:
        lines.append(f"| {m} | {seed} | {r['step']} | " + " | ".join(f"{fmt(r['fd'][k], 4)} / {fmt(r['fd_compiled'][k], 4)}"
                                                                    for k in metrics)
                     + f" | {r['eval_s']:.1f} / {r['eval_s_compiled']:.1f} |")
    return lines + [""]


def skipped_notes(series, runs: dict, keys: set[str]) -> list[str]:
    """Footnotes for †: windows with skipped (non-finite) steps, whose FD comes from an EMA those steps froze, and
    runs of these study keys stopped as diverged (benchmarks/study.py applies the library's `bad_steps_verdict`)."""
    notes = [f"- † {m}, seed {seed}, step {r['step']}: {skipped_before(rs, r)} (a non-finite loss or gradient)"
             for (m, seed), rs in sorted(series.items()) for r in rs if skipped_before(rs, r)]
    notes += [f"- {m}, seed {seed}{f' (study `{k}`)' if len(keys) > 1 else ''}, diverged: {r['diverged']}"
              for (k, m, seed), r in sorted(runs.items()) if k in keys and r.get("diverged")]
    return notes + [""] if notes else []


def paired_with_none(series, metrics: list[str], methods: list[str]) -> list[str]:
    """Each method minus vanilla SiT of the same seed, at the last step both reached: runs of one seed share the
    initial weights, the batches and the noise, so the difference carries less of the seed-to-seed spread."""
    pairs = [(m, "none") for m in methods if m != "none"]
    return paired(series, metrics, pairs, "**Paired with vanilla SiT**: a method's FD minus `none`'s FD of the same "
                  "seed, at the last step both reached (the seeds that reached it); mean over those seeds, then each "
                  "seed (negative = better than vanilla SiT):", "none")


def paired_with_base(series, metrics: list[str], methods: list[str]) -> list[str]:
    """Each ablation (`method[variant]`) minus its own method without the variant, same seed: what the variant
    alone changed."""
    pairs = [(m, m.partition("[")[0]) for m in methods if "[" in m and m.partition("[")[0] in methods]
    return paired(series, metrics, pairs, "**Ablations paired with their method**: `method[variant]` minus `method` of "
                  "the same seed, at the last step both reached; mean over seeds, then each seed (negative = the "
                  "variant did better):", "method")


def ahpa_against_baselines(series, metric: str, methods: list[str]) -> list[str]:
    """The study's question in one table: each AHPA run (`ahpa-*`) minus each alignment baseline trained with the same
    variant (`multi-uniform[weight=1.5]` for `ahpa-soft[weight=1.5]`), same seed, at every step both reached. Of the
    table's methods only: a method registered with the library (study_extensions.py) is neither AHPA nor one of its
    baselines, whatever its name; it is paired with `none` as every method is."""
    def split(m):
        name, sep, variant = m.partition("[")
        return name.partition(":")[0], sep + variant
    own = [m for m in methods if split(m)[0] in TABLE]
    rows = []
    for a in (m for m in own if m.startswith("ahpa")):
        for b in (m for m in own if m != "none" and not m.startswith("ahpa") and split(m)[1] == split(a)[1]):
            seeds = sorted(s for mm, s in series if mm == a and (b, s) in series)
            by_step: dict[int, list[float]] = {}
            for s in seeds:
                fa = {r["step"]: r["fd"][metric] for r in series[(a, s)]}
                fb = {r["step"]: r["fd"][metric] for r in series[(b, s)]}
                for step in sorted(fa.keys() & fb.keys()):
                    by_step.setdefault(step, []).append(fa[step] - fb[step])
            if by_step:
                cells = [f"{step}: {statistics.mean(d):+.3f} ({sum(x < 0 for x in d)}/{len(d)})" for step, d in sorted(by_step.items())]
                rows.append(f"| {a} | {b} | {', '.join(map(str, seeds))} | " + "; ".join(cells) + " |")
    if not rows:
        return []
    return [f"**AHPA against the alignment baselines** ({metric}): an AHPA run minus a baseline trained with the same "
            "variant, same seed, at each step both reached: mean over seeds (AHPA ahead in k of n seeds); negative = "
            "AHPA better:", "", "| AHPA run | baseline | seeds | step: minus baseline (ahead) |", "|---|---|---|---|",
            *rows, ""]


def paired(series, metrics: list[str], pairs: list[tuple[str, str]], title: str, base_name: str) -> list[str]:
    """A table of FD differences (method minus base) per pair, same seed, at the furthest step both reached."""
    rows = []
    for m, base in pairs:
        seeds = sorted(s for mm, s in series if mm == m and (base, s) in series)
        common = {s: {r["step"] for r in series[(m, s)]} & {r["step"] for r in series[(base, s)]} for s in seeds}
        if not any(common.values()):
            continue
        step = max(max(c) for c in common.values() if c)  # the furthest step; the seeds that reached it
        seeds = [s for s in seeds if step in common[s]]
        at = {(mm, s): next(r for r in series[(mm, s)] if r["step"] == step) for s in seeds for mm in (m, base)}
        cells = []
        for metric in metrics:
            d = [at[(m, s)]["fd"][metric] - at[(base, s)]["fd"][metric] for s in seeds]
            cells.append(f"{statistics.mean(d):+.3f} (" + " / ".join(f"{x:+.3f}" for x in d) + ")")
        rows.append(f"| {m} | {step} | {', '.join(map(str, seeds))} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    return [title, "", "| method | step | seeds | " + " | ".join(f"{m} minus {base_name}" for m in metrics) + " |",
            "|---|---|---|" + "---|" * len(metrics), *rows, ""]


def step_reaching(points: list[tuple[int, float]], target: float) -> tuple[str, float]:
    """From when a run's FD curve (eval points, ascending steps) stays at or below `target`: ("at", step) interpolated
    linearly at its last crossing (`ahpa.compare.images_to_reach`, which `ahpa compare` uses on images); ("before",
    first step) if every evaluation was; ("after", last step) if its last was above."""
    step = images_to_reach(points, target)
    if step is None:
        return "after", points[-1][0]
    return ("before", points[0][0]) if all(y <= target for _, y in points) else ("at", step)


def tflop_to(cost: dict, step: float) -> float:
    """A run's model TFLOPs over its first `step` steps (`tflop_per_step` of study.py: the heads until stop_step)."""
    aligned = min(step, cost["stop_step"]) if cost["stop_step"] else step
    return aligned * cost["aligned"] + (step - aligned) * cost["flow"]


def steps_to_match_none(series, metrics: list[str], methods: list[str], per_flop: bool = False) -> list[str]:
    """The speed-up the study asks about: for each evaluation step s of vanilla SiT (same seed), the step at which a
    method reached none's FD at s for good (the last crossing: from there on its curve stays at or below), as s /
    that step (2.0x = the same FD in half the images). `per_flop`: the
    same in training FLOPs (none's to s over the method's to that step), for runs whose rows record them."""
    if not any(m == "none" for m, _ in series):
        return []
    metric = metrics[0]
    cost = {k: next((r["tflop_per_step"] for r in rs if r.get("tflop_per_step")), None) for k, rs in series.items()}
    if per_flop:
        series = {k: rs for k, rs in series.items() if cost[k]}
        if not any(m != "none" for m, _ in series) or not any(m == "none" for m, _ in series):
            return []
    steps = sorted({r["step"] for (m, _), rs in series.items() if m == "none" for r in rs})
    if per_flop:
        lines = [f"**Training speed-up per FLOP** ({metric}): the same, in model FLOPs (3 x the forward's, the "
                 "alignment heads included until `align.stop_step`): `none`'s FLOPs to s divided by the method's to the "
                 "step where it reached `none`'s FD at s. What the speed-up is worth in compute:", ""]
    else:
        lines = [f"**Training speed-up over vanilla SiT** ({metric}): for each of `none`'s evaluation steps s, s divided "
                 "by the step from which the method stays at or below `none`'s FD at s (its last crossing; same seed; linear "
                 "between evaluations). "
                 "Mean over seeds, then each seed; `>x`: reached before the method's first evaluation; `<x`: not reached "
                 "by its last (no mean then):", ""]
    lines += ["| method | " + " | ".join(f"s = {s}" for s in steps) + " |", "|---|" + "---|" * len(steps)]
    for m in methods:
        seeds = sorted(s for mm, s in series if mm == m and ("none", s) in series)
        if m == "none" or not seeds:
            continue
        cells = []
        for st in steps:
            found = []
            for seed in seeds:
                target = next((r["fd"][metric] for r in series[("none", seed)] if r["step"] == st), None)
                if target is not None:
                    kind, step = step_reaching(sorted((r["step"], r["fd"][metric]) for r in series[(m, seed)]), target)
                    ratio = (tflop_to(cost[("none", seed)], st) / tflop_to(cost[(m, seed)], step) if per_flop
                             else st / step)
                    found.append((kind, ratio))
            if not found:
                cells.append("")
                continue
            each = " / ".join({"at": "", "before": ">", "after": "<"}[k] + f"{x:.2f}" for k, x in found)
            exact = all(k == "at" for k, _ in found)
            cells.append(f"{statistics.mean(x for _, x in found):.2f}x ({each})" if exact else f"({each})")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines + [""]
