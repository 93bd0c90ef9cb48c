"""The eager operators of a training step: aten operators dispatched per `Trainer.train_step` (and the log window's
sums the training loop adds), by region, and the step's host time, vanilla SiT against AHPA side by side, on a tiny
model on the CPU; JSON out.

    python benchmarks/step_ops.py --out benchmarks/results/step_ops_cpu.json

Why: with `train.compile` only the SiT and the aligner are compiled; every other operator of the step runs eagerly,
one kernel launch (~5-20 us of host time on a GPU) each, and the study's small model is bound by that host time
(docs/benchmarks.md, "A small model: CUDA graphs"). The compute of a tiny model is negligible, so the counts are what
a GPU's host pays for; the counts do not depend on the device, the times do.

Regions: `SiT` and `aligner` are the modules `train.compile` compiles (forward and backward: run eagerly here, their
operators are counted apart); every other operator is eager under `train.compile` too, split by phase. A phase is
named by the line of `Trainer.train_step` / `Trainer._loss` running it (PHASES); an operator of the backward pass by
the autograd node running it, whose phase is the one that created the node in the forward pass (gradients
accumulated into parameters: `accumulate grads`). `window sums`: the training loop's per-step sums of the step's
metrics over a log window (ahpa.train.logger.add_to_window). `ops` counts every aten operator; `launches` leaves
out views and allocations (no kernel on a GPU): an estimate of the kernels launched.

Host time: each method's trainer built in one process, their steps interleaved (the machine's load drifts over the
run, not between the methods), compile off, the median over --steps steps per round and --rounds processes, of the
wall time and of the thread's CPU time (a tiny model's CPU step is mostly the host's work per operator).
`--baseline-src DIR` measures another checkout's library (its src/) the same way, its processes alternating with
this one's: ratios of medians, before/after, from one run.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import json
import linecache
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import benchlib

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"

# SiT-S/1's layout at a negligible width, on 8x8 latents (64 tokens) as the study's; the synthetic encoder gives five
# levels as the study's TAEF2 does (down0, down1, down2, mid, latent here): per-level work scales with their number
SIZES = {
    "tiny": {"hidden": 32, "depth": 2, "heads": 2, "batch": 8, "projector": 32, "align_depth": 1, "cache_images": 32},
    "small": {"hidden": 64, "depth": 6, "heads": 2, "batch": 16, "projector": 64, "align_depth": 2, "cache_images": 64},
}
RESOLUTION, CHANNELS = 32, (16, 32, 32)  # the synthetic encoder's factor 4: an 8x8 latent
METHODS = {
    "none": {"method": "none"},
    "ahpa-soft": {"method": "ahpa", "router": "soft"},
    "multi-uniform": {"method": "multi-uniform"},
    "ahpa-soft-bins": {"method": "ahpa", "router": "soft", "router_t_bins": 4},
    "vae-latent": {"method": "vae-latent"},
}
# wall time, and this thread's CPU time: the host's own work, without the waits for a core on a loaded machine or the
# cache's prefetch thread
CLOCKS = ("wall", "cpu")
COMPILED = ("SiT", "aligner")  # what train.compile compiles; the phases below run eagerly either way

# (text in the line of Trainer.train_step / _loss, phase): the first match names the phase of that line's operators
PHASES = (
    ("batch_indices(", "data order (host)"),  # host tensors on a GPU too: host time, no kernel
    ("self._draws(", "draws"), ("draws.items()", "draws"),
    ("p.source.fetch(", "fetch"),
    ("p.stats.latent.apply(", "standardise"), ("standardise_levels(", "standardise"),
    ("self.net(", "SiT"), ("self.align_net(", "aligner"),
    (".backward()", "loss"), ("scaled = ", "loss"),  # the division by grad_accum, the loss scale, the seed gradient
    ("totals.get(k, 0)", "metric accumulation"), ("v / accum", "metric accumulation"),
    ("totals[k] + v", "metric accumulation"),
    ("clip_grad_norm_", "clip"), ("full_value(grad_norm)", "clip"),
    ("isfinite", "skip check"), ("found_inf = (", "skip check"),
    ("optimizer.", "optimizer"),
    ("ema_update(", "EMA"), ("posthoc.update(", "post-hoc EMAs"),
    ("update_running(", "running means"),
    ("scale.update(", "loss scale"), ("scale.unscale_(", "loss scale"),
    ("bad", "bad-step counters"),
    ("totals", "metric masks"), ("skipped", "metric masks"),
)
# besides views: no kernel launched on a GPU (allocations, aliases, the profiler's ranges around optimizer.step)
NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "lift_fresh",
             "_unsafe_view", "alias", "set_", "resize_", "_record_function_enter_new", "_record_function_exit"}


def phase_of_line(text: str, in_loss: bool) -> str:
    for needle, phase in PHASES:
        if needle in text:
            return phase
    return "loss" if in_loss else f"other: {text.strip()[:60]}"


class StepOps:
    """Counts the aten operators dispatched while it is entered, by phase (see the module's docstring)."""

    def __init__(self):
        from ahpa.train.loop import Trainer

        self.anchors = {Trainer.train_step.__code__: False, Trainer._loss.__code__: True}
        self.seqs: list[int] = []  # sequence numbers of the autograd nodes seen made, ascending, and their phases
        self.seq_phase: list[str] = []
        self.outside = "outside the step"
        self.counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self._modes = (_Tagger(self), _Counter(self))

    def __enter__(self):
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc):
        for m in reversed(self._modes):
            m.__exit__(*exc)

    def phase_here(self) -> str:
        f = sys._getframe(1)
        while f is not None:
            in_loss = self.anchors.get(f.f_code)
            if in_loss is not None:
                return phase_of_line(linecache.getline(f.f_code.co_filename, f.f_lineno), in_loss)
            f = f.f_back
        return self.outside

    def backward_phase(self, node) -> str:
        variable = getattr(node, "variable", None)
        if variable is not None:  # AccumulateGrad: eager whatever is compiled
            return "accumulate grads"
        i = bisect.bisect_left(self.seqs, node._sequence_nr())
        # a node made inside an operator that is one call to Python (a composite) is numbered before its output's
        phase = self.seq_phase[i] if i < len(self.seqs) else "unknown node"
        return f"{phase} backward" if phase in COMPILED else f"{phase} (backward)"

    def record(self, out) -> None:
        phase = None
        for t in tree_leaves(out):
            fn = getattr(t, "grad_fn", None) if isinstance(t, torch.Tensor) else None
            if fn is None:
                continue
            seq = fn._sequence_nr()
            if self.seqs and seq <= self.seqs[-1]:  # a node made before (a view's base, a getter): not this call's
                continue
            phase = phase or self.phase_here()
            self.seqs.append(seq)
            self.seq_phase.append(phase)

    def per_step(self, steps: int) -> dict:
        """{phase: {"ops", "launches", "by_op"}} per step, and the totals by region."""
        phases = {}
        for phase, c in sorted(self.counts.items()):
            launches = sum(n for op, n in c.items() if not op.endswith("(view)") and op not in NO_KERNEL)
            phases[phase] = {"ops": _per(sum(c.values()), steps), "launches": _per(launches, steps),
                             "by_op": {op: _per(n, steps) for op, n in c.most_common()}}
        compiled = {k: v for k, v in phases.items() if k.split(" ")[0] in COMPILED}
        eager = {k: v for k, v in phases.items() if k not in compiled}
        totals = {name: {key: round(sum(v[key] for v in group.values()), 2) for key in ("ops", "launches")}
                  for name, group in (("compiled", compiled), ("eager", eager))}
        return {"totals": totals, "phases": phases}


def _per(n: int, steps: int) -> float:
    return round(n / steps, 2)


class _Tagger(TorchFunctionMode):
    """Above autograd: the phase of each autograd node the forward pass makes."""

    def __init__(self, owner: StepOps):
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if torch.is_grad_enabled():
            self.owner.record(out)
        return out


class _Counter(TorchDispatchMode):
    """Below autograd: every aten operator, by phase."""

    def __init__(self, owner: StepOps):
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        node = torch._C._current_autograd_node()
        if node is not None:
            phase = self.owner.backward_phase(node)
        else:
            phase = self.owner.phase_here()
            phase = f"{phase} forward" if phase in COMPILED else phase
        name = func.overloadpacket.__name__
        self.owner.counts[phase][f"{name} (view)" if func.is_view else name] += 1
        return func(*args, **(kwargs or {}))


def add_to_window(sums: dict, metrics: dict) -> None:
    """What the training loop does with each step's metrics: ahpa.train.logger.add_to_window, or the loop's own lines
    where the library has no such function (a checkout before it)."""
    from ahpa.train import logger

    if hasattr(logger, "add_to_window"):
        return logger.add_to_window(sums, metrics)
    for k, v in metrics.items():
        sums[k] = sums.get(k, 0) + v


def run_config(size: dict, method: str, cache: Path):
    from ahpa import config as config_mod

    spec = METHODS[method]
    return config_mod.from_dict({
        "model": {"preset": "S/1", "hidden_size": size["hidden"], "depth": size["depth"], "num_heads": size["heads"]},
        "data": {"source": "cache", "path": str(cache), "resolution": RESOLUTION, "hflip": True, "num_classes": 10},
        "prior": {"encoder": "", "stats_images": 16},  # the encoder object's spec is recorded
        # the study's settings (src/ahpa/configs/cifar64-s1.yaml) where they change the step's operators
        "align": {"depth": size["align_depth"], "weight": 0.5, "projector_dim": size["projector"], **spec},
        "train": {"batch_size": size["batch"], "device": "cpu", "seed": 0, "steps": 10**9, "sample_every": 0,
                  "log_every": 10**9, "ckpt_every": 10**9, "lr": 8e-4, "warmup_steps": 500, "grad_clip": 1.0,
                  "ema_decay": 0.9999, "ema_warmup": True},
    })


def child(args) -> None:
    """One process's measurement of every method (this process's library: PYTHONPATH), JSON on stdout."""
    from ahpa.train.loop import Trainer

    torch.set_num_threads(1)
    size = SIZES[args.size]
    encoder = benchlib.SyntheticSDVAE(block_out_channels=CHANNELS)
    methods = args.methods.split(",")
    runs = Path(tempfile.mkdtemp(prefix="step-ops-", dir=args.work_dir))
    trainers = {m: Trainer(run_config(size, m, args.cache), runs / m, encoder=encoder) for m in methods}
    sums = {m: {} for m in methods}
    try:
        for _ in range(args.warmup):  # the optimiser's state, first allocations
            for m, tr in trainers.items():
                add_to_window(sums[m], tr.train_step())
        out = {"torch": torch.__version__, "counts": {}, "ms": {m: {clock: [] for clock in CLOCKS} for m in methods}}
        if args.count_steps:
            for m, tr in trainers.items():
                with StepOps() as ops:
                    for _ in range(args.count_steps):
                        metrics = tr.train_step()
                        ops.outside = "window sums"
                        add_to_window(sums[m], metrics)
                        ops.outside = "outside the step"
                rec = ops.per_step(args.count_steps)
                rec["levels"] = list(tr.parts.levels)
                out["counts"][m] = rec
        for _ in range(args.steps):
            for m, tr in trainers.items():  # interleaved
                t0, c0 = time.perf_counter(), time.thread_time()
                add_to_window(sums[m], tr.train_step())
                out["ms"][m]["cpu"].append(1e3 * (time.thread_time() - c0))
                out["ms"][m]["wall"].append(1e3 * (time.perf_counter() - t0))
        out["finite"] = {m: all(bool(torch.isfinite(v).all()) for v in s.values()) for m, s in sums.items()}
    finally:
        for tr in trainers.values():
            if hasattr(tr.parts.source, "close"):
                tr.parts.source.close()
        shutil.rmtree(runs, ignore_errors=True)
    print(json.dumps(out))


def measure(args, src: Path, count: bool) -> dict:
    words = [sys.executable, __file__, "--child", "--size", args.size, "--methods", args.methods, "--steps",
             str(args.steps), "--warmup", str(args.warmup), "--count-steps", str(args.count_steps if count else 0),
             "--cache", str(args.cache), "--work-dir", str(args.work_dir)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), str(HERE)])}
    done = subprocess.run(words, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"the measurement with {src} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def parser() -> argparse.ArgumentParser:
    """The command line (tests/test_docs_commands.py reads its flags to check the documented commands)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="tiny", choices=sorted(SIZES), help="the tiny SiT's width, depth and batch")
    ap.add_argument("--methods", default="none,ahpa-soft,multi-uniform", help=f"comma list of {', '.join(METHODS)}")
    ap.add_argument("--steps", type=int, default=150, help="timed steps per method per round (interleaved)")
    ap.add_argument("--rounds", type=int, default=5, help="processes per library, alternating with the baseline's")
    ap.add_argument("--warmup", type=int, default=3, help="steps before counting and timing")
    ap.add_argument("--count-steps", type=int, default=2, help="steps whose operators are counted (first round)")
    ap.add_argument("--baseline-src", type=Path, help="another checkout's src/ to measure alongside (before/after)")
    ap.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "ahpa-step-ops",
                    help="the synthetic cache and the runs' directories")
    ap.add_argument("--out", type=Path, help="write the JSON here too")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one measuring process
    ap.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    return ap


def main() -> None:
    args = parser().parse_args()
    unknown = [m for m in args.methods.split(",") if m not in METHODS]
    if unknown:
        raise SystemExit(f"--methods: {', '.join(unknown)} unknown; choose from {', '.join(METHODS)}")
    if args.child:
        return child(args)
    torch.set_num_threads(1)
    device = torch.device("cpu")
    size = SIZES[args.size]
    encoder = benchlib.SyntheticSDVAE(block_out_channels=CHANNELS)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    cache = benchlib.write_synthetic_cache(args.work_dir / f"cache-{size['cache_images']}", encoder,
                                           size["cache_images"], RESOLUTION, RESOLUTION // encoder.factor, device,
                                           num_classes=10)
    args.cache = Path(cache["path"])
    libraries = {"this": SRC, **({"baseline": args.baseline_src.resolve()} if args.baseline_src else {})}
    t0 = time.perf_counter()
    results = {lib: [] for lib in libraries}
    for r in range(args.rounds):
        for lib, src in libraries.items():  # alternating: the load's drift falls on both
            results[lib].append(measure(args, src, count=r == 0))
    methods = args.methods.split(",")
    out = {"command": benchlib.command_line(), **benchlib.device_info(device), "size": args.size, **size,
           "resolution": RESOLUTION, "levels": len(encoder.levels), "methods": {m: METHODS[m] for m in methods},
           "steps": args.steps, "rounds": args.rounds, "count_steps": args.count_steps, "libraries": {}}
    for lib, rounds in results.items():
        med = {clock: {m: statistics.median([x for one in rounds for x in one["ms"][m][clock]]) for m in methods}
               for clock in CLOCKS}
        out["libraries"][lib] = {
            "src": str(libraries[lib]), "torch": rounds[0]["torch"], "counts": rounds[0]["counts"],
            "finite": all(all(one["finite"].values()) for one in rounds),
            **{f"median_{clock}_ms": {m: round(v, 3) for m, v in med[clock].items()} for clock in CLOCKS},
            "round_median_cpu_ms": {m: [round(statistics.median(one["ms"][m]["cpu"]), 3) for one in rounds]
                                    for m in methods},
            **{f"{clock}_ratios_to_none": ({m: round(med[clock][m] / med[clock]["none"], 3) for m in methods
                                            if m != "none"} if "none" in methods else {}) for clock in CLOCKS},
        }
    if "baseline" in results:
        this, base = out["libraries"]["this"], out["libraries"]["baseline"]
        out["this_over_baseline"] = {
            m: {**{f"{clock}_ms": round(this[f"median_{clock}_ms"][m] / base[f"median_{clock}_ms"][m], 3)
                   for clock in CLOCKS},
                **({key: round(this["counts"][m]["totals"]["eager"][key] / base["counts"][m]["totals"]["eager"][key], 3)
                    for key in ("ops", "launches")} if args.count_steps else {})}
            for m in methods}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
