"""Side-by-side comparison of training runs (e.g. AHPA against REPA and vanilla SiT on your data): their
evaluations against images seen, how many images each needs to reach a baseline's Fréchet distance, and which
settings differ between them, so that a reader sees at once whether the comparison is fair.

Pure functions over run directories (config.yaml, metrics.jsonl, starts.jsonl); `ahpa compare` draws and prints
them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ahpa.config import flatten
from ahpa.jsonl import read_rows
from ahpa.provenance import last_start

# the facts of a run's newest start (ahpa.provenance) that are compared; its host and time are not
ENV_COMPARED = ("device", "processes", "torch", "cuda", "ahpa", "source")
# settings that differ between comparable runs without changing what is compared
NOT_COMPARED = ("train.steps", "train.log_every", "train.ckpt_every", "train.sample_every", "train.keep_checkpoints",
                "train.device", "train.max_bad_steps", "data.prefetch")


@dataclass
class Run:
    name: str
    path: Path
    settings: dict  # flattened config.yaml
    evals: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # metric -> [(images, value)]
    flow: list[tuple[int, float]] = field(default_factory=list)  # [(images, flow loss)]
    img_per_s: float | None = None  # median of the logged windows
    done: bool = False
    env: dict = field(default_factory=dict)  # its newest start's versions, commit and device (starts.jsonl)
    eval_setups: list[tuple[int, str]] = field(default_factory=list)  # [(images, what each evaluation used)]

    @property
    def method(self) -> str:
        return str(self.settings.get("align.method", "?"))


def read_run(path: str | Path) -> Run:
    """A run directory's settings and curves; a clear error when it is not one."""
    path = Path(path)
    cfg_file, metrics_file = path / "config.yaml", path / "metrics.jsonl"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path} is not a run directory (no config.yaml); give directories that `ahpa train --out` wrote")
    settings = flatten(yaml.safe_load(cfg_file.read_text()) or {})
    start = last_start(path) or {}
    env = {k: start[k] for k in ENV_COMPARED if k in start}
    run = Run(path.name, path, settings, done=(path / "DONE").exists(), env=env)
    if not metrics_file.is_file():
        return run
    rates = []
    for row in read_rows(metrics_file):
        images = row.get("images", 0)
        if "loss/flow" in row:
            run.flow.append((images, row["loss/flow"]))
        if "img_per_s" in row:
            rates.append(row["img_per_s"])
        for key, value in row.items():
            if key.startswith("eval/"):
                run.evals.setdefault(key[len("eval/"):], []).append((images, value))
        if "eval_setup" in row:  # runs from before it was recorded have none
            run.eval_setups.append((images, row["eval_setup"]))
    if rates:
        run.img_per_s = sorted(rates)[len(rates) // 2]
    return run


def name_runs(runs: list[Run]) -> None:
    """Unique display names: the directory's name, with its parent's where two share one."""
    names = [r.path.name for r in runs]
    for r in runs:
        if names.count(r.path.name) > 1:
            r.name = f"{r.path.parent.name}/{r.path.name}"


class NotRead:
    """The value of a setting the run did not read (shown as such; it differs from nothing)."""

    def __repr__(self) -> str:
        return "(not read)"


NOT_READ = NotRead()


def unread_settings(settings: dict) -> set[str]:
    """The keys of a run's settings that its training did not read, so a difference in them changes nothing: a
    cache brings its own statistics and data, a run without evaluations reads no eval.*, vanilla SiT no align.*,
    and only an external-encoder method (REPA) reads prior.external."""
    from ahpa.align.methods import METHODS

    source, method = settings.get("data.source"), settings.get("align.method")
    out = {"prior.stats_images"} if source == "cache" else set()
    out |= {"data.procedural_size"} if source != "procedural" else {"data.path"}
    if not settings.get("eval.every"):
        out |= {k for k in settings if k.startswith("eval.") and k != "eval.every"}
    spec = METHODS.get(method)  # a plugin's method unknown here: everything counts
    if spec is not None and spec.levels == "none":
        out |= {k for k in settings if k.startswith("align.") and k != "align.method"}
    if spec is not None and spec.levels != "external":
        out.add("prior.external")
    return out


def differing_settings(runs: list[Run]) -> dict[str, list]:
    """{key: each run's value} for the keys whose values are not all equal among the runs that read them (run
    length and cadences left out); a run that did not read the key shows NOT_READ."""
    keys = sorted({k for r in runs for k in r.settings} - set(NOT_COMPARED))
    unread = [unread_settings(r.settings) for r in runs]
    out = {}
    for k in keys:
        values = [NOT_READ if k in u else r.settings.get(k) for r, u in zip(runs, unread)]
        read = [v for v in values if v is not NOT_READ]
        if any(v != read[0] for v in read):
            out[k] = values
    return out


def differing_environment(runs: list[Run]) -> dict[str, list]:
    """{fact: each run's value} for the environment facts (device, processes, versions, commit) that differ between
    runs that recorded them: img/s compares only on the same device and process count."""
    recorded = [r for r in runs if r.env]
    if len(recorded) < 2:
        return {}
    return {k: [r.env.get(k) for r in runs] for k in ENV_COMPARED
            if any(r.env.get(k) != recorded[0].env.get(k) for r in recorded)}


def mixed_evaluations(runs: list[Run]) -> list[str]:
    """A line for each run whose evaluations were not all made alike (eval.* or sample.* changed on a resume): the
    points of its curve before and after the change are not comparable."""
    lines = []
    for r in runs:
        spans: list[list] = []  # [setup, first images, last images]
        for images, setup in r.eval_setups:
            if spans and spans[-1][0] == setup:
                spans[-1][2] = images
            else:
                spans.append([setup, images, images])
        if len({setup for setup, _, _ in spans}) > 1:
            lines.append(f"- {r.name}: " + "; then ".join(f"{setup} (images {a:,}-{b:,})" for setup, a, b in spans))
    return lines


def images_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """The number of images from which a curve stays at or below `target`: where it crosses it for the last time
    (linear between evaluations), so that a noisy early dip below does not count as reaching it; None when its last
    value is above."""
    if not curve or curve[-1][1] > target:
        return None
    above = [i for i, (_, y) in enumerate(curve) if y > target]
    if not above:
        return float(curve[0][0])
    (x0, y0), (x1, y1) = curve[above[-1]], curve[above[-1] + 1]
    return x0 + (x1 - x0) * (y0 - target) / (y0 - y1)


def value_at(curve: list[tuple[int, float]], images: float) -> float | None:
    """A curve's value at `images` (linear between evaluations), or None outside the evaluated range."""
    for x, y in curve:
        if x == images:
            return y
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if x0 < images < x1:
            return y0 + (y1 - y0) * (images - x0) / (x1 - x0)
    return None


def pick_baseline(runs: list[Run], name: str | None) -> Run:
    if name:
        for r in runs:
            if name in (r.name, str(r.path), r.path.name):
                return r
        raise ValueError(f"--baseline {name!r} is none of the runs: {', '.join(r.name for r in runs)}")
    return next((r for r in runs if r.method == "none"), runs[0])


def table(runs: list[Run], baseline: Run, metric: str) -> str:
    """Markdown: each run's last and best `metric`, its value where the baseline ended, and the speed-up in images
    to reach the baseline's last value (the baseline's images to reach it, by the same rule, over the run's). A run
    that reached it by its first evaluation may have reached it earlier: its speed-up is a lower bound (">= x"). A
    baseline that did so did not improve after its first evaluation, and no speed-up is read from it (a note)."""
    lines = [f"| run | method | images | last {metric} | best | at the baseline's last images | images to reach "
             f"the baseline's last | speed-up | img/s |", "|---|---|---|---|---|---|---|---|---|"]
    base = baseline.evals.get(metric, [])
    # the baseline's own images to reach its last value by the same rule as every run's: where its curve rose again
    # at the end (noise, overfitting), that is before its last images, and a copy of it is 1.00x, not faster
    base_reach = images_to_reach(base, base[-1][1]) if base else None
    flat = len(base) > 1 and base_reach == base[0][0]  # no better after its first evaluation: no speed-up to read
    for r in runs:
        curve = r.evals.get(metric, [])
        if not curve:
            lines.append(f"| {r.name} | {r.method} | {r.flow[-1][0] if r.flow else 0:,} | no evaluations | | | | | "
                         f"{_num(r.img_per_s, '.0f')} |")
            continue
        at = value_at(curve, base[-1][0]) if base else None
        reach = images_to_reach(curve, base[-1][1]) if base else None
        if not base or flat:
            speed = "—"
        elif reach is None:
            speed = "not reached"
        else:
            speed = f"{'>= ' if reach == curve[0][0] and r is not baseline else ''}{base_reach / reach:.2f}x"
        lines.append(f"| {r.name}{' (baseline)' if r is baseline else ''} | {r.method} | {curve[-1][0]:,} | "
                     f"{curve[-1][1]:.3f} | {min(v for _, v in curve):.3f} | {_num(at, '.3f')} | "
                     f"{_num(reach, ',.0f')} | {speed} | {_num(r.img_per_s, '.0f')} |")
    if flat:
        lines += ["", f"No speed-up is read from these curves: the baseline's {metric} was at or below its last value "
                  f"({base[-1][1]:.3f}) from its first evaluation on, so it did not improve after {base[0][0]:,} images "
                  "(noise, or training too short or too long for the evaluations' spacing). Evaluate earlier and more "
                  "often, or train longer."]
    return "\n".join(lines)


def _num(x: float | None, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)
