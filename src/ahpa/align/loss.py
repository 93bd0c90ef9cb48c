"""Alignment losses and the router's objective, as pure functions (fp32 inside)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cosine_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of 1 - cos(pred, target): [B, N, C] x2 -> [B]."""
    cos = F.cosine_similarity(pred.float(), target.float(), dim=-1, eps=1e-6)  # [B, N]
    return 1.0 - cos.mean(dim=1)


def smooth_l1_loss(pred: torch.Tensor, target: torch.Tensor, beta: float) -> torch.Tensor:
    """Smooth-L1 (SRA2's choice for the latent), mean over tokens and channels: -> [B]."""
    return F.smooth_l1_loss(pred.float(), target.float(), beta=beta, reduction="none").flatten(1).mean(dim=1)


# name -> per-sample loss [B, N, C] x2 -> [B]; the names are ahpa.align.methods.LOSSES
LEVEL_LOSSES = {"cosine": lambda p, q, beta: cosine_loss(p, q), "smooth-l1": smooth_l1_loss}


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
