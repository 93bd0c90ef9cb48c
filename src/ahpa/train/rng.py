"""Every random draw comes from a generator seeded by (seed, step or index, stream), never by rank.

Each kind of draw has a stream of its own, listed here so that a new kind takes a number no other uses: drawing more
or less of one kind (align.token_fraction < 1 adds the token draws) then changes no other draw. The numbers are part
of every run's identity: changing one changes what a seed draws.
"""

from __future__ import annotations

import hashlib
import operator

import torch

TRAIN_STREAM = 1  # a step's times t, noise, label drops, posterior noise (seed, step): ahpa.train.draws
STATS_STREAM = 2  # the posterior noise while a new run measures its prior statistics (seed): ahpa.train.build
SAMPLE_STREAM = 3  # a sample's initial and SDE noise (seed, sample index): ahpa.sample
FLIP_STREAM = 4  # which images of a step's batch are mirrored (seed, step): ahpa.data.order
TOKEN_STREAM = 5  # the tokens a step aligns, align.token_fraction < 1 (seed, step): ahpa.train.draws
EPOCH_STREAM = 17  # each epoch's permutation of the data (seed, epoch): ahpa.data.order
NOISE_STREAM = 31  # posterior noise of prepare's latent statistics, from (seed, shard): ahpa.data.shard_encoder


def derive_seed(*parts: int, stream: int = 0) -> int:
    # hashed by value: repr() of numpy's int64(3) or torch's tensor(3) is not repr(3), and a sample index given so
    # (generate(bundle, torch.arange(8), ...)) drew other noise than `ahpa sample` draws for that index
    parts = tuple(operator.index(p) for p in parts)
    digest = hashlib.blake2b(repr((stream, *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def generator(*parts: int, stream: int = 0, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derive_seed(*parts, stream=stream))
