"""Exponential moving average of the backbone, with warm-up.

A fixed 0.9999 still holds mostly the initial weights after a few thousand steps, so the decay
ramps up as min(decay, (1 + n) / (10 + n)) when warm-up is on.
"""

from __future__ import annotations

import torch
from torch import nn


def ema_decay(num_updates: int, decay: float, warmup: bool) -> float:
    return min(decay, (1 + num_updates) / (10 + num_updates)) if warmup else decay


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, one fused foreach call over all parameters."""
    ema_params = [p for p in ema.parameters()]
    params = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)
