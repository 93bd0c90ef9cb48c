"""From encoder outputs to training inputs: normalised latents and per-level token targets.

Each level's map is average-pooled to the DiT token grid and standardised per channel with
statistics measured on the data; the latent is standardised per channel too (no magic 0.18215).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ahpa.priors.base import Level


def uneven_pooling(level: Level, resolution: int, grid: int) -> str | None:
    """Why the map of `level` does not average-pool evenly to the `grid` x `grid` token grid of images of side
    `resolution`, or None when it does: when whole cells of the level (stride x stride pixels) tile a token
    (resolution / grid pixels), token i's target is the mean over patch i. Otherwise pool_to_grid's adaptive pooling
    averages overlapping windows of unequal size (a map a little larger than the grid) or copies one cell into
    several tokens (a smaller one), and a stride that does not divide the resolution leaves a map that does not cover
    the image: targets that are not their tokens' patches."""
    token = resolution // grid
    if resolution % grid == 0 and token % level.stride == 0:
        return None
    side = resolution // level.stride
    return (f"level {level.name!r} has stride {level.stride}, a {side}x{side} map at resolution {resolution}, which "
            f"does not pool evenly to the {grid}x{grid} token grid: a token covers {token}x{token} pixels, and a "
            f"level's stride must divide {token}")


def pool_to_grid(feat: torch.Tensor, grid: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, grid*grid, C] by average pooling (H, W multiples of grid, or adaptive)."""
    if feat.shape[-1] != grid or feat.shape[-2] != grid:
        feat = F.adaptive_avg_pool2d(feat.float(), grid)
    # [B, C, g, g] -> [B, N = g*g, C], row-major over the grid as the SiT's tokens (SiT.forward): token i of a
    # target and of the hidden states is the same patch
    return feat.flatten(2).transpose(1, 2)


@dataclass
class ChannelStats:
    """Per-channel mean and std of one level (or the latent), measured on the data. They stay on the CPU (what
    checkpoints and exports record); each device and layout they are used at (rank, channel dimension) gets one
    float32 copy shaped to broadcast, made at the first use: copying them from host memory at every call would make
    the training step wait for the GPU (a host sync), 2 + 2 x levels times per micro-batch, and reshaping them at
    every call costs host time (two views each for the latent and every level, each micro-batch)."""

    mean: torch.Tensor  # [C]
    std: torch.Tensor  # [C]
    _views: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def _on(self, x: torch.Tensor, channel_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) on x's device, viewed to broadcast along `channel_dim`. A step uses one or two layouts per
        statistics object, so a copy per layout rather than one per device shared by its views costs a few [C]
        copies, once."""
        key = (x.device, x.ndim, channel_dim % x.ndim)
        if key not in self._views:
            shape = [1] * x.ndim
            shape[channel_dim] = -1
            self._views[key] = tuple(v.to(x.device, torch.float32).reshape(shape) for v in (self.mean, self.std))
        return self._views[key]

    def apply(self, x: torch.Tensor, channel_dim: int) -> torch.Tensor:
        mean, std = self._on(x, channel_dim)
        return (x.float() - mean) / std

    def invert(self, x: torch.Tensor, channel_dim: int) -> torch.Tensor:
        mean, std = self._on(x, channel_dim)
        return x.float() * std + mean


class StatsAccumulator:
    """Streaming per-channel moments: float64 sums kept on the input's device (no host sync per update)."""

    def __init__(self) -> None:
        self.n = 0
        self.s1: torch.Tensor | None = None
        self.s2: torch.Tensor | None = None

    def update(self, x: torch.Tensor, channel_dim: int) -> None:
        # float64 accumulators without a float64 copy of x or a movedim copy: this runs for every level
        # on every batch (prepare, statistics), so it must stay small next to the encoder
        x = x.detach().float()
        dims = [d for d in range(x.ndim) if d != channel_dim % x.ndim]
        s1 = x.sum(dims, dtype=torch.float64)  # [C]
        s2 = x.square().sum(dims, dtype=torch.float64)
        self.s1 = s1 if self.s1 is None else self.s1 + s1
        self.s2 = s2 if self.s2 is None else self.s2 + s2
        self.n += x.numel() // x.shape[channel_dim]

    def result(self, min_std: float = 1e-4) -> ChannelStats:
        mean = self.s1.cpu() / self.n
        var = (self.s2.cpu() / self.n - mean * mean).clamp_min(0)
        return ChannelStats(mean.float(), var.sqrt().clamp_min(min_std).float())


@dataclass
class PriorStats:
    latent: ChannelStats
    levels: dict[str, ChannelStats] = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = {"latent.mean": self.latent.mean, "latent.std": self.latent.std}
        for name, s in self.levels.items():
            out[f"level.{name}.mean"], out[f"level.{name}.std"] = s.mean, s.std
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "PriorStats":
        levels = {}
        for key in d:
            if key.startswith("level.") and key.endswith(".mean"):
                name = key[len("level.") : -len(".mean")]
                levels[name] = ChannelStats(d[key], d[f"level.{name}.std"])
        return cls(ChannelStats(d["latent.mean"], d["latent.std"]), levels)


def standardise_levels(maps: dict[str, torch.Tensor], levels: list[str], stats: PriorStats) -> list[torch.Tensor]:
    """K x [B, N, C_k] standardised targets, in the order of `levels`."""
    return [stats.levels[name].apply(maps[name], channel_dim=2) for name in levels]
