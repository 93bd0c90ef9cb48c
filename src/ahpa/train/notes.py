"""What a run says before its first step: how it trains (`setup_note`, the first thing to check when a cluster run is
slower than planned), and the settings that cost more than expected or change nothing (precision, the alignment
heads' arithmetic, settings its method or switches do not read). Notes, not errors: the run trains as configured."""

from __future__ import annotations

from dataclasses import asdict

import torch

from ahpa.align import get_method
from ahpa.align.methods import ROUTING, align_settings_read, declared_settings, settings_in_use
from ahpa.config import AlignCfg, Config, EvalCfg, TrainCfg
from ahpa.train.build import BF16_MAJOR, Parts, precision_name


def precision_note(precision: str, device: torch.device) -> list[str]:
    """A note when train.precision=bf16 asks a CUDA GPU without bf16 arithmetic (before compute capability BF16_MAJOR:
    V100, T4, RTX 20xx) for it: it runs, emulated or with fp32 kernels, far slower than the fp16 that `auto` picks."""
    if precision != "bf16" or device.type != "cuda":
        return []
    major, minor = torch.cuda.get_device_capability(device)
    if major >= BF16_MAJOR:
        return []
    return [f"train.precision=bf16 on a GPU of compute capability {major}.{minor}, which has no bf16 arithmetic (it "
            f"comes with {BF16_MAJOR}.0): far slower than fp16; train.precision=auto or fp16 trains in fp16 with a "
            "loss scale"]


HEADS_NOTE_SHARE = 0.15  # above this, a run says what its alignment heads cost



def heads_cost_note(parts: Parts) -> list[str]:
    """A note when the alignment heads are a large part of the training arithmetic: REPA's 2048-wide projector adds
    ~2% to XL/2 and ~11% to B/2, but 25% to the study's SiT-S/1 (measured: its step took 1.29x vanilla's)."""
    if parts.aligner is None:
        return []
    model = parts.model
    share = parts.aligner.flops_per_image(model.cfg.num_tokens) / model.flops_per_image()
    if share <= HEADS_NOTE_SHARE:
        return []
    return [f"the alignment heads add {share:.0%} to the SiT's training FLOPs (align.projector_dim="
            f"{parts.cfg.align.projector_dim} on a {model.cfg.hidden_size}-wide SiT); a narrower projector, or "
            f"aligning a share of the tokens (align.token_fraction), costs less (docs/method.md, 'Projector cost')"]


def guidance_note(cfg: Config, num_classes: int) -> list[str]:
    """A note when the run's sampler guides (sample.cfg_scale != 1) a model guidance cannot help
    (`ahpa.sample.unguidable`: one class, or no label dropout): its grids and evaluations guide, and so does
    `ahpa sample --run` where the command leaves --cfg-scale out, which says so only when it samples."""
    from ahpa.sample import unguidable

    why = unguidable(num_classes, cfg.train.label_dropout) if cfg.sample.cfg_scale != 1 else None
    return [f"sample.cfg_scale={cfg.sample.cfg_scale:g}: {why}; the run's sample grids and evaluations guide with it, "
            "as `ahpa sample --run` does by default (sample.cfg_scale=1 does not guide)"] if why else []


def setup_note(cfg: Config, parts: Parts, world: int, sharding: bool, device_name: str) -> str:
    """What the run trains on, in one line: the first thing to check when a cluster run is slower than expected
    (the wrong GPU, fp32 where bf16 was meant, an eager step, a per-process batch that is not the one planned)."""
    t = cfg.train
    how = "FSDP2" if sharding else "DDP"
    precision = precision_name(parts.amp) + (" with a dynamic loss scale" if parts.loss_scale is not None else "")
    # the compile times measured in docs/benchmarks.md: a bar that does not move at first is expected
    compiled = (f"compiled ({t.compile_mode}; the first step compiles: 28-77 s on an H200, docs/benchmarks.md)"
                if t.compile else "eager")
    micro = f" in {t.grad_accum} micro-batches" if t.grad_accum > 1 else ""
    where = device_name if world == 1 else f"{world} x {device_name} ({how})"
    # what the aligner resolved: a method fixes its router and loss (multi-uniform: uniform), a package may bring them
    a = getattr(parts, "aligner", None)
    aligned = ""
    if a is not None:
        # the extensions' own settings it reads (align.options), as in force: given or their defaults
        used = settings_in_use(cfg.align.method, cfg.align.router, cfg.align.loss) or {}
        options = "".join(f"; options.{name}={a.cfg.options[name]}" for name in used if name in a.cfg.options)
        aligned = (f" (levels {', '.join(a.levels)} at block{'s' if len(a.taps) > 1 else ''} "
                   f"{', '.join(map(str, a.taps))}; router {a.router.mode}; loss {a.loss_kind}; weight "
                   f"{cfg.align.weight:g}{options})")
    return (f"training on {where}, {precision}, {compiled}: {t.steps:,} step{'s' if t.steps != 1 else ''} of global "
            f"batch {t.batch_size} "
            f"({t.batch_size // world} per process{micro}), align.method={cfg.align.method}{aligned}")


def ignored_settings_note(cfg: Config, levels: list[str]) -> list[str]:
    """Notes for settings that change nothing: align settings the chosen method does not read, and evaluation
    settings while evaluation is off. Set on purpose or not, the user learns it before the run, not after."""
    off = [k for k, v in asdict(cfg.eval).items() if k != "every" and v != asdict(EvalCfg())[k]]
    notes = [f"eval.every=0 does not read eval.{', eval.'.join(off)}: ignored (eval.every=N evaluates every N "
             "steps)"] if off and not cfg.eval.every else []
    if cfg.data.source == "procedural" and cfg.data.path:  # "pass data.path=": the run trains on shapes all the same
        notes.append(f"data.source=procedural does not read data.path={cfg.data.path}: ignored, this run trains on "
                     "procedural shapes (data.source=npz reads an .npz; a folder of images is encoded by `ahpa prepare` "
                     "and read as data.source=cache)")
    if cfg.train.compile_mode != "default" and not cfg.train.compile:  # a GPU recipe's mode, its switch left out
        notes.append(f"train.compile=false does not read train.compile_mode={cfg.train.compile_mode}: ignored, the run "
                     "is eager (train.compile=true compiles)")
    if cfg.train.posthoc_every != TrainCfg().posthoc_every and not cfg.train.posthoc_ema:
        notes.append(f"train.posthoc_ema=[] does not read train.posthoc_every={cfg.train.posthoc_every}: ignored, no "
                     "post-hoc EMA is tracked (train.posthoc_ema=[0.05,0.10] tracks EDM2's)")
    if cfg.prior.external and get_method(cfg.align.method).levels != "external":  # one set of overrides for every method
        notes.append(f"align.method={cfg.align.method} does not read prior.external={cfg.prior.external} (REPA's "
                     "encoder): ignored")
    return notes + _align_notes(cfg, levels)


def _align_notes(cfg: Config, levels: list[str]) -> list[str]:
    defaults = asdict(AlignCfg())
    # align.options is no setting itself: each of its keys is one, kept where given for an extension not in use
    changed = [k for k, v in asdict(cfg.align).items() if k not in ("method", "options") and v != defaults[k]]
    a = cfg.align
    spec = get_method(a.method)
    reads = align_settings_read(a.method, a.router, a.router_normalize, a.loss)
    declared = declared_settings()
    # each with what declares it, so the user sees which extension the run would need to use to read it
    notes = [f"align.options.{k}: no method, loss or router mode this run uses declares it (a setting of "
             f"{', '.join(declared[k][1]) if k in declared else 'another extension'}): ignored"
             for k in a.options if f"options.{k}" not in reads]
    return notes + _builtin_align_notes(cfg, levels, changed, spec, reads)


def _builtin_align_notes(cfg: Config, levels: list[str], changed: list[str], spec, reads: set[str]) -> list[str]:
    a = cfg.align
    if spec.levels == "none":
        return [f"align.method={a.method} does not read align.{', align.'.join(changed)}: ignored"] if changed else []
    notes = [f"align.method={a.method} aligns its external encoder's tokens alone (prior.external), not the VAE's "
             f"levels: align.levels={list(a.levels)} is ignored"] if a.levels and "levels" not in reads else []
    # the router mode in force: the method's own, or align.router's (align_settings_read says what each reads)
    ignored = [k for k in changed if k in ROUTING and k not in reads]
    who = f"align.method={a.method}" if spec.router else f"align.router={a.router}"
    notes += [f"{who} does not read align.{', align.'.join(ignored)}: ignored"] if ignored else []
    if "smooth_l1_beta" in changed and "smooth_l1_beta" not in reads:
        notes.append(f"the {spec.loss if a.loss == 'default' else a.loss} loss does not read align.smooth_l1_beta: ignored")
    if (spec.router or a.router) == "topk" and a.router_topk >= len(levels):
        notes.append(f"align.router_topk={a.router_topk} keeps all {len(levels)} levels: the same as router=soft")
    if spec.levels == "all" and len(levels) == 1:  # a weighting of one level has nothing to choose
        notes.append(f"align.levels: one level ({levels[0]}), which {who} gives weight 1 at every t, as "
                     "align.method=vae-level does")
    return notes
