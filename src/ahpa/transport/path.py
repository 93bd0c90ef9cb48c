"""Interpolation paths x_t = alpha(t) x + sigma(t) eps and their velocity targets.

t=0 is data, t=1 is noise. The network predicts v = d/dt x_t = alpha'(t) x + sigma'(t) eps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

Fn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Path:
    name: str
    alpha: Fn
    sigma: Fn
    d_alpha: Fn
    d_sigma: Fn

    def interpolate(self, x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = _bc(self.alpha(t), x), _bc(self.sigma(t), x)
        return a * x + s * eps

    def velocity(self, x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return _bc(self.d_alpha(t), x) * x + _bc(self.d_sigma(t), x) * eps

    def predictions(self, x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0_hat, eps_hat) from x_t and a velocity, by solving the 2x2 system of the path."""
        a, s = _bc(self.alpha(t), x_t), _bc(self.sigma(t), x_t)
        da, ds = _bc(self.d_alpha(t), x_t), _bc(self.d_sigma(t), x_t)
        det = ds * a - s * da  # > 0 on both paths for t in [0, 1]
        return (ds * x_t - s * v) / det, (a * v - da * x_t) / det

    def score(self, x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """grad log p_t(x_t) = -eps_hat / sigma(t); undefined at t=0."""
        _, eps = self.predictions(x_t, v, t)
        return -eps / _bc(self.sigma(t), x_t)


@dataclass(frozen=True)
class LinearPath(Path):
    def velocity(self, x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """eps - x: the general formula's numbers exactly ((-1) x + 1 eps, each product exact), in one kernel instead
        of six (two ones_like, a negation, two products, a sum): the training step runs it eagerly, every step."""
        return eps - x


def _bc(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    # [B] -> [B, 1, 1, ...] to broadcast over the sample's dimensions
    return coef.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


_HALF_PI = math.pi / 2

PATHS: dict[str, Path] = {
    "linear": LinearPath(
        "linear",
        alpha=lambda t: 1 - t,
        sigma=lambda t: t,
        d_alpha=lambda t: -torch.ones_like(t),
        d_sigma=lambda t: torch.ones_like(t),
    ),
    "cosine": Path(
        "cosine",
        alpha=lambda t: torch.cos(_HALF_PI * t),
        sigma=lambda t: torch.sin(_HALF_PI * t),
        d_alpha=lambda t: -_HALF_PI * torch.sin(_HALF_PI * t),
        d_sigma=lambda t: _HALF_PI * torch.cos(_HALF_PI * t),
    ),
}


def get_path(name: str) -> Path:
    if name not in PATHS:
        raise ValueError(f"unknown path {name!r}; valid paths: {', '.join(PATHS)}")
    return PATHS[name]
