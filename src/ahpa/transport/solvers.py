"""Samplers from t=1 (noise) to t=0 (data): Euler and Heun ODE, Euler-Maruyama SDE.

`velocity(x, t)` is any callable returning the (guided) velocity at scalar time t.
The SDE uses diffusion w(t) = 2 sigma(t) (REPA's choice, w = 2t on the linear path). The forward SDE
dx = (v + (w/2) score) dt + sqrt(w) dW has the ODE's marginals; the sampler runs its reverse in tau = 1 - t,
dx = (-v + (w/2) score) dtau + sqrt(w) dW.
"""

from __future__ import annotations

from typing import Callable

import torch

from ahpa.transport.path import Path

SOLVERS = ("euler", "heun", "euler-maruyama")
Velocity = Callable[[torch.Tensor, float], torch.Tensor]


def time_grid(steps: int) -> list[float]:
    """steps + 1 times from noise (1) to data (0), evenly spaced, in float64."""
    return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()


def euler(velocity: Velocity, x: torch.Tensor, steps: int) -> torch.Tensor:
    ts = time_grid(steps)
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        x = x + (t_next - t_cur) * velocity(x, t_cur)
    return x


def heun(velocity: Velocity, x: torch.Tensor, steps: int) -> torch.Tensor:
    """Heun's second-order method; the last step (to t=0) is Euler, as in EDM: 2 * steps - 1 evaluations."""
    ts = time_grid(steps)
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        dt = t_next - t_cur
        v_cur = velocity(x, t_cur)
        x_pred = x + dt * v_cur
        x = x + dt * 0.5 * (v_cur + velocity(x_pred, t_next)) if t_next > 0 else x_pred
    return x


def euler_maruyama(
    velocity: Velocity, x: torch.Tensor, steps: int, path: Path, noise: torch.Tensor, t_last: float = 0.04
) -> torch.Tensor:
    """noise [steps - 1, B, ...] standard normal, drawn per sample by the caller.

    steps - 1 stochastic steps from 1 to t_last, then one deterministic step to 0 (the score is
    singular at t=0).
    """
    if noise.shape[0] != steps - 1:
        raise ValueError(f"euler-maruyama needs noise for {steps - 1} steps, got {noise.shape[0]}")
    ts = torch.linspace(1.0, t_last, steps, dtype=torch.float64).tolist() + [0.0]
    for i, (t_cur, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        h = t_cur - t_next  # > 0: time runs backwards
        v = velocity(x, t_cur)
        t = torch.full((x.shape[0],), t_cur, device=x.device)
        w = 2.0 * float(path.sigma(torch.tensor(t_cur)))
        drift = -v + 0.5 * w * path.score(x, v, t)  # d x / d(1 - t)
        x = x + h * drift
        if i < steps - 1:
            x = x + (w * h) ** 0.5 * noise[i].to(x.dtype)
    return x


def solve(
    solver: str, velocity: Velocity, x: torch.Tensor, steps: int, path: Path, noise: torch.Tensor | None = None
) -> torch.Tensor:
    if solver == "euler":
        return euler(velocity, x, steps)
    if solver == "heun":
        return heun(velocity, x, steps)
    if solver == "euler-maruyama":
        if noise is None:
            raise ValueError("euler-maruyama needs per-sample noise")
        return euler_maruyama(velocity, x, steps, path, noise)
    raise ValueError(f"unknown sampler {solver!r}; valid samplers: {', '.join(SOLVERS)}")
