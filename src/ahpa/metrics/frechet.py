"""Fréchet distance between Gaussians fitted to detector features, and the streaming statistics behind it.

FD(N(mu1, S1), N(mu2, S2)) = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2).

The statistics are kept as raw sums (count, sum x, sum x x^T) in float64, as EDM2 does: sums are what
several processes can add with one all_reduce, and float64 keeps the cancellation in
cov = (sum x x^T - N mu mu^T) / (N - 1) harmless for detector features (means and spreads of order 1).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ahpa.device import float64_device


def _as_f64(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    a = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} holds non-finite values")
    return a


def _sym(m: np.ndarray) -> np.ndarray:
    return 0.5 * (m + m.T)


def trace_sqrt_product(sigma1, sigma2) -> float:
    """tr((S1 S2)^1/2) for symmetric positive semi-definite S1, S2.

    Why eigendecompositions rather than scipy.linalg.sqrtm(S1 @ S2): S1 S2 is similar to the symmetric
    matrix S1^1/2 S2 S1^1/2 (exactly when S1 is invertible, by continuity otherwise), so both have the
    same real, non-negative eigenvalues and tr((S1 S2)^1/2) = sum sqrt(eig(S1^1/2 S2 S1^1/2)). Working
    with symmetric matrices, eigh returns real eigenvalues by construction: no complex parts to discard,
    no eps*I offset whose size changes the answer, and rank-deficient covariances (fewer samples than
    dimensions) are fine; round-off can only push eigenvalues of a PSD matrix slightly below zero, and
    those are clipped. It needs numpy alone (no scipy).
    """
    s1 = _sym(_as_f64(sigma1, "sigma1"))
    s2 = _sym(_as_f64(sigma2, "sigma2"))
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T  # S1^1/2, symmetric PSD
    inner = _sym(root1 @ s2 @ root1)
    ev = np.linalg.eigvalsh(inner)
    return float(np.sqrt(np.clip(ev, 0.0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet (2-Wasserstein squared) distance between N(mu1, sigma1) and N(mu2, sigma2), as a float."""
    m1, m2 = _as_f64(mu1, "mu1"), _as_f64(mu2, "mu2")
    s1, s2 = _as_f64(sigma1, "sigma1"), _as_f64(sigma2, "sigma2")
    d = m1.shape[0]
    if m1.shape != (d,) or m2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(
            f"shape mismatch: mu1 {m1.shape}, sigma1 {s1.shape}, mu2 {m2.shape}, sigma2 {s2.shape} "
            "(statistics from different detectors?)"
        )
    diff = m1 - m2
    fd = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt_product(s1, s2))
    # The distance is a squared metric, >= 0 in exact arithmetic; a negative value can only be round-off
    # of order 1e-12 * trace, which would print as a confusing "-0.000".
    return max(fd, 0.0)


class FeatureStats:
    """Streaming count / sum / sum of outer products of feature vectors, in float64.

    Sums live on `device` (the detector's, so a GPU run never copies features to the host; MPS has no float64,
    so its features are summed on the CPU). Feed batches
    with `update`; read `mean` / `cov` (numpy float64); combine processes with `merge`, or with
    `torch.distributed.all_reduce(stats.to_tensor())` followed by `FeatureStats.from_tensor`.
    Statistics loaded from a file without a sample count (e.g. an ADM reference batch) have a mean and
    covariance but no sums: they can be compared, not merged.
    """

    detector: str | None = None  # metric name the statistics were computed with, when known
    image_size: tuple[int, int] | None = None  # (H, W) of the images measured, when known

    def __init__(self, dim: int | None = None, device: torch.device | str = "cpu"):
        self.device = float64_device(device)
        self.count = 0
        self.sum: torch.Tensor | None = None
        self.outer: torch.Tensor | None = None
        self._moments: tuple[np.ndarray, np.ndarray] | None = None  # set only when the count is unknown
        if dim is not None:
            self._allocate(dim)

    def _allocate(self, dim: int) -> None:
        self.sum = torch.zeros(dim, dtype=torch.float64, device=self.device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=self.device)

    @property
    def dim(self) -> int | None:
        if self._moments is not None:
            return int(self._moments[0].shape[0])
        return None if self.sum is None else int(self.sum.shape[0])

    def update(self, features) -> "FeatureStats":
        """Add a batch of features [N, D] (torch or numpy); returns self."""
        if self._moments is not None:
            raise ValueError("these statistics were loaded without a sample count; they cannot be extended")
        if isinstance(features, torch.Tensor):
            x = features.detach().to(self.device, torch.float64)
        else:
            x = torch.from_numpy(np.asarray(features, dtype=np.float64)).to(self.device)
        if x.ndim != 2:
            raise ValueError(f"features must be [N, D], got shape {tuple(x.shape)}")
        if self.sum is None:
            self._allocate(x.shape[1])
        if x.shape[1] != self.sum.shape[0]:
            raise ValueError(f"feature dimension {x.shape[1]} does not match earlier batches ({self.sum.shape[0]})")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("features hold non-finite values")
        self.count += x.shape[0]
        self.sum += x.sum(dim=0)
        self.outer += x.T @ x
        return self

    @property
    def mean(self) -> np.ndarray:
        if self._moments is not None:
            return self._moments[0]
        if self.count < 1:
            raise ValueError("no features accumulated")
        return (self.sum / self.count).cpu().numpy()

    @property
    def cov(self) -> np.ndarray:
        """Unbiased (N - 1) covariance."""
        if self._moments is not None:
            return self._moments[1]
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 samples, have {self.count}")
        mu = self.sum / self.count
        c = (self.outer - self.count * torch.outer(mu, mu)) / (self.count - 1)
        return _sym(c.cpu().numpy())

    def frechet_distance(self, other: "FeatureStats") -> float:
        return frechet_distance(self.mean, self.cov, other.mean, other.cov)

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        """Add another accumulator's sums into this one (in place); returns self."""
        if self._moments is not None or other._moments is not None:
            raise ValueError("statistics loaded without a sample count cannot be merged")
        if other.sum is None:
            return self
        if self.sum is None:
            self._allocate(other.dim)
        if other.dim != self.dim:
            raise ValueError(f"cannot merge statistics of dimension {other.dim} into {self.dim}")
        self.count += other.count
        self.sum += other.sum.to(self.device)
        self.outer += other.outer.to(self.device)
        return self

    def to_tensor(self) -> torch.Tensor:
        """Flat float64 [1 + D + D*D] = (count, sum, outer): one all_reduce(SUM) reduces everything.

        Every process must know D beforehand (construct with `dim=`), even one that saw no samples.
        """
        if self._moments is not None:
            raise ValueError("statistics loaded without a sample count have no sums to reduce")
        if self.sum is None:
            raise ValueError("dimension unknown: construct FeatureStats(dim=D) so that empty shards can be reduced")
        n = torch.tensor([float(self.count)], dtype=torch.float64, device=self.device)
        return torch.cat([n, self.sum, self.outer.reshape(-1)])

    @classmethod
    def from_tensor(cls, flat: torch.Tensor) -> "FeatureStats":
        flat = flat.detach().to(torch.float64)
        n = flat.numel()
        dim = int(round((-1 + math.sqrt(1 + 4 * (n - 1))) / 2))
        if n != 1 + dim + dim * dim:
            raise ValueError(f"a flat statistics tensor has 1 + D + D*D entries; {n} is not of that form")
        out = cls(dim, device=flat.device)
        out.count = int(round(flat[0].item()))
        out.sum.copy_(flat[1 : 1 + dim])
        out.outer.copy_(flat[1 + dim :].reshape(dim, dim))
        return out

    @classmethod
    def from_moments(cls, mu, sigma, count: int | None = None) -> "FeatureStats":
        """Rebuild from mean and unbiased covariance; with the count the sums are exact and merging works."""
        mu, sigma = _as_f64(mu, "mu"), _as_f64(sigma, "sigma")
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ValueError(f"mu must be [D] and sigma [D, D]; got {mu.shape} and {sigma.shape}")
        out = cls()
        if count is None or count < 2:
            out._moments = (mu, sigma)
            return out
        out._allocate(mu.shape[0])
        out.count = int(count)
        out.sum.copy_(torch.from_numpy(count * mu))
        out.outer.copy_(torch.from_numpy((count - 1) * sigma + count * np.outer(mu, mu)))
        return out

    def save(self, path: str | Path, detector: str | None = None, spatial: "FeatureStats | None" = None) -> None:
        """Write an .npz with `mu`, `sigma`, `count` (and the detector's metric name and the image size, when known);
        with `spatial`, sFID's statistics beside them as `mu_s`, `sigma_s`, `count_s` (ADM's reference batch names)."""
        detector = detector if detector is not None else self.detector
        extra = {} if detector is None else {"detector": np.array(detector)}
        if self.image_size is not None:  # kept so that a cached reference can still be compared with samples' size
            extra["image_size"] = np.array(self.image_size, dtype=np.int64)
        if spatial is not None:
            extra.update(mu_s=spatial.mean, sigma_s=spatial.cov, count_s=np.array(spatial._stored_count, dtype=np.int64))
        np.savez(Path(path), mu=self.mean, sigma=self.cov, count=np.array(self._stored_count, dtype=np.int64), **extra)

    @property
    def _stored_count(self) -> int:
        return -1 if self._moments is not None else self.count  # -1: unknown

    @classmethod
    def load(cls, path: str | Path, spatial: bool = False) -> "FeatureStats":
        """Read our .npz or an ADM reference batch (`mu`, `sigma`; no count); with `spatial`, the sFID statistics
        stored beside them (`mu_s`, `sigma_s`: ADM's reference batches and our files written with them)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"statistics file {str(path)!r} does not exist")
        s = "_s" if spatial else ""
        with np.load(path, allow_pickle=False) as f:
            if f"mu{s}" not in f or f"sigma{s}" not in f:
                raise ValueError(f"{str(path)!r} holds no `mu{s}`/`sigma{s}` statistics (keys: {sorted(f.keys())})")
            count = int(f[f"count{s}"]) if f"count{s}" in f else None
            out = cls.from_moments(f[f"mu{s}"], f[f"sigma{s}"], None if count is None or count < 0 else count)
            # mu_s/sigma_s are sFID's by their name (ADM's); mu/sigma the detector's the file names, if it does
            out.detector = "sFID" if spatial else str(f["detector"]) if "detector" in f else None
            out.image_size = tuple(int(x) for x in f["image_size"]) if "image_size" in f else None
        return out
