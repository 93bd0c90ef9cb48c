"""ahpa compare RUN RUN ... --out DIR: runs side by side (Fréchet distances and flow loss against images seen, the
speed-up over a baseline, the settings that differ), as a markdown table, the same as data (compare.json,
ahpa.compare_data) and plots; runs that differ only in their seed are read as one method, with the spread of its
seeds (ahpa.compare_seeds)."""

from __future__ import annotations

from ahpa.commands.examples import with_examples


def register(sub) -> None:
    p = sub.add_parser("compare", help="compare training runs: FD curves, speed-up over a baseline, differing settings",
                       **with_examples(
        "  # runs trained with eval.every (FD during training); the baseline is the vanilla SiT run",
        "  ahpa compare runs/mine-none runs/mine --out runs/compare",
        "More: docs/evaluation.md ('Comparing runs')"))
    p.add_argument("runs", nargs="+", help="run directories (as `ahpa train --out` wrote them)")
    p.add_argument("--out", default="", help="directory for compare.md, compare.json (its figures as data) and the plots "
                   "(default: print only)")
    p.add_argument("--baseline", default="", help="the run the speed-ups are measured against, by name or path "
                   "(default: the first with align.method=none that has evaluations)")
    p.add_argument("--metric", default="", help="the evaluation to rank by, e.g. FD-r20 or FID, any case (default: the "
                   "first one the baseline logged)")
    p.add_argument("--no-group-seeds", action="store_true", help="show every run as its own row, also runs that differ "
                   "only in train.seed (default: those are one row, the mean of their seeds, with their spread)")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from ahpa import compare, compare_data, compare_seeds
    from ahpa.atomic import atomic_write_text
    from ahpa.train import plots

    out = Path(args.out) if args.out else None
    if out is not None and out.is_dir() and any(out.iterdir()) and not (out / "compare.md").is_file():
        raise ValueError(f"--out {out} holds other files (no compare.md of an earlier comparison): name an empty or new "
                         "directory, or one that `ahpa compare` wrote")
    runs = [compare.read_run(p) for p in args.runs]
    compare.check_distinct(runs)
    compare.name_runs(runs)
    # the rows: a group of seeds is one, its curves their mean; what belongs to a run itself (how it was evaluated
    # along the way, its environment, whether it finished) is still told run by run
    rows, ungrouped = compare_seeds.group_seeds(runs, not args.no_group_seeds)
    baseline = compare.pick_baseline(rows, args.baseline or None)
    metrics = list(dict.fromkeys(m for r in [baseline, *rows] for m in r.evals))  # the baseline's first, as logged
    metric = metrics[0] if metrics else ""
    if args.metric:
        metric = next((m for m in metrics if m.lower() == args.metric.lower()), "")
        if not metric:
            raise ValueError(f"--metric {args.metric!r}: the runs' evaluations are {', '.join(metrics) or 'none'}")
    # every value compare.md states, once: its table and notes are written from this, and compare.json holds it
    data = compare_data.comparison(runs, rows, baseline, metric, metrics, ungrouped)
    notes, bullets = data["notes"], lambda lines: [f"- {line}" for line in lines]
    parts = [f"# {len(runs)} run{'s' if len(runs) != 1 else ''}; baseline {baseline.name}", ""]
    if metric and notes["evaluated_otherwise"]:  # above the table: its FDs and speed-ups for these runs do not compare
        parts += [f"**Evaluated otherwise than the baseline** ({baseline.name}: {baseline.eval_setup}); their {metric} "
                  "does not compare with its, and no speed-up is read from them:", *bullets(notes["evaluated_otherwise"]),
                  ""]
    if metric:
        # REPA's encoder runs on every batch, untrained: its forward is counted for runs that recorded it
        uncounted = [r["name"] for r in data["rows"] if r["external"] and not r["frozen_flops_counted"]]
        frozen = ("; REPA's frozen encoder's forward, run on every batch, too" if any(r["external"] for r in data["rows"])
                  else "")
        frozen += (f", except for {', '.join(uncounted)}, trained before it was recorded: there its cost shows in img/s "
                   "only" if uncounted else "")
        parts += [compare_data.markdown_table(data), "",
                  f"Speed-up: the images from which the baseline stays at or below its last {metric} over the images "
                  "from which a run does (the last crossing, linear between evaluations; `>=`: reached by the run's "
                  "first evaluation, maybe before); per FLOP: the same counted in training FLOPs, each run's images at "
                  f"its own arithmetic per image (the alignment heads add some{frozen}; — for a run from before it "
                  "was recorded); img/s: the median of the logged windows and their range, for the cost per image (it "
                  "compares only on the same device under the same load).", ""]
    else:
        parts += ["No run has evaluations (set eval.every, eval.ref and eval.detectors to get Fréchet distances). "
                  "Trained so far: " + ", ".join(f"{r.name} {r.length:,} images" for r in runs) + ".", ""]
    if notes["seed_groups"]:
        parts += ["**Seeds read as one method**: runs that differ only in `train.seed` and were evaluated alike; the "
                  "row of each group reads the mean of its seeds' curves at the images every seed was evaluated at:",
                  *bullets(notes["seed_groups"]), ""]
        if notes["paired_seeds"]:
            parts += [f"**Paired seeds** ({metric}): the speed-up between the mean curves, then that of each seed over "
                      "the baseline's run of the same seed (same initial weights, batches and noise), each read at the "
                      "points of its group's mean; ahead: above 1.00x. The spread: each side's seeds at the baseline's "
                      "last images (the range of a few seeds, not a significance test: two seeds apart by a hair are "
                      "'beyond' each other):", *bullets(notes["paired_seeds"]), ""]
    if notes["not_grouped"]:
        parts += ["**Not read as seeds of one method** (alike but for their seed):", *bullets(notes["not_grouped"]), ""]
    if notes["mixed_evaluations"]:
        parts += ["**Evaluations made differently within a run** (eval.* or sample.* changed on a resume; the points "
                  "on either side of a change are not comparable, nor speed-ups across it):",
                  *bullets(notes["mixed_evaluations"]), ""]
    parts.append("Settings that differ (run length, the log, checkpoint and grid cadences and how a run computes are "
                 "not compared; a setting a run did not read shows `(not read)`):" + ("" if notes["settings"] else " none"))
    for line in notes["settings"]:
        key, _, values = line.partition(": ")
        parts.append(f"- `{key}`: {values}")
    if notes["environments"]:  # speeds from other GPUs or process counts are no comparison; other code may train otherwise
        parts += ["", "Trained in different environments (their newest start; img/s compares only on the same device "
                  "and process count):", *bullets(notes["environments"])]
    if notes["mixed_environments"]:
        parts += ["", "**Environments that changed within a run** (resumed on other GPUs, process counts or versions; "
                  "its img/s mixes their speeds):", *bullets(notes["mixed_environments"])]
    if notes["unfinished"]:
        parts += ["", "Not finished (no DONE): " + ", ".join(notes["unfinished"])]
    if out is not None:
        names = [f"{m}.png" for m in metrics] + ["flow-loss.png"]
        parts += ["", "Plots: " + ", ".join(names)]
    text = "\n".join(parts) + "\n"
    print(text, end="")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        for old in out.glob("*.png"):  # an earlier comparison's (the folder holds its compare.md): not this one's
            old.unlink()
        # compare.md first: a folder holding it is one `ahpa compare` wrote, and may be written again
        atomic_write_text(out / "compare.md", text)
        atomic_write_text(out / "compare.json", compare_data.to_json(data))
        faint = " (a group of seeds: their mean, each seed faint)" if notes["seed_groups"] else ""
        for m in metrics:
            plots.line_plot({r.name: r.evals.get(m, []) for r in rows}, out / f"{m}.png", "training images", m, m + faint,
                            highlight=baseline.name, faint={r.name: [s.evals.get(m, []) for s in r.seeds] for r in rows})
        plots.line_plot({r.name: r.flow for r in rows}, out / "flow-loss.png", "training images", "flow loss",
                        "flow-matching loss" + faint, logy=True, markers=False, highlight=baseline.name,
                        faint={r.name: [s.flow for s in r.seeds] for r in rows})
        print(f"wrote {out / 'compare.md'}, compare.json and {len(names)} plot{'s' if len(names) != 1 else ''}")
    return 0
