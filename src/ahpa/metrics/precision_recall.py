"""Improved precision and recall (Kynkäänniemi et al. 2019), as in the ADM and StyleGAN evaluators.

Each set of features stands for a manifold: the union of balls around its points, each ball reaching to the
point's k-th nearest neighbour in the same set (k = 3). Precision is the share of generated samples that fall
inside the real manifold (are they realistic?), recall the share of real images inside the generated
manifold (is the data covered?). Distances are Euclidean, computed in row blocks on the features' device, so
memory stays O(block x N) while the work is the O(N^2 D) of the definition.
"""

from __future__ import annotations

import torch


def _as_features(x, name: str) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.ndim != 2 or not x.is_floating_point():
        raise ValueError(f"{name}: expected float features [N, D], got {x.dtype} {tuple(x.shape)}")
    return x.float()


def knn_radii(features: torch.Tensor, k: int = 3, block: int = 1024) -> torch.Tensor:
    """Distance from each point to its k-th nearest other point of the same set: [N]."""
    f = _as_features(features, "features")
    if not 1 <= k < len(f):
        raise ValueError(f"need 1 <= k < number of points; got k={k} with {len(f)} points")
    # each point is its own nearest neighbour at distance 0, hence the (k + 1)-th smallest
    return torch.cat([torch.cdist(f[i:i + block], f).kthvalue(k + 1, dim=1).values for i in range(0, len(f), block)])


def manifold_coverage(manifold: torch.Tensor, radii: torch.Tensor, queries: torch.Tensor, block: int = 1024) -> float:
    """Share of `queries` within radii[j] of some manifold point j."""
    m, q = _as_features(manifold, "manifold"), _as_features(queries, "queries").to(manifold.device)
    inside = [(torch.cdist(q[i:i + block], m) <= radii[None, :]).any(dim=1) for i in range(0, len(q), block)]
    return float(torch.cat(inside).float().mean())


def precision_recall(real, fake, k: int = 3, block: int = 1024) -> tuple[float, float]:
    """(precision, recall) of generated features `fake` [M, D] against real features `real` [N, D]."""
    real, fake = _as_features(real, "real"), _as_features(fake, "fake")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dimensions differ: real {real.shape[1]}, fake {fake.shape[1]} (different detectors?)")
    fake = fake.to(real.device)
    precision = manifold_coverage(real, knn_radii(real, k, block), fake, block)
    recall = manifold_coverage(fake, knn_radii(fake, k, block), real, block)
    return precision, recall
