"""The training-only alignment module: projector heads, router and running loss statistics.

Nothing here is part of the exported model: inference runs the plain SiT.
"""

from __future__ import annotations

import torch
from torch import nn

from ahpa.align.loss import cosine_loss, entropy, router_objective, smooth_l1_loss
from ahpa.align.projector import Projector
from ahpa.align.router import Router
from ahpa.config import AlignCfg
from ahpa.train.distributed import all_reduce_mean_


class Aligner(nn.Module):
    def __init__(self, hidden: int, levels: list[str], dims: list[int], cfg: AlignCfg, router_mode: str, loss: str):
        super().__init__()
        self.levels = list(levels)
        self.loss_kind = loss
        self.beta = cfg.smooth_l1_beta
        self.normalize = cfg.router_normalize
        self.entropy_weight = cfg.router_entropy
        self.momentum = cfg.router_momentum
        self.t_bins = cfg.router_t_bins
        self.projector = Projector(hidden, dims, cfg.projector_dim, cfg.shared_trunk)
        self.router = Router(len(levels), router_mode, cfg.router_tau, cfg.router_topk, cfg.snr_width)
        k = len(levels)
        # [K] with one bin (the layout checkpoints have always had), [bins, K] with several
        self.register_buffer("running_loss", torch.ones(k) if self.t_bins == 1 else torch.ones(self.t_bins, k))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        if self.t_bins > 1:  # updates per bin: a bin's first batch is taken as it is
            self.register_buffer("bin_updates", torch.zeros(self.t_bins, dtype=torch.long))

    def level_losses(self, preds: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor:
        """Per-sample, per-level losses [B, K] (fp32)."""
        if self.loss_kind == "smooth-l1":
            cols = [smooth_l1_loss(p, q, self.beta) for p, q in zip(preds, targets)]
        else:
            cols = [cosine_loss(p, q) for p, q in zip(preds, targets)]
        return torch.stack(cols, dim=1)

    def forward(
        self, hidden: torch.Tensor, targets: list[torch.Tensor], t: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """hidden [B, N, D], targets K x [B, N, C_k], t [B] -> (loss, detached metrics).

        The backbone and projectors get sum_k g_k(t) l_k with g detached; a learned router gets
        its own objective (router_objective), so the router's anti-collapse terms never push the
        backbone.
        """
        losses = self.level_losses(self.projector(hidden), targets)  # [B, K]
        weights = self.router(t)  # [B, K]
        loss = (weights.detach() * losses).sum(dim=1).mean()
        weighted = loss.detach()
        bins = None if self.t_bins == 1 else (t.detach() * self.t_bins).long().clamp_(0, self.t_bins - 1)  # [B]
        if self.training:
            # every process keeps the same running statistics: the mean over the global batch
            if bins is None:
                self._update_running(all_reduce_mean_(losses.detach().mean(dim=0)))
            else:
                self._update_running_bins(losses.detach(), bins)
        if self.router.learned:
            running = None
            if self.normalize:
                running = self.running_loss if bins is None else self.running_loss[bins]  # [K] or [B, K]
            objective = router_objective(weights, losses, running, self.entropy_weight)
            if self.normalize:
                # On the first update the running means are this batch's means, so the router's bias gets a
                # gradient of exactly zero, and Adam would turn its rounding noise into full-size steps (runs
                # that differ only in summation order, e.g. 1 vs 2 processes, would part there). Nothing is
                # learned from that step: zero it exactly, without a host sync.
                objective = objective * (self.num_updates > 1).to(objective.dtype)
            loss = loss + objective
        metrics = {
            "align/weighted": weighted,
            "align/level_loss": losses.detach().mean(dim=0),  # [K]
            "align/router_entropy": entropy(weights.detach()).mean(),
        }
        return loss, metrics

    @torch.no_grad()
    def _update_running_bins(self, losses: torch.Tensor, bins: torch.Tensor) -> None:
        """Per-bin running means from losses [B, K] and bins [B]; a bin without samples keeps its value."""
        sums = torch.zeros_like(self.running_loss).index_add_(0, bins, losses)  # [bins, K]
        ones = torch.ones_like(bins, dtype=losses.dtype)
        counts = torch.zeros(self.t_bins, device=losses.device, dtype=losses.dtype).index_add_(0, bins, ones)  # [bins]
        sums, counts = all_reduce_mean_(sums), all_reduce_mean_(counts)  # global sums / global counts, as a ratio
        mean = sums / counts.clamp_min(1e-12)[:, None]
        ema = self.momentum * self.running_loss + (1 - self.momentum) * mean
        seen = counts > 0
        new = torch.where((self.bin_updates == 0)[:, None], mean, ema)
        self.running_loss.copy_(torch.where(seen[:, None], new, self.running_loss))
        self.bin_updates.add_(seen.long())
        self.num_updates.add_(1)

    @torch.no_grad()
    def _update_running(self, batch_mean: torch.Tensor) -> None:
        # the first update takes the batch mean as it is; no host sync (torch.where, not `if`)
        ema = self.momentum * self.running_loss + (1 - self.momentum) * batch_mean
        self.running_loss.copy_(torch.where(self.num_updates == 0, batch_mean, ema))
        self.num_updates.add_(1)

    @torch.no_grad()
    def router_table(self, num_t: int = 51) -> tuple[torch.Tensor, torch.Tensor]:
        """(t [T], weights [T, K]) for plots and logs."""
        device = self.running_loss.device
        t = torch.linspace(0.0, 1.0, num_t, device=device)
        return t.cpu(), self.router(t).float().cpu()
