"""Merges study result files (benchmarks/study.py) into a markdown report with plots.

    python benchmarks/study_report.py --results docs/study/gpu/results.jsonl --out docs/study/gpu
    python benchmarks/study_report.py --results docs/study/smoke/results.jsonl --out docs/study/smoke --smoke

Rows are keyed by (study key, method, seed, step), post-hoc EMA rows also by their sigma_rel (study_ema.py); a later
row with the same key replaces an earlier one (a rerun of a job). Runs are compared only within one study key (same
config, steps, evaluation protocol; keys that differ in the evaluation cadence alone are one study,
`merge_cadences`), at equal steps; the comparisons are in study_tables.py, the figures in study_plots.py. Rows of
one table that record other input files (`inputs`: the data's and the decoder's sha256, study_inputs.py) are refused,
as are rows of one registered method in one table that record other extensions (study_extensions.py).
Writes README.md (tables), fd-<metric>-<key>.png (FD against training images, one line per method and seed),
router-<key>-<method>-seed<s>.png (router weights against t, one panel per evaluation point), levels-<key>.png
(per-level alignment losses), ms-per-step-<key>.png, ema-length-<metric>-<key>.png (FD against the post-hoc
reconstructions' sigma_rel, study_ema.py, when the rows hold them), and copies the sample grids found beside the
results; every PNG in --out is stored with a 256-colour palette (`compact_png`: the docs travel with each device call).
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import shutil
from collections import defaultdict
from pathlib import Path

from study_cfg import cfg_section, guided_key
from study_ema import ema_section, orphan_notes
from study_extensions import check_extensions
from study_inputs import check_mixed
from study_setup import SIZES, settings_but_cadence
from study_plots import compact_png, plot_fd, plot_levels, plot_router, plot_speed, plot_sweep
from study_tables import (ahpa_against_baselines, compiled_evaluation, fmt, paired_with_base, paired_with_none,
                          skipped_before, skipped_notes, steps_to_match_none)



def load_rows(paths: list[Path], skipped: list | None = None, ema: dict | None = None,
              guided: dict | None = None) -> tuple[list[Path], dict, dict]:
    """(files, eval rows by (study, method, seed, step), run rows by (study, method, seed)); the methods a time budget
    skipped are appended to `skipped`, the post-hoc EMA rows ("eval_ema", "ema_refused") put in `ema` by (study,
    method, seed, step, ema_sigma), and the guided evaluations ("eval_cfg") in `guided` by study_cfg.guided_key, when
    given: kinds of their own, so that a reader of eval rows never takes them for the run's own unguided EMA."""
    files = []
    for p in paths:
        if not p.exists():
            raise SystemExit(f"--results {p}: no such file or folder")
        files += sorted([*p.glob("*.jsonl"), *p.glob("*.jsonl.gz")]) if p.is_dir() else [p]
    evals, runs, posthoc, cfg_rows = {}, {}, {}, {}
    seen: dict = {}  # study_inputs.check_mixed: the first row of each table that records its input files
    seen_ext: dict = {}  # study_extensions.check_extensions: the first row of each registered method in each table
    for f in files:
        # a finished pilot's rows are stored gzipped (they travel with every device call); appending a gzip member
        # (`gzip -nc new.jsonl >> results.jsonl.gz`) keeps the file one valid stream
        text = gzip.decompress(f.read_bytes()).decode() if f.suffix == ".gz" else f.read_text()
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            r = json.loads(line)
            if r.get("inputs"):  # rows from before the field: unknown inputs, merged as they always were
                check_mixed(seen, r, f"{f}, line {n}")
            check_extensions(seen_ext, r, f"{f}, line {n}")
            if r.get("kind") == "eval":
                evals[(r["study"], r["method"], r["seed"], r["step"])] = r
            elif r.get("kind") == "run":
                runs[(r["study"], r["method"], r["seed"])] = r
            elif r.get("kind") == "skipped" and skipped is not None:
                skipped.append(r)
            elif r.get("kind") in ("eval_ema", "ema_refused"):  # one key: a rerun's verdict replaces the earlier one
                need = ("study", "method", "seed", "step", "ema_sigma", *(("fd", "ema_residual") if r["kind"] == "eval_ema" else ()))
                if any(k not in r for k in need):
                    raise SystemExit(f"{f}, line {n}: a {r['kind']} row without {', '.join(k for k in need if k not in r)} "
                                     "(benchmarks/study.py --ema-lengths writes them): correct or delete that line, "
                                     "the other rows are read as they are")
                posthoc[(r["study"], r["method"], r["seed"], r["step"], r["ema_sigma"])] = r
            elif r.get("kind") == "eval_cfg":
                need = ("study", "method", "seed", "step", "cfg_scale", "guidance_interval", "fd")
                if any(k not in r for k in need):
                    raise SystemExit(f"{f}, line {n}: an eval_cfg row without {', '.join(k for k in need if k not in r)} "
                                     "(benchmarks/study.py --eval-cfg writes them): correct or delete that line, the "
                                     "other rows are read as they are")
                cfg_rows[guided_key(r)] = r
    evals, runs, posthoc, cfg_rows = merge_cadences(evals, runs, posthoc, cfg_rows)
    if ema is not None:
        ema.update(posthoc)
    if guided is not None:
        guided.update(cfg_rows)
    return files, evals, runs


def merge_cadences(evals: dict, runs: dict, *more: dict) -> tuple[dict, ...]:
    """Study keys whose settings differ in `study.eval_every` alone are one study: evaluating draws none of training's
    random numbers (every draw is a function of (seed, step), ahpa/train/draws.py), so a run evaluated every 4,000
    steps trained exactly as one evaluated every 2,000. Their rows move to the key of the finest cadence, each keeping
    its own key as `evaluated_as`. Further dicts (`more`: post-hoc EMA rows) move alike."""
    families = defaultdict(list)  # the settings without the cadence -> [(cadence, key)]
    for r in [*evals.values(), *runs.values(), *(r for rows in more for r in rows.values())]:
        if "config" in r:
            families[settings_but_cadence(r["config"])].append((r["config"].get("study.eval_every") or 0, r["study"]))
    home = {key: min(members)[1] for members in families.values() for _, key in members}

    def moved(rows: dict) -> dict:
        # a run under both cadences (a rerun): the home key's own rows win, so that no curve mixes two runs
        out = {}
        for (k, *rest), r in sorted(rows.items(), key=lambda kv: home.get(kv[0][0], kv[0][0]) == kv[0][0]):
            out[(home.get(k, k), *rest)] = r if home.get(k, k) == k else {**r, "study": home[k], "evaluated_as": k}
        return out
    return moved(evals), moved(runs), *map(moved, more)


def method_order(methods) -> list[str]:
    """Baselines first, AHPA last; a vae-level's level (":stage4") and a variant ("[router_entropy=0]") follow their
    method; methods registered with the library (study_extensions.py) after the table's, by name."""
    order = ["none", "vae-latent", "vae-level", "multi-uniform", "ahpa-soft", "ahpa-snr", "ahpa-topk"]
    return sorted(methods, key=lambda m: (next((i for i, o in enumerate(order) if re.split(r"[:\[]", m)[0] == o), 99), m))


def file_label(label: str) -> str:
    """A method label as it appears in file names: vae-level:stage4 -> vae-level-stage4."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-")


def report_study(key: str, evals: dict, runs: dict, out: Path, files: list[Path], ema: dict | None = None,
                 guided: dict | None = None) -> list[str]:
    rows = {k: v for k, v in evals.items() if k[0] == key}
    series = defaultdict(list)  # (method, seed) -> eval rows by step
    for (_, m, s, _), r in sorted(rows.items(), key=lambda kv: kv[0][3]):
        series[(m, s)].append(r)
    any_row = next((r for r in rows.values() if "evaluated_as" not in r), next(iter(rows.values())))
    cfg, metrics = any_row["config"], sorted(any_row["fd"])
    steps = sorted({k[3] for k in rows})
    methods = method_order({m for m, _ in series})
    lines = [f"## Study `{key}`", ""]
    lines += [f"SiT {cfg.get('model.preset')} (hidden {cfg.get('model.hidden_size') or 'preset'}, depth "
              f"{cfg.get('model.depth') or 'preset'}), batch {cfg.get('train.batch_size')}, lr {cfg.get('train.lr')} "
              f"(warm-up {cfg.get('train.warmup_steps')}), align depth {cfg.get('align.depth')}, lambda "
              f"{cfg.get('align.weight')}, {cfg.get('study.limit') or 'all'} images of {cfg.get('study.data')} at "
              f"{cfg.get('data.resolution')}x{cfg.get('data.resolution')}; "
              f"evaluation: {cfg.get('study.eval_num')} class-balanced EMA samples, Euler 50 steps, no guidance. "
              f"Device: {any_row.get('device')}, torch {any_row.get('torch')}, {any_row.get('precision')}.", ""]
    lines += [f"Command (one job): `{any_row.get('command')}`", ""]
    merged = sorted({(r["evaluated_as"], r["config"].get("study.eval_every")) for r in rows.values() if "evaluated_as" in r})
    if merged:  # merge_cadences: the same training, evaluated at other steps
        lines += [f"Evaluated every {cfg.get('study.eval_every')} steps; this table also holds "
                  + ", ".join(f"study `{k}` (the same settings, evaluated every {e} steps)" for k, e in merged)
                  + ": evaluating draws none of training's random numbers, so those runs trained exactly as these.", ""]
    lanes = sorted({r.get("lanes", 1) for r in rows.values()})
    if lanes != [1]:  # benchmarks/study_gpu_job.sh runs several study processes on one device at once
        lines += [f"Timings: {' or '.join(map(str, lanes))} study processes (lanes) shared the device, so ms/step and "
                  "evaluation times are measured under that contention: compare them within one job only.", ""]
    for metric in metrics:
        lines += [f"**{metric}** (lower is better) at training step (images seen = step x batch):", ""]
        lines += ["| method | seed | " + " | ".join(str(s) for s in steps) + " | steady ms/step | complete |",
                  "|---|---|" + "---|" * len(steps) + "---|---|"]
        for m in methods:
            for (mm, seed), rs in sorted(series.items()):
                if mm != m:
                    continue
                by_step = {r["step"]: fmt(r["fd"][metric]) + ("†" if skipped_before(rs, r) else "") for r in rs}
                run = runs.get((key, m, seed))
                done = "no (diverged)" if run and run.get("diverged") else ("yes" if run else "no")
                lines.append(f"| {m} | {seed} | " + " | ".join(by_step.get(s, "—") for s in steps)
                             + f" | {fmt(run and run['ms_per_step_steady'], 1)} | {done} |")
        lines.append("")
    lines += skipped_notes(series, runs, {key})
    lines += compiled_evaluation(series, metrics, methods)
    lines += paired_with_none(series, metrics, methods)
    lines += paired_with_base(series, metrics, methods)
    lines += ahpa_against_baselines(series, metrics[0], methods)
    lines += steps_to_match_none(series, metrics, methods)
    lines += steps_to_match_none(series, metrics, methods, per_flop=True)
    for metric in metrics:
        name = f"fd-{metric}-{key}.png"
        plot_fd(series, metric, cfg.get("train.batch_size"), out / name, methods)
        lines += [f"![{metric} against images]({name})", ""]
    name = f"levels-{key}.png"
    if plot_levels(series, cfg.get("train.batch_size"), out / name, methods):
        lines += ["Per-level alignment losses (mean over each window between evaluations; before lambda):", "",
                  f"![per-level losses]({name})", ""]
    name = f"ms-per-step-{key}.png"
    plot_speed(runs, key, out / name, methods)
    lines += ["Wall-clock per training step (median over the windows after the first; a run of one window: that window, warm-up included; evaluation excluded):", "",
              f"![ms per step]({name})", ""]
    for (m, seed), rs in sorted(series.items(), key=lambda kv: (methods.index(kv[0][0]), kv[0][1])):
        routed = [r for r in rs if r.get("router") and r["router"]["mode"] != "uniform"]  # a fixed 1/K says nothing
        if routed:
            name = f"router-{key}-{file_label(m)}-seed{seed}.png"
            plot_router(routed, out / name, f"{m}, seed {seed}")
            lines += [f"Router weights of {m} (seed {seed}) at each evaluation point:", "", f"![router {m}]({name})", ""]
    grids = {}  # file name -> its label (the name without "samples-<key>-" and ".png")
    for k in [key, *(k for k, _ in merged)]:
        for f in files:
            for g in sorted(f.parent.glob(f"samples-{k}-*.png")) if f.is_file() else []:
                if g.parent.resolve() != out.resolve():
                    shutil.copy2(g, out / g.name)
                grids[g.name] = g.name.split(k + "-", 1)[1].rsplit(".", 1)[0]
    if grids:
        lines += ["Final EMA samples (class i % 10 in column order):", ""]
        rank = {file_label(m): i for i, m in enumerate(methods)}
        order = sorted(grids, key=lambda g: (rank.get(grids[g].split("-seed")[0], 99), grids[g]))
        lines += [f"- {grids[g]}: ![samples]({g})" for g in order] + [""]
    # last: their headings (###) would otherwise hold the section's figures that follow
    return lines + cfg_section(key, series, guided or {}, methods, metrics) + ema_section(key, series, ema or {}, methods,
                                                                                          metrics, out)


def lr_sweeps(evals: dict, runs: dict, out: Path) -> list[str]:
    """Vanilla SiT across study keys whose settings differ in train.lr alone (the key includes the lr, so each rate is
    a study of its own): one table and one plot per such group, to choose the rate the other methods then use. A
    rate whose run diverged before its first evaluation has a row too: that is the sweep's upper edge."""
    groups = defaultdict(dict)  # the config without train.lr -> {lr: (study key, {step: eval row})}
    evaluated = [(r, True) for (_, m, seed, _), r in sorted(evals.items(), key=lambda kv: kv[0][3]) if m == "none" and seed == 0]
    stopped = [(r, False) for (_, m, seed), r in runs.items() if m == "none" and seed == 0 and r.get("diverged")]
    for r, is_eval in evaluated + stopped:
        rest = json.dumps({k: v for k, v in r["config"].items() if k != "train.lr"}, sort_keys=True)
        _, curve = groups[rest].setdefault(r["config"]["train.lr"], (r["study"], {}))
        if is_eval:
            curve[r["step"]] = r
    lines = []
    for n, by_lr in enumerate(g for g in groups.values() if len(g) > 1):
        curves = {lr: c for lr, (_, c) in by_lr.items() if c}
        if not curves:
            continue
        metrics = sorted(next(iter(next(iter(curves.values())).values()))["fd"])
        steps = sorted({s for c in curves.values() for s in c})
        lines += ["## Learning-rate sweep (vanilla SiT, seed 0)", "",
                  "Study keys that differ only in `train.lr`; " + " / ".join(metrics) + " at each step (lower is better):", "",
                  "| lr | study key | " + " | ".join(str(s) for s in steps) + " |", "|---|---|" + "---|" * len(steps)]
        for lr, (key, c) in sorted(by_lr.items()):
            cells = [" / ".join(fmt(c[s]["fd"][k]) for k in metrics) + ("†" if skipped_before(list(c.values()), c[s]) else "")
                     if s in c else "—" for s in steps]
            lines.append(f"| {lr:g} | `{key}` | " + " | ".join(cells) + " |")
        series = {(f"none at lr {lr:g}", 0): list(c.values()) for lr, c in curves.items()}
        lines += [""] + skipped_notes(series, runs, {key for key, _ in by_lr.values()})
        name = f"lr-sweep-{n}.png"
        plot_sweep(curves, metrics[0], out / name)
        lines += [f"![{metrics[0]} by learning rate]({name})", ""]
    return lines


def banner_values(rows: list[dict]) -> dict[str, str]:
    """The smoke and pilot banners' figures, from the rows' settings (a run of another size, e.g. 20 samples for a
    quick check, is not described by the size's defaults); several values in the rows are joined with "or"."""
    def values(fn) -> str:
        found = sorted({fn(r["config"]) for r in rows if "config" in r} - {None})
        return " or ".join(found) if found else "?"

    def tokens(c: dict) -> str | None:  # the cache's grid (the size's) over the preset's patch
        grid, preset = SIZES.get(c.get("study.size"), {}).get("grid"), str(c.get("model.preset", ""))
        return f"{(grid // int(preset.partition('/')[2])) ** 2}" if grid and preset.partition("/")[2].isdigit() else None

    return {"hidden": values(lambda c: f"{c['model.hidden_size']}" if c.get("model.hidden_size") else None),
            "depth": values(lambda c: f"{c['model.depth']}" if c.get("model.depth") else None),
            "tokens": values(tokens),
            "batch": values(lambda c: f"{c['train.batch_size']}" if c.get("train.batch_size") else None),
            "images": values(lambda c: f"{c['study.limit']:,}" if c.get("study.limit") else None),
            "side": values(lambda c: f"{c['data.resolution']}x{c['data.resolution']}" if c.get("data.resolution") else None),
            "eval_num": values(lambda c: f"{c['study.eval_num']:,}" if c.get("study.eval_num") else None)}


def parser() -> argparse.ArgumentParser:
    """The command line (tests/test_docs_commands.py reads its flags to check the documented commands)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, nargs="+", required=True, help="results files or folders of *.jsonl")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--smoke", action="store_true", help="label the report as a smoke test (not results)")
    ap.add_argument("--pilot", action="store_true", help="label the report as a CPU pilot (not the protocol)")
    return ap


def main() -> None:
    args = parser().parse_args()
    skipped: list[dict] = []
    ema: dict = {}
    guided: dict = {}
    files, evals, runs = load_rows(args.results, skipped, ema, guided)
    if not evals and not runs and not ema:
        raise SystemExit(f"no study rows in {', '.join(map(str, files)) or 'the folders given (no *.jsonl)'}: give the "
                         "results file(s) benchmarks/study.py --results wrote")
    sizes = {r.get("config", {}).get("study.size") for r in [*evals.values(), *runs.values()]}
    args.smoke = args.smoke or sizes == {"smoke"}  # the rows say what they are, whatever the flags
    args.pilot = args.pilot or sizes == {"pilot"}
    args.out.mkdir(parents=True, exist_ok=True)
    title = "SMOKE TEST, not results" if args.smoke else ("CPU PILOT, not the protocol" if args.pilot else "results")
    lines = ["# Convergence study: " + title, ""]
    size = banner_values([*evals.values(), *runs.values()])
    if args.smoke:
        lines += ["> **Smoke test of the study's code path, not a result.** A tiny SiT trained for a few dozen steps on a",
                  f"> few hundred images on a CPU, evaluated on {size['eval_num']} samples: every figure below exercises the plumbing",
                  "> (cache, training, evaluation, merge, plots) and says nothing about which method is better.", ""]
    if args.pilot:
        lines += [f"> **CPU pilot, not the protocol.** A small SiT (hidden {size['hidden']}, {size['depth']} blocks, {size['tokens']} tokens) trained for the steps",
                  f"> below, batch {size['batch']}, on {size['images']} CIFAR-10 images at {size['side']} through TAEF2, evaluated on {size['eval_num']} samples. Model, data,",
                  "> resolution, length and sample count are all far below STUDY.md's; differences smaller than the spread",
                  "> between seeds mean nothing, and even larger ones only suggest what the GPU study should look at.", ""]
    lines += [f"Generated by `python benchmarks/study_report.py` from {len(files)} file(s): "
              + ", ".join(f"`{f.name}`" for f in files) + ".", ""]
    keys = sorted({k[0] for k in evals})
    if not keys:
        lines.append("No evaluation rows found.")
    lines += lr_sweeps(evals, runs, args.out)
    for key in keys:
        lines += report_study(key, evals, runs, args.out, files, ema, guided)
    unevaluated = sorted((k, m, seed) for k, m, seed in runs if k not in keys)
    if unevaluated:  # runs that ended before their first evaluation (a diverged one, say): listed, not lost
        lines += ["## Runs without an evaluation", ""]
        lines += [f"- study `{k}`, {m}, seed {seed}: {runs[(k, m, seed)].get('diverged') or 'no evaluation row'}"
                  for k, m, seed in unevaluated] + [""]
    lines += orphan_notes(ema, set(keys))
    if skipped:  # a lane's later method cut by --budget-s: named, not lost
        lines += ["## Methods skipped by the time budget", ""]
        lines += [f"- study `{r.get('study', '?')}`, {r['method']}, seed {r['seed']}: {r.get('reason', 'skipped')}"
                  for r in skipped] + [""]
    (args.out / "README.md").write_text("\n".join(lines) + "\n")
    for png in sorted(args.out.glob("*.png")):
        compact_png(png)
    print(f"wrote {args.out / 'README.md'} ({len(keys)} study key(s), {len(evals)} evaluation rows)")


if __name__ == "__main__":
    main()
