"""Deterministic data order: which samples form the global batch of a step.

Position p of the endless stream is sample perm_e[p mod N] with e = p // N and perm_e a
permutation drawn from (seed, e). Step s uses positions [s*B, (s+1)*B). Resume needs only the
step; any number of processes slices the same global batch.
"""

from __future__ import annotations

import functools

import torch

from ahpa.train.rng import derive_seed


@functools.lru_cache(maxsize=4)  # a step touches at most two epochs; randperm of 1.3M costs ~10 ms
def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(derive_seed(seed, epoch, stream=17))
    return torch.randperm(n, generator=g)


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> torch.Tensor:
    """Global batch indices of `step` (int64 [batch_size])."""
    pos = torch.arange(step * batch_size, (step + 1) * batch_size)
    epochs = pos // n
    out = torch.empty_like(pos)
    for e in epochs.unique().tolist():
        sel = epochs == e
        out[sel] = epoch_permutation(n, seed, e)[pos[sel] % n]
    return out
