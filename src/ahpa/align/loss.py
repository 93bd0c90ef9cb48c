"""Alignment losses and the router's objective, as pure functions (fp32 inside)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ahpa.align.methods import LOSSES, Loss, check_new_settings
from ahpa.align.settings import Setting, checked_settings
from ahpa.config import AlignCfg
from ahpa.plugins import check_call, declares


def cosine_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of 1 - cos(pred, target): [B, N, C] x2 -> [B]."""
    cos = F.cosine_similarity(pred.float(), target.float(), dim=-1, eps=1e-6)  # [B, N]
    return 1.0 - cos.mean(dim=1)


def smooth_l1_loss(pred: torch.Tensor, target: torch.Tensor, beta: float) -> torch.Tensor:
    """Smooth-L1 (SRA2's choice for the latent), mean over tokens and channels: -> [B]."""
    return F.smooth_l1_loss(pred.float(), target.float(), beta=beta, reduction="none").flatten(1).mean(dim=1)


LOSS_CONTRACT = ("fn(prediction [B, N, C], target [B, N, C], the run's AlignCfg[, level=NAME]) -> [B] "
                 "(docs/extending.md, 'A loss')")


def check_loss(name: str, cfg: AlignCfg, levels: list[str] | tuple[str, ...] = ()) -> None:
    """Call a registered loss on a small input, a target unlike the prediction and one equal to it: a loss returning
    a scalar, [B, N] or [B, 1], no gradient, a value not finite (0/0 at a perfect match), or a negative one fails here,
    named, and not as a shape error at the first step, steps skipped as non-finite, or a run that silently does not
    learn (the router divides each level's loss by its running mean: a negative mean, -cos for 1 - cos, blew its
    gradient up by orders of magnitude and clipping then stalled the backbone). A loss that declares `level` is probed
    at each of `levels`, the aligner's (it may compute each its own way). Built-in losses are not probed."""
    if name in LOSSES.built_in:
        return
    fn = LOSSES.entries[name].fn
    for level in (levels if declares(fn, "level") else [None]):
        _probe(name, fn, cfg, {} if level is None else {"level": level})


def _probe(name: str, fn, cfg: AlignCfg, level: dict) -> None:
    """check_loss at one level (`level`: {} or {"level": NAME}, as the aligner passes it)."""
    # [B=2, N=3, C=4]; no random draw: the run's seed stays as it is
    pred = torch.linspace(-1.0, 1.0, 24).reshape(2, 3, 4).requires_grad_()
    at = f" at level {level['level']!r}" if level else ""
    for which, target in (("unlike", pred.detach().flip(-1)), ("equal to", pred.detach())):
        try:
            out = fn(pred, target, cfg, **level)
        except Exception as e:  # the user's function: named with the call, its traceback chained
            raise ValueError(f"align.loss={name!r} failed{at} on the check's inputs [B=2, N=3, C=4]: "
                             f"{type(e).__name__}: {e}; a loss takes any number of tokens N (align.token_fraction "
                             "keeps a share of them) and channels C (docs/extending.md, 'A loss')") from e
        where = f"align.loss={name!r} returned{at}"
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2,):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"{where} {got} for [B=2, N=3, C=4] inputs; a loss returns one value per sample, [B] "
                             "(docs/extending.md, 'A loss')")
        if out.dtype != torch.float32 or not out.requires_grad:
            raise ValueError(f"{where} a {out.dtype} tensor {'with' if out.requires_grad else 'without'} a gradient "
                             "to the prediction; a loss is fp32 (compute in pred.float()) and differentiable in the "
                             "prediction, or its head learns nothing (docs/extending.md, 'A loss')")
        if not torch.isfinite(out.detach()).all():  # NaN < 0 is false: checked before the sign
            raise ValueError(f"{where} {[round(v, 4) for v in out.tolist()]} for a target {which} the prediction: a "
                             "loss is finite, at a perfect match too (clamp a norm it divides by, e.g. "
                             ".clamp_min(1e-6)); a step whose loss is not finite is skipped (docs/extending.md, 'A loss')")
        if (out.detach() < -1e-5).any():  # rounding: 1 - cos(x, x) may be -1e-7
            raise ValueError(f"{where} {[round(v, 4) for v in out.tolist()]}: a loss is >= 0 (0 at a perfect match), "
                             "as the router divides each level's loss by its running mean; e.g. 1 - cos, not -cos "
                             "(docs/extending.md, 'A loss')")


def register_loss(name: str, fn: Callable[..., torch.Tensor], about: str = "",
                  settings: tuple[Setting, ...] = ()) -> None:
    """Make `align.loss=NAME` (and a MethodSpec's loss) valid, computed by fn(prediction, target, align settings) ->
    loss per sample [B] in fp32. A function that declares a parameter `level` is given the name of the level it
    computes (`level="latent"`), by keyword. `settings`: its own parameters (ahpa.align.settings.Setting), set as
    align.options.NAME=VALUE and read as cfg.options["NAME"]."""
    if not name or name == "default" or not callable(fn):
        raise ValueError(f"register_loss needs a name other than '' and 'default' (align.loss=default is the method's "
                         f"own loss) and a function; got {name!r} and {type(fn).__name__}")
    check_call(fn, (None, None, None), f"loss {name!r}", LOSS_CONTRACT, keywords=("level",))
    settings = checked_settings(settings, f"loss {name!r}")
    check_new_settings(LOSSES, name, settings)
    LOSSES.register(name, Loss(about, fn, settings))


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
