"""Exponential moving average of the backbone, with warm-up.

A fixed 0.9999 still holds mostly the initial weights after a few thousand steps, so the decay
ramps up as min(decay, (1 + n) / (10 + n)) when warm-up is on.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ahpa.train.distributed import local_shard
from ahpa.train.posthoc_ema import averaging_sigma_rel


def ema_decay(num_updates: int, decay: float, warmup: bool) -> float:
    return min(decay, (1 + num_updates) / (10 + num_updates)) if warmup else decay


def ema_sigma_rel(decay: float, warmup: bool, steps: int) -> float:
    """EDM2's sigma_rel of this EMA after `steps` updates (one per optimiser step, skipped ones included, as the
    training loop counts them): the relative std of its averaging profile (ahpa.train.posthoc_ema.averaging_sigma_rel),
    to set it beside post-hoc reconstructions. 0.9999 with warm-up: 0.0906 at 4,000 steps, 0.0905 at 8,000 (close to a
    power-function EMA of gamma 8); without warm-up the initial weights' share decay**steps dominates it."""
    if not 0 <= decay < 1:
        raise ValueError(f"train.ema_decay={decay}: a decay is in [0, 1)")
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps={steps}: sigma_rel is told after a whole number of updates, at least one")
    return averaging_sigma_rel([ema_decay(n, decay, warmup) for n in range(int(steps))])


def ema_note(decay: float, warmup: bool, steps: int) -> list[str]:
    """A note when the run ends before its EMA has left the initial weights: without warm-up they keep a share
    decay ** steps, so the ImageNet configs' 0.9999 shrunk to a few hundred steps grids, evaluates and exports an
    untrained model, and every method compared looks alike."""
    if warmup or decay ** steps <= 0.5:
        return []
    return [f"train.ema_decay={decay} without train.ema_warmup: after {steps:,} step{'s' if steps != 1 else ''} the "
            f"EMA, which the grids, evaluations, export and samples use, still holds {decay ** steps:.0%} of the initial "
            f"weights (half of them after {math.log(0.5) / math.log(decay):,.0f} steps); for a short run set "
            "train.ema_warmup=true or a lower train.ema_decay"]


@torch.no_grad()
def ema_update(ema: list[nn.Parameter], model: list[nn.Parameter], decay: float, keep: torch.Tensor | None = None) -> None:
    """ema <- lerp(ema, model, w) = ema + w * (model - ema) with w = 1 - decay, one foreach lerp over all parameters
    (the two modules' `parameters()`, listed once by the caller: walking the module tree every step is host time).
    It reads both lists and writes the EMA once and allocates nothing; a sub, mul and add moved about 8 parameter
    sizes and held a full copy of the difference (benchmarks/ema_update.py).

    `keep` (a 0-dim tensor, 1 = skipped step) zeroes w without a host sync: w becomes a device tensor, given once per
    parameter to the List overload, since torch 2.4-2.13 has no foreach lerp with one tensor weight and a Python
    float of it would wait for the GPU. That overload's fused CUDA kernel wants weights shaped like the parameters,
    so on a GPU it runs one lerp kernel per parameter: as few bytes, more launches. Under FSDP both modules are
    sharded alike, so the update runs on each process's local shards with no communication. The two lists pair
    parameters of the same dtype (the EMA is a copy of the model).
    """
    ema_params = [local_shard(p) for p in ema]
    trained = [local_shard(p) for p in model]  # read under no_grad: no detach (a view per parameter, every step)
    if keep is None:
        torch._foreach_lerp_(ema_params, trained, 1.0 - decay)
        return
    # computed on the device (torch.tensor(w, device=...) would copy from host memory, which waits for the GPU's
    # queued work), in each parameter's dtype: torch 2.4's lerp refuses a weight of another dtype
    weight = {}
    for p in ema_params:
        if p.dtype not in weight:
            weight[p.dtype] = (1 - keep.to(p.dtype)) * (1.0 - decay)
    torch._foreach_lerp_(ema_params, trained, [weight[p.dtype] for p in ema_params])
