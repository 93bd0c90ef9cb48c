"""Builds a run's parts from its config: device, data, encoders, model, aligner, optimiser (the prior statistics:
compute_stats, called by ahpa.train.run_state.restore on a new run), and its FLOPs per image. What a run says when
it starts is ahpa.train.notes."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from ahpa.align import get_method, resolve_depths, resolve_levels
from ahpa.align.methods import LOSSES, METHODS, ROUTER_MODES
from ahpa.align.objective import Aligner
from ahpa.config import Config, absolute_spec
from ahpa.data.batches import BatchSource, OnTheFly
from ahpa.data.sources import load_image_set
from ahpa.device import resolve_device
from ahpa.models.sit import PATCHES, SiT, SiTConfig
from ahpa.priors.base import PriorEncoder, frozen
from ahpa.priors.external import ExternalEncoder, load_external
from ahpa.priors.registry import kinds, load_encoder
from ahpa.priors.targets import PriorStats, uneven_pooling
from ahpa.registry import Registry
from ahpa.train.distributed import current, device_for
from ahpa.train.loss_scale import LossScale
from ahpa.train.posthoc_track import PowerEMAs
from ahpa.train.rng import STATS_STREAM, generator

BF16_MAJOR = 8  # CUDA compute capability from which a GPU computes in bf16 (A100, H100, RTX 30xx on)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """train.precision's autocast dtype on `device` (None: fp32). auto is bf16 on a CUDA GPU that computes in it
    (compute capability BF16_MAJOR or later) and fp16, with a loss scale, on one that does not (V100, T4, RTX 20xx:
    bf16 there is emulated, many times slower, or not supported); fp32 elsewhere."""
    if precision == "auto" and device.type == "cuda":
        return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= BF16_MAJOR else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def precision_name(amp: torch.dtype | None) -> str:
    """How a run computes, as its first line and benchmark records say it."""
    return {torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}.get(amp, "fp32")


@dataclass
class Parts:
    cfg: Config
    device: torch.device
    amp: torch.dtype | None
    source: BatchSource  # OnTheFly, or a prepared cache's CacheSource
    encoder: PriorEncoder
    external: ExternalEncoder | None
    levels: list[str]
    model: SiT
    ema: SiT
    aligner: Aligner | None
    optimizer: torch.optim.Optimizer
    stats: PriorStats | None = None  # None until ahpa.train.run_state.restore measures or loads them
    loss_scale: LossScale | None = None  # fp16 training's (ahpa.train.loss_scale)
    notes: list[str] = field(default_factory=list)  # what the parts run at, said when the run starts
    posthoc: PowerEMAs | None = None  # train.posthoc_ema's power-function EMAs (ahpa.train.posthoc_track), or None

    @property
    def grid(self) -> int:
        return self.model.cfg.grid

    def trainable(self) -> list[torch.nn.Parameter]:
        params = list(self.model.parameters())
        if self.aligner is not None:
            params += [p for p in self.aligner.parameters() if p.requires_grad]
        return params


def sit_config(cfg: Config, encoder: PriorEncoder, num_classes: int) -> SiTConfig:
    res = cfg.data.resolution
    if res % encoder.factor:
        raise ValueError(f"data.resolution={res} is not divisible by the VAE factor {encoder.factor} of {encoder.spec!r}")
    latent = res // encoder.factor
    sc = SiTConfig.preset(cfg.model.preset, input_size=latent, in_channels=encoder.latent_channels,
                          num_classes=num_classes, qk_norm=cfg.model.qk_norm, mlp_ratio=cfg.model.mlp_ratio)
    for key in ("hidden_size", "depth", "num_heads"):
        if getattr(cfg.model, key):
            setattr(sc, key, getattr(cfg.model, key))
    if latent % sc.patch_size:
        # a coarse VAE (DC-AE's factor 32) leaves few latent cells: the patch that fits is as good a fix as a resolution
        size = cfg.model.preset.split("/")[0]
        fits = [f"{size}/{p}" for p in PATCHES if latent % p == 0]
        raise ValueError(
            f"model.preset={cfg.model.preset}: latent side {latent} (data.resolution={res} / VAE factor {encoder.factor} "
            f"of {encoder.spec!r}) is not divisible by patch size {sc.patch_size}: use a resolution that is a multiple "
            f"of {encoder.factor * sc.patch_size}, or model.preset={' or '.join(fits)}"
        )
    return sc


def check_pooling(encoder: PriorEncoder, levels: list[str], resolution: int, sc: SiTConfig) -> None:
    """Refuses a level whose map does not pool evenly to the model's tokens (a custom encoder's level coarser than a
    token, or of a stride that does not divide it): pool_to_grid would train it on targets that are not its tokens'
    patches, without a word. `ahpa prepare` refuses such a level by the same rule."""
    for lvl in map(encoder.level, levels):
        why = uneven_pooling(lvl, resolution, sc.grid)
        if why is None:
            continue
        f = encoder.factor
        fits = [other.name for other in encoder.levels if not uneven_pooling(other, resolution, sc.grid)]
        patches = [f"/{p}" for p in PATCHES if (f * p) % lvl.stride == 0 and (resolution // f) % p == 0]
        raise ValueError(f"prior.encoder={encoder.spec!r}: {why} (the VAE factor {f} x the model's patch "
                         f"{sc.patch_size}), so its targets would not be its tokens' patches: leave it out of "
                         f"align.levels (those that pool evenly: {', '.join(fits)})"
                         + (f", or take a model.preset of patch {' or '.join(patches)}" if patches else ""))


def build_optimizer(cfg: Config, model: SiT, aligner: Aligner | None) -> torch.optim.Optimizer:
    """AdamW over the model's then the aligner's parameters (checkpoints key its state by this order)."""
    params = list(model.parameters()) + (list(aligner.parameters()) if aligner is not None else [])
    return torch.optim.AdamW(
        params, lr=cfg.train.lr, betas=tuple(cfg.train.betas), weight_decay=cfg.train.weight_decay,
        fused=True,  # also on CPU (torch >= 2.4): it honours found_inf, so bad steps skip without a sync
    )


def build_parts(
    cfg: Config, device: torch.device | None = None, external: ExternalEncoder | None = None,
    encoder: PriorEncoder | None = None,
) -> Parts:
    """All parts of a run. `external` supplies REPA's frozen encoder as a module (else prior.external);
    `encoder` a prior encoder object in place of loading `prior.encoder` (its spec is still recorded)."""
    device = device or resolve_device(device_for(cfg.train.device, current()))  # under torchrun: cuda:LOCAL_RANK
    method = get_method(cfg.align.method)
    if not cfg.prior.encoder and encoder is None:
        raise ValueError("prior.encoder is not set: name the VAE, e.g. prior.encoder=taef2:PATH or ahpa-vae:PATH")
    encoder = frozen(encoder.to(device)) if encoder is not None else load_encoder(cfg.prior.encoder, device)
    if cfg.data.source == "cache":  # a prepared cache (ahpa prepare): the encoder stays for decoding samples
        from ahpa.data.cache import cache_overview, open_cache

        num_classes, available = cache_overview(cfg, encoder, method)
    else:
        data = load_image_set(cfg.data, cfg.train.seed)
        num_classes, available = data.num_classes, encoder.level_names
    sc = sit_config(cfg, encoder, num_classes)
    levels = resolve_levels(method, available, list(cfg.align.levels))
    check_pooling(encoder, [n for n in levels if n != "external"], cfg.data.resolution, sc)
    if method.levels != "none" and not 1 <= cfg.align.depth <= sc.depth:
        raise ValueError(f"align.depth={cfg.align.depth} must lie in [1, {sc.depth}] (the model's depth)")
    if method.levels != "external":
        if external is not None:  # it would train without it, and the user believes it aligns to it
            raise ValueError(f"an external encoder was given to Trainer, but align.method={cfg.align.method} aligns "
                             "no external encoder's tokens: set align.method=repa, or leave external out")
    elif external is not None:
        if not isinstance(external, ExternalEncoder):  # any module mapping images to tokens [B, N, C], as docs say
            external = ExternalEncoder.wrap(external)
        external = frozen(external.to(device))  # eval mode, no gradients: whatever the caller left (BatchNorm drifts)
    else:
        if not cfg.prior.external:
            raise ValueError("align.method=repa needs prior.external=KIND:DIR (an external frozen encoder: dinov2:DIR, "
                             "transformers:DIR or a kind of register_external)")
        external = load_external(cfg.prior.external).to(device)
    # refuses tokens that do not tile the SiT's grid; runs an encoder that takes other input sides at one that does
    notes = [external.setup(sc.grid)] if external is not None else []

    torch.manual_seed(cfg.train.seed)  # weight init is part of the run's identity
    model = SiT(sc).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    try:  # after the EMA copy: the EMA never runs a backward pass
        model.set_activation_checkpointing(cfg.train.activation_checkpointing)
    except ValueError as e:
        raise ValueError(f"train.activation_checkpointing={cfg.train.activation_checkpointing}: {e}") from None
    aligner = None
    if levels:
        dims = [external.channels] if external is not None else [encoder.level(n).channels for n in levels]
        router_mode = method.router or cfg.align.router
        loss = method.loss if cfg.align.loss == "default" else cfg.align.loss
        depths = resolve_depths(levels, cfg.align.depth, list(cfg.align.level_depths), sc.depth, cfg.align.shared_trunk)
        aligner = Aligner(sc.hidden_size, levels, dims, cfg.align, router_mode, loss, depths).to(device)
    optimizer = build_optimizer(cfg, model, aligner)
    amp = autocast_dtype(cfg.train.precision, device)
    if cfg.data.source == "cache":
        source = open_cache(cfg, encoder, levels, sc.grid, device)
    else:
        # the VAE encodes in fp32 under fp16 training: VAEs are known to overflow fp16 (SDXL's needed an "fp16-fix"
        # release; diffusers marks such VAEs force_upcast), and a bad latent is a bad step, not a loss-scale matter
        source = OnTheFly(data, encoder, levels, sc.grid, cfg.data.resolution, device, None if amp == torch.float16 else amp)
    return Parts(cfg, device, amp, source, encoder, external, levels, model, ema, aligner, optimizer,
                 loss_scale=LossScale(device) if amp == torch.float16 else None, notes=notes,
                 posthoc=PowerEMAs(ema, cfg.train.posthoc_ema) if cfg.train.posthoc_ema else None)


def given_encoder_spec(encoder, configured: str) -> tuple[str, list[str]]:
    """(the spec of an encoder object given to `Trainer`, notes), checked: the run records the spec (config.yaml, the
    export), and resuming, exporting and `ahpa sample --run` load the encoder again by it. A kind no loader is
    registered for is a note, not an error: a benchmark or a notebook may train in this process only."""
    spec = getattr(encoder, "spec", "") or ""
    fix = ("set its `spec` to KIND:WHERE with KIND registered (ahpa.priors.register_encoder in this process, or an "
           "`ahpa.encoders` entry point for every process; docs/extending.md)")
    if not spec:
        raise ValueError(f"the encoder given to Trainer ({type(encoder).__name__}) has no spec, which the run records "
                         f"to load it again: {fix}")
    if configured and absolute_spec(configured) != absolute_spec(spec):
        raise ValueError(f"prior.encoder={configured!r} is not the encoder given to Trainer ({spec!r}): the run would "
                         "train with one and record the other; leave prior.encoder empty or name the same encoder")
    if spec.partition(":")[0] not in kinds():
        return spec, [f"the encoder given to Trainer has spec {spec!r}, whose kind no loader is registered for: this "
                      f"process trains with it, but a resume, an export's sampling or `ahpa sample --run` will not find "
                      f"it; {fix}"]
    return spec, []


def registered_entries(cfg: Config, parts: Parts) -> list[tuple[str, Registry, str, object]]:
    """(setting, registry, name, entry) of each extension the run's parts were built and checked with (a registered,
    not built-in, method, router mode or loss): the Trainer refuses to train once one of them is registered again,
    since the router and the aligner call a registry's entry at each step and would run the new one unchecked."""
    used = [("align.method", METHODS, cfg.align.method)]
    if parts.aligner is not None:
        used += [("align.router", ROUTER_MODES, parts.aligner.router.mode),
                 ("align.loss", LOSSES, parts.aligner.loss_kind)]
    return [(key, reg, name, reg.entries[name]) for key, reg, name in used if name not in reg.built_in]


def train_flops_per_image(parts: Parts) -> float:
    """The training arithmetic per image: 3 x (2 x multiply-adds) of the SiT's forward and of the alignment heads'
    (the MFU convention). Recorded at each start, so that `ahpa compare` reads speed-ups per FLOP as well as per
    image: heads that cost 25% of a small SiT's arithmetic must buy more than 1.25x fewer images to pay."""
    model = parts.model
    heads = parts.aligner.flops_per_image(model.cfg.num_tokens) if parts.aligner is not None else 0.0
    return 3.0 * (model.flops_per_image() + heads)


def frozen_flops_per_image(parts: Parts) -> float:
    """The forward arithmetic per image of REPA's frozen encoder, run on every batch (no backward; counted by
    torch's FlopCounterMode when it was set up, on the run's device): the cost of the external target that AHPA's
    own levels do not have, which `ahpa compare` adds to the training FLOPs per image. 0 for other methods."""
    return parts.external.flops_per_image if parts.external is not None else 0.0


def check_batch_split(batch_size: int, grad_accum: int, world: int) -> None:
    """The global batch splits evenly into processes x micro-batches, or the refusal names the train.grad_accum values
    that fit this many processes: a run resumed on fewer or other GPUs keeps its batch and changes those."""
    if batch_size % (grad_accum * world) == 0:
        return
    fits = [str(a) for a in range(1, batch_size // world + 1) if batch_size % (a * world) == 0]
    shown = ", ".join(fits[:8]) + (", ..." if len(fits) > 8 else "")
    fix = (f"with {world} process{'es' if world > 1 else ''}, train.grad_accum may be {shown}" if fits else
           f"no train.grad_accum fits {world} processes: launch a number of processes that divides {batch_size}")
    raise ValueError(f"train.batch_size={batch_size} (the global batch) is not divisible by train.grad_accum x "
                     f"processes = {grad_accum} x {world}: {fix}")


def compute_stats(parts: Parts) -> PriorStats:
    """Latent and level statistics of the run's data, from a generator of their own."""
    g = generator(parts.cfg.train.seed, stream=STATS_STREAM, device=parts.device)
    return parts.source.measure_stats(parts.cfg.prior.stats_images, g)
