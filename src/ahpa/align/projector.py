"""Projectors from the SiT's hidden tokens to each level's feature space.

REPA uses one Linear(h,P)-SiLU-Linear(P,P)-SiLU-Linear(P,C) MLP per target. With K levels that
costs K trunks; the default here shares the trunk and gives each level a light linear head, all
heads fused into one matmul whose output is split per level.
"""

from __future__ import annotations

import torch
from torch import nn


def mlp_trunk(hidden: int, proj: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(hidden, proj), nn.SiLU(), nn.Linear(proj, proj), nn.SiLU())


class Projector(nn.Module):
    def __init__(self, hidden: int, dims: list[int], proj_dim: int = 2048, shared_trunk: bool = True):
        super().__init__()
        self.dims = list(dims)
        self.shared = shared_trunk
        if shared_trunk:
            self.trunk = mlp_trunk(hidden, proj_dim)
            self.head = nn.Linear(proj_dim, sum(dims))  # all levels' heads in one matmul
        else:
            self.trunks = nn.ModuleList(nn.Sequential(*mlp_trunk(hidden, proj_dim), nn.Linear(proj_dim, d)) for d in dims)

    def forward(self, h: torch.Tensor) -> list[torch.Tensor]:
        """h [B, N, D] -> one [B, N, C_k] per level."""
        if self.shared:
            return list(self.head(self.trunk(h)).split(self.dims, dim=-1))
        return [trunk(h) for trunk in self.trunks]

    def per_level(self, hs: list[torch.Tensor]) -> list[torch.Tensor]:
        """One hidden [B, N, D] per level (levels aligned to different blocks) -> one [B, N, C_k] per level."""
        if self.shared:
            raise ValueError("levels aligned to different blocks need a trunk per level (align.shared_trunk=false)")
        return [trunk(h) for trunk, h in zip(self.trunks, hs)]

    def flops_per_token(self) -> float:
        """2 x multiply-adds of one forward per token (what the heads add to a training step, x3)."""
        return 2.0 * sum(p.numel() for n, p in self.named_parameters() if n.endswith("weight"))
