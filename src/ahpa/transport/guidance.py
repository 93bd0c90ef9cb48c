"""Classifier-free guidance with a guidance interval, evaluated in fixed-size micro-batches.

Every network call sees exactly `micro_batch` rows (the last chunk is padded), so a sample's
arithmetic never depends on how many other samples share its batch: sample files are identical
whatever the batch size or number of processes.
"""

from __future__ import annotations

from typing import Callable

import torch

VelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def fixed_batch(fn: Callable[..., torch.Tensor], micro_batch: int, *inputs: torch.Tensor) -> torch.Tensor:
    """fn(*inputs) evaluated on chunks of exactly `micro_batch` rows (why: the module's docstring)."""
    outs = []
    for start in range(0, inputs[0].shape[0], micro_batch):
        chunk = [v[start : start + micro_batch] for v in inputs]
        n = chunk[0].shape[0]
        if n < micro_batch:  # pad with copies of the first row; padded outputs are dropped
            chunk = [torch.cat([v, v[:1].expand(micro_batch - n, *v.shape[1:])]) for v in chunk]
        outs.append(fn(*chunk)[:n])
    return torch.cat(outs)


def guided_velocity(
    fn: VelocityFn,
    x: torch.Tensor,
    t: float,
    y: torch.Tensor,
    null_class: int,
    scale: float = 1.0,
    interval: tuple[float, float] = (0.0, 1.0),
    micro_batch: int = 64,
) -> torch.Tensor:
    """v = v_uncond + scale * (v_cond - v_uncond) on every channel, inside the guidance interval.

    Outside [interval[0], interval[1]] (and for scale == 1) only the conditional branch runs.
    """
    tt = torch.full((x.shape[0],), float(t), device=x.device)
    if scale == 1.0 or not (interval[0] <= t <= interval[1]):
        return fixed_batch(fn, micro_batch, x, tt, y)
    both = fixed_batch(fn, micro_batch, torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([y, torch.full_like(y, null_class)]))
    cond, uncond = both.chunk(2)
    return uncond + scale * (cond - uncond)
