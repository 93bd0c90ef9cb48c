"""Classifier-free guidance with a guidance interval, evaluated in fixed-size micro-batches.

Every network call sees exactly `micro_batch` rows (the last chunk is padded), so a sample's
arithmetic never depends on how many other samples share its batch: sample files are identical
whatever the batch size or number of processes.
"""

from __future__ import annotations

from typing import Callable

import torch

VelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def fixed_batch(fn: VelocityFn, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, micro_batch: int) -> torch.Tensor:
    """fn(x, t, y) evaluated on chunks of exactly `micro_batch` rows."""
    outs = []
    for start in range(0, x.shape[0], micro_batch):
        xs, ts, ys = x[start : start + micro_batch], t[start : start + micro_batch], y[start : start + micro_batch]
        n = xs.shape[0]
        if n < micro_batch:  # pad with copies of the first row; padded outputs are dropped
            pad = micro_batch - n
            xs = torch.cat([xs, xs[:1].expand(pad, *xs.shape[1:])])
            ts = torch.cat([ts, ts[:1].expand(pad)])
            ys = torch.cat([ys, ys[:1].expand(pad)])
        outs.append(fn(xs, ts, ys)[:n])
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
        return fixed_batch(fn, x, tt, y, micro_batch)
    both = fixed_batch(fn, torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([y, torch.full_like(y, null_class)]), micro_batch)
    cond, uncond = both.chunk(2)
    return uncond + scale * (cond - uncond)
