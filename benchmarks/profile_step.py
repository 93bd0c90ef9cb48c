"""Where a training step's time goes: a kernel-level profile of the throughput benchmark's step, and the rates the
model's own matrix shapes and attention reach on their own. For the MFU gap of issue 5 (docs/benchmarks.md).

    python benchmarks/profile_step.py --size gpu --models XL/2 --methods none --out $OUT/profile.json   # GPU
    python benchmarks/profile_step.py --size tiny --models B/2 --methods none,ahpa-cached --out /tmp/p.json  # CPU smoke

Per (model, method): the same Trainer as benchmarks/throughput.py (same config, synthetic cache, stand-in
encoders), `--warmup` steps (compilation), then `--steps` steps under torch.profiler. On CUDA the device kernels are
summed by category (GEMM, attention, Triton-fused, optimizer, copies, other) with the top kernels by time, and the GPU's
busy time (union of kernel intervals) is set against the wall time: the difference is time the GPU waited for the
host. On the CPU the same table is made of CPU operators (a smoke test of the plumbing: CPU times say nothing about
the GPU). Then, on CUDA only: bf16 GEMMs of the block's own shapes (tokens x in -> out, forward) against one
8192^3 product, and scaled-dot-product attention of the model's shape, forward + backward, under each backend torch
offers, so that "are these shapes slow" and "is this attention kernel slow" have numbers.
"""

from __future__ import annotations

import argparse
import json
import re
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

import benchlib
from throughput_setup import PRECISIONS, SIZES, TINY_SIT, encoders_for, run_config, write_caches

from ahpa.models.sit import SiTConfig
from ahpa.train.build import autocast_dtype, precision_name
from ahpa.train.loop import Trainer

# first match wins: kernel names of cuBLAS/CUTLASS GEMMs, flash/cuDNN/efficient attention, inductor's Triton kernels
# (before the optimizer's: their names read "triton_red_fused_..."), the foreach/fused multi-tensor kernels of the
# optimizer, the EMA and the gradient clipping, then copies
CATEGORIES = (
    ("attention", re.compile(r"flash|fmha|attention|sdpa|cudnn.*(mha|sdp)", re.I)),
    ("gemm", re.compile(r"gemm|cutlass|xmma|nvjet|sm90_|sm80_|matmul|aten::(mm|addmm|bmm|linear)$", re.I)),
    ("triton", re.compile(r"^triton_", re.I)),
    ("optimizer", re.compile(r"multi_tensor|adam|foreach", re.I)),
    ("copy", re.compile(r"memcpy|memset|copy_|aten::to$|_to_copy", re.I)),
)


def category(name: str) -> str:
    return next((cat for cat, pattern in CATEGORIES if pattern.search(name)), "other")


def is_annotation(event) -> bool:
    """A range the profiler draws on the GPU's timeline around the kernels of a CPU region ("Optimizer.step#AdamW.step"):
    not a kernel, and counting it would count its kernels twice. (`is_user_annotation` is missing from older torch.)"""
    flag = getattr(event, "is_user_annotation", None)
    return bool(flag) if flag is not None else "#" in event.name


def busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (kernels of several streams may overlap)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def profile_steps(trainer: Trainer, steps: int, device: torch.device) -> dict:
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    benchlib.sync(device)
    with torch.profiler.profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        benchlib.sync(device)
        wall_us = (time.perf_counter() - t0) * 1e6
    if device.type == "cuda":
        # kernels and copies the device ran (their own records, not the CPU-side launches)
        events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and not is_annotation(e)]
        # CUPTI may be unavailable (e.g. under gVisor): then no device record exists, and the table says so
        kind = "cuda kernels" if events else "no CUDA kernel records (CUPTI unavailable?)"
    else:
        events = [e for e in prof.events() if not e.cpu_children and e.name.startswith("aten::")]  # leaf operators
        kind = "cpu leaf operators (smoke only)"
    spans = [(e.time_range.start, e.time_range.end) for e in events]
    by_cat: dict[str, float] = {}
    by_name: dict[str, list[float]] = {}
    for e, (a, b) in zip(events, spans):
        cat = category(e.name)
        by_cat[cat] = by_cat.get(cat, 0.0) + (b - a)
        slot = by_name.setdefault(e.name, [0.0, 0])
        slot[0] += b - a
        slot[1] += 1
    total = sum(by_cat.values())
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:25]
    return {
        "measured": kind, "steps": steps, "wall_ms_per_step": round(wall_us / 1e3 / steps, 3),
        "busy_ms_per_step": round(busy_us(spans) / 1e3 / steps, 3),
        "kernel_ms_per_step": round(total / 1e3 / steps, 3), "launches_per_step": round(len(events) / steps, 1),
        "categories_ms_per_step": {k: round(v / 1e3 / steps, 3) for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
        "top": [{"name": n[:160], "category": category(n), "ms_per_step": round(t / 1e3 / steps, 3), "calls_per_step": c / steps}
                for n, (t, c) in top],
    }


def timed(fn, device: torch.device, reps: int = 20) -> float:
    """Seconds per call of fn, after 3 warm-up calls, between CUDA events."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / 1e3 / reps


def gemm_rates(sc: SiTConfig, batch: int, device: torch.device) -> list[dict]:
    """TFLOP/s of the block's linear layers (bf16, forward, [tokens, in] x [in, out]) and of one 8192^3 product."""
    d, tokens = sc.hidden_size, batch * sc.num_tokens
    hidden = int(d * sc.mlp_ratio)
    shapes = {"reference 8192^3": (8192, 8192, 8192), "qkv": (tokens, d, 3 * d), "attn proj": (tokens, d, d),
              "mlp fc1": (tokens, d, hidden), "mlp fc2": (tokens, hidden, d)}
    out = []
    for name, (m, k, n) in shapes.items():
        a = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=device, dtype=torch.bfloat16)
        s = timed(lambda: F.linear(a, w), device)
        out.append({"gemm": name, "m_k_n": [m, k, n], "ms": round(s * 1e3, 4), "tflops": round(2 * m * k * n / s / 1e12, 1)})
    return out


def attention_rates(sc: SiTConfig, batch: int, device: torch.device) -> list[dict]:
    """Forward + backward of the model's attention under each SDPA backend (an unavailable one is recorded so)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    h, n, dh = sc.num_heads, sc.num_tokens, sc.hidden_size // sc.num_heads
    q, k, v = (torch.randn(batch, h, n, dh, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    g = torch.randn(batch, h, n, dh, device=device, dtype=torch.bfloat16)
    flops = 3 * 4 * batch * h * n * n * dh  # forward 2 products of 2*n*n*dh each; backward twice the forward
    out = []
    for backend in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "MATH"):
        kernel = getattr(SDPBackend, backend, None)
        if kernel is None:
            out.append({"backend": backend, "error": "not in this torch"})
            continue

        def step():
            with sdpa_kernel(kernel):
                F.scaled_dot_product_attention(q, k, v).backward(g)

        try:
            s = timed(step, device, reps=10)
            out.append({"backend": backend, "shape_b_h_n_dh": [batch, h, n, dh], "ms_fwd_bwd": round(s * 1e3, 4),
                        "tflops": round(flops / s / 1e12, 1)})
        except Exception as e:  # a backend that refuses these inputs (head dim, dtype, GPU) says why
            out.append({"backend": backend, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"})
    with torch.no_grad():  # which backend the default dispatch picks for these inputs, by timing the plain call
        s = timed(lambda: F.scaled_dot_product_attention(q, k, v), device)
    out.append({"backend": "default (forward only)", "ms_fwd": round(s * 1e3, 4)})
    return out


def parser() -> argparse.ArgumentParser:
    """The command line (tests/test_docs_commands.py reads its flags to check the documented commands)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=tuple(SIZES), default="tiny")
    ap.add_argument("--models", default="XL/2")
    ap.add_argument("--methods", default="none", help="comma list of throughput.py's methods")
    ap.add_argument("--compile", choices=("on", "off"), default=None, help="default: on at --size gpu, off at tiny")
    ap.add_argument("--compile-mode", default="default", help="train.compile_mode when compiled")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--precision", choices=PRECISIONS, default="auto",
                    help="train.precision of the profiled runs (auto: bf16 on GPUs with bf16 arithmetic)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", type=Path, required=True, help="JSON file (rewritten after every record)")
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/ahpa-profile"))
    ap.add_argument("--device", default="auto")
    return ap


def main() -> None:
    args = parser().parse_args()

    size = SIZES[args.size]
    device = benchlib.resolve_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    compiled = (args.compile or ("on" if args.size == "gpu" else "off")) == "on"
    result = {"meta": {**benchlib.device_info(device), "command": benchlib.command_line(), "size": args.size,
                       "compile": compiled, "compile_mode": args.compile_mode, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}, "profiles": [], "gemm": {},
              "attention": {}}

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")

    synthetic = benchlib.SyntheticSDVAE().to(device)
    caches, _ = write_caches(args.work_dir, size, synthetic, args.methods.split(","), size["cache_images"], device)
    for model in args.models.split(","):
        batch = args.batch or size["batch"][model]
        for method in args.methods.split(","):
            encoder, external, _ = encoders_for(method, size, device, synthetic)
            cfg = run_config(size, args, model, method, compiled, caches, device, prefetch=True)
            trainer = Trainer(cfg, args.work_dir / "runs" / f"{model.replace('/', '')}-{method}", external=external, encoder=encoder)
            for _ in range(args.warmup):
                trainer.train_step()
            rec = {"model": model, "method": method, "batch": batch, "precision": precision_name(autocast_dtype(args.precision, device))}
            try:
                rec.update(profile_steps(trainer, args.steps, device))
                print(f"{model} {method}: {rec['wall_ms_per_step']} ms/step wall, {rec['busy_ms_per_step']} busy, "
                      f"{rec['categories_ms_per_step']}", flush=True)
            except Exception as e:  # the profiler itself may fail where CUPTI is unavailable: keep the rates below
                traceback.print_exc()
                rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            result["profiles"].append(rec)
            if hasattr(trainer.parts.source, "close"):
                trainer.parts.source.close()
            del trainer, encoder, external
            torch._dynamo.reset()
            save()
        if device.type == "cuda":
            sc = SiTConfig.preset(model, input_size=size["resolution"] // synthetic.factor, in_channels=synthetic.latent_channels)
            if args.size == "tiny":
                sc.hidden_size, sc.depth, sc.num_heads = TINY_SIT[model]
            result["gemm"][model] = gemm_rates(sc, batch, device)
            result["attention"][model] = attention_rates(sc, batch, device)
            print(json.dumps({"gemm": result["gemm"][model], "attention": result["attention"][model]}), flush=True)
            save()
    save()


if __name__ == "__main__":
    main()
