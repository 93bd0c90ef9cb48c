"""Inception Score (Salimans et al. 2016): exp E_x KL(p(y|x) || p(y)), averaged over splits.

As the original code and StyleGAN2-ADA/EDM compute it: the samples are cut into `splits` contiguous parts
in their stored order, each part's score uses that part's marginal p(y), and the result is the mean and
standard deviation over parts (10 parts of 5,000 for the usual 50,000 samples). Samples written by
`ahpa sample` cycle through the classes, so every part is class-balanced.
"""

from __future__ import annotations

import numpy as np
import torch


def inception_score(probs, splits: int = 10) -> tuple[float, float]:
    """(mean, std) of the Inception Score of class probabilities [N, K] (rows sum to 1)."""
    p = probs.detach().to("cpu", torch.float64).numpy() if isinstance(probs, torch.Tensor) else np.asarray(probs, np.float64)
    if p.ndim != 2 or len(p) < splits or splits < 1:
        raise ValueError(f"need probabilities [N, K] with N >= splits >= 1; got shape {p.shape} and splits={splits}")
    if not np.all(np.isfinite(p)) or p.min() < 0:
        raise ValueError("class probabilities must be finite and non-negative")
    n = len(p)
    scores = []
    for i in range(splits):
        part = p[i * n // splits:(i + 1) * n // splits]
        marginal = part.mean(axis=0, keepdims=True)
        # 0 log 0 = 0: a class with zero probability contributes nothing (and must not give nan)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(part > 0, part * (np.log(part) - np.log(marginal)), 0.0).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))
