"""Where a training batch's latents and prior targets come from.

A source maps global sample indices to a `PriorBatch`: the (sampled, raw) latent, each level's
map pooled to the token grid (raw, before standardisation) and the labels. `OnTheFly` runs the
frozen encoder on in-memory images inside the step; a prepared cache (ahpa.data.cache) reads
the same quantities from disk. Statistics are measured by the source that knows the data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from ahpa.data.sources import ImageSet
from ahpa.device import autocast
from ahpa.priors.base import PriorEncoder
from ahpa.priors.targets import PriorStats, StatsAccumulator, pool_to_grid


@dataclass
class PriorBatch:
    latent: torch.Tensor  # [B, C, h, w] raw latent (sampled from the posterior where there is one)
    levels: dict[str, torch.Tensor]  # name -> [B, N, C_k] pooled to the token grid, raw
    labels: torch.Tensor  # int64 [B]
    images: torch.Tensor | None = None  # [B, 3, R, R] in [0, 1]: on the fly, or a cache's stored crops (REPA reads pixels)


class BatchSource(Protocol):
    """What the trainer uses of a source of batches: `OnTheFly` and a prepared cache (ahpa.data.cache.CacheSource)
    are the two; a third needs these, and may add `start_prefetch(plan, step)` and `close()` (a cache gathers the
    coming steps' rows in a background thread; the trainer calls them where the source has them)."""

    levels: list[str]  # the levels it reads, the external encoder's aside
    num_classes: int
    samples_posterior: bool  # whether fetch takes posterior noise (the latent is sampled)

    def __len__(self) -> int: ...

    @property
    def reads_priors(self) -> bool: ...  # whether a batch reads more than the latent

    def drop_levels(self) -> None: ...  # alignment has stopped: read the latent (and labels) alone from now on

    def fetch(self, idx: torch.Tensor, flip: torch.Tensor | None, posterior_noise: torch.Tensor | None) -> PriorBatch: ...

    def measure_stats(self, num_images: int, generator: torch.Generator) -> PriorStats: ...


def prepare_images(images_u8: torch.Tensor, resolution: int, flip: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, R, R] in [0, 1], bicubic-resized if needed, flipped where `flip`."""
    x = images_u8.permute(0, 3, 1, 2).float().div_(255.0)  # [B, 3, H, W]
    if x.shape[-1] != resolution or x.shape[-2] != resolution:
        x = F.interpolate(x, size=(resolution, resolution), mode="bicubic", align_corners=False).clamp_(0, 1)
    if flip is not None:
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x


class OnTheFly:
    """Encodes in-memory images with the frozen encoder inside the training step."""

    def __init__(self, data: ImageSet, encoder: PriorEncoder, levels: list[str], grid: int, resolution: int,
                 device: torch.device, amp: torch.dtype | None = None):
        self.data, self.encoder, self.grid, self.resolution, self.device = data, encoder, grid, resolution, device
        self.amp = amp  # the frozen encoder runs under the training autocast (bf16 on CUDA)
        self.levels = [l for l in levels if l != "external"]
        self.num_classes = data.num_classes
        self.samples_posterior = encoder.stochastic  # whether fetch uses posterior noise
        if device.type == "cuda":  # the encoder runs in every step: channels-last convolutions are faster there
            encoder.use_memory_format(torch.channels_last)

    def __len__(self) -> int:
        return len(self.data)

    @property
    def reads_priors(self) -> bool:
        """Whether a batch reads more than the latent (the images are decoded for the latent anyway)."""
        return bool(self.levels)

    def drop_levels(self) -> None:
        """From now on encode and return the latent alone (align.stop_step)."""
        self.levels = []

    @torch.no_grad()
    def fetch(self, idx: torch.Tensor, flip: torch.Tensor | None, posterior_noise: torch.Tensor | None) -> PriorBatch:
        flip = None if flip is None else flip.to(self.device, non_blocking=True)
        images = prepare_images(self.data.images[idx].to(self.device, non_blocking=True), self.resolution, flip)
        with autocast(self.device, self.amp):
            out = self.encoder.encode(images, [l for l in self.levels if l != "latent"])
        latent = out.sample(posterior_noise)  # fp32: the flow loss is fp32 whatever the encoder ran in
        maps = {name: pool_to_grid(latent if name == "latent" else out.features[name], self.grid) for name in self.levels}
        return PriorBatch(latent, maps, self.data.labels[idx].to(self.device, non_blocking=True), images)

    @torch.no_grad()
    def measure_stats(self, num_images: int, generator: torch.Generator, batch_size: int = 64) -> PriorStats:
        """Latent statistics per channel and level statistics after pooling, on the first images (no flips)."""
        lat, acc = StatsAccumulator(), {name: StatsAccumulator() for name in self.levels}
        n = min(num_images, len(self))
        c, f = self.encoder.latent_channels, self.encoder.factor
        for lo in range(0, n, batch_size):
            idx = torch.arange(lo, min(lo + batch_size, n))
            side = self.resolution // f
            noise = torch.randn((len(idx), c, side, side), generator=generator, device=self.device)
            b = self.fetch(idx, None, noise)
            lat.update(b.latent, channel_dim=1)
            for name in self.levels:
                acc[name].update(b.levels[name], channel_dim=2)
        return PriorStats(lat.result(), {name: a.result() for name, a in acc.items()})
