"""The EMA of a chosen length, reconstructed after training from a run's post-hoc EMA snapshots (EDM2 Sec. 3): the
least-squares weights of the snapshots' averaging profiles for the target profile (ahpa.train.posthoc_ema), applied
to their weights. `ahpa export --posthoc-sigma` writes the result as a normal export.

A target the snapshots cannot represent is refused rather than approximated silently: the fit's relative residual
||sum_i x_i p_i - q|| / ||q|| bounds the reconstruction's error for any trajectory (module docstring of
ahpa.train.posthoc_ema), and is reported with every reconstruction.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from ahpa.train.posthoc_ema import SIGMA_MAX, solve_weights, std_to_exp
from ahpa.train.posthoc_track import DIRECTORY, list_snapshots, snapshot_info

# the largest relative profile residual accepted (10%): tracking [0.05, 0.10], evenly spaced snapshots of 4 steps reach
# sigma_rel 0.04-0.15 within it, of 8 steps 0.035-0.215, of 16 steps 0.025-0.255 (`_fits`, at the last snapshot's step)
MAX_RESIDUAL = 0.1


@dataclass
class Reconstruction:
    sigma_rel: float
    step: int  # the target's: the EMA as it would have been after this step
    residual: float  # the fit's relative L2 residual of the averaging profile
    sources: list[tuple[int, float, float]]  # (step, sigma_rel, weight) of each snapshot used
    paths: list[Path]

    def metadata(self) -> dict:
        """What an export records of it (its `posthoc_ema` metadata)."""
        return {"sigma_rel": self.sigma_rel, "step": self.step, "residual": self.residual,
                "snapshots": [{"step": s, "sigma_rel": r, "weight": w} for s, r, w in self.sources]}

    def describe(self) -> str:
        steps = sorted({s for s, _, _ in self.sources})
        tracked = sorted({r for _, r, _ in self.sources})
        return (f"the power-function EMA of sigma_rel {self.sigma_rel:g} at step {self.step:,}, from {len(self.sources)} "
                f"snapshots (sigma_rel {', '.join(f'{r:g}' for r in tracked)}; steps {steps[0]:,}-{steps[-1]:,}); "
                f"profile residual {self.residual:.2%}")


def _fits(steps, gammas, target_step: int, max_residual: float) -> tuple[float, float] | None:
    """The span of sigma_rel the snapshots represent within `max_residual` at `target_step` (on a grid of 0.005), for
    the refusal's message; None when none."""
    grid = np.arange(0.005, SIGMA_MAX, 0.005)
    ok = [s for s in grid if solve_weights(steps, gammas, target_step, std_to_exp(float(s)))[1] <= max_residual]
    return (float(min(ok)), float(max(ok))) if ok else None


def plan(run_dir: str | Path, sigma_rel: float, step: int | None = None,
         max_residual: float = MAX_RESIDUAL) -> Reconstruction:
    """The snapshots and their weights for the EMA of `sigma_rel` at `step` (default: the newest snapshot's), from
    the snapshots of steps up to it; refuses a target they cannot represent, naming what would."""
    directory = Path(run_dir) / DIRECTORY
    if not 0 < sigma_rel < SIGMA_MAX:
        raise ValueError(f"--posthoc-sigma {sigma_rel}: a power-function EMA's sigma_rel is in (0, {SIGMA_MAX:.4f}) "
                         "(12^-1/2 is the plain mean of the whole run)")
    paths = list_snapshots(directory)
    if not paths:
        raise FileNotFoundError(f"{directory} holds no post-hoc EMA snapshots: the run must be trained with "
                                "train.posthoc_ema=[...] (EDM2's: [0.05,0.10]), which writes them every "
                                "train.posthoc_every steps")
    infos = [snapshot_info(p) for p in paths]
    newest = max(i["step"] for i in infos)
    target = newest if step is None else step
    if target < 1:
        raise ValueError(f"--step {step}: steps count from 1 (the step after which the EMA is reconstructed)")
    if target > newest:
        raise ValueError(f"--step {step}: {directory}'s snapshots are of steps {min(i['step'] for i in infos):,} to "
                         f"{newest:,}; the EMA at a step after the newest snapshot is not in them")
    used = [(p, i) for p, i in zip(paths, infos) if i["step"] <= target]
    if len(used) < 2:
        raise ValueError(f"{len(used)} post-hoc EMA snapshot{'s' if len(used) != 1 else ''} of a step up to {target:,} in {directory}: a reconstruction "
                         "needs at least 2 (more, the better it fits); choose a later --step, or train on")
    steps = [i["step"] for _, i in used]
    gammas = [i["gamma"] for _, i in used]
    weights, residual = solve_weights(steps, gammas, target, std_to_exp(sigma_rel))
    if not residual <= max_residual:
        span = _fits(steps, gammas, target, max_residual)
        reach = (f"they represent sigma_rel {span[0]:.3f} to {span[1]:.3f} within it" if span
                 else "they represent no sigma_rel within it")
        raise ValueError(f"--posthoc-sigma {sigma_rel:g} at step {target:,}: the {len(used)} snapshots of {directory} "
                         f"(sigma_rel {sorted({i['sigma_rel'] for _, i in used})}) match its averaging profile with a "
                         f"residual of {residual:.1%}, above the {max_residual:.0%} accepted: {reach}. More snapshots "
                         "(a smaller train.posthoc_every) or a tracked sigma_rel near it reach further; "
                         "--max-residual accepts a worse fit")
    return Reconstruction(sigma_rel, target, residual,
                          [(i["step"], i["sigma_rel"], float(w)) for (_, i), w in zip(used, weights)],
                          [p for p, _ in used])


def combine(paths: list[Path], weights: list[float]) -> dict[str, torch.Tensor]:
    """sum_i weights[i] * snapshot_i, summed in float64 (the weights of many close snapshots are large and of both
    signs: float32 sums would lose digits to cancellation), returned in float32. One snapshot is read at a time: the
    sum holds 8 bytes a parameter (5.4 GB at XL/2)."""
    total: dict[str, torch.Tensor] = {}
    keys = None
    for path, w in zip(paths, weights):
        state = load_file(str(path))
        if keys is None:
            keys = set(state)
        elif set(state) != keys:
            raise ValueError(f"{path} holds other tensors than {paths[0]}: snapshots of two models in one folder")
        for k, v in state.items():
            term = v.double() * w
            total[k] = total[k] + term if k in total else term
    return {k: v.float() for k, v in total.items()}


def reconstruct(run_dir: str | Path, sigma_rel: float, step: int | None = None,
                max_residual: float = MAX_RESIDUAL) -> tuple[dict[str, torch.Tensor], Reconstruction]:
    """(the backbone's state dict of the reconstructed EMA, what it is made of): see `plan` and `combine`."""
    rec = plan(run_dir, sigma_rel, step, max_residual)
    return combine(rec.paths, [w for _, _, w in rec.sources]), rec
