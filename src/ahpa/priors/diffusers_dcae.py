"""A diffusers `AutoencoderDC` (DC-AE, SANA's autoencoder: deterministic, 32x or more downsampling, wide latents) as a
prior encoder, on the loading, identity, hooks and decoding of `DiffusersVAE`.

Its encoder is conv_in, down blocks (each a Sequential of residual or EfficientViT blocks that ends, but in the last,
in a downsampler to the next block's width) and conv_out plus a channel-averaging shortcut that gives the latent: no
mid block and no posterior. Levels are the down blocks' outputs, captured by hooks in the one forward that gives the
latent.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ahpa.priors.base import LATENT, EncoderOutput, Level
from ahpa.priors.diffusers_vae import DiffusersVAE


def dc_levels_from_config(block_out_channels: Sequence[int], layers_per_block: Sequence[int],
                          latent_channels: int) -> tuple[Level, ...]:
    """Level names, channels and strides implied by an AutoencoderDC config (`encoder_block_out_channels`,
    `encoder_layers_per_block`, `latent_channels`).

    diffusers' DC-AE encoder: conv_in keeps the image side when the first block has layers, and is itself a stride-2
    downsampler into the second block's width when it has none (encoder_layers_per_block[0] = 0). Every block with layers
    but the last ends in a downsampler to the next block's width, so down_blocks[i] outputs block_out_channels[i + 1]
    channels at twice the stride it read (not block i's width, as in an AutoencoderKL); the last keeps its input's
    stride, the latent's. A block without layers is an identity (and then has no downsampler): no level of its own.
    """
    n = len(block_out_channels)
    stride = 1 if layers_per_block[0] > 0 else 2
    levels = []
    for i, (width, depth) in enumerate(zip(block_out_channels, layers_per_block)):
        if depth == 0:
            continue
        if i < n - 1:
            stride, width = stride * 2, block_out_channels[i + 1]
        levels.append(Level(f"down{i}", width, stride))
    levels.append(Level(LATENT, latent_channels, stride))
    return tuple(levels)


class DiffusersDCAE(DiffusersVAE):
    """Frozen diffusers AutoencoderDC with levels down{i} (the down blocks that have layers) and latent. Images in
    [-1, 1]; the latent is deterministic (no logvar, so training draws no posterior noise for it)."""

    classes = ("AutoencoderDC",)
    stochastic = False

    def _hierarchy(self, vae: nn.Module) -> tuple[tuple[Level, ...], dict[str, nn.Module]]:
        cfg = vae.config
        levels = dc_levels_from_config(cfg.encoder_block_out_channels, cfg.encoder_layers_per_block,
                                       int(cfg.latent_channels))
        blocks = vae.encoder.down_blocks
        return levels, {lvl.name: blocks[int(lvl.name[4:])] for lvl in levels if lvl.name != LATENT}

    def _encode(self, x: torch.Tensor, levels: tuple[str, ...]) -> EncoderOutput:
        with self._capture(levels) as features:
            # vae.encoder directly rather than vae.encode: tiling (if a user enabled it) would run the blocks once per
            # tile and the hooks would keep only the last
            latent = self.vae.encoder(self._in_vae_dtype(x))  # [B, C_lat, H/f, W/f]
        return EncoderOutput(mean=latent, logvar=None, features=dict(features))
