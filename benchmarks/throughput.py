"""Training and sampling throughput of ahpa's own Trainer, per method, model and compile mode; JSON out.

    python benchmarks/throughput.py --size tiny --out /tmp/tp.json                 # CPU smoke, < 3 min on 2 cores
    python benchmarks/throughput.py --size gpu --models B/2,XL/2 --methods none,ahpa-cached,repa \
        --compile compiled --out $OUT/throughput.json                              # the core GPU comparison

What runs is what users run: a `Trainer` built from a config, stepped with `train_step()` (its data source,
draws, loss, clip, fused AdamW, EMA and all host syncs included). Per (model, compile, method) it records
img/s over the timed steps after warm-up (torch.cuda.synchronize around them), MFU (model FLOPs = 3 x
SiT.flops_per_image; the projector heads' FLOPs and frozen encoders' FLOPs reported separately), peak
memory (torch.cuda.max_memory_allocated) and, on a GPU, the host syncs per step with the lines that cause them
(CUDA's sync debug mode over 3 more steps; the step should have none). Methods:

- none:            vanilla SiT; latents read from the synthetic cache (so it pays the same loader as ahpa).
- ahpa-cached:     AHPA (soft router, all cached levels + latent) from a real prepared cache on disk, written by
                   the library's `prepare` with a stand-in encoder of SD-VAE's level shapes (benchlib.SyntheticSDVAE):
                   five levels 128/256/512/512/512 channels pooled to the token grid + latent mean/logvar, fp16,
                   stored flips; memory-mapped by the library's CacheSource, so the loader is in the step.
- ahpa-on-the-fly: AHPA with an SD-VAE-config AutoencoderKL (random weights, the library's DiffusersVAE) encoding
                   in-memory images inside the step. Needs diffusers; recorded as skipped without it.
- repa:            REPA with a DINOv2-B/14-shaped ViT (random weights) at 224 on in-memory images; latents from the
                   cheap stand-in encoder (REPA pre-extracts latents, so its VAE costs nothing in the step).
- repa-cached:     the same REPA reading its images from a prepared cache, as REPA trains at ImageNet scale with ahpa
                   (`ahpa prepare --levels latent --store-images`: latent moments + uint8 crops, R*R*3 bytes a
                   sample, stored flips of the latent), so the loader of the images is in the step.

Options the GPU jobs compare: --activation-checkpointing (comma list of block counts, 'all' = every block; the
memory target is XL/2 at batch 256 in 80 GB), --prefetch on|off|both (the cache source gathering the next
step's rows in a background thread; it applies to the cached methods none and ahpa-cached) and --token-fractions
(comma list of align.token_fraction values for the aligned methods: the heads run on that share of the tokens) and
--posthoc-ema (comma list of train.posthoc_ema settings, `off` or sigma_rel joined by ':', for every method: each
sigma_rel is one more EMA update of the backbone in every timed step; snapshots are written by the training loop,
not by train_step, so none is written or timed here).

Sampling: an exported model (export_model -> load_export, a plain SiT) with CFG over every step, 50 Heun and 250
Euler-Maruyama steps, bf16 autocast on GPU (fp32 on CPU); decoding uses the stand-in's trivial decoder.
--size tiny shrinks every network (see SIZES) so that the CPU smoke finishes quickly: its figures are a smoke
test of the code path and of the ratios' plumbing, not performance results.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import tempfile
import time
import traceback
from pathlib import Path

import torch

import benchlib
from throughput_ratios import blocks_name, ratios, sigmas_name
from throughput_setup import (CACHED, METHODS, PRECISIONS, SIZES, TINY_SIT, at_resolution,
                              encoders_for, posthoc_settings, run_config, write_caches)
from ahpa.config import SampleCfg
from ahpa.data.cache import CacheSource
from ahpa.data.shard_store import row_bytes
from ahpa.models.sit import SiT, SiTConfig
from ahpa.priors.targets import ChannelStats
from ahpa.sample import export_model, generate, load_export, per_sample_noise
from ahpa.train.build import autocast_dtype, precision_name
from ahpa.train.loop import Trainer

def measure_train(cfg, encoder, external, warmup: int, steps: int, device: torch.device, run_dir: Path) -> dict:
    t0 = time.perf_counter()
    trainer = Trainer(cfg, run_dir, external=external, encoder=encoder)
    p = trainer.parts
    build_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(warmup):  # compiles here when compiled
        trainer.train_step()
    benchlib.sync(device)
    warm_s = time.perf_counter() - t0
    windows, window, since = [], max(1, steps // 4), 0  # per-window rates show whether the timing is steady
    t0 = last = time.perf_counter()
    for i in range(1, steps + 1):
        metrics = trainer.train_step()
        since += 1
        if i % window == 0 or i == steps:
            benchlib.sync(device)
            now = time.perf_counter()
            windows.append(round(since * cfg.train.batch_size / (now - last), 2))
            last, since = now, 0
    dt = time.perf_counter() - t0
    B = cfg.train.batch_size
    sit_fwd = p.model.flops_per_image()
    heads = 0.0
    if p.aligner is not None:
        heads = 3 * p.aligner.flops_per_image(p.model.cfg.num_tokens)
    rec = {
        "img_per_s": round(steps * B / dt, 2), "step_ms": round(1000 * dt / steps, 2), "window_img_per_s": windows,
        "sit_params_M": round(p.model.num_params() / 1e6, 2),
        "model_gflop_per_img": round(3 * sit_fwd / 1e9, 3), "heads_gflop_per_img": round(heads / 1e9, 3),
        "levels": p.levels, "build_s": round(build_s, 2), "warmup_s": round(warm_s, 2),
        "loss_flow": float(metrics["loss/flow"]), "finite": bool(torch.isfinite(metrics["loss/flow"])),
        "peak_mem_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
    }
    rec["checkpointed_blocks"] = p.model.checkpoint_blocks
    if device.type == "cuda":
        try:  # a diagnostic: its failure must not cost the measurement above
            rec.update(benchlib.host_syncs(trainer.train_step, 3))
        except Exception as e:  # noqa: BLE001
            rec["host_syncs_error"] = f"{type(e).__name__}: {e}"
    if isinstance(p.source, CacheSource):  # what the loader reads per sample, the bytes that make it cost
        rec["cache_bytes_per_sample"] = sum(row_bytes(p.source.specs[f]) for f in p.source.fields)
        if p.source.prefetcher is not None:  # every fetch should have been prefetched: misses mean a plan mismatch
            rec["prefetch_hits"], rec["prefetch_misses"] = p.source.prefetcher.hits, p.source.prefetcher.misses
        p.source.close()  # no gather of this run may overlap the next measurement
    del trainer, p
    return rec


def frozen_encoder_gflops(method: str, encoder, external, size: dict, device: torch.device) -> float | None:
    """Forward FLOPs per image of the frozen encoder a method runs inside the step (no backward)."""
    res = size["resolution"]
    img = torch.rand(1, 3, res, res, device=device)
    if method == "ahpa-on-the-fly":
        return benchlib.count_flops(lambda: encoder.encode(img, [n for n in encoder.level_names if n != "latent"])) / 1e9
    if method in ("repa", "repa-cached"):
        return benchlib.count_flops(lambda: external(img, 1)) / 1e9
    return None


def measure_sampling(model: str, size: dict, args, encoder, device: torch.device, tmp: Path, info: dict,
                     compile_modes: tuple[bool, ...] = (False,)) -> list[dict]:
    side = size["resolution"] // encoder.factor
    sc = SiTConfig.preset(model, input_size=side, in_channels=encoder.latent_channels, num_classes=1000)
    if args.size == "tiny":
        sc.hidden_size, sc.depth, sc.num_heads = TINY_SIT[model]
    torch.manual_seed(0)
    sit = SiT(sc)
    path = export_model(tmp / "model.safetensors", sit, ChannelStats(torch.zeros(sc.in_channels), torch.ones(sc.in_channels)),
                        encoder.spec, "linear", size["resolution"])
    bundle = load_export(path, device, encoder=encoder)
    bundle.autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    n = args.sample_n or size["sample_n"][model]
    labels = torch.arange(n) % sc.num_classes
    out = []
    for compiled, (solver, steps) in ((c, s) for c in compile_modes for s in (("heun", 50), ("euler-maruyama", 250))):
        scfg = SampleCfg(solver=solver, steps=steps, cfg_scale=1.5, guidance_low=0.0, guidance_high=1.0, micro_batch=2 * n,
                         compile=compiled)
        t0 = time.perf_counter()
        generate(bundle, list(range(n)), labels, 0, SampleCfg(solver=solver, steps=2, cfg_scale=1.5, micro_batch=2 * n,
                                                              compile=compiled))  # warm-up: compiles when compiled
        benchlib.sync(device)
        warm_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        per_sample_noise(0, list(range(n)), bundle.latent_shape, steps - 1 if solver == "euler-maruyama" else 0)
        noise_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        images = generate(bundle, list(range(n)), labels, 0, scfg)
        benchlib.sync(device)
        dt = time.perf_counter() - t0
        nfe = 2 * steps - 1 if solver == "heun" else steps
        flops = nfe * 2 * n * sit.flops_per_image()  # CFG: every evaluation runs 2n rows
        peak = info["peak_bf16_tflops"]
        out.append({
            **info, "kind": "sample", "model": model, "solver": solver, "steps": steps, "nfe": nfe, "cfg_scale": 1.5,
            "guidance_interval": [0.0, 1.0], "batch": n, "micro_batch": 2 * n, "compile": compiled, "warmup_s": round(warm_s, 2),
            "precision": precision_name(autocast_dtype("auto", device)), "img_per_s": round(n / dt, 3),
            "seconds": round(dt, 3), "host_noise_s": round(noise_s, 3), "decode": "stand-in decoder (trivial)",
            "mfu": round(flops / dt / (peak * 1e12), 4) if peak else None, "images_shape": list(images.shape),
        })
    return out


def parser() -> argparse.ArgumentParser:
    """The command line (tests/test_docs_commands.py reads its flags to check the documented commands)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=tuple(SIZES), default="tiny")
    ap.add_argument("--out", type=Path, required=True, help="JSON file (rewritten after every record)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    ap.add_argument("--models", default="B/2,XL/2")
    ap.add_argument("--compile", choices=("both", "eager", "compiled"), default=None,
                    help="default: both at --size gpu, eager at --size tiny (inductor's CPU compile takes minutes)")
    ap.add_argument("--compile-mode", default="default",
                    help="train.compile_mode for compiled runs (default | max-autotune-no-cudagraphs | reduce-overhead | ...)")
    ap.add_argument("--steps", type=int, help="timed steps (default per size)")
    ap.add_argument("--warmup", type=int, help="warm-up steps before timing (default per size)")
    ap.add_argument("--batch", type=int, help="global batch for every model (default per size and model)")
    ap.add_argument("--resolution", type=int,
                    help="image side (default per size: 256 for gpu); REPA's ViT input scales with it, as REPA feeds "
                         "DINOv2 448 at 512. ImageNet 512 trains at 1,024 tokens: give a --batch that fits")
    ap.add_argument("--activation-checkpointing", default="0",
                    help="comma list of SiT blocks to checkpoint, one measurement each: N = the first N, all = every "
                         "block, 0 = off (default 0)")
    ap.add_argument("--prefetch", choices=("on", "off", "both"), default="on",
                    help="cached methods (none, ahpa-cached): gather the next step's cache rows in a background thread")
    ap.add_argument("--token-fractions", default="1",
                    help="comma list of align.token_fraction values, one measurement each for the aligned methods "
                         "(the share of tokens the heads align; default 1 = all)")
    ap.add_argument("--posthoc-ema", default="off",
                    help="comma list of train.posthoc_ema settings, one measurement each for every method: off, or "
                         "sigma_rel joined by ':' (off,0.05:0.10 = without, then with EDM2's two power-function EMAs)")
    ap.add_argument("--sampling", choices=("on", "off"), default="on")
    ap.add_argument("--sampling-compile", choices=("off", "on", "both"), default="off",
                    help="sample.compile for the sampling measurements (both: eager, then compiled, side by side)")
    ap.add_argument("--sample-n", type=int, help="images per sampling measurement (default per size and model)")
    ap.add_argument("--cache-images", type=int, help="images in the synthetic cache (default per size)")
    ap.add_argument("--work-dir", type=Path, help="where the synthetic cache and run dirs go (default: a temp dir)")
    ap.add_argument("--budget-s", type=float, default=0, help="start no new measurement after this many seconds (0 = no limit)")
    ap.add_argument("--sampling-budget-s", type=float, default=0,
                    help="start no sampling measurement after this many seconds (default: --budget-s)")
    ap.add_argument("--precision", choices=PRECISIONS, default="auto",
                    help="train.precision of the training measurements (auto: bf16 on GPUs with bf16 arithmetic)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads (CPU runs only): 1 by default, since OpenMP threads spinning on shared, busy cores "
                         "made every op 10-50x slower here")
    return ap


def main() -> None:
    args = parser().parse_args()

    size = at_resolution(SIZES[args.size], args.resolution)
    device = benchlib.resolve_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    compile_modes = {"both": (False, True), "eager": (False,), "compiled": (True,)}[args.compile or ("both" if args.size == "gpu" else "eager")]
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}; valid: {', '.join(METHODS)}")
    models = [m for m in args.models.split(",") if m]
    try:
        checkpointing = [-1 if v == "all" else int(v) for v in args.activation_checkpointing.split(",") if v]
    except ValueError:
        raise SystemExit(f"--activation-checkpointing {args.activation_checkpointing!r}: give a comma list of block counts "
                         f"or 'all', e.g. all,0") from None
    prefetch_modes = {"on": (True,), "off": (False,), "both": (True, False)}[args.prefetch]
    try:
        fractions = [float(v) for v in args.token_fractions.split(",") if v]
    except ValueError:
        raise SystemExit(f"--token-fractions {args.token_fractions!r}: give a comma list of numbers in (0, 1], e.g. 1,0.25") from None
    posthocs = [tuple(v) for v in posthoc_settings(args.posthoc_ema)]
    steps, warmup = args.steps or size["steps"], args.warmup if args.warmup is not None else size["warmup"]
    info = benchlib.device_info(device)
    info["command"] = benchlib.command_line()
    started = time.perf_counter()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="ahpa-throughput-"))
    result = {"meta": {**info, "size": args.size, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                       "cpu_threads": torch.get_num_threads(), "note": "tiny = smoke sizes, not performance results"
                       if args.size == "tiny" else ""}, "cache": None, "records": []}

    def save() -> None:
        result["ratios"] = ratios(result["records"])
        result["meta"]["elapsed_s"] = round(time.perf_counter() - started, 1)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")

    synthetic = benchlib.SyntheticSDVAE().to(device)
    caches, written = write_caches(work, size, synthetic, methods, args.cache_images or size["cache_images"], device)
    for name, key in (("levels", "cache"), ("images", "cache_images")):
        if name in written:
            result[key] = written[name]
            print(f"{key}: {written[name]}", flush=True)
    save()
    variants = [(model, compiled, ckpt, method, prefetch, fraction, posthoc) for model in models
                for compiled in compile_modes for ckpt in checkpointing for method in methods
                for prefetch in (prefetch_modes if method in CACHED else (None,))
                for fraction in (fractions if method != "none" else (1.0,)) for posthoc in posthocs]
    for model, compiled, ckpt, method, prefetch, fraction, posthoc in variants:
        base = {**info, "kind": "train", "size": args.size, "model": model, "method": method, "compile": compiled,
                "compile_mode": args.compile_mode if compiled else None,
                "batch": args.batch or size["batch"][model], "precision": precision_name(autocast_dtype(args.precision, device)),
                "resolution": size["resolution"], "timed_steps": steps, "warmup_steps": warmup,
                "activation_checkpointing": ckpt, "prefetch": prefetch, "token_fraction": fraction,
                "posthoc_ema": list(posthoc)}
        label = f"{model} {method} compile={compiled}" + (f" checkpointing={blocks_name(ckpt)}" if ckpt else "") + (
            " prefetch=off" if prefetch is False else "") + (f" token_fraction={fraction:g}" if fraction != 1 else "") + (
            f" posthoc_ema={sigmas_name(posthoc)}" if posthoc else "")
        if args.budget_s and time.perf_counter() - started > args.budget_s:
            result["records"].append({**base, "skipped": f"time budget {args.budget_s:.0f} s spent"})
            save()
            continue
        try:
            encoder, external, note = encoders_for(method, size, device, synthetic)
        except ImportError as e:
            result["records"].append({**base, "skipped": f"unavailable: {e}"})
            print(f"{label}: skipped ({e})", flush=True)
            save()
            continue
        cfg = run_config(size, args, model, method, compiled, caches, device, ckpt, prefetch, fraction, posthoc)
        try:
            rec = measure_train(cfg, encoder, external, warmup, steps, device, work / "runs" / f"{len(result['records'])}")
            rec["frozen_encoder_gflop_per_img"] = frozen_encoder_gflops(method, encoder, external, size, device)
            peak = info["peak_bf16_tflops"]
            rec["mfu"] = round(rec["img_per_s"] * rec["model_gflop_per_img"] / (peak * 1e3), 4) if peak else None
            rec["mfu_with_heads"] = (round(rec["img_per_s"] * (rec["model_gflop_per_img"] + rec["heads_gflop_per_img"])
                                           / (peak * 1e3), 4) if peak else None)
            rec["note"] = note
        except Exception as e:  # one failed configuration (an out-of-memory one too) must not lose the others' figures
            traceback.print_exc()
            rec = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        result["records"].append({**base, **rec})
        print(f"{label}: {rec.get('img_per_s', rec.get('error'))} img/s (mem {rec.get('peak_mem_gb')} GB, mfu {rec.get('mfu')})",
              flush=True)
        del encoder, external
        torch._dynamo.reset()  # drop compiled graphs (and the weights they hold); inductor's disk cache stays
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        save()
    if args.sampling == "on":
        for model in models:
            limit = args.sampling_budget_s or args.budget_s
            if limit and time.perf_counter() - started > limit:
                result["records"].append({**info, "kind": "sample", "model": model, "skipped": f"time budget {limit:.0f} s spent"})
                continue
            try:
                recs = measure_sampling(model, size, args, synthetic, device, work, info,
                                        {"off": (False,), "on": (True,), "both": (False, True)}[args.sampling_compile])
            except Exception as e:
                traceback.print_exc()
                recs = [{**info, "kind": "sample", "model": model, "error": f"{type(e).__name__}: {e}"}]
            for r in recs:
                print(f"sample {model} {r.get('solver')} compile={r.get('compile')}: {r.get('img_per_s', r.get('error'))} img/s",
                      flush=True)
            result["records"] += recs
            save()
    save()
    if args.work_dir is None:  # a temp dir of our own: the synthetic cache is gigabytes at --size gpu
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result["ratios"], indent=1))


if __name__ == "__main__":
    main()
