"""The Dynamic Router: weights over K prior levels as a function of the noise level t.

Modes:
- soft:    g(t) = softmax(MLP(sinusoidal(1000 t)) / tau), learned, initialised uniform. The MLP and its sinusoid
           are the router's own, not the SiT's time embedding.
- topk:    as soft, then only the k largest weights of each sample (at its t) are kept and renormalised. The
           router's objective takes the weights before the cut (`route`): after it, a level left out has no
           gradient and its weight could never rise again (at initialisation, where all weights tie, the tie-break
           chooses the k, the same at every t). A level's head learns only from the samples whose t keeps it; left
           out at every t, its relative loss stays about where it was; the entropy bonus, or the kept levels'
           relative losses rising above it, bring it back.
- snr:     fixed schedule, no parameters: level k (from 0) gets a Gaussian window centred at t = k / (K - 1), the
           windows normalised over the levels at each t, in the order the levels come (the encoder's: stages
           fine -> coarse, then the latent; or align.levels'), so coarse levels dominate at high noise (the paper's
           story).
- uniform: 1/K everywhere (the multi-uniform baseline; a single level gets weight 1).

More modes come from register_router_mode: a fixed schedule of t, or a learned mode that post-processes the soft
path's weights (docs/extending.md, "A router mode").
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ahpa.align.methods import ROUTER_MODES, RouterMode, check_new_settings
from ahpa.align.settings import Setting, checked_settings
from ahpa.models.sit import timestep_embedding
from ahpa.plugins import check_call, declares

# a registered mode's function (RouterMode.fn): a fixed one maps (t [B] fp32, K) -> weights [B, K]; a learned one maps
# the soft path's weights [B, K] to the weights the levels' losses get [B, K] (its objective trains the soft weights)
FIXED_CONTRACT = "fn(t [B] in [0, 1], num_levels K[, cfg=AlignCfg]) -> weights [B, K], rows summing to 1"
LEARNED_CONTRACT = "fn(soft weights [B, K][, cfg=AlignCfg]) -> weights [B, K], rows summing to 1"


def register_router_mode(name: str, fn: Callable[..., torch.Tensor], learned: bool = False,
                         settings: tuple[Setting, ...] = ()) -> None:
    """Make `align.router=NAME` valid. Fixed (learned=False): fn(t, num_levels) -> [B, K], a schedule with no
    parameters. Learned: the router's MLP and objective as for `soft`, and fn(soft weights) -> [B, K] the weights the
    levels' losses get (as `topk` cuts them); the objective keeps training the soft weights, so a level fn leaves out
    can come back. The router checks fn's output when it is built. A function that declares a parameter `cfg` is
    given the run's align settings by keyword, whose `options` hold its `settings` (ahpa.align.settings.Setting:
    align.options.NAME=VALUE)."""
    if not callable(fn):
        raise ValueError(f"register_router_mode needs a function; got {type(fn).__name__}")
    check_call(fn, (None,) if learned else (None, None), f"router mode {name!r}",
               LEARNED_CONTRACT if learned else FIXED_CONTRACT, keywords=("cfg",))
    settings = checked_settings(settings, f"router mode {name!r}")
    check_new_settings(ROUTER_MODES, name, settings)
    ROUTER_MODES.register(name, RouterMode(bool(learned), fn, settings))


def snr_schedule(t: torch.Tensor, num_levels: int, width: float) -> torch.Tensor:
    """[B] -> [B, K] fixed weights: coarse levels at high noise, fine levels near the data."""
    centres = torch.linspace(0.0, 1.0, num_levels, device=t.device)  # [K], level k at k / (K - 1): fine -> coarse
    logits = -((t.float()[:, None] - centres[None]) ** 2) / (2 * width**2)  # [B, K] log of each Gaussian window
    return torch.softmax(logits, dim=-1)  # the windows normalised over the levels


def keep_topk(weights: torch.Tensor, k: int) -> torch.Tensor:
    """Zero all but the k largest weights of each row and renormalise."""
    if k >= weights.shape[-1]:
        return weights
    idx = weights.topk(k, dim=-1).indices
    mask = torch.zeros_like(weights).scatter_(-1, idx, 1.0)
    kept = weights * mask
    return kept / kept.sum(dim=-1, keepdim=True)


def check_weights(mode: str, t: torch.Tensor, weights: torch.Tensor) -> None:
    """Router weights [T, K] at t [T] must be a distribution over the levels at every t: non-negative rows that sum
    to 1; otherwise the error names the mode and the first values of t where they are not."""
    w = weights.detach().float().cpu()
    bad = (w < 0).any(dim=1) | ((w.sum(dim=1) - 1).abs() > 1e-4)
    if bad.any():
        at = ", ".join(f"{x:.2f}" for x in t.cpu()[bad][:4].tolist()) + (", ..." if int(bad.sum()) > 4 else "")
        raise ValueError(f"router mode {mode!r}: its weights at t = {at} are no distribution over the levels "
                         f"(smallest weight {w[bad].min().item():.4f}, row sums {w[bad].sum(1).min().item():.4f}"
                         f"..{w[bad].sum(1).max().item():.4f}); each row is non-negative and sums to 1")


class Router(nn.Module):
    def __init__(
        self, num_levels: int, mode: str = "soft", tau: float = 1.0, topk: int = 2, width: float = 0.25,
        hidden: int = 128, freq_dim: int = 64, cfg=None,
    ):
        """`cfg`: the run's AlignCfg, given to a registered mode's function that declares `cfg` (its settings are in
        cfg.options); None gives it the defaults."""
        super().__init__()
        ROUTER_MODES.check(mode)
        self.num_levels, self.mode, self.tau, self.topk, self.width = num_levels, mode, tau, topk, width
        self.freq_dim = freq_dim
        fn = ROUTER_MODES.entries[mode].fn
        self._fn_kwargs = {}  # read once here: route() passes them on every step without inspecting fn again
        if fn is not None and declares(fn, "cfg"):
            from ahpa.config import AlignCfg, fill_options

            if cfg is None:
                cfg = AlignCfg(router=mode)
                fill_options(cfg)
            self._fn_kwargs = {"cfg": cfg}
        self.mlp = None
        if self.learned:
            self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, num_levels))
            # zero last layer: softmax of zeros is uniform, so soft training starts from multi-uniform
            nn.init.zeros_(self.mlp[-1].weight)
            nn.init.zeros_(self.mlp[-1].bias)
        self._check_route()

    def _check_route(self) -> None:
        """Route 101 values of t once, so that a mode whose branch is missing or returns the wrong thing fails when it
        is built (docs/extending.md, "A router mode"), not at the first training step: a pair of [B, K] tensors, and
        weights that are a distribution over the levels at every t (a schedule may go negative between a few
        values). A learned mode is seen at its uniform start only; check_weights runs again on its trained weights
        where the router is plotted."""
        t = torch.linspace(0.0, 1.0, 101)
        try:
            with torch.no_grad():
                out = self.route(t)
        except NotImplementedError:  # a mode of ROUTER_MODES without its branch: says so itself
            raise
        except Exception as e:  # a registered function's own error: named with the call, its traceback chained
            raise ValueError(f"router mode {self.mode!r}: Router.route(t [{len(t)}]) with K={self.num_levels} failed: "
                             f"{type(e).__name__}: {e}") from e
        want = (len(t), self.num_levels)
        shape = lambda x: tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__  # noqa: E731
        shapes = [shape(w) for w in out] if isinstance(out, tuple) else shape(out)
        if ROUTER_MODES.entries[self.mode].fn is not None and self.num_levels > 1 and shapes[0] != want:
            contract = LEARNED_CONTRACT if self.learned else FIXED_CONTRACT
            raise ValueError(f"router mode {self.mode!r} (register_router_mode): its function returned {shapes[0]} for "
                             f"{len(t)} values of t and K={self.num_levels}; it is {contract}")
        if shapes != [want, want]:
            raise ValueError(f"router mode {self.mode!r}: Router.route(t [{len(t)}]) returned {shapes}; it returns a "
                             f"pair (weights, objective's weights), each [B, K] = {list(want)}")
        check_weights(self.mode, t, out[0])

    @property
    def varies(self) -> bool:
        """Whether the weights change with t: a plot of them says something (not uniform weights, nor one level)."""
        return self.mode != "uniform" and self.num_levels > 1

    @property
    def learned(self) -> bool:
        return ROUTER_MODES.entries[self.mode].learned and self.num_levels > 1

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t [B] in [0, 1] -> weights [B, K] (fp32, rows sum to 1)."""
        return self.route(t)[0]

    def route(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t [B] -> (weights the levels' losses get [B, K], what a learned router's objective trains [B, K]): the
        same tensor for the fixed modes and `soft`; `topk` and a registered learned mode apply their cut or
        post-processing to the first only, so that the objective trains the softmax and every level keeps learning."""
        if self.mode == "uniform" or self.num_levels == 1:
            weights = torch.full((t.shape[0], self.num_levels), 1.0 / self.num_levels, device=t.device)
            return weights, weights
        if self.mode == "snr":
            weights = snr_schedule(t, self.num_levels, self.width)
            return weights, weights
        registered = ROUTER_MODES.entries[self.mode].fn
        if not self.learned:
            if registered is None:
                raise NotImplementedError(f"router mode {self.mode!r} is fixed (ROUTER_MODES) but has no branch in "
                                          "Router.route and no function of register_router_mode")
            # fp32 as the built-in modes: float64 weights would promote the whole alignment loss to float64 (slow on
            # a GPU)
            weights = registered(t.float(), self.num_levels, **self._fn_kwargs).float()
            return weights, weights
        emb = timestep_embedding(t * 1000.0, self.freq_dim)  # [B, freq_dim]
        probs = torch.softmax(self.mlp(emb.to(self.mlp[0].weight.dtype)).float() / self.tau, dim=-1)  # [B, K]
        if registered is not None:
            return registered(probs, **self._fn_kwargs).float(), probs
        return (keep_topk(probs, self.topk) if self.mode == "topk" else probs), probs
