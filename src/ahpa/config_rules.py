"""The values each setting may take: choices (some read from the registries when asked, so that an entry added is
valid at once) and ranges, checked by ahpa.config as soon as a key is set; the rules between keys, checked once
every key is set; and the hint for a value not among the choices."""

from __future__ import annotations

from ahpa.align.methods import LOSSES, METHODS, ROUTER_MODES
from ahpa.external_kinds import parse_external
from ahpa.registry import check_name, unknown_hint
from ahpa.spelling import did_you_mean


class _OrDefault:
    """align.loss's values: default (the method's own loss), or a registered one (ahpa.registry.Registry: read
    when asked, so that an entry registered at run time is valid at once, and a package's once it is imported)."""

    def __contains__(self, value) -> bool:
        return value == "default" or value in LOSSES

    def __iter__(self):
        return iter(("default", *LOSSES))


class _Presets:
    """The SiT presets of ahpa.models.sit (SIZES x PATCHES), read when asked: that module needs torch."""

    @staticmethod
    def _all() -> list[str]:
        from ahpa.models.sit import PATCHES, SIZES

        return [f"{s}/{p}" for s in SIZES for p in PATCHES]

    def __contains__(self, value) -> bool:
        return value in self._all()

    def __iter__(self):
        return iter(self._all())


CHOICES = {
    "model.preset": _Presets(),
    "transport.path": ("linear", "cosine"),
    "transport.time_sampler": ("uniform", "logit-normal"),
    "data.source": ("procedural", "npz", "cache"),
    "align.method": METHODS,  # the registries (ahpa.align.methods), read when asked
    "align.loss": _OrDefault(),
    "align.router": ROUTER_MODES,
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "train.compile_mode": ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    "sample.solver": ("euler", "heun", "euler-maruyama"),
}

# the settings that registered methods, losses and router modes declare (ahpa.align.settings): align.options.NAME
OPTIONS = "align.options"
# the keys whose values are names (of prior.external, its kind) that a package or a session may register
# (docs/extending.md), and align.options, whose names they declare: a run's config.yaml may name one this process
# lacks. Resuming refuses it (ahpa.train.run_dir); sampling and exporting, which build no aligner, read it unresolved
# (ahpa.config.load's `unresolved`)
REGISTERED_KEYS = ("align.method", "align.loss", "align.router", "prior.external", OPTIONS)


def named_elsewhere(key: str, value) -> bool:
    """Whether `value` of a REGISTERED_KEYS key has the form of a name a registry takes (of prior.external, KIND:WHERE
    with such a kind), so that, unknown here, it may be registered elsewhere; whether it is, or is misspelt, cannot be
    told here. A value of another form is refused even where the name is not needed."""
    if key not in REGISTERED_KEYS or not isinstance(value, str):
        return False
    name, sep, where = value.partition(":")
    if key == "prior.external" and not (sep and where):
        return False
    try:
        check_name(name if key == "prior.external" else value, key, f"{key}=NAME")
    except ValueError:
        return False
    return True


# the keys naming a pretrained part as KIND:WHERE whose kinds are known here, each with its parser (a ValueError that
# names the kinds); prior.encoder's registry needs torch, so its kind is checked when the encoder loads
SPEC_KINDS = {"prior.external": parse_external}


def wandb_project(value: str) -> tuple[str | None, str]:
    """train.wandb's PROJECT or ENTITY/PROJECT -> (entity or None, project); a ValueError says what W&B would refuse
    (its names take no `\\ # ? % :`, and a slash only between entity and project)."""
    parts = value.split("/")
    if len(parts) > 2 or not all(parts) or any(c in value for c in "\\#?%:"):
        raise ValueError("give a W&B project as PROJECT or ENTITY/PROJECT (no \\ # ? % : in either), or '' for no W&B")
    return (parts[0] if len(parts) == 2 else None), parts[-1]


# keys whose non-empty text has a form of its own, each with its parser (a ValueError that says the form)
FORMS = {"train.wandb": wandb_project}


def spec_problem(key: str, value) -> str | None:
    """What is wrong with the KIND:WHERE spec `value` of `key` (an unknown kind, with a near spelling and the valid
    kinds), or with the form of a key of FORMS, or None; an empty value sets no part."""
    parse = SPEC_KINDS.get(key) or FORMS.get(key)
    if parse is None or not value:
        return None
    try:
        parse(value)
    except ValueError as e:
        return str(e)
    return None


# the values a key may take, checked as soon as it is set (so a bad value fails before any file is written);
# limits that depend on other keys (align.depth against the model's depth) are checked where both are known
_AT_LEAST_1 = (lambda v: v >= 1, "at least 1")
_AT_LEAST_0 = (lambda v: v >= 0, "0 or more")
_POSITIVE = (lambda v: v > 0, "positive")
_IN_0_1 = (lambda v: 0 <= v <= 1, "in [0, 1]")
_BELOW_1 = (lambda v: 0 <= v < 1, "in [0, 1)")
# a power-function EMA's sigma_rel: 12^-1/2 is its exponent 0, the plain mean of the whole run (ahpa.train.posthoc_ema)
_SIGMA_MAX = 12 ** -0.5
_SIGMAS = (lambda v: all(0 < s < _SIGMA_MAX for s in v) and len(set(v)) == len(v),
           f"[] (off) or distinct sigma_rel values each in (0, {_SIGMA_MAX:.4f}), where the power-function EMA's exponent "
           "is finite and positive; EDM2 tracks [0.05, 0.10]")
RANGES = {
    "model.hidden_size": _AT_LEAST_0, "model.depth": _AT_LEAST_0, "model.num_heads": _AT_LEAST_0,
    "model.mlp_ratio": _POSITIVE, "transport.time_std": _POSITIVE,
    "data.resolution": _AT_LEAST_1, "data.num_classes": _AT_LEAST_0, "data.limit": _AT_LEAST_0,
    "data.procedural_size": _AT_LEAST_1, "prior.stats_images": _AT_LEAST_1,
    "align.depth": _AT_LEAST_1, "align.weight": _AT_LEAST_0, "align.smooth_l1_beta": _POSITIVE,
    "align.projector_dim": _AT_LEAST_1, "align.router_tau": _POSITIVE, "align.router_topk": _AT_LEAST_1,
    "align.router_entropy": _AT_LEAST_0, "align.router_momentum": _BELOW_1, "align.router_t_bins": _AT_LEAST_1,
    "align.snr_width": _POSITIVE, "align.stop_step": (lambda v: v >= 0, "0 or more (0 aligns for the whole run)"),
    "align.token_fraction": (lambda v: 0 < v <= 1, "in (0, 1] (1 aligns every token)"),
    "train.steps": _AT_LEAST_1, "train.batch_size": _AT_LEAST_1, "train.grad_accum": _AT_LEAST_1,
    "train.lr": _POSITIVE, "train.warmup_steps": _AT_LEAST_0, "train.weight_decay": _AT_LEAST_0,
    "train.grad_clip": _AT_LEAST_0, "train.label_dropout": _BELOW_1, "train.ema_decay": _BELOW_1,
    "train.posthoc_ema": _SIGMAS,
    "train.posthoc_every": (lambda v: v >= 0, "0 (auto: train.steps / 16 apart) or a number of steps"),
    "train.activation_checkpointing": (lambda v: v >= -1, "-1 (all blocks), 0 (off) or a number of blocks"),
    "train.log_every": _AT_LEAST_1, "train.ckpt_every": _AT_LEAST_1, "train.sample_every": _AT_LEAST_0,
    "train.keep_checkpoints": _AT_LEAST_0, "train.max_bad_steps": _AT_LEAST_1,
    "sample.steps": _AT_LEAST_1, "sample.cfg_scale": _AT_LEAST_0, "sample.guidance_low": _IN_0_1,
    "sample.guidance_high": _IN_0_1, "sample.micro_batch": _AT_LEAST_1, "sample.grid_images": _AT_LEAST_0,
    "eval.every": _AT_LEAST_0, "eval.num": (lambda v: v >= 2, "at least 2 (a covariance)"), "eval.batch": _AT_LEAST_1,
}


def _guidance_interval(cfg) -> str | None:
    s = cfg.sample
    if s.guidance_low > s.guidance_high:  # guided_velocity guides for low <= t <= high: an empty interval never does
        return (f"sample.guidance_low={s.guidance_low} exceeds sample.guidance_high={s.guidance_high}: guidance runs "
                "for t in [low, high], which is then empty, so cfg_scale would do nothing; give low <= high")
    return None


# the rules between keys that each key's own range cannot check: each takes a whole Config, and returns what is
# wrong (or None)
ACROSS_KEYS = (_guidance_interval,)

# the study's and the paper's run names, which are a method and a router mode together
_RUN_NAMES = {f"ahpa-{mode}": f"align.method=ahpa align.router={mode}" for mode in ("soft", "topk", "snr", "uniform")}


def choice_hint(key: str, value, choices: list[str]) -> str:
    """What a user who gave `value` probably meant: a name of the study's tables, a near spelling, a name of an
    installed package that failed to import (named with its error), or (a name that looks like nothing known) one
    registered from Python in another process."""
    if key == "align.method" and value in _RUN_NAMES:
        return f" ({value!r} names a run of the study: {_RUN_NAMES[value]})"
    if key not in ("align.method", "align.loss", "align.router"):
        return did_you_mean(value, choices)
    return "".join(unknown_hint(value, choices))  # a registry's name: as Registry.check explains it
