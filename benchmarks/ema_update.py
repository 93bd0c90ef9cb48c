"""The EMA update's time and extra memory: the library's one foreach lerp (ahpa.train.ema.ema_update) against the
three foreach passes it replaced (sub into a new copy, mul, add; kept here as the baseline), side by side; JSON out.

    python benchmarks/ema_update.py --model B/2 --out benchmarks/results/ema_update_cpu_b2.json

On the parameters of a real SiT (shapes of --model's preset, random values): each way as training calls it (a 0-dim
`keep` tensor every step) and as the post-hoc EMAs do (a Python float weight), --repeats timed updates each,
interleaved, the median kept. Extra memory: each way once more in a fresh process, its peak resident memory (CPU,
Linux's VmHWM) or peak allocated memory (CUDA) above the state it was given. Ratios are each baseline's median time over
the lerp's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import benchlib

from ahpa.models.sit import SiT, SiTConfig
from ahpa.train.ema import ema_update

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}
DECAY = 0.9999


@torch.no_grad()
def three_passes(ema: list[torch.Tensor], model: list[torch.Tensor], decay: float, keep: torch.Tensor | None = None) -> None:
    """The update before the lerp (the baseline): ema += w * (model - ema), w zeroed by keep on the device."""
    diff = torch._foreach_sub(model, ema)
    weight = 1.0 - decay if keep is None else (1 - keep.to(ema[0].dtype)) * (1.0 - decay)
    torch._foreach_mul_(diff, weight)
    torch._foreach_add_(ema, diff)


WAYS = {"three-pass": three_passes, "lerp": ema_update}
CALLS = ("keep", "float")  # training's call (a keep tensor every step), the post-hoc EMAs' (a float weight)


def shapes_of(model: str) -> list[torch.Size]:
    with torch.device("meta"):  # the preset's parameter shapes, with no memory and no initialisation
        return [p.shape for p in SiT(SiTConfig.preset(model)).parameters()]


def state(model: str, dtype: torch.dtype, device: torch.device) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(EMA, model) parameter lists shaped like the preset's SiT, with values in [0, 1) (no denormals)."""
    shapes = shapes_of(model)
    g = torch.Generator(device).manual_seed(0)
    ema = [torch.rand(s, generator=g, device=device).to(dtype) for s in shapes]
    return ema, [torch.rand(s, generator=g, device=device).to(dtype) for s in shapes]


def update(way: str, call: str, ema, model, keep: torch.Tensor) -> None:
    WAYS[way](ema, model, DECAY, keep if call == "keep" else None)


def timings(args, device: torch.device) -> dict:
    ema, model = state(args.model, DTYPES[args.dtype], device)
    keep = torch.zeros((), device=device)  # a step not skipped: the update runs in full
    runs = [(way, call) for call in CALLS for way in WAYS]
    seconds = {r: [] for r in runs}
    for r in runs:  # one untimed update each (first touches, allocator)
        update(*r, ema, model, keep)
    for _ in range(args.repeats):
        for r in runs:  # interleaved: the machine's load drifts over the run, not between the ways
            benchlib.sync(device)
            t0 = time.perf_counter()
            update(*r, ema, model, keep)
            benchlib.sync(device)
            seconds[r].append(time.perf_counter() - t0)
    return {f"{way} {call}": {"median_ms": round(1e3 * statistics.median(s), 2), "ms": [round(1e3 * x, 2) for x in s]}
            for (way, call), s in seconds.items()}


def extra_memory(args, way: str, call: str) -> float:
    """MB above the state that one update of `way` takes at its peak, in a fresh process (peaks only grow)."""
    words = [sys.executable, __file__, "--model", args.model, "--dtype", args.dtype, "--device", args.device,
             "--threads", str(args.threads), "--child", f"{way}:{call}"]
    out = subprocess.run(words, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["extra_mb"]


def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux's VmHWM): not ru_maxrss, which a process started by another keeps
    from its parent's peak (Linux carries it across fork and exec), here a benchmark holding two copies of the state."""
    status = Path("/proc/self/status").read_text().splitlines()
    return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmHWM"))


def child(args, device: torch.device) -> None:
    way, call = args.child.split(":")
    ema, model = state(args.model, DTYPES[args.dtype], device)
    keep = torch.zeros((), device=device)
    if device.type == "cuda":
        benchlib.sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        update(way, call, ema, model, keep)
        benchlib.sync(device)
        extra = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        base = peak_rss_mb()
        update(way, call, ema, model, keep)
        extra = peak_rss_mb() - base
    print(json.dumps({"extra_mb": round(extra, 1)}))


def parser() -> argparse.ArgumentParser:
    """The command line (tests/test_docs_commands.py reads its flags to check the documented commands)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="B/2", help="SiT preset whose parameter shapes are updated (B/2: 130.3M)")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="of the EMA and model (training: fp32)")
    ap.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda")
    ap.add_argument("--repeats", type=int, default=7, help="timed updates per way, the median kept")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--out", type=Path, help="write the JSON here too")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # WAY:CALL, the memory measurement's own process
    return ap


def main() -> None:
    args = parser().parse_args()
    torch.set_num_threads(args.threads)
    device = benchlib.resolve_device(args.device)
    if args.child:
        return child(args, device)
    shapes = shapes_of(args.model)
    t0 = time.perf_counter()
    times = timings(args, device)
    extra = {f"{way} {call}": extra_memory(args, way, call) for call in CALLS for way in WAYS}
    ratios = {f"{way}/lerp {call} time": round(times[f"{way} {call}"]["median_ms"] / times[f"lerp {call}"]["median_ms"], 2)
              for call in CALLS for way in WAYS if way != "lerp"}
    result = {"command": benchlib.command_line(), **benchlib.device_info(device), "model": args.model,
              "params": sum(s.numel() for s in shapes), "tensors": len(shapes), "dtype": args.dtype,
              "repeats": args.repeats, "time": times, "extra_mb": extra, "ratios": ratios,
              "seconds": round(time.perf_counter() - t0, 1)}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
