"""What each measurement of benchmarks/throughput.py runs: the sizes (tiny for the CPU smoke, gpu for the H100/H200
jobs), the synthetic caches the cached methods read, each measurement's Trainer config and its encoders. Split from
throughput.py, which times them; benchmarks/profile_step.py profiles the same runs."""

from __future__ import annotations

from pathlib import Path

import torch

import benchlib
from ahpa import config as config_mod
from ahpa.priors.external import ExternalEncoder
from ahpa.train.posthoc_ema import SIGMA_MAX

METHODS = ("none", "ahpa-cached", "ahpa-on-the-fly", "repa", "repa-cached")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")  # train.precision's values; run_config reads args.precision
CACHED = ("none", "ahpa-cached", "repa-cached")  # read a prepared cache: they pay its loader, and prefetch applies
TINY_SIT = {"B/2": (96, 4, 4), "XL/2": (128, 6, 4)}  # tiny stand-ins: (hidden, depth, heads)
SIZES = {
    # resolution, batch per model, timed/warm-up steps, projector width, cache images, VAE config, ViT, sampling n
    "tiny": dict(resolution=64, batch={"B/2": 16, "XL/2": 16}, steps=4, warmup=2, projector=256, cache_images=64,
                 vae=dict(benchlib.SD_VAE_CONFIG, block_out_channels=[32, 64, 128, 128], layers_per_block=1),
                 vit=dict(image_size=112, patch=14, dim=96, depth=2, heads=4), sample_n={"B/2": 8, "XL/2": 8},
                 align_depth={"B/2": 2, "XL/2": 2}, stats_images=16),
    "gpu": dict(resolution=256, batch={"B/2": 256, "XL/2": 128}, steps=20, warmup=5, projector=2048, cache_images=1024,
                vae=benchlib.SD_VAE_CONFIG, vit=dict(image_size=224, patch=14, dim=768, depth=12, heads=12),
                sample_n={"B/2": 128, "XL/2": 64}, align_depth={"B/2": 4, "XL/2": 8}, stats_images=64),
}


def at_resolution(size: dict, resolution: int | None) -> dict:
    """A size's settings at another image side: the ViT's input scales with it (REPA: 224 at 256, 448 at 512), a
    whole number of its patches; everything else (batch, steps) is the size's or the options'."""
    if not resolution or resolution == size["resolution"]:
        return size
    if resolution % 16:  # the SD-VAE's 1/8 latent and patch 2
        raise SystemExit(f"--resolution {resolution}: give a multiple of 16 (the VAE's 1/8 latent, patch 2)")
    vit = size["vit"]
    side = max(vit["patch"], round(vit["image_size"] * resolution / size["resolution"] / vit["patch"]) * vit["patch"])
    return {**size, "resolution": resolution, "vit": {**vit, "image_size": side}}


def posthoc_settings(text: str) -> list[list[float]]:
    """--posthoc-ema: a comma list of train.posthoc_ema settings, each `off` or sigma_rel joined by ':'."""
    fix = "give a comma list of settings, each 'off' or distinct sigma_rel in (0, 0.2887) joined by ':', e.g. off,0.05:0.10"
    try:
        out = [[] if v == "off" else [float(s) for s in v.split(":")] for v in text.split(",") if v]
    except ValueError:
        raise SystemExit(f"--posthoc-ema {text!r}: {fix}") from None
    if not out or any(not all(0 < s < SIGMA_MAX for s in v) or len(set(v)) != len(v) for v in out):
        raise SystemExit(f"--posthoc-ema {text!r}: {fix}")
    return out


def write_caches(work: Path, size: dict, synthetic, methods: list[str], num: int, device: torch.device
                 ) -> tuple[dict[str, Path], dict[str, dict]]:
    """The synthetic caches the methods read, written (or reused) where one of them needs it: `levels` (SD-VAE-shaped
    levels and the latent, for none and ahpa-cached) and `images` (REPA's own: the latent and the crops, for
    repa-cached). Returns (their paths, what each write reported)."""
    grid = size["resolution"] // synthetic.factor // 2  # patch 2
    caches = {"levels": work / f"cache-sdvae-shaped-{size['resolution']}",
              "images": work / f"cache-latent-images-{size['resolution']}"}
    needed = {"levels": any(m in ("none", "ahpa-cached") for m in methods), "images": "repa-cached" in methods}
    written = {name: benchlib.write_synthetic_cache(path, synthetic, num, size["resolution"], grid, device,
                                                    store_images=name == "images")
               for name, path in caches.items() if needed[name]}
    return caches, written


def run_config(size: dict, args, model: str, method: str, compiled: bool, caches: dict[str, Path], device: torch.device,
               checkpointing: int = 0, prefetch: bool | None = None, token_fraction: float = 1.0,
               posthoc: tuple[float, ...] = ()):
    """The Trainer config of one measurement (plain dict -> Config, as a YAML file would give). `posthoc`'s snapshot
    spacing is the run's length: its free-space check then counts one snapshot step, not train.steps / 16 of them
    (16 x 2 x 2.7 GB at XL/2, more than the GPU machine's disk), and train_step writes none anyway."""
    res = size["resolution"]
    m = {"preset": model}
    if args.size == "tiny":
        m["hidden_size"], m["depth"], m["num_heads"] = TINY_SIT[model]
    batch = args.batch or size["batch"][model]
    cache = caches["images" if method == "repa-cached" else "levels"]
    data = ({"source": "cache", "path": str(cache), "prefetch": bool(prefetch)} if method in CACHED else
            {"source": "procedural", "procedural_size": max(2 * batch, 64)})
    align_method = {"none": "none", "repa": "repa", "repa-cached": "repa"}.get(method, "ahpa")
    return config_mod.from_dict({
        "model": m,
        "data": {**data, "resolution": res, "hflip": True, "num_classes": 1000},
        "prior": {"encoder": "", "stats_images": size["stats_images"]},  # the encoder object's spec is recorded
        "align": {"method": align_method, "depth": size["align_depth"][model], "weight": 0.5,
                  "projector_dim": size["projector"], "router": "soft", "token_fraction": token_fraction},
        "train": {"batch_size": batch, "compile": compiled, "compile_mode": args.compile_mode, "device": str(device), "activation_checkpointing": checkpointing,
                  "precision": args.precision, "seed": 0, "steps": 10**9, "sample_every": 0, "log_every": 10**9,
                  "ckpt_every": 10**9, "lr": 1e-4, "grad_clip": 1.0, "posthoc_ema": list(posthoc),
                  "posthoc_every": 10**9 if posthoc else 0},  # not 10**9 when off: the run notes it as ignored
    })


def encoders_for(method: str, size: dict, device: torch.device, synthetic):
    """(prior encoder, external encoder or None, note) of a method; raises ImportError where one is unavailable."""
    if method == "ahpa-on-the-fly":
        return benchlib.sd_vae_random(size["vae"], device), None, "SD-VAE-config AutoencoderKL, random weights, under the run's autocast"
    if method in ("repa", "repa-cached"):
        vit = benchlib.ViTTokens(**size["vit"])
        ext = ExternalEncoder(vit, size["vit"]["dim"], input_size=size["vit"]["image_size"])
        return synthetic, ext, f"DINOv2-B/14-shaped ViT {size['vit']}, random weights, under the run's autocast"
    return synthetic, None, ""
