"""Alignment losses and the router's objective, as pure functions (fp32 inside)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ahpa.align.methods import LOSSES
from ahpa.config import AlignCfg
from ahpa.plugins import check_call


def cosine_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of 1 - cos(pred, target): [B, N, C] x2 -> [B]."""
    cos = F.cosine_similarity(pred.float(), target.float(), dim=-1, eps=1e-6)  # [B, N]
    return 1.0 - cos.mean(dim=1)


def smooth_l1_loss(pred: torch.Tensor, target: torch.Tensor, beta: float) -> torch.Tensor:
    """Smooth-L1 (SRA2's choice for the latent), mean over tokens and channels: -> [B]."""
    return F.smooth_l1_loss(pred.float(), target.float(), beta=beta, reduction="none").flatten(1).mean(dim=1)


# name -> per-sample loss (prediction [B, N, C], target [B, N, C], the run's align settings) -> [B]; the names are
# ahpa.align.methods.LOSSES
LEVEL_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor, AlignCfg], torch.Tensor]] = {
    "cosine": lambda p, q, cfg: cosine_loss(p, q),
    "smooth-l1": lambda p, q, cfg: smooth_l1_loss(p, q, cfg.smooth_l1_beta),
}


_BUILT_IN = frozenset(LEVEL_LOSSES)
LOSS_CONTRACT = "fn(prediction [B, N, C], target [B, N, C], the run's AlignCfg) -> [B] (docs/extending.md, 'A loss')"


def check_loss(name: str, cfg: AlignCfg) -> None:
    """Call a registered loss once on a small input: a loss returning a scalar, [B, N] or [B, 1] fails here, named,
    and not as a shape error somewhere in the objective at the first step. Built-in losses are not probed."""
    if name in _BUILT_IN:
        return
    pred = torch.linspace(-1.0, 1.0, 24).reshape(2, 3, 4)  # [B=2, N=3, C=4]; no random draw: the run's seed stays as it is
    out = LEVEL_LOSSES[name](pred, pred.flip(-1), cfg)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2,):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"align.loss={name!r} returned {got} for [B=2, N=3, C=4] inputs; a loss returns one value per "
                         "sample, [B] (docs/extending.md, 'A loss')")


def register_loss(name: str, fn: Callable[[torch.Tensor, torch.Tensor, AlignCfg], torch.Tensor], about: str = "") -> None:
    """Make `align.loss=NAME` (and a MethodSpec's loss) valid, computed by fn(prediction, target, align settings) ->
    loss per sample [B] in fp32. A parameter of its own is a field of AlignCfg, read from the settings."""
    if not name or name == "default" or not callable(fn):
        raise ValueError(f"register_loss needs a name other than '' and 'default' (align.loss=default is the method's "
                         f"own loss) and a function; got {name!r} and {type(fn).__name__}")
    if name in _BUILT_IN:
        raise ValueError(f"loss {name!r} is built in (every method that uses it would change); register yours "
                         "under another name")
    check_call(fn, (None, None, None), f"loss {name!r}", LOSS_CONTRACT)
    LOSSES[name] = about
    LEVEL_LOSSES[name] = fn


def entropy(weights: torch.Tensor) -> torch.Tensor:
    """Entropy of each row of a [B, K] distribution -> [B]."""
    return -(weights * torch.log(weights.clamp_min(1e-12))).sum(dim=-1)


def router_objective(
    weights: torch.Tensor,
    losses: torch.Tensor,
    running_mean: torch.Tensor | None,
    entropy_weight: float,
    active: torch.Tensor | None = None,
) -> torch.Tensor:
    """What the router minimises: the batch mean of sum_k g_k(t) r_k - eta H(g), r_k = l_k (/ running mean_k),
    eta = entropy_weight.

    weights [B, K] (carry the router's gradient), losses [B, K] (detached here, so the router
    cannot lower the objective by changing the backbone), running_mean [K], or [B, K] (each sample's bin of t),
    or None. active: [B] or [] 0/1, the samples that count (the others add 0: their running mean is not known yet).
    """
    r = losses.detach()
    if running_mean is not None:
        r = r / running_mean.clamp_min(1e-8)
    per_sample = (weights * r).sum(dim=1) - entropy_weight * entropy(weights)  # [B]
    return (per_sample if active is None else per_sample * active).mean()
