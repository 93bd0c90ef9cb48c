"""Every random draw comes from a generator seeded by (seed, step or index, stream), never by rank."""

from __future__ import annotations

import hashlib
import operator

import torch


def derive_seed(*parts: int, stream: int = 0) -> int:
    # hashed by value: repr() of numpy's int64(3) or torch's tensor(3) is not repr(3), and a sample index given so
    # (generate(bundle, torch.arange(8), ...)) drew other noise than `ahpa sample` draws for that index
    parts = tuple(operator.index(p) for p in parts)
    digest = hashlib.blake2b(repr((stream, *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def generator(*parts: int, stream: int = 0, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derive_seed(*parts, stream=stream))
