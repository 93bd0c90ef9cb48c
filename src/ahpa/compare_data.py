"""`ahpa compare` as data: every value its table and notes state, computed once into plain dicts and lists, from
which compare.md's table is written (markdown_table) and which compare.json holds (to_json), so that a paper's own
table or plot reads the very figures compare.md shows, without parsing markdown. The fields are described in
docs/evaluation.md ("Comparing runs"); SCHEMA goes up with any change a reader of compare.json would have to know of.

Pure functions over ahpa.compare.Run rows (a group of seeds is one row, ahpa.compare_seeds).
"""

from __future__ import annotations

import json
import math

from ahpa import compare, compare_seeds
from ahpa.compare import NOT_READ, SPEED_SHOWN, Run

SCHEMA = 1


def comparison(runs: list[Run], rows: list[Run], baseline: Run, metric: str, metrics: list[str],
               ungrouped: list[str]) -> dict:
    """The comparison of `runs` (as given) shown as `rows` (groups of seeds in place of their runs; `ungrouped`: the
    lines of compare_seeds.group_seeds saying why runs were not grouped), read against `baseline` by `metric` (""
    when no run has evaluations). Notes are lists of strings, each one line of compare.md without its bullet."""
    otherwise = compare.evaluated_otherwise(rows, baseline)
    differing = compare.differing_settings(rows)
    base = baseline.evals.get(metric, [])
    table_notes = []
    if metric and not base:
        table_notes.append(f"The baseline {baseline.name} has no {metric} evaluations, so no speed-up is read: name one "
                           "that has with --baseline RUN.")
    elif metric and compare.not_improved(base):
        table_notes.append(
            f"No speed-up is read from these curves: the baseline's {metric} was at or below its last value "
            f"({base[-1][1]:.3f}) from its first evaluation on, so it did not improve after {base[0][0]:,} images "
            "(noise, or training too short or too long for the evaluations' spacing). Evaluate earlier and more "
            "often, or train longer.")
    elif metric and rose_at_end(base):
        low = min(base, key=lambda point: point[1])
        table_notes.append(
            f"The baseline's {metric} rose at its end (lowest {low[1]:.3f} at {low[0]:,} images, last {base[-1][1]:.3f} "
            f"at {base[-1][0]:,}): speed-ups are read against its last value, which a run reaches early, so a run below "
            "the baseline at every later evaluation can still read near or under 1.00x. Read the FDs at equal images "
            "too; more samples per evaluation (less noise) or a longer run make the speed-up mean more.")
    settings = []
    for key, values in differing.items():
        why = ""
        if key == "train.seed":  # other seeds that are not one row: say why
            why = (" (not read as seeds of one method: see above)" if ungrouped else
                   " (runs that differ in other settings too are not read as seeds of one method)")
        settings.append(f"{key}: " + compare.summarise_values(rows, values) + why)
    # "unrecorded": a run from before starts.jsonl; "none": recorded as absent (no CUDA build, no checkout)
    environments = [f"{key}: " + ", ".join(f"{r.name}={v if v is not None else 'none' if r.env else 'unrecorded'}"
                                           for r, v in zip(runs, values))
                    for key, values in compare.differing_environment(runs).items()]
    notes = {
        "table": table_notes,
        "evaluated_otherwise": [f"{name}: {diff}" for name, diff in otherwise.items()],
        "seed_groups": _unbulleted(compare_seeds.describe(rows, metric)),
        "paired_seeds": _unbulleted(compare_seeds.paired(rows, baseline, metric, otherwise) if metric else []),
        "not_grouped": _unbulleted(ungrouped),
        "mixed_evaluations": _unbulleted(compare.mixed_evaluations(runs)),
        "settings": settings,
        "environments": environments,
        "mixed_environments": _unbulleted(compare.mixed_speeds(runs)),
        "unfinished": [r.name for r in runs if not r.done],
    }
    return {"schema": SCHEMA, "metric": metric or None, "metrics": metrics, "baseline": baseline.name,
            "rows": [row_data(r, i, baseline, metric, otherwise, differing) for i, r in enumerate(rows)],
            "notes": notes}


def rose_at_end(base: list[tuple[int, float]]) -> bool:
    """Whether a baseline curve's last value lies above its lowest by more than rounding (compare.SAME): its speed-ups
    are read against a value other runs pass early, and a reader should be told (compare.md's table note)."""
    low = min(y for _, y in base)
    return len(base) > 1 and base[-1][1] > low + compare.SAME * max(abs(low), 1.0)


def row_data(r: Run, i: int, baseline: Run, metric: str, otherwise: dict[str, str],
             differing: dict[str, list]) -> dict:
    """Row `i` of the comparison: who it is, its curves, and the table's values for `metric`."""
    members = r.seeds or [r]
    out = {"name": r.name, "baseline": r is baseline, "method": r.method, "label": r.label,
           "external": r.external or None, "group": bool(r.seeds),
           "runs": [{"name": m.name, "path": str(m.path.resolve()), "seed": compare_seeds.seed_of(m),
                     "finished": m.done, "images_trained": m.length} for m in members],
           "finished": r.done, "eval_setup": r.eval_setup, "evaluated_otherwise": otherwise.get(r.name),
           "settings": {k: v[i] for k, v in differing.items() if v[i] is not NOT_READ},
           "settings_not_read": [k for k, v in differing.items() if v[i] is NOT_READ],
           "curves": {m: _curve(r, c, [s.evals.get(m, []) for s in r.seeds]) for m, c in r.evals.items()},
           "flow_loss": _curve(r, r.flow, []),
           "img_per_s": None if r.img_per_s is None else
           {"median": r.img_per_s, "min": min(r.rates), "max": max(r.rates)},
           "flops_per_image": r.flops_per_image, "frozen_flops_counted": r.frozen_counted}
    out.update(table_values(r, baseline, metric, otherwise))
    paired = (r is not baseline and metric and (r.seeds or baseline.seeds) and r.evals.get(metric) and
              r.name not in otherwise)
    out["paired_speed_ups"] = [{"seed": s, "kind": kind, "value": ratio} for s, (ratio, kind) in
                               (compare_seeds.paired_speed_ups(r, baseline, metric) if paired else {}).items()]
    return out


def table_values(r: Run, baseline: Run, metric: str, otherwise: dict[str, str]) -> dict:
    """The table's columns for `metric`: last and best (lowest) value, the value at the baseline's last images, the
    images to reach the baseline's last value, and the speed-ups (ahpa.compare.speed_kind; "not_comparable" for a row
    evaluated otherwise than the baseline; per FLOP: the same images each at its own arithmetic per image)."""
    base, curve = baseline.evals.get(metric, []), r.evals.get(metric, [])
    if not curve:
        none = {"kind": "not_read", "value": None}
        return {"last": None, "best": None, "at_baseline_last": None, "images_to_reach": None, "speed_up": none,
                "speed_up_per_flop": dict(none)}
    ratio, kind = compare.speed_kind(base, curve)
    if r.name in otherwise and kind != "not_read":
        ratio, kind = None, "not_comparable"
    per_flop = None
    if ratio is not None and r.flops_per_image and baseline.flops_per_image:
        per_flop = ratio * baseline.flops_per_image / r.flops_per_image
    return {"last": {"images": curve[-1][0], "value": curve[-1][1]}, "best": min(v for _, v in curve),
            "at_baseline_last": compare.value_at(curve, base[-1][0]) if base else None,
            "images_to_reach": compare.images_to_reach(curve, base[-1][1]) if base else None,
            "speed_up": {"kind": kind, "value": ratio},
            "speed_up_per_flop": {"kind": kind if per_flop is not None else "not_read", "value": per_flop}}


def markdown_table(data: dict) -> str:
    """compare.md's table of `comparison(...)` for its metric, with the notes under it."""
    metric, rows = data["metric"], data["rows"]
    base = next(r for r in rows if r["baseline"])["curves"].get(metric)
    lines = [f"| run | method | last evaluated at (images) | last {metric} | best | at the baseline's last images | "
             f"images to reach the baseline's last | speed-up | per FLOP | img/s (median; min-max) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    # decimals enough to tell apart the values a verdict reads: the rows' last values and the baseline's curve
    fd = f".{compare.digits([r['last']['value'] for r in rows if r['last']] + (base['value'] if base else []))}f"
    for r in rows:
        name, rate = f"{r['name']}{' (baseline)' if r['baseline'] else ''}", r["img_per_s"]
        rate = "—" if rate is None else f"{rate['median']:.0f} ({rate['min']:.0f}-{rate['max']:.0f})"
        if r["last"] is None:
            has = f" (has {', '.join(r['curves'])})" if r["curves"] else ""
            lines.append(f"| {name} | {r['label']} | — | no {metric} evaluations{has} | | | | | | {rate} |")
            continue
        speed, per_flop = (SPEED_SHOWN[s["kind"]].format(s["value"]) for s in (r["speed_up"], r["speed_up_per_flop"]))
        lines.append(f"| {name} | {r['label']} | {r['last']['images']:,} | {r['last']['value']:{fd}} | "
                     f"{r['best']:{fd}} | {_num(r['at_baseline_last'], fd)} | {_num(r['images_to_reach'], ',.0f')} | "
                     f"{speed} | {per_flop} | {rate} |")
    for note in data["notes"]["table"]:
        lines += ["", note]
    return "\n".join(lines)


def to_json(data: dict) -> str:
    """compare.json's text: JSON has no NaN or infinity, so a value that is one (a diverged run's loss, a failed
    evaluation) is written null and listed under "non_finite" with where it was (a JSON pointer) and what."""
    found: list[dict] = []

    def clean(x, at: str):
        if isinstance(x, float) and not math.isfinite(x):
            found.append({"at": at, "was": repr(x)})
            return None
        if isinstance(x, dict):
            return {k: clean(v, f"{at}/{str(k).replace('~', '~0').replace('/', '~1')}") for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v, f"{at}/{j}") for j, v in enumerate(x)]
        return x

    out = clean(data, "")
    out["non_finite"] = found
    # default=str: a setting YAML read as a date or another non-JSON type is written as it reads
    return json.dumps(out, indent=1, ensure_ascii=False, allow_nan=False, default=str) + "\n"


def _curve(r: Run, curve: list[tuple[int, float]], seeds: list[list[tuple[int, float]]]) -> dict:
    """A curve as columns: the step logged at each point's images (None where none was), images, value; for a group of
    seeds also each seed's values at the same points (the points of the mean: every seed has them)."""
    out = {"step": [r.steps.get(x) for x, _ in curve], "images": [x for x, _ in curve], "value": [y for _, y in curve]}
    if seeds:
        out["seeds"] = [[values[x] for x, _ in curve] for values in map(dict, seeds)]
    return out


def _unbulleted(lines: list[str]) -> list[str]:
    return [line.removeprefix("- ") for line in lines]


def _num(x: float | None, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)
