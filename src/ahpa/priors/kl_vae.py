"""A small KL-VAE of our own (`ahpa-vae:DIR`): for the demo and for users with their own domains.

Layout: conv_in, then per stage a residual block (its output is level `stageK`) followed by a
stride-2 convolution except after the last stage, then a 1x1 convolution to the posterior moments.
A directory holds `config.json` and `model.safetensors`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ahpa.atomic import atomic_path, atomic_write_text
from ahpa.priors.base import LATENT, EncoderOutput, Level, PriorEncoder, frozen, posterior_sample, sha256_file


@dataclass
class KLVAEConfig:
    channels: list = field(default_factory=lambda: [32, 64, 64])  # one entry per stage
    latent_channels: int = 4
    groups: int = 8


class ResBlock(nn.Module):
    def __init__(self, c: int, groups: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(groups, c), nn.SiLU(), nn.Conv2d(c, c, 3, padding=1),
            nn.GroupNorm(groups, c), nn.SiLU(), nn.Conv2d(c, c, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class KLVAE(PriorEncoder):
    def __init__(self, cfg: KLVAEConfig):
        super().__init__()
        self.cfg = cfg
        ch, g = list(cfg.channels), cfg.groups
        self.conv_in = nn.Conv2d(3, ch[0], 3, padding=1)
        self.stages = nn.ModuleList(ResBlock(c, g) for c in ch)
        self.downs = nn.ModuleList(nn.Conv2d(ch[i], ch[i + 1], 3, stride=2, padding=1) for i in range(len(ch) - 1))
        self.to_moments = nn.Sequential(nn.GroupNorm(g, ch[-1]), nn.SiLU(), nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 1))
        rev = ch[::-1]
        self.from_latent = nn.Conv2d(cfg.latent_channels, rev[0], 3, padding=1)
        self.dec_stages = nn.ModuleList(ResBlock(c, g) for c in rev)
        self.ups = nn.ModuleList(nn.Conv2d(rev[i], rev[i + 1], 3, padding=1) for i in range(len(rev) - 1))
        self.conv_out = nn.Sequential(nn.GroupNorm(g, rev[-1]), nn.SiLU(), nn.Conv2d(rev[-1], 3, 3, padding=1))
        self.factor = 2 ** (len(ch) - 1)
        self.latent_channels = cfg.latent_channels
        self.levels = tuple(Level(f"stage{i + 1}", c, 2**i) for i, c in enumerate(ch)) + (
            Level(LATENT, cfg.latent_channels, self.factor),
        )
        self.spec = "ahpa-vae:<in memory>"
        self.weights_sha256 = None

    def moments(self, x: torch.Tensor, levels: tuple[str, ...] = ()) -> tuple[torch.Tensor, torch.Tensor, dict]:
        feats = {}
        h = self.conv_in(x)
        for i, stage in enumerate(self.stages):
            h = stage(h)
            if f"stage{i + 1}" in levels:
                feats[f"stage{i + 1}"] = h
            if i < len(self.downs):
                h = self.downs[i](h)
        mean, logvar = self.to_moments(h).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0), feats

    def _encode(self, x: torch.Tensor, levels: tuple[str, ...]) -> EncoderOutput:
        mean, logvar, feats = self.moments(x, levels)
        return EncoderOutput(mean, logvar, feats)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        h = self.from_latent(z)
        for i, stage in enumerate(self.dec_stages):
            h = stage(h)
            if i < len(self.ups):
                h = self.ups[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(h)

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(directory / "model.safetensors") as tmp:
            save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(tmp))
        atomic_write_text(directory / "config.json", json.dumps(asdict(self.cfg), indent=2))

    @classmethod
    def random(cls, seed: int = 0) -> "KLVAE":
        """Untrained weights from a fixed seed (smoke runs and tests; not a useful prior)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vae = cls(KLVAEConfig())
        vae.spec = "ahpa-vae:random"
        return frozen(vae)

    @classmethod
    def from_dir(cls, directory: str | Path) -> "KLVAE":
        directory = Path(directory)
        for name in ("config.json", "model.safetensors"):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"ahpa-vae directory {str(directory)!r} has no {name} (train one with `ahpa vae-train`)")
        vae = cls(KLVAEConfig(**json.loads((directory / "config.json").read_text())))
        state = load_file(str(directory / "model.safetensors"))
        missing, unexpected = vae.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{directory / 'model.safetensors'} does not match its config.json: missing {missing}, unexpected {unexpected}")
        vae.weights_sha256 = sha256_file(directory / "model.safetensors")
        vae.spec = f"ahpa-vae:{directory}"
        return frozen(vae)


def vae_loss(vae: KLVAE, x: torch.Tensor, noise: torch.Tensor, kl_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x in [-1, 1]. Returns (loss, reconstruction MSE): L1 + MSE reconstruction plus a small KL."""
    mean, logvar, _ = vae.moments(x)
    z = posterior_sample(mean, logvar, noise)
    rec = vae._decode(z)
    mse = F.mse_loss(rec, x)
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
    return F.l1_loss(rec, x) + mse + kl_weight * kl, mse.detach()


def train_vae(
    images: np.ndarray,
    cfg: KLVAEConfig | None = None,
    steps: int = 400,
    batch_size: int = 32,
    lr: float = 2e-3,
    kl_weight: float = 1e-3,
    seed: int = 0,
    device: torch.device | str = "cpu",
    on_step: Callable[[int, float], None] | None = None,
) -> KLVAE:
    """Train a KLVAE on uint8 NHWC images; returns it frozen. `on_step(step, mse)` reports progress."""
    torch.manual_seed(seed)
    vae = KLVAE(cfg or KLVAEConfig()).to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, betas=(0.9, 0.99))
    # OneCycleLR divides by its warm-up's length minus one step, so a warm-up of exactly one step (10% of 10 steps)
    # divides by zero: that run warms up for two
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.2 if steps == 10 else 0.1)
    gen = torch.Generator().manual_seed(seed)
    data = torch.from_numpy(images)
    for step in range(steps):
        idx = torch.randint(0, len(data), (batch_size,), generator=gen)
        x = data[idx].permute(0, 3, 1, 2).float().div(127.5).sub(1).to(device)  # [B, 3, H, W] in [-1, 1]
        noise = torch.randn(x.shape[0], vae.latent_channels, x.shape[2] // vae.factor, x.shape[3] // vae.factor, generator=gen)
        loss, mse = vae_loss(vae, x, noise.to(device), kl_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if on_step is not None:
            on_step(step, mse.item())
    return frozen(vae)
