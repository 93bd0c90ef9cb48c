"""All random numbers of one training step, as functions of (seed, step): identical on every process, so a
resumed run and a run on any number of processes draw the same."""

from __future__ import annotations

import torch

from ahpa.align.tokens import draw_kept
from ahpa.config import Config
from ahpa.data.order import flip_mask
from ahpa.train.rng import TOKEN_STREAM, TRAIN_STREAM, generator
from ahpa.transport.timesteps import sample_t


def step_draws(cfg: Config, step: int, n: int, latent_shape: tuple[int, ...], device: torch.device,
               samples_posterior: bool, num_tokens: int) -> dict[str, torch.Tensor]:
    """The global batch's draws: flips, times t, noise, label drops, the posterior's noise (if the latent is
    sampled) and the aligned tokens (if align.token_fraction < 1)."""
    g = generator(cfg.train.seed, step, stream=TRAIN_STREAM, device=device)
    draws = {
        "flip": flip_mask(step, n, cfg.train.seed, cfg.data.hflip),
        "t": sample_t(n, cfg.transport.time_sampler, g, device, cfg.transport.time_mean, cfg.transport.time_std),
        "eps": torch.randn((n, *latent_shape), generator=g, device=device),
        "drop": torch.rand(n, generator=g, device=device) < cfg.train.label_dropout,
    }
    # the last draw of the stream, so skipping it for a deterministic encoder (TAEF2) changes no other draw
    if samples_posterior:
        draws["posterior"] = torch.randn((n, *latent_shape), generator=g, device=device)
    if cfg.align.token_fraction < 1:
        tokens = generator(cfg.train.seed, step, stream=TOKEN_STREAM, device=device)
        draws["kept"] = draw_kept(n, num_tokens, cfg.align.token_fraction, tokens, device)  # [n, k]
    return draws
