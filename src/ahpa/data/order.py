"""Deterministic data order: which samples form the global batch of a step, and which are mirrored.

Position p of the endless stream is sample perm_e[p mod N] with e = p // N and perm_e a
permutation drawn from (seed, e). Step s uses positions [s*B, (s+1)*B). Resume needs only the
step; any number of processes slices the same global batch. Because the order needs nothing but
(seed, step), a loader may gather the rows of step s+1 while step s computes (ahpa.data.prefetch).
"""

from __future__ import annotations

import functools

import torch

from ahpa.train.rng import EPOCH_STREAM, FLIP_STREAM, derive_seed, generator


@functools.lru_cache(maxsize=4)  # a step touches at most two epochs; randperm of 1.3M costs ~10 ms
def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(derive_seed(seed, epoch, stream=EPOCH_STREAM))
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


def flip_mask(step: int, batch_size: int, seed: int, hflip: bool) -> torch.Tensor:
    """Which samples of the global batch of `step` are mirrored (bool [batch_size]).

    Drawn on the host: a cache picks stored rows by it, and reading a device mask would sync."""
    return (torch.rand(batch_size, generator=generator(seed, step, stream=FLIP_STREAM)) < 0.5) & hflip


def micro_batches(batch_size: int, rank: int = 0, world: int = 1, accum: int = 1) -> list[slice]:
    """The positions in the global batch of each fetch this process makes, in order: its contiguous slice of
    the global batch, cut into `accum` micro-batches. The training step and the prefetch plan both cut by it."""
    per_rank = batch_size // world
    micro = per_rank // accum
    lo = rank * per_rank
    return [slice(lo + a * micro, lo + (a + 1) * micro) for a in range(accum)]


def process_requests(step: int, batch_size: int, n: int, seed: int, hflip: bool, rank: int = 0, world: int = 1,
                     accum: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(indices, flips) of each fetch this process makes at `step`, in order (see `micro_batches`)."""
    idx, flip = batch_indices(step, batch_size, n, seed), flip_mask(step, batch_size, seed, hflip)
    return [(idx[sl], flip[sl]) for sl in micro_batches(batch_size, rank, world, accum)]
