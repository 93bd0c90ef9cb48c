"""Side-by-side comparison of training runs (e.g. AHPA against REPA and vanilla SiT on your data): their
evaluations against images seen, how many images each needs to reach a baseline's Fréchet distance, and which
settings differ between them, so that a reader sees at once whether the comparison is fair.

Pure functions over run directories (config.yaml, metrics.jsonl, starts.jsonl, inputs.json); `ahpa compare` draws
and prints them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ahpa.align.methods import METHODS, align_settings_read
from ahpa.config import flatten
from ahpa.jsonl import read_rows
from ahpa.provenance import starts
from ahpa.train import eval_setup, inputs

# the facts of a run's newest start (ahpa.provenance) that are compared; its host and time are not
ENV_COMPARED = ("device", "processes", "torch", "cuda", "ahpa", "source", "extensions")
# those that set a run's speed: a run resumed with others (a job requeued on other GPUs, resumed on fewer) mixes speeds
SPEED_FACTS = ("device", "processes", "torch", "cuda")
# settings that differ between comparable runs without changing what is compared: the run length and cadences, and
# how a run computes rather than what (compiled or eager, checkpointed activations, FSDP or DDP, the global batch in
# micro-batches, the detector's and the sampler's batch: equal to rounding), its sample grids, the post-hoc EMAs
# kept beside its own (they leave the model and the EMA that is evaluated bitwise as they were), and where a copy of
# its metrics goes (W&B). config.yaml holds the newest start's: a run resumed on one GPU with train.grad_accum=2, then
# sharded, is the same run
NOT_COMPARED = ("train.steps", "train.log_every", "train.ckpt_every", "train.sample_every", "train.keep_checkpoints",
                "train.posthoc_ema", "train.posthoc_every",
                "train.device", "train.max_bad_steps", "train.compile", "train.compile_mode",
                "train.activation_checkpointing", "train.fsdp", "train.grad_accum", "data.prefetch", "sample.compile",
                "sample.micro_batch", "sample.grid_images", "eval.batch", "train.wandb", "train.wandb_name")
# relative tolerance under which two Fréchet distances are equal: the same samples measured in other batches differ
# by ~1e-13, and one run must not "reach" its own copy's value by chance of rounding
SAME = 1e-9
# a speed-up's kind (speed_kind; compare.json names it) -> how compare.md shows it; only the first two have a ratio
SPEED_SHOWN = {"exact": "{:.2f}x", "lower_bound": ">= {:.2f}x", "not_reached": "not reached",
               "not_yet": "not yet (shorter)", "not_comparable": "not comparable", "not_read": "—"}


@dataclass
class Run:
    name: str
    path: Path
    settings: dict  # flattened config.yaml
    evals: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # metric -> [(images, value)], logged order
    flow: list[tuple[int, float]] = field(default_factory=list)  # [(images, flow loss)]
    rates: list[float] = field(default_factory=list)  # img/s of each logged window
    done: bool = False
    env: dict = field(default_factory=dict)  # its newest start's versions, commit and device (starts.jsonl)
    eval_setups: list[tuple[int, str]] = field(default_factory=list)  # [(images, what each evaluation used)]
    identities: dict[str, str] = field(default_factory=dict)  # data.path / prior.encoder -> content identity
    flops_per_image: float | None = None  # training FLOPs per image (its newest start; None before they were recorded)
    seeds: list[Run] = field(default_factory=list)  # a group of seeds (ahpa.compare_seeds): the runs it is the mean of
    frozen_counted: bool = True  # whether flops_per_image holds REPA's frozen encoder (recorded since it was counted)
    speeds: list[tuple[int, dict]] = field(default_factory=list)  # [(step, SPEED_FACTS)] at each start that changed them
    steps: dict[int, int] = field(default_factory=dict)  # images -> the step logged at them (compare.json's curves)

    @property
    def method(self) -> str:
        return str(self.settings.get("align.method", "?"))

    @property
    def external(self) -> str:
        """REPA's frozen encoder (prior.external) for a method that aligns to one, else ""."""
        spec = METHODS.get(self.method)
        return str(self.settings.get("prior.external") or "") if spec is not None and spec.levels == "external" else ""

    @property
    def label(self) -> str:
        """The method with what tells its variants apart: the router mode of a method that takes align.router
        (ahpa), the level of a one-level method, chosen levels, REPA's encoder (its kind and folder's name)."""
        spec, s = METHODS.get(self.method), self.settings
        if self.external:
            kind, _, where = self.external.partition(":")
            return f"{self.method} ({kind}:{Path(where).name or where})"
        if spec is None or spec.levels in ("none", "external"):
            return self.method
        details = [str(s.get("align.router"))] if not spec.router else []
        if s.get("align.levels"):
            details.append(",".join(map(str, s["align.levels"])))
        return f"{self.method} ({'; '.join(details)})" if details else self.method

    @property
    def img_per_s(self) -> float | None:
        """The median of the logged windows."""
        return sorted(self.rates)[len(self.rates) // 2] if self.rates else None

    @property
    def length(self) -> int:
        """Training images so far (the last logged window)."""
        return self.flow[-1][0] if self.flow else 0

    @property
    def eval_setup(self) -> str | None:
        """What its last evaluation used (None for a run from before it was recorded)."""
        return self.eval_setups[-1][1] if self.eval_setups else None


def read_run(path: str | Path) -> Run:
    """A run directory's settings and curves; a clear error when it is not one."""
    path = Path(path)
    cfg_file, metrics_file = path / "config.yaml", path / "metrics.jsonl"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path} is not a run directory (no config.yaml); give directories that `ahpa train --out` wrote")
    settings = flatten(yaml.safe_load(cfg_file.read_text()) or {})
    history = starts(path)
    start = history[-1] if history else {}
    env = {k: start[k] for k in ENV_COMPARED if k in start}
    speeds: list[tuple[int, dict]] = []
    for s in history:
        facts = {k: s.get(k) for k in SPEED_FACTS}
        if not speeds or speeds[-1][1] != facts:
            speeds.append((s.get("step", 0), facts))
    recorded = inputs.read(path) or {}
    identities = {k: v["identity"] for k, v in recorded.items() if isinstance(v, dict) and v.get("identity")}
    # the training arithmetic and REPA's frozen encoder's forward (recorded since the nineteenth session; before,
    # the SiT's and the heads' alone)
    flops = start.get("train_flops_per_image")
    run = Run(path.name, path, settings, done=(path / "DONE").exists(), env=env, identities=identities,
              flops_per_image=flops + start.get("frozen_flops_per_image", 0.0) if flops else flops,
              frozen_counted="frozen_flops_per_image" in start, speeds=speeds)
    if not metrics_file.is_file():
        return run
    for row in read_rows(metrics_file):
        images = row.get("images", 0)
        if "step" in row:
            run.steps[images] = row["step"]
        if "loss/flow" in row:
            run.flow.append((images, row["loss/flow"]))
        if "img_per_s" in row:
            run.rates.append(row["img_per_s"])
        for key, value in row.items():
            if key.startswith("eval/"):
                run.evals.setdefault(key[len("eval/"):], []).append((images, value))
        if "eval_setup" in row:  # runs from before it was recorded have none
            run.eval_setups.append((images, row["eval_setup"]))
    return run


def check_distinct(runs: list[Run]) -> None:
    """The same run given twice would be shown twice, and compared with itself."""
    seen: dict[Path, Run] = {}
    for r in runs:
        key = r.path.resolve()
        if key in seen:
            raise ValueError(f"{r.path} is given twice (also as {seen[key].path}): give each run once")
        seen[key] = r


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


class Shown(str):
    """A value already written as it is shown (a path with its content identity): not quoted again."""

    def __repr__(self) -> str:
        return str(self)


def unread_settings(settings: dict) -> set[str]:
    """The keys of a run's settings that its training did not read, so a difference in them changes nothing: a
    cache brings its own statistics and data, a run without evaluations reads no eval.*, and each method reads
    its own align.* settings (ahpa.align.methods.align_settings_read: vanilla SiT none, REPA no router, ...); only
    an external-encoder method (REPA) reads prior.external."""
    source, method = settings.get("data.source"), settings.get("align.method")
    out = {"prior.stats_images"} if source == "cache" else set()
    out |= {"data.procedural_size"} if source != "procedural" else {"data.path"}
    if not settings.get("eval.every"):
        out |= {k for k in settings if k.startswith("eval.") and k != "eval.every"}
    reads = align_settings_read(str(method), str(settings.get("align.router")), bool(settings.get("align.router_normalize")),
                                str(settings.get("align.loss")))
    if reads is not None:  # None: a plugin's method not installed here, and every setting counts
        out |= {k for k in settings if k.startswith("align.") and k[len("align."):] not in reads}
        if METHODS[method].levels != "external":
            out.add("prior.external")
    return out


def differing_settings(runs: list[Run]) -> dict[str, list]:
    """{key: each run's value} for the keys whose values are not all equal among the runs that read them (run
    length and cadences left out); a run that did not read the key shows NOT_READ. The data and the VAE are compared
    by the content identity each run recorded (inputs.json) where both have one: a copy elsewhere is the same data,
    and other data under the same path is not (values then show their identity beside the path)."""
    keys = sorted({k for r in runs for k in r.settings} - set(NOT_COMPARED))
    unread = [unread_settings(r.settings) for r in runs]
    out = {}
    for k in keys:
        # a run records the settings of the extensions it uses (align.options.NAME): one without the key read none
        values = [NOT_READ if k in u or (k.startswith("align.options.") and k not in r.settings) else r.settings.get(k)
                  for r, u in zip(runs, unread)]
        compared = [r.identities.get(k, v) if v is not NOT_READ else v for r, v in zip(runs, values)]
        read = [c for c in compared if c is not NOT_READ]
        if any(c != read[0] for c in read):
            # compared by content: each run's identity beside its path shows which are the same files
            out[k] = [Shown(f"{v!r} ({r.identities[k][:22]}...)") if k in r.identities and v is not NOT_READ else v
                      for r, v in zip(runs, values)]
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


def mixed_speeds(runs: list[Run]) -> list[str]:
    """A line for each run resumed on another device, process count or version than it started with: its img/s
    mixes their speeds, which the newest start alone (differing_environment) does not show."""
    lines = []
    for r in runs:
        changed = [k for k in SPEED_FACTS if len({str(facts[k]) for _, facts in r.speeds}) > 1]
        if changed:
            lines.append(f"- {r.name}: " + "; then ".join(
                ", ".join(f"{k} {facts[k]}" for k in changed) + f" (from step {step:,})" for step, facts in r.speeds))
    return lines


def evaluated_otherwise(runs: list[Run], baseline: Run) -> dict[str, str]:
    """{run name: what its last evaluation used that the baseline's did not}, for runs evaluated otherwise than the
    baseline (other samples, reference, seed or sampler): their Fréchet distances do not compare with the
    baseline's (FD depends on the number of samples), nor do speed-ups read from them."""
    if baseline.eval_setup is None:
        return {}
    return {r.name: eval_setup.changed(r.eval_setup, baseline.eval_setup) for r in runs
            if r is not baseline and r.eval_setup is not None and r.eval_setup != baseline.eval_setup}


def images_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """The number of images from which a curve stays at or below `target`: where it crosses it for the last time
    (linear between evaluations), so that a noisy early dip below does not count as reaching it; None when its last
    value is above. Values within a relative SAME of the target count as reaching it."""
    limit = target + SAME * max(abs(target), 1.0)
    if not curve or curve[-1][1] > limit:
        return None
    above = [i for i, (_, y) in enumerate(curve) if y > limit]
    if not above:
        return float(curve[0][0])
    (x0, y0), (x1, y1) = curve[above[-1]], curve[above[-1] + 1]
    return x0 + (x1 - x0) * (y0 - target) / (y0 - y1) if y1 < target else float(x1)


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
    """The run named (its name, or any path to it; a group of seeds by its name or any of its runs'), else the first
    vanilla SiT run that has evaluations, the first vanilla one, the first evaluated one, the first."""
    if name:
        given = Path(name).expanduser()
        for r in runs:
            if name == r.name or any(name == s.name or (given.exists() and given.resolve() == s.path.resolve())
                                     for s in r.seeds or [r]):
                return r
        raise ValueError(f"--baseline {name!r} is none of the runs: {', '.join(r.name for r in runs)}")
    ranked = [r for r in runs if r.method == "none" and r.evals] + [r for r in runs if r.method == "none"]
    return next(iter(ranked + [r for r in runs if r.evals]), runs[0])


def not_improved(base: list[tuple[int, float]]) -> bool:
    """Whether a baseline curve of several evaluations was at or below its last value from its first on (the images
    to reach its last value by the same rule as every run's: where it rose again at the end, noise or overfitting,
    that is before its last images): it did not improve after its first evaluation, and no speed-up is read from it."""
    return len(base) > 1 and images_to_reach(base, base[-1][1]) == base[0][0]


def speed_kind(base: list[tuple[int, float]], curve: list[tuple[int, float]]) -> tuple[float | None, str]:
    """(ratio, kind) of the images `base` needs to stay at or below its last value over those `curve` needs (both by
    images_to_reach, so that a copy of the baseline is 1.00x). Kinds (SPEED_SHOWN): "exact"; "lower_bound" where the
    curve was there by its first evaluation (maybe earlier); "not_reached", or "not_yet" for a curve that ends before
    the baseline's; "not_read" where no speed-up is read (no baseline curve, or one that did not improve after its
    first evaluation). Only the first two have a ratio."""
    if not base or not curve or not_improved(base):
        return None, "not_read"
    reach = images_to_reach(curve, base[-1][1])
    if reach is None:
        return None, "not_yet" if curve[-1][0] < base[-1][0] else "not_reached"
    ratio = images_to_reach(base, base[-1][1]) / reach
    return ratio, "lower_bound" if reach == curve[0][0] and curve is not base else "exact"


def speed_up(base: list[tuple[int, float]], curve: list[tuple[int, float]]) -> tuple[float | None, str]:
    """(ratio, as shown): speed_kind's, its kind written as the table shows it (">= 1.20x", "not reached", "—")."""
    ratio, kind = speed_kind(base, curve)
    return ratio, SPEED_SHOWN[kind].format(ratio)


def summarise_values(runs: list[Run], values: list) -> str:
    """`name=value` for each run; with more than three runs, the runs grouped by value, and the largest group, when
    it holds more than three, as "the others" ("100: none-n100; 200: the others")."""
    shown = [repr(v) for v in values]
    if len(runs) <= 3:
        return ", ".join(f"{r.name}={v}" for r, v in zip(runs, shown))
    groups: dict[str, list[str]] = {}
    for r, v in zip(runs, shown):
        groups.setdefault(v, []).append(r.name)
    common, members = max(groups.items(), key=lambda kv: len(kv[1]))
    others = len(members) > 3
    parts = [f"{v}: {', '.join(names)}" for v, names in groups.items() if not (others and v == common)]
    return "; ".join(parts + ([f"{common}: the others"] if others else []))


def digits(values: list[float], least: int = 3, most: int = 8) -> int:
    """Decimals enough to tell apart the values a verdict reads (runs' last values, the baseline's curve): two FDs
    that differ by more than rounding (SAME) must not print alike beside "reached" and "not reached"."""
    for d in range(least, most):
        shown: dict[str, float] = {}
        if all(abs(shown.setdefault(f"{v:.{d}f}", v) - v) <= SAME * max(abs(v), 1.0) for v in values):
            return d
    return most

