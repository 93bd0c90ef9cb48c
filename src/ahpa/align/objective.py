"""The training-only alignment module: projector heads, router and running loss statistics.

Nothing here is part of the exported model: inference runs the plain SiT.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ahpa.align.loss import check_loss, entropy, router_objective
from ahpa.align.methods import LOSSES
from ahpa.align.projector import Projector
from ahpa.align.router import Router
from ahpa.align.tokens import gather_tokens, kept_tokens
from ahpa.config import AlignCfg, fill_options
from ahpa.device import autocast
from ahpa.plugins import declares
from ahpa.train.distributed import all_reduce_mean


class Aligner(nn.Module):
    """K levels' projector heads, the router over them and the running means of their losses (`running_loss`: [K],
    or [bins, K] with align.router_t_bins > 1), for the hidden tokens after the blocks `taps`."""

    def __init__(self, hidden: int, levels: list[str], dims: list[int], cfg: AlignCfg, router_mode: str, loss: str,
                 depths: list[int] | None = None):
        super().__init__()
        self.levels = list(levels)
        # the SiT block each level is aligned to (align.depth, or align.level_depths); the hidden tokens the
        # forward takes are those after each of `taps`, in block order
        self.depths = list(depths) if depths is not None else [cfg.depth] * len(levels)
        self.taps = tuple(sorted(set(self.depths)))
        LOSSES.check(loss)
        # the settings a loss is given say what is in force: a method that fixes its router (multi-uniform) runs that
        # mode whatever align.router says, and its loss the resolved one, not "default"
        cfg = dataclasses.replace(cfg, router=router_mode, loss=loss)
        # the loss's and the mode's own settings (align.options), defaults filled in where the caller built the
        # AlignCfg by hand (a config read by ahpa.config has them): a function reads cfg.options["NAME"] as declared
        fill_options(cfg)
        check_loss(loss, cfg, levels)
        self.loss_kind, self.cfg = loss, cfg
        # a loss that declares `level` gets each level's name by keyword; read once here, not at each step
        fn = LOSSES.entries[loss].fn
        self._loss_kwargs = [{"level": name} if declares(fn, "level") else {} for name in self.levels]
        self.normalize = cfg.router_normalize
        self.entropy_weight = cfg.router_entropy
        self.momentum = cfg.router_momentum
        self.t_bins = cfg.router_t_bins
        self.token_fraction = cfg.token_fraction
        self.projector = Projector(hidden, dims, cfg.projector_dim, cfg.shared_trunk)
        self.router = Router(len(levels), router_mode, cfg.router_tau, cfg.router_topk, cfg.snr_width, cfg=cfg)
        k = len(levels)
        # [K] with one bin (the layout checkpoints have always had), [bins, K] with several
        self.register_buffer("running_loss", torch.ones(k) if self.t_bins == 1 else torch.ones(self.t_bins, k))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        if self.t_bins > 1:  # updates per bin: a bin's first batch is taken as it is
            self.register_buffer("bin_updates", torch.zeros(self.t_bins, dtype=torch.long))

    def level_losses(self, preds: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor:
        """Per-sample, per-level losses [B, K] (fp32). Outside the step's autocast: a registered loss with a matmul
        (a Gram matrix) would otherwise compute it in bf16 whatever it casts its inputs to."""
        fn = LOSSES.entries[self.loss_kind].fn
        with autocast(preds[0].device, None):
            return torch.stack([fn(p, q, self.cfg, **kw) for p, q, kw in zip(preds, targets, self._loss_kwargs)],
                               dim=1).float()

    def flops_per_image(self, num_tokens: int) -> float:
        """Model FLOPs (2 x multiply-adds) of the heads' forward for one image: they see only the aligned tokens."""
        return self.projector.flops_per_token() * kept_tokens(num_tokens, self.token_fraction)

    def predictions(self, hidden: torch.Tensor | list[torch.Tensor], kept: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The heads' outputs, one [B, N, C_k] per level ([B, k, C_k] with `kept`), from the hidden tokens after
        each of `taps` (a list in `taps` order, or one tensor when there is one tap)."""
        hs = [hidden] if isinstance(hidden, torch.Tensor) else list(hidden)
        if len(hs) != len(self.taps):
            raise ValueError(f"the aligner takes the hidden tokens after blocks {self.taps}; got {len(hs)} tensors")
        if kept is not None:
            hs = [gather_tokens(h, kept) for h in hs]
        if len(hs) == 1:
            return self.projector(hs[0])
        # align.level_depths: each level's own trunk on its own block's tokens
        return self.projector.per_level([hs[self.taps.index(d)] for d in self.depths])

    def forward(
        self, hidden: torch.Tensor | list[torch.Tensor], targets: list[torch.Tensor], t: torch.Tensor,
        kept: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """hidden [B, N, D] (one per tap, in `taps` order, or one tensor when there is one tap), targets
        K x [B, N, C_k], t [B], kept [B, k] token indices or None (all) -> (loss, detached metrics).

        The backbone and projectors get sum_k g_k(t) l_k with g detached; a learned router gets
        its own objective (router_objective), so the router's anti-collapse terms never push the
        backbone.
        """
        if kept is not None:  # align.token_fraction < 1: the heads and losses see each sample's kept tokens only
            targets = [gather_tokens(x, kept) for x in targets]
        losses = self.level_losses(self.predictions(hidden, kept), targets)  # [B, K]
        # [B, K] each: the weights the losses get (detached below), and those the router's objective trains (the
        # same tensor but for topk and registered learned modes, whose cut or post-processing only the first has)
        weights, trained = self.router.route(t)
        loss = (weights.detach() * losses).sum(dim=1).mean()
        weighted = loss.detach()
        bins = None if self.t_bins == 1 else (t.detach() * self.t_bins).long().clamp_(0, self.t_bins - 1)  # [B]
        if self.router.learned:
            loss = loss + self._router_objective(trained, losses, bins)
        metrics = {"align/weighted": weighted, "align/level_loss": losses.detach().mean(dim=0)}  # [K]
        if self.router.varies:  # uniform weights or one level: a constant, logged as a curve it would mislead
            metrics["align/router_entropy"] = entropy(weights.detach()).mean()
        if self.training:  # the caller sums these over a step's micro-batches and calls update_running once
            metrics["running/sums"], metrics["running/counts"] = self.running_terms(losses.detach(), bins)
        return loss, metrics

    def _router_objective(self, weights: torch.Tensor, losses: torch.Tensor, bins: torch.Tensor | None) -> torch.Tensor:
        """The learned router's own objective (router_objective) with this aligner's running means and settings."""
        if not self.normalize:
            return router_objective(weights, losses, None, self.entropy_weight)
        running = self.running_loss if bins is None else self.running_loss[bins]  # [K] or [B, K]
        # The running means are the previous steps' (update_running comes after the step): a sample whose bin has
        # none yet (every sample on the first step) adds nothing (a mask: no host sync)
        seen = self.num_updates > 0 if bins is None else self.bin_updates[bins] > 0  # [] or [B]
        return router_objective(weights, losses, running, self.entropy_weight, seen.to(losses.dtype))

    def running_terms(self, losses: torch.Tensor, bins: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """What one batch adds to the running means: (the batch mean [K], 1) with one bin; with several, the
        per-bin sums [bins, K] and counts [bins]."""
        if bins is None:
            return losses.mean(dim=0), torch.ones((), device=losses.device, dtype=losses.dtype)
        sums = torch.zeros_like(self.running_loss).index_add_(0, bins, losses)  # [bins, K]
        ones = torch.ones_like(bins, dtype=losses.dtype)
        counts = torch.zeros(self.t_bins, device=losses.device, dtype=losses.dtype).index_add_(0, bins, ones)
        return sums, counts

    @torch.no_grad()
    def update_running(self, sums: torch.Tensor, counts: torch.Tensor, skip: torch.Tensor | None = None) -> None:
        """One update of the running loss means per optimiser step, from the `running/*` terms of forward summed
        (or averaged) over the step's micro-batches, so that accumulating gradients over micro-batches trains as
        the whole batch does. Every process keeps the same statistics: the global batch's. A step whose loss was
        not finite (`skip` > 0, a 0-dim tensor) changes nothing. No host sync."""
        sums = all_reduce_mean(sums)
        if self.t_bins > 1:  # global sums / global counts, as a ratio
            counts = all_reduce_mean(counts)
            mean = sums / counts.clamp_min(1e-12)[:, None]
            seen = counts > 0
            if skip is not None:
                seen = seen & (skip == 0)
            ema = self.momentum * self.running_loss + (1 - self.momentum) * mean
            new = torch.where((self.bin_updates == 0)[:, None], mean, ema)
            self.running_loss.copy_(torch.where(seen[:, None], new, self.running_loss))
            self.bin_updates.add_(seen.long())
        else:
            mean = sums / counts
            # the first update takes the batch mean as it is (torch.where, not `if`: no host sync)
            ema = self.momentum * self.running_loss + (1 - self.momentum) * mean
            new = torch.where(self.num_updates == 0, mean, ema)
            self.running_loss.copy_(new if skip is None else torch.where(skip > 0, self.running_loss, new))
        self.num_updates.add_(1 if skip is None else (skip == 0).long())

    @torch.no_grad()
    def router_table(self, num_t: int = 51) -> tuple[torch.Tensor, torch.Tensor]:
        """(t [T], weights [T, K]) for plots and logs."""
        device = self.running_loss.device
        t = torch.linspace(0.0, 1.0, num_t, device=device)
        return t.cpu(), self.router(t).float().cpu()
