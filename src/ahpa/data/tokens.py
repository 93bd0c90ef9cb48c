"""Operations on token maps [B, N = g*g, C] (row-major over the grid) shared by the cache writer and reader.

The writer measures statistics with exactly the operations the reader applies, so the stored statistics
describe what training sees.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def grid_side(tokens: torch.Tensor) -> int:
    n = tokens.shape[1]
    g = int(round(n**0.5))
    if g * g != n:
        raise ValueError(f"{n} tokens do not form a square grid")
    return g


def pool_tokens(tokens: torch.Tensor, factor: int) -> torch.Tensor:
    """[B, (g*k)^2, C] -> [B, g^2, C] by k x k average pooling on the grid (k = factor)."""
    if factor == 1:
        return tokens
    b, _, c = tokens.shape
    side = grid_side(tokens)
    x = tokens.float().transpose(1, 2).reshape(b, c, side, side)  # [B, C, G, G]
    x = F.avg_pool2d(x, factor)  # [B, C, G/k, G/k]
    return x.flatten(2).transpose(1, 2)  # [B, (G/k)^2, C]


def flip_tokens(tokens: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Horizontally mirror the token maps of the samples where `flip` (bool [B]) is set."""
    b, n, c = tokens.shape
    side = grid_side(tokens)
    grid = tokens.reshape(b, side, side, c)  # [B, rows, cols, C]
    return torch.where(flip[:, None, None, None], grid.flip(2), grid).reshape(b, n, c)


def divisor_grids(grid: int) -> list[int]:
    """Every model grid a cache of this grid can serve by pooling (largest first)."""
    return [g for g in range(grid, 0, -1) if grid % g == 0]
