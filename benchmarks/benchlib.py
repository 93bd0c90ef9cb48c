"""Shared parts of the benchmarks: environment record, stand-in encoders, a synthetic prepared cache.

Nothing here is part of the library. The stand-ins exist so that the throughput benchmark runs with no
files and no downloads (the GPU machine has neither pretrained weights nor diffusers):

- `SyntheticSDVAE`: a PriorEncoder with SD-VAE's level names, channels and strides (down0 128@1/2,
  down1 256@1/4, down2/down3/mid 512@1/8, latent 4@1/8 with posterior moments) whose maps are cheap fixed
  random functions of the image. Only shapes and bytes matter to a throughput measurement; it writes the
  synthetic cache through the library's own `prepare`, gives REPA runs their latents (REPA pre-extracts
  them) and decodes samples for the sampling benchmark.
- `ViTTokens`: a DINOv2-B/14-shaped ViT (patch 14, 768 wide, 12 blocks, LayerScale) with random weights,
  built from torch.nn layers, returning patch tokens: REPA's external encoder at its real cost.
"""

from __future__ import annotations

import collections
import json
import math
import os
import platform
import sys
import threading
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ahpa.device import peak_tflops
from ahpa.priors.base import EncoderOutput, PriorEncoder, frozen
from ahpa.priors.diffusers_vae import levels_from_config

# stabilityai/sd-vae-ft-ema as diffusers AutoencoderKL arguments (shared/reference/sd-vae-ft-ema.config.json):
# restated so that no file outside the repository is needed on the GPU machine.
SD_VAE_CONFIG = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4, "layers_per_block": 2,
    "norm_num_groups": 32, "out_channels": 3, "sample_size": 256, "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}  # fmt: skip

def device_info(device: torch.device) -> dict:
    """What every record carries about where it ran."""
    if device.type == "cuda":
        name, peak = torch.cuda.get_device_name(device), peak_tflops(device)  # the MFU denominator
    else:
        n = torch.get_num_threads()
        name = f"CPU {platform.machine()} ({n} thread{'s' if n > 1 else ''})"
        peak = None  # no MFU on CPU: no meaningful dense peak to divide by
    info = {"device": name, "peak_bf16_tflops": peak, "torch": torch.__version__, "python": platform.python_version()}
    # the compiler's settings given by environment (TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1, say) change the kernels;
    # its cache directory does not (and inductor sets that variable itself once it has compiled)
    inductor = {k: v for k, v in sorted(os.environ.items()) if k.startswith("TORCHINDUCTOR_") and k != "TORCHINDUCTOR_CACHE_DIR"}
    return {**info, "inductor_env": inductor} if inductor else info


def resolve_device(spec: str) -> torch.device:
    """--device of the benchmarks: auto = CUDA if present, else the CPU (never MPS: the figures are CPU or CUDA ones)."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def command_line() -> str:
    return " ".join([Path(sys.executable).name, *sys.argv])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


SYNC_STACK_FRAMES = 6  # Python frames kept per host-sync site


def host_syncs(step: Callable[[], object], steps: int) -> dict:
    """Host syncs in `steps` calls of `step`, a training step (which should have none: the CPU queues work ahead of the GPU),
    counted by CUDA's sync debug mode, which warns at each one. Each site is the Python stack at the warning,
    innermost first (a warning names one frame only: the eleventh session's B/2 vanilla step reported a sync at
    `__init__.py:1270`, which did not say whose). `host_syncs_per_step` counts the calling thread's syncs (the
    step's); other threads' (the cache's prefetch thread) are counted apart and their sites named by thread.
    Other warnings are shown as usual."""
    here = threading.get_ident()
    counts, sites, lock = collections.Counter(), collections.Counter(), threading.Lock()
    show = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return show(message, category, filename, lineno, file, line)
        # the stack up to the warning: without this function's frame and the warnings module's own
        stack = [f for f in traceback.extract_stack()[:-1] if Path(f.filename).name != "warnings.py"][-SYNC_STACK_FRAMES:]
        mine = threading.get_ident() == here
        site = ("" if mine else f"[{threading.current_thread().name}] ") + " <- ".join(
            f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(stack))
        with lock:  # the prefetch thread warns too
            counts[mine] += 1
            sites[site] += 1

    with warnings.catch_warnings():  # restores warnings.showwarning on exit
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return {"host_syncs_per_step": round(counts[True] / steps, 2),
            "host_syncs_other_threads_per_step": round(counts[False] / steps, 2),
            "host_sync_sites": dict(sites.most_common(8))}


def count_flops(fn) -> float:
    """FLOPs (2 x multiply-adds) of one call, counted by torch's FlopCounterMode (matmuls, convs, SDPA)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


class SyntheticSDVAE(PriorEncoder):
    """SD-VAE-shaped levels and latent moments from fixed random per-pixel maps of the pooled image (cheap)."""

    def __init__(self, block_out_channels=(128, 256, 512, 512), latent_channels: int = 4, seed: int = 0):
        super().__init__()
        self.levels = levels_from_config(list(block_out_channels), latent_channels)
        self.factor = 2 ** (len(block_out_channels) - 1)
        self.latent_channels = latent_channels
        self.spec = "bench:synthetic-sd-vae"  # not a registry kind: handed to Trainer(encoder=...)
        self.weights_sha256 = None
        g = torch.Generator().manual_seed(seed)
        for lvl in self.levels:
            if lvl.name != "latent":
                setattr(self, f"w_{lvl.name}", nn.Parameter(torch.randn(lvl.channels, 3, generator=g) * 2.0))
                setattr(self, f"b_{lvl.name}", nn.Parameter(torch.rand(lvl.channels, generator=g) * math.pi))
        # parameters, not buffers: the library finds an encoder's device from its first parameter
        self.w_moments = nn.Parameter(torch.randn(2 * latent_channels, 3, generator=g))
        self.w_decode = nn.Parameter(torch.randn(3, latent_channels, generator=g) * 0.5)
        frozen(self)

    def _encode(self, x: torch.Tensor, levels: tuple[str, ...]) -> EncoderOutput:
        x = x.float()
        feats = {}
        for name in levels:
            if name == "latent":
                continue
            lvl = self.level(name)
            pooled = F.avg_pool2d(x, lvl.stride)  # [B, 3, R/s, R/s]
            w, b = getattr(self, f"w_{name}"), getattr(self, f"b_{name}")
            feats[name] = torch.sin(torch.einsum("bchw,kc->bkhw", pooled, w) + b[:, None, None])  # [B, C_k, R/s, R/s]
        moments = torch.einsum("bchw,kc->bkhw", F.avg_pool2d(x, self.factor), self.w_moments)  # [B, 2C, h, w]
        mean, logvar = moments.chunk(2, dim=1)
        logvar = -4.0 + 0.5 * torch.tanh(logvar)  # small posterior spread, as a trained KL-VAE has
        if "latent" in levels:
            feats["latent"] = mean
        return EncoderOutput(mean, logvar, feats)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(z.float(), scale_factor=self.factor, mode="nearest")  # [B, C, R, R]
        return torch.tanh(torch.einsum("bchw,kc->bkhw", up, self.w_decode))  # [B, 3, R, R] in [-1, 1]


def sd_vae_random(config: dict, device: torch.device, seed: int = 0) -> PriorEncoder:
    """The library's DiffusersVAE around an AutoencoderKL with random weights (needs diffusers)."""
    from ahpa.priors.diffusers_vae import DiffusersVAE

    torch.manual_seed(seed)
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    enc = DiffusersVAE.from_config(config, memory_format=fmt)
    enc.spec = "diffusers:<random SD-VAE config>"
    return enc.to(device)


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ls1 = nn.Parameter(torch.full((dim,), 1e-5))  # DINOv2's LayerScale
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = nn.Linear(dim, int(dim * mlp_ratio))
        self.fc2 = nn.Linear(int(dim * mlp_ratio), dim)
        self.ls2 = nn.Parameter(torch.full((dim,), 1e-5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # [3, B, H, N, Dh]
        a = F.scaled_dot_product_attention(*qkv.unbind(0))  # [B, H, N, Dh]
        x = x + self.ls1 * self.proj(a.transpose(1, 2).reshape(b, n, d))
        return x + self.ls2 * self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViTTokens(nn.Module):
    """A DINOv2-shaped ViT with random weights: images [B, 3, S, S] (normalised) -> patch tokens [B, (S/p)^2, C]."""

    def __init__(self, image_size: int = 224, patch: int = 14, dim: int = 768, depth: int = 12, heads: int = 12):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        n = (image_size // patch) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(_Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.patch_embed(x).flatten(2).transpose(1, 2)  # [B, N, C]
        h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1) + self.pos_embed  # [B, 1 + N, C]
        for blk in self.blocks:
            h = blk(h)
        return self.norm(h)[:, 1:]  # drop CLS -> [B, N, C]


def write_synthetic_cache(out: Path, encoder: PriorEncoder, num: int, resolution: int, grid: int,
                          device: torch.device, num_classes: int = 1000, store_images: bool = False) -> dict:
    """A real prepared cache (the library's `prepare`, stored flips, fp16) of `num` random images encoded by
    `encoder`; reused when complete. With `store_images`, REPA's: the latent and the uint8 crops, no levels.
    Returns {path, images, bytes, bytes_per_image, seconds, reused}."""
    import time

    from ahpa.data.cache import read_manifest
    from ahpa.data.prepare import PrepareOptions, prepare
    from ahpa.data.shard_store import row_bytes

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    src = out.parent / f"{out.name}-images.npz"
    if not src.exists():
        rng = np.random.default_rng(0)
        # 8x8 sources: prepare upsamples them on the device, so writing the cache costs little host work
        np.savez(src, images=rng.integers(0, 256, (num, 8, 8, 3), dtype=np.uint8), labels=np.arange(num) % num_classes)
    opts = PrepareOptions(images=str(src), vae=encoder.spec, resolution=resolution, out=str(out), grid=grid,
                          dtype="fp16", flips="stored", batch=64, workers=0, device=str(device), shard_size=512,
                          store_images=store_images, levels=["latent"] if store_images else None)
    t0 = time.perf_counter()
    res = prepare(opts, encoder=encoder.to(device))
    return {"path": str(res.path), "images": res.images, "bytes": res.bytes,
            # a sample reads one variant of each field (the original or its stored flip; the image once)
            "bytes_per_image_read": sum(row_bytes(spec) for name, spec in read_manifest(res.path)["fields"].items()
                                        if not name.startswith("flip.")),
            "seconds": round(time.perf_counter() - t0, 2), "reused": res.noop}


def append_jsonl(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
