"""Run configuration: typed dataclasses, YAML files and dotted `key=value` overrides.

Strings become checked choices here, once: an unknown key or value fails with the valid names.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ahpa.spelling import did_you_mean
from ahpa.config_rules import (ACROSS_KEYS, CHOICES, RANGES, choice_hint,  # noqa: F401  (CHOICES, RANGES re-exported)
                               named_elsewhere, spec_problem)


class _Settings:
    """A config section, or the whole config: setting a name it lacks is refused, as an unknown override key is.
    `cfg.train.stepz = 30` in a notebook used to add a stray attribute, and the run trained with the default."""

    def __setattr__(self, name: str, value: Any) -> None:
        names = self.__dataclass_fields__
        if name not in names:
            section = next((f.name for f in dataclasses.fields(Config) if f.default_factory is type(self)), "")
            key, what = (f"{section}.{name}", f"valid keys in {section}") if section else (name, "sections are")
            hint = did_you_mean(name, names).replace("'", f"'{section}.", 1) if section else did_you_mean(name, names)
            raise AttributeError(f"unknown config key {key!r}{hint}; {what}: {', '.join(names)}")
        object.__setattr__(self, name, value)


@dataclass
class ModelCfg(_Settings):
    preset: str = "S/2"  # SiT size/patch
    qk_norm: bool = False  # LayerNorm of queries and keys in attention (off in DiT, SiT and REPA)
    # overrides of the preset, for tiny test models (0 = take the preset's value)
    hidden_size: int = 0  # width
    depth: int = 0  # blocks
    num_heads: int = 0  # attention heads
    mlp_ratio: float = 4.0  # MLP width / hidden size


@dataclass
class TransportCfg(_Settings):
    path: str = "linear"  # linear | cosine
    time_sampler: str = "uniform"  # uniform | logit-normal
    time_mean: float = 0.0  # time_sampler=logit-normal: mean of the logit of t (SD3: 0)
    time_std: float = 1.0  # time_sampler=logit-normal: std of the logit of t (SD3: 1)


@dataclass
class DataCfg(_Settings):
    source: str = "procedural"  # procedural | npz | cache
    path: str = ""  # npz file or cache directory
    resolution: int = 32  # image side fed to the encoder
    hflip: bool = True  # random horizontal flips (a function of seed and step)
    num_classes: int = 0  # 0 = read from the data
    limit: int = 0  # use only the first N images (0 = all)
    procedural_size: int = 4096  # images in the procedural data set
    # data.source=cache: gather the next step's rows in a background thread (into pinned buffers on CUDA) while
    # this step computes; the batches are the same with it on or off (ahpa.data.prefetch)
    prefetch: bool = True


@dataclass
class PriorCfg(_Settings):
    encoder: str = ""  # taef2:DIR | diffusers:DIR_OR_HUB_ID | ahpa-vae:DIR | a kind of register_encoder
    stats_images: int = 1024  # images used to measure latent/level statistics (a cache brings its own: ignored)
    external: str = ""  # repa only: dinov2:DIR | transformers:DIR | a kind of register_external (its frozen encoder)


@dataclass
class AlignCfg(_Settings):
    method: str = "ahpa"  # a method of ahpa.align.methods.METHODS
    depth: int = 4  # hidden tokens after this block (1-based) are aligned
    weight: float = 0.5  # lambda
    levels: list = field(default_factory=list)  # [] = the method's default levels
    loss: str = "default"  # default (the method's own) or one of ahpa.align.methods.LOSSES
    smooth_l1_beta: float = 0.05  # loss=smooth-l1 (vae-latent's default): its beta, SRA2's 0.05
    projector_dim: int = 2048  # width of the projector trunk (REPA: 2048; docs/method.md, 'Projector cost')
    shared_trunk: bool = True  # one projector trunk, a light linear head per level
    router: str = "soft"  # a mode of ahpa.align.methods.ROUTER_MODES, for methods that take it (ahpa)
    router_tau: float = 1.0  # softmax temperature of the learned router
    router_topk: int = 2  # router=topk: levels kept at each t
    router_normalize: bool = True  # router sees each level's loss / its running mean
    router_entropy: float = 0.05  # entropy bonus on the router's weights
    router_momentum: float = 0.99  # running-mean momentum for the normalisation
    # running means per level and per bin of t (1 = one per level over all t). With 1, a level whose loss is small
    # near the data (the latent) looks better than usual there and takes the weight; with several bins the router
    # sees each level against its own usual loss at that t, i.e. which level is improving
    router_t_bins: int = 1
    snr_width: float = 0.25  # width of each level's window on t in the fixed snr schedule
    # 0: align for the whole run. N > 0: from step N on, train on the flow loss alone (HASTE's "termination",
    # Wang et al. 2025: REPA speeds up early training and can hold it back later); the aligner is no longer run
    stop_step: int = 0
    # a depth of its own for some levels, NAME:BLOCK items, e.g. [stage1:2,stage4:6] (the others stay at align.depth):
    # a hierarchy of the encoder mapped onto the SiT's blocks. Needs shared_trunk=false (one trunk per level)
    level_depths: list = field(default_factory=list)
    # the share of each image's tokens that the heads align, drawn anew every step (ahpa.align.tokens): an unbiased
    # estimate of the full alignment loss at that share of the heads' cost. 1 aligns every token (REPA, the paper)
    token_fraction: float = 1.0


@dataclass
class TrainCfg(_Settings):
    steps: int = 1000  # optimiser steps of the whole run (may change on resume)
    batch_size: int = 256  # global batch, all processes and accumulation steps together
    grad_accum: int = 1  # micro-batches per step; the same run as one batch of batch_size
    lr: float = 1e-4  # AdamW's learning rate, constant after the warm-up
    warmup_steps: int = 0  # linear learning-rate warm-up (0 = none)
    betas: list = field(default_factory=lambda: [0.9, 0.999])  # AdamW's betas
    weight_decay: float = 0.0  # AdamW's weight decay
    grad_clip: float = 1.0  # largest global gradient norm (0 = no clipping)
    label_dropout: float = 0.1  # share of labels replaced by the null class (classifier-free guidance)
    ema_decay: float = 0.9999  # EMA of the backbone: the weights that are sampled and exported
    ema_warmup: bool = True  # decay min(ema_decay, (1 + n) / (10 + n)) after n updates
    # EDM2's post-hoc EMA (docs/method.md, "Post-hoc EMA"): the sigma_rel (the average's std relative to the run's
    # length, each in (0, 0.2887)) of power-function EMAs kept beside the EMA and saved to RUN/posthoc, from which
    # `ahpa export --posthoc-sigma` builds an EMA of any length after training. [] = off; EDM2 tracks [0.05, 0.10].
    # Each costs one copy of the backbone in memory and one file per snapshot
    posthoc_ema: list[float] = field(default_factory=list)
    # steps between post-hoc EMA snapshots (and one at the last step). 0 (auto) = ceil(train.steps / 16): 16 snapshot
    # steps in a run of 256 steps or more, which represent sigma_rel 0.025-0.255 within a 10% residual tracking
    # [0.05, 0.10] (XL/2's 400K steps: 86 GB, where every 500 steps would be 4.3 TB). The run refuses to start when they would not fit in --out's
    # free space (`ahpa train --no-space-check` skips that). A lengthened run (train.steps on resume) spaces the
    # snapshots still to come more widely; those written stay valid
    posthoc_every: int = 0
    # auto: bf16 on CUDA GPUs with bf16 arithmetic (A100, H100, RTX 30xx on), fp16 on older ones (V100, T4), fp32
    # elsewhere | fp32 | bf16 | fp16 (autocast with a dynamic loss scale, ahpa.train.loss_scale)
    precision: str = "auto"
    compile: bool = False  # torch.compile the backbone and the aligner (for GPUs)
    # torch.compile's mode: default | max-autotune-no-cudagraphs (tries Triton GEMM templates against cuBLAS:
    # minutes more compilation, for long runs) | reduce-overhead / max-autotune (CUDA graphs: for small,
    # host-bound models; the study's SiT-S/1 stepped 1.7-1.9x faster with reduce-overhead, docs/benchmarks.md)
    compile_mode: str = "default"
    fsdp: bool = False  # under torchrun: shard model, EMA and aligner with FSDP2 instead of DDP (L, XL)
    # SiT blocks (the first N; -1 = all, 0 = off) whose activations are recomputed in the backward pass instead
    # of stored: less activation memory for about a third more compute in those blocks. The same computation
    # (bitwise the same gradients in eager mode on the CPU, tested; a compiled graph may round differently).
    # A training setting, not a model one: it is not part of the architecture and is not exported.
    activation_checkpointing: int = 0
    seed: int = 0  # weights, data order and every random draw are functions of it (and of the step)
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    log_every: int = 50  # steps per metrics row (metrics.jsonl, TensorBoard, progress bar)
    ckpt_every: int = 1000  # steps per checkpoint (a stopped run resumes from the newest)
    sample_every: int = 1000  # steps per sample grid of the EMA model, and one at the end (0 = none)
    keep_checkpoints: int = 3  # newest checkpoints kept on disk (0 = keep every one)
    max_bad_steps: int = 20  # non-finite steps in a row (or over half of any stretch this long) before the run stops
    # Weights & Biases: "" = off; PROJECT or ENTITY/PROJECT = rank 0 also logs what TensorBoard gets to one W&B run per
    # run directory, which a resume continues (its id in RUN/wandb_id; W&B's files in RUN/wandb/). `pip install wandb`.
    # Online unless WANDB_MODE=offline (`wandb sync RUN/wandb/offline-run-*` uploads it later). The steps a resume
    # redoes keep in W&B the values it had (README, "A run directory")
    wandb: str = ""
    wandb_name: str = ""  # the W&B run's display name ("" = the run directory's name)


@dataclass
class SampleCfg(_Settings):
    solver: str = "euler"  # euler | heun | euler-maruyama
    steps: int = 50  # solver steps
    cfg_scale: float = 1.0  # classifier-free guidance scale (1 = no guidance)
    # guidance runs for t in [guidance_low, guidance_high] only; t = 1 is noise, and REPA's samples use
    # guidance_high=0.7 (no guidance near pure noise), which carries over since the conventions are the same
    guidance_low: float = 0.0  # guidance from this t ...
    guidance_high: float = 1.0  # ... up to this t
    micro_batch: int = 64  # rows per network call; with guidance a row pair per image, so micro_batch/2 images
    grid_images: int = 64  # images in a run's sample grid (0 = no grids)
    # torch.compile the network for sampling: one graph, since every call has the fixed micro-batch's shape.
    # Faster on a GPU (eager sampling ran at 20-27% MFU on an H200); outputs differ from eager at rounding level,
    # so it is part of a sample file's identity
    compile: bool = False


@dataclass
class EvalCfg(_Settings):
    every: int = 0  # evaluate every N steps (0 = off); uses the `sample` section's sampler settings
    detectors: list = field(default_factory=list)  # torchscript:FILE | inception:FILE | dinov2:DIR
    ref: str = ""  # reference images (.npz, or a folder: read at data.resolution as prepare reads it) or statistics .npz
    num: int = 10000  # class-balanced samples per evaluation
    batch: int = 250  # images per sampling and detector call
    seed: int = 0  # seed of the evaluation's noise: the same samples at every evaluation


@dataclass
class Config(_Settings):
    model: ModelCfg = field(default_factory=ModelCfg)
    transport: TransportCfg = field(default_factory=TransportCfg)
    data: DataCfg = field(default_factory=DataCfg)
    prior: PriorCfg = field(default_factory=PriorCfg)
    align: AlignCfg = field(default_factory=AlignCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    sample: SampleCfg = field(default_factory=SampleCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class ConfigError(ValueError):
    pass


def _section_types(obj: Any) -> dict[str, Any]:
    hints = typing.get_type_hints(type(obj))
    return {f.name: hints[f.name] for f in dataclasses.fields(obj)}


def _coerce(key: str, value: Any, typ: Any, where: str, unresolved: tuple[str, ...] = ()) -> Any:
    """Check/convert one value to the declared type; strings from the command line are parsed as YAML. A key of
    `unresolved` may hold a registered name unknown here (config_rules.named_elsewhere)."""
    if isinstance(value, str) and typ is not str and value != "":
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as e:  # an unclosed [ or {, say: the value, not YAML's parser state, is the news
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            hint = "; a list is written [a,b] or a,b" if typ is list or typing.get_origin(typ) is list else ""
            raise ConfigError(f"{where}: {key}={value!r} is not a valid value ({problem}){hint}") from None
    origin = typing.get_origin(typ)
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {key} must be true or false, got {value!r}")
    elif typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            span = f" ({RANGES[key][1]})" if key in RANGES else ""  # e.g. -1 (all blocks), 0 (off) or ...
            raise ConfigError(f"{where}: {key} must be an integer{span}, got {value!r}")
    elif typ is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {key} must be a number, got {value!r}")
        value = float(value)
    elif typ is str:
        if not isinstance(value, str):
            value = str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {key} must be a string, got {value!r}")
    elif typ is list or origin is list:
        numbers = typing.get_args(typ) == (float,)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        elif numbers and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]  # one number given bare
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: {key} must be a list, got {value!r}")
        value = [_number(key, v, where) for v in value] if numbers else list(value)
    choices = CHOICES.get(key)
    elsewhere = key in unresolved and named_elsewhere(key, value)
    if choices is not None and value not in choices and not elsewhere:
        raise ConfigError(f"{where}: {key}={value!r} is not valid; valid values: {', '.join(choices)}"
                          f"{choice_hint(key, value, list(choices))}")
    problem = None if elsewhere else spec_problem(key, value)
    if problem:
        raise ConfigError(f"{where}: {key}={value!r} is not valid: {problem}")
    allowed, text = RANGES.get(key, (None, ""))
    if allowed is not None and not allowed(value):
        raise ConfigError(f"{where}: {key}={value!r} is out of range; it must be {text}")
    return value


def _number(key: str, item: Any, where: str) -> float:
    """An item of a list of numbers: `a,b` on the command line gives strings, YAML 1.1 reads 3e-4 as one."""
    try:
        if isinstance(item, bool):
            raise ValueError
        return float(item)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {key} must be a list of numbers, got the item {item!r}") from None


def _apply(cfg: Config, key: str, value: Any, where: str, unresolved: tuple[str, ...] = ()) -> None:
    section, _, name = key.partition(".")
    sections = {f.name for f in dataclasses.fields(cfg)}
    if section not in sections or not name:
        raise ConfigError(f"{where}: unknown config key {key!r}{did_you_mean(section, sections) if name else ''}; "
                          f"sections are: {', '.join(sorted(sections))}")
    sub = getattr(cfg, section)
    types_ = _section_types(sub)
    if name not in types_:
        elsewhere = [f"{other}.{name}" for other in sorted(sections) if name in _section_types(getattr(cfg, other))]
        hint = (f" (did you mean {' or '.join(elsewhere)}?)" if elsewhere
                else did_you_mean(name, types_).replace("'", f"'{section}.", 1))
        raise ConfigError(f"{where}: unknown config key {key!r}{hint}; valid keys in {section}: {', '.join(types_)}")
    setattr(sub, name, _coerce(key, value, types_[name], where, unresolved))


def check_across_keys(cfg: Config, where: str) -> None:
    """The rules between keys (ahpa.config_rules.ACROSS_KEYS), once every key is set."""
    for rule in ACROSS_KEYS:
        problem = rule(cfg)
        if problem:
            raise ConfigError(f"{where}: {problem}")


def checked_sample(cfg: SampleCfg | dict, where: str) -> SampleCfg:
    """`cfg` (a SampleCfg, or a mapping of some of its keys) checked as a config's `sample` section is: each key's
    type, choices and range, and the rules across keys. Returns a checked copy (a mapping's missing keys default)."""
    if isinstance(cfg, SampleCfg):
        values = vars(cfg)
    elif isinstance(cfg, dict):
        values = cfg
    else:
        raise ConfigError(f"{where}: expected a SampleCfg (or a dict of its keys), got {type(cfg).__name__}")
    return from_dict({"sample": dict(values)}, where=where).sample


def _fill(cfg: Config, data: dict, where: str, unresolved: tuple[str, ...] = ()) -> Config:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of sections, got {type(data).__name__}")
    for section, values in data.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: section {section!r} must be a mapping, got {values!r}")
        for name, value in values.items():
            _apply(cfg, f"{section}.{name}", value, where, unresolved)
    return cfg


def from_dict(data: dict, where: str = "config", base: Config | None = None) -> Config:
    cfg = _fill(base if base is not None else Config(), data, where)
    check_across_keys(cfg, where)
    return cfg


def load(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), where: str = "overrides",
         unresolved: tuple[str, ...] = ()) -> Config:
    """A config from an optional YAML file plus `section.key=value` overrides (later wins); an error in an override
    names it as coming from `where` (`ahpa train` passes "command line"; a notebook has none). `unresolved`: keys of
    config_rules.REGISTERED_KEYS whose names may be unknown in this process, for a reader that builds no aligner (a
    run's config read to sample or export its SiT: the package that registered its method is not needed there)."""
    if isinstance(overrides, str):  # one override given bare: its characters would be read as overrides
        overrides = [overrides]
    if isinstance(overrides, dict):  # its keys alone would be read, each refused as "not of the form section.key=value"
        raise ConfigError(f"{where}: a list of 'section.key=value' strings, as the command line takes them, not a "
                          "dict: e.g. [f'{k}={v}' for k, v in overrides.items()]")
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        _fill(cfg, data, str(path), unresolved)  # the keys across sections are checked once the overrides are in
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        _apply(cfg, key.strip(), value.strip(), where, unresolved)
    check_across_keys(cfg, str(path) + (f" with the {where}" if overrides else "") if path is not None else where)
    return cfg


# keys naming files: a path, or a KIND:PATH spec of a pretrained part (a list of specs for detectors)
PATH_KEYS = ("data.path", "eval.ref")
SPEC_KEYS = ("prior.encoder", "prior.external", "eval.detectors")


def shown(path: str | Path) -> str:
    """A path for an error message: a relative one says what it is relative to (the directory `ahpa` runs from,
    which is not where the config file lies)."""
    p = Path(path).expanduser()
    return repr(str(path)) + ("" if p.is_absolute() else f" (relative to {os.getcwd()})")


def _absolute(path: str) -> str:
    # only a path that exists here: a hub id (diffusers:org/name) or `ahpa-vae:random` stays as written, and a
    # missing file keeps its name for the error that reports it. abspath, not resolve: symlinks stay as given
    local = os.path.expanduser(path)
    return os.path.abspath(local) if path and os.path.exists(local) else path


def absolute_spec(spec: str) -> str:
    """KIND:PATH with PATH made absolute where it exists here (a hub id or KIND:random stays as written)."""
    kind, sep, where = spec.partition(":")
    return f"{kind}:{_absolute(where)}" if sep else spec


def with_absolute_paths(cfg: Config) -> Config:
    """A copy whose file paths are absolute, relative ones taken from the working directory: a run's config.yaml
    and its export then name the same files from any directory, and resuming from elsewhere compares equal."""
    out = from_dict(cfg.to_dict())
    for key in PATH_KEYS + SPEC_KEYS:
        section, _, name = key.partition(".")
        value = getattr(getattr(out, section), name)
        fix = _absolute if key in PATH_KEYS else absolute_spec
        setattr(getattr(out, section), name, [fix(v) for v in value] if isinstance(value, list) else fix(value))
    return out


def dump(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
