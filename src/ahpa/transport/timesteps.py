"""Training-time distributions of t in [0, 1]."""

from __future__ import annotations

import torch

TIME_SAMPLERS = ("uniform", "logit-normal")


def sample_t(
    n: int,
    kind: str,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    mean: float = 0.0,
    std: float = 1.0,
) -> torch.Tensor:
    """n times in [0, 1] drawn from `generator` (uniform, or logit-normal(mean, std) as in SD3)."""
    if kind == "uniform":
        return torch.rand(n, generator=generator, device=device)
    if kind == "logit-normal":
        return torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=device))
    raise ValueError(f"unknown time sampler {kind!r}; valid: {', '.join(TIME_SAMPLERS)}")
