"""Channel reduction of cached levels: a PCA basis per level, fitted once and stored with the cache.

A level with C channels is stored as r < C coefficients per token and rebuilt on the training device, so
the aligner still sees C channels. The PCA is taken on the per-channel *standardised* tokens (the
correlation matrix), because that is what the alignment loss compares: a plain PCA would spend its r
directions on the high-variance channels and rebuild the quiet ones, which standardisation then amplifies,
badly. With D = diag(std), U the top-r eigenvectors of the correlation matrix:
    z  = (x - mean) @ P,  P = D^-1 U   [C, r]      (prepare)
    x' = z @ Q^T + mean,  Q = D U      [C, r]      (reader)
Fitted on the first images of the source (pooled to the cache grid, originals only). The basis file
`reduce.safetensors` is written before any shard and its sha256 is part of every shard's settings digest:
shards of another basis are never mixed in.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load as load_tensors
from safetensors.numpy import save as save_tensors

from ahpa.device import autocast, float64_device

REDUCE_FILE = "reduce.safetensors"


class CovarianceSums:
    """Streaming sum and Gram matrix of token vectors in float64 (on the tokens' device; the CPU for MPS's)."""

    def __init__(self) -> None:
        self.n, self.s1, self.gram = 0, None, None

    def update(self, tokens: torch.Tensor) -> None:
        x = tokens.reshape(-1, tokens.shape[-1]).to(float64_device(tokens.device), torch.float64)  # [M, C]
        s1, gram = x.sum(0), x.T @ x  # [C], [C, C]
        self.s1 = s1 if self.s1 is None else self.s1 + s1
        self.gram = gram if self.gram is None else self.gram + gram
        self.n += x.shape[0]

    def basis(self, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """(mean [C], P [C, dim], Q [C, dim], fraction of the standardised variance kept), float32."""
        mean = (self.s1 / self.n).cpu()
        cov = self.gram.cpu() / self.n - torch.outer(mean, mean)
        std = cov.diagonal().clamp_min(1e-12).sqrt()
        corr = cov / torch.outer(std, std)
        vals, vecs = torch.linalg.eigh(corr)  # ascending
        vals, vecs = vals.flip(0).clamp_min(0), vecs.flip(1)[:, :dim]
        # eigenvectors are defined up to sign: fix it (largest entry positive) so the basis is reproducible
        sign = torch.sign(vecs.gather(0, vecs.abs().argmax(0, keepdim=True)))
        vecs = vecs * torch.where(sign == 0, torch.ones_like(sign), sign)
        kept = float(vals[:dim].sum() / vals.sum().clamp_min(1e-30))
        project, rebuild = vecs / std[:, None], vecs * std[:, None]
        return mean.float().numpy(), project.float().numpy(), rebuild.float().numpy(), kept


def save_bases(bases: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]) -> tuple[bytes, str]:
    """Serialise {level: (mean, P, Q)}; returns (file bytes, sha256)."""
    tensors = {}
    for name, arrays in bases.items():
        for key, arr in zip(("mean", "project", "rebuild"), arrays):
            tensors[f"{name}.{key}"] = np.ascontiguousarray(arr, np.float32)
    data = save_tensors(tensors)
    return data, hashlib.sha256(data).hexdigest()


def load_bases(directory: Path, sha256: str, device: torch.device) -> dict[str, tuple[torch.Tensor, ...]]:
    """{level: (mean [C], P [C, r], Q [C, r])} as float32 on `device`, after checking the file's checksum."""
    path = Path(directory) / REDUCE_FILE
    if not path.is_file():
        raise ValueError(f"{path} is missing: this cache stores reduced levels and needs its basis file; prepare it again")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(f"{path} does not match the sha256 recorded in the manifest; the cache is damaged: prepare it again")
    tensors = load_tensors(data)
    names = sorted({k.rsplit(".", 1)[0] for k in tensors})
    return {n: tuple(torch.from_numpy(tensors[f"{n}.{k}"]).to(device) for k in ("mean", "project", "rebuild"))
            for n in names}


@torch.no_grad()
def fit_bases(encoder, loader, names: list[str], grid: int, resolution: int, dim: int, precision: str,
              device: torch.device) -> tuple[bytes, str, dict[str, float]]:
    """Encode the loader's items (originals), pool to the grid, fit a basis per level in `names`.

    Returns (basis file bytes, their sha256, {level: fraction of variance kept}). Bad files are passed over
    here; the main pass reports them.
    """
    from ahpa.data.listing import assemble
    from ahpa.priors.targets import pool_to_grid

    sums = {name: CovarianceSums() for name in names}
    for items in loader:
        good = [it for it in items if it.image is not None]
        if not good:
            continue
        with autocast(device, torch.bfloat16 if precision == "bf16" else None):
            feats = encoder.encode(assemble(good, resolution, device), names).features
        for name in names:
            sums[name].update(pool_to_grid(feats[name].float(), grid))  # [n, G*G, C]
    if not sums[names[0]].n:
        raise ValueError("none of the items chosen to fit --reduce could be decoded: nothing to fit the PCA bases on")
    bases, kept = {}, {}
    for name in names:
        *bases[name], kept[name] = sums[name].basis(dim)
    data, sha = save_bases(bases)
    return data, sha, kept


def project(tokens: torch.Tensor, mean: torch.Tensor, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """[B, N, C] -> coefficients [B, N, r]."""
    return (tokens.float() - mean) @ p


def reconstruct(coeffs: torch.Tensor, mean: torch.Tensor, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Coefficients [B, N, r] -> tokens [B, N, C] (float32)."""
    return coeffs.float() @ q.T + mean
