"""Aligning a random subset of the tokens (align.token_fraction).

The alignment loss is a mean over tokens, so the mean over a uniformly drawn subset of them is an unbiased
estimate of it, and so is its gradient: aligning k of N tokens keeps the objective in expectation and runs the
projector heads on k/N of the tokens. Where the heads are a large share of a step's arithmetic (REPA's 2048-wide
projector adds 25% to SiT-S/1, 11% to B/2) that is most of their cost; the price is a noisier alignment gradient.
"""

from __future__ import annotations

import torch


def kept_tokens(num_tokens: int, fraction: float) -> int:
    """How many of `num_tokens` tokens a fraction aligns (at least one)."""
    return max(1, min(num_tokens, round(num_tokens * fraction)))


def draw_kept(n: int, num_tokens: int, fraction: float, generator: torch.Generator, device) -> torch.Tensor:
    """[n, k] distinct token indices per sample, uniform over subsets (the k largest of N uniform scores)."""
    scores = torch.rand(n, num_tokens, generator=generator, device=device)  # [n, N]
    return scores.topk(kept_tokens(num_tokens, fraction), dim=1).indices  # [n, k]


def gather_tokens(x: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """x [B, N, C], kept [B, k] -> [B, k, C]: each sample's kept tokens."""
    return x.gather(1, kept[:, :, None].expand(-1, -1, x.shape[-1]))
