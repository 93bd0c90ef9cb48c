"""The sections of a run's configuration: every key, its type and default, and its documentation (the comments
beside the fields, which `ahpa train --show-config` prints, ahpa.config_doc).

Plain typed values; reading them from YAML and overrides, and checking them, is ahpa.config's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ahpa.spelling import did_you_mean


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
    # the settings a registered method, loss or router mode declares for itself (docs/extending.md, "Settings of your
    # own"), align.options.NAME=VALUE; the run's method, loss and router mode get theirs, defaults filled in
    options: dict = field(default_factory=dict)


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
