"""The interface every frozen prior encoder (a VAE and its level taps) implements.

One codec object owns the image range its VAE expects: callers always pass images as float
in [0, 1] (NCHW) and get images in [0, 1] back from `decode`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

# the name of the level that is the latent itself (the last of every encoder's levels)
LATENT = "latent"


@dataclass(frozen=True)
class Level:
    """One alignment target: a feature map of the encoder (or the latent itself)."""

    name: str
    channels: int
    stride: int  # image side / feature-map side


def posterior_sample(mean: torch.Tensor, logvar: torch.Tensor | None, noise: torch.Tensor | None) -> torch.Tensor:
    """mean + exp(logvar / 2) * noise in fp32 (the mean alone without a logvar or noise).

    The caller draws `noise`, so every draw comes from its own seeded generator."""
    if logvar is None or noise is None:
        return mean.float()
    return mean.float() + torch.exp(0.5 * logvar.float()) * noise


@dataclass
class EncoderOutput:
    mean: torch.Tensor  # [B, C_lat, H/f, W/f] latent (posterior mean for a KL-VAE)
    logvar: torch.Tensor | None  # [B, C_lat, H/f, W/f] or None for a deterministic encoder
    features: dict[str, torch.Tensor]  # level name -> [B, C_k, H/s_k, W/s_k]

    def sample(self, noise: torch.Tensor | None = None) -> torch.Tensor:
        """A latent from the posterior given standard-normal `noise` (the mean for deterministic encoders)."""
        return posterior_sample(self.mean, self.logvar, noise)


class PriorEncoder(nn.Module):
    """A frozen VAE: encodes images to a latent and exposes its hierarchy of levels.

    Subclasses set `spec` (the grammar string that built them), `levels` (ordered fine to coarse,
    the latent last, named "latent"), `latent_channels` and `factor` (image side / latent side),
    and implement `_encode(x, levels)` on images already in their own range and `_decode(z)`.
    """

    spec: str
    levels: tuple[Level, ...]
    latent_channels: int
    factor: int
    stochastic: bool = True  # encode returns a posterior logvar, so training samples the latent (TAEF2: False)
    memory_format: torch.memory_format = torch.contiguous_format  # of conv weights and inputs (use_memory_format)

    def level(self, name: str) -> Level:
        for lvl in self.levels:
            if lvl.name == name:
                return lvl
        raise KeyError(f"encoder {self.spec!r} has no level {name!r}; its levels are {[l.name for l in self.levels]}")

    @property
    def level_names(self) -> list[str]:
        return [lvl.name for lvl in self.levels]

    def use_memory_format(self, memory_format: torch.memory_format) -> "PriorEncoder":
        """Keep conv weights, and convert inputs, to `memory_format`. channels_last lets cuDNN run the convolutions
        without layout transposes, which is faster on recent GPUs, in bf16 especially; the results are the same
        up to the order of additions inside a convolution."""
        self.memory_format = memory_format
        self.to(memory_format=memory_format)  # converts the 4-d (conv) weights only
        return self

    def to_input_range(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> the range this VAE expects (default [-1, 1])."""
        return images * 2 - 1

    def from_output_range(self, images: torch.Tensor) -> torch.Tensor:
        return ((images + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, levels: list[str] | tuple[str, ...] = ()) -> EncoderOutput:
        """images: float [B, 3, H, W] in [0, 1]. Features are returned for the requested levels."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"encoder {self.spec!r} takes RGB images [B, 3, H, W], got shape {tuple(images.shape)}")
        h, w = images.shape[-2:]
        if h % self.factor or w % self.factor:
            raise ValueError(f"image size {h}x{w} is not divisible by the VAE factor {self.factor} of {self.spec!r}")
        self._check_levels()
        for name in levels:
            self.level(name)  # fails with the list of valid names
        stages = tuple(n for n in levels if n != LATENT)  # _encode computes the latent anyway: it never sees the name
        out = self._encode(self._in_memory_format(self.to_input_range(images)), stages)
        self._check_output(out, stages, (h, w))
        # asked for by name: the mean, for every encoder alike. (Training's `latent` level is not this: it is the
        # posterior sample the SiT denoises, pooled, ahpa.data.batches and the cache reader)
        if LATENT in levels:
            out.features[LATENT] = out.mean
        return out

    def _check_levels(self) -> None:
        """The declared hierarchy against itself: unique names, and a latent Level that says what `latent_channels` and
        `factor` say (the heads are sized from the Level, the data from the attributes: a mismatch used to be a bare
        shape error at the first training step)."""
        names = self.level_names
        where = f"{type(self).__name__} ({getattr(self, 'spec', '')!r})"
        if len(set(names)) != len(names):
            raise ValueError(f"{where} declares levels {names}: each name once")
        if LATENT not in names:
            raise ValueError(f"{where} declares levels {names} without the latent: the last is Level('latent', "
                             f"latent_channels, factor)")
        lat = self.level(LATENT)
        if (lat.channels, lat.stride) != (self.latent_channels, self.factor):
            raise ValueError(f"{where} declares Level('latent', {lat.channels}, {lat.stride}) but latent_channels="
                             f"{self.latent_channels} and factor={self.factor}: they describe the same latent")

    def _check_output(self, out: EncoderOutput, levels, size: tuple[int, int]) -> None:
        """What _encode returned against what `levels` declares (channels, and the side: image side / stride): a wrong
        map fails here, naming the encoder and level. Shapes only: no host sync."""
        where = f"{type(self).__name__}._encode ({self.spec!r})"
        if out.mean.shape[1] != self.latent_channels:
            raise ValueError(f"{where} returned a latent of {out.mean.shape[1]} channels; latent_channels is {self.latent_channels}")
        if (out.logvar is not None) != self.stochastic:  # on the fly and a prepared cache must agree on sampling
            raise ValueError(
                f"{where} returned {'a' if out.logvar is not None else 'no'} posterior logvar but its `stochastic` is "
                f"{self.stochastic}: training samples the latent exactly when an encoder is stochastic, and a cache "
                f"stores the logvar to do so; set stochastic = {out.logvar is not None} or return "
                f"{'logvar=None' if out.logvar is not None else 'the logvar'}")
        latent_side = (size[0] // self.factor, size[1] // self.factor)
        if tuple(out.mean.shape[2:]) != latent_side:
            raise ValueError(f"{where} returned a latent of {tuple(out.mean.shape[2:])} for images {size}; the factor "
                             f"{self.factor} makes it {latent_side}")
        for name in levels:
            if name not in out.features:
                raise ValueError(f"{where} was asked for level {name!r} and returned features {sorted(out.features)}; "
                                 "features holds every requested level other than the latent")
            lvl, got = self.level(name), out.features[name].shape
            if got[1] != lvl.channels:
                raise ValueError(f"{where} returned level {name!r} with {got[1]} channels; its Level declares {lvl.channels}")
            side = (size[0] // lvl.stride, size[1] // lvl.stride)
            if tuple(got[2:]) != side:
                raise ValueError(f"{where} returned level {name!r} at {tuple(got[2:])} for images {size}; its Level "
                                 f"declares stride {lvl.stride}, so {side} (a map pooled or from another level?)")

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, C_lat, h, w] (raw, not normalised) -> images [B, 3, h*f, w*f] in [0, 1]."""
        return self.from_output_range(self._decode(self._in_memory_format(latents)))

    def _in_memory_format(self, x: torch.Tensor) -> torch.Tensor:
        # only when asked: in the default format, inputs keep the strides they come with, as they always did
        return x if self.memory_format == torch.contiguous_format else x.contiguous(memory_format=self.memory_format)

    def _encode(self, x: torch.Tensor, levels: tuple[str, ...]) -> EncoderOutput:  # pragma: no cover
        raise NotImplementedError

    def _decode(self, z: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def identity(self) -> dict:
        """What a cache or run records to recognise this encoder again."""
        return {"spec": self.spec, "weights_sha256": getattr(self, "weights_sha256", None)}


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def frozen(module: nn.Module) -> nn.Module:
    module.eval()
    module.requires_grad_(False)
    return module
