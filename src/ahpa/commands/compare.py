"""ahpa compare RUN RUN ... --out DIR: runs side by side (Fréchet distances and flow loss against images seen, the
speed-up over a baseline, the settings that differ), as a markdown table and plots."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("compare", help="compare training runs: FD curves, speed-up over a baseline, differing settings")
    p.add_argument("runs", nargs="+", help="run directories (as `ahpa train --out` wrote them)")
    p.add_argument("--out", default="", help="directory for compare.md and the plots (default: print only)")
    p.add_argument("--baseline", default="", help="the run the speed-ups are measured against (default: the first "
                   "with align.method=none, else the first given)")
    p.add_argument("--metric", default="", help="the evaluation to rank by, e.g. FD-r20 or FID (default: the first "
                   "one the baseline has)")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from ahpa import compare
    from ahpa.train import plots

    runs = [compare.read_run(p) for p in args.runs]
    compare.name_runs(runs)
    baseline = compare.pick_baseline(runs, args.baseline or None)
    metrics = sorted({m for r in runs for m in r.evals})
    metric = args.metric or next(iter(sorted(baseline.evals)), metrics[0] if metrics else "")
    if args.metric and args.metric not in metrics:
        raise ValueError(f"--metric {args.metric!r}: the runs' evaluations are {', '.join(metrics) or 'none'}")
    parts = [f"# {len(runs)} runs; baseline {baseline.name}", ""]
    if metric:
        parts += [compare.table(runs, baseline, metric), "",
                  f"Speed-up: the images from which the baseline stays at or below its last {metric} over the images "
                  "from which a run does (the last crossing, linear between evaluations; `>=`: reached by the run's "
                  "first evaluation, maybe before); img/s: the median of the logged windows, for the cost per image.",
                  ""]
    else:
        parts += ["No run has evaluations (set eval.every, eval.ref and eval.detectors to get Fréchet distances).", ""]
    mixed = compare.mixed_evaluations(runs)
    if mixed:
        parts += ["**Evaluations made differently within a run** (eval.* or sample.* changed on a resume; the points "
                  "on either side of a change are not comparable, nor speed-ups across it):", *mixed, ""]
    differing = compare.differing_settings(runs)
    parts.append("Settings that differ (run length and the log, checkpoint and grid cadences are not compared; the "
                 "images column shows the length):" + ("" if differing else " none"))
    for key, values in differing.items():
        parts.append(f"- `{key}`: " + ", ".join(f"{r.name}={v!r}" for r, v in zip(runs, values)))
    environment = compare.differing_environment(runs)
    if environment:  # speeds from other GPUs or process counts are no comparison; other code may train otherwise
        parts += ["", "Trained in different environments (their newest start; img/s compares only on the same device "
                  "and process count):"]
        for key, values in environment.items():
            # "unrecorded": a run from before starts.jsonl; "none": recorded as absent (no CUDA build, no checkout)
            parts.append(f"- {key}: " + ", ".join(f"{r.name}={v if v is not None else 'none' if r.env else 'unrecorded'}"
                                                   for r, v in zip(runs, values)))
    unfinished = [r.name for r in runs if not r.done]
    if unfinished:
        parts += ["", "Not finished (no DONE): " + ", ".join(unfinished)]
    text = "\n".join(parts) + "\n"
    print(text, end="")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.md").write_text(text)
        for m in metrics:
            plots.line_plot({r.name: r.evals.get(m, []) for r in runs}, out / f"{m}.png", "training images", m, m)
        plots.line_plot({r.name: r.flow for r in runs}, out / "flow-loss.png", "training images", "flow loss",
                        "flow-matching loss", logy=True, markers=False)
        print(f"wrote {out / 'compare.md'} and {len(metrics) + 1} plots")
    return 0
