"""fp16 training's dynamic loss scale (train.precision=fp16, the choice of GPUs without bf16: V100, T4, RTX 20xx).

float16 has 5 exponent bits: a gradient below ~6e-8 flushes to zero and one above 65,504 overflows. So the loss is
multiplied by a scale before the backward pass, which keeps small gradients representable, and the gradients are
divided by it again before clipping and the optimiser. A step whose gradients overflowed is skipped (as any step with
non-finite gradients is) and halves the scale; `interval` steps in a row without an overflow double it. This is
torch.amp.GradScaler's schedule. It is kept here as tensors on the device, so the step never waits for the host:
GradScaler reads its overflow flag on the host unless the optimiser unscales by itself, and the clipping needs
unscaled gradients before the optimiser runs.

An overflow is forgiven, not counted as a bad step by the divergence rule, only while the scale can still come down
(above 1) and the loss itself is finite. A non-finite loss is a forward pass that failed in fp16, and non-finite
gradients at a scale of 1 are no scaling matter: both count, so a run that fp16 cannot hold stops as any diverging
run does.
"""

from __future__ import annotations

import torch

INIT_SCALE = 2.0 ** 16  # GradScaler's: the first steps find the range (each overflow halves it)
GROWTH_INTERVAL = 2000  # good steps in a row before the scale doubles (GradScaler's)


def next_scale(scale: torch.Tensor, good_run: torch.Tensor, overflow: torch.Tensor,
               interval: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, good steps in a row) after a step: `overflow` (1.0 or 0.0) halves the scale, not below 1, and restarts
    the count; the `interval`-th good step in a row doubles the scale and restarts it too."""
    good_run = (good_run + 1) * (1 - overflow)
    grow = (good_run >= interval).to(scale.dtype)
    factor = torch.where(overflow > 0, torch.full_like(scale, 0.5), 1 + grow)
    return torch.clamp(scale * factor, min=1.0), good_run * (1 - grow)


def forgiven(found_inf: torch.Tensor, loss: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """1.0 where a skipped step was the loss scale's overflow, which halving the scale deals with: gradients not
    finite, the loss finite, the scale still above 1 (module docstring); else 0.0."""
    return found_inf * torch.isfinite(loss).to(found_inf.dtype) * (scale > 1).to(found_inf.dtype)


class LossScale:
    """The scale and its count of good steps, on the run's device; saved in the checkpoint, so that a resumed run
    scales its next step exactly as the run that went on would have."""

    def __init__(self, device: torch.device, init: float | None = None, interval: int | None = None):
        self.scale = torch.full((), float(init or INIT_SCALE), device=device)
        self.good_run = torch.zeros((), device=device)
        self.interval = interval or GROWTH_INTERVAL

    def unscale_(self, params: list[torch.nn.Parameter]) -> None:
        """Divides the gradients by the scale in place (one foreach pass; an inf stays inf, for the overflow check)."""
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, self.scale.reciprocal())

    def update(self, found_inf: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        """After the step: the scale's schedule, and 1.0 where the skip was an overflow it forgives (else 0.0)."""
        overflow = forgiven(found_inf, loss, self.scale)
        self.scale, self.good_run = next_scale(self.scale, self.good_run, found_inf, self.interval)
        return overflow

    def state_dict(self) -> dict:
        return {"scale": float(self.scale), "good_run": int(self.good_run)}

    def load_state_dict(self, state: dict) -> None:
        self.scale.fill_(float(state["scale"]))
        self.good_run.fill_(int(state["good_run"]))
