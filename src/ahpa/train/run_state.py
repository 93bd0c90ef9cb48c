"""What a run's checkpoint holds, and putting it back into a run's parts.

Plain full state dicts of the backbone, its EMA, the aligner and the optimiser, the same with or without FSDP, so a
run may change between FSDP, DDP and one process on resume; plus the step, the EMA's update count, the prior
statistics and what identifies the levels and the encoder; and train.posthoc_ema's power-function EMAs when on.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from ahpa.config import Config
from ahpa.priors.targets import PriorStats
from ahpa.train.build import Parts, compute_stats
from ahpa.train.checkpoint import load_latest_everywhere, owned
from ahpa.train.run_dir import RunConfigError


def checkpoint_state(parts: Parts, sharded, rank: int, step: int, ema_updates: int, world: int, cfg: Config) -> dict | None:
    """The checkpoint's content. Under FSDP (`sharded`, an ahpa.train.fsdp.Sharded) every process calls it (it
    gathers) and only rank 0 gets the dict; the others get None."""
    p = parts
    if sharded is None:
        model, ema, optimizer = p.model.state_dict(), p.ema.state_dict(), p.optimizer.state_dict()
        aligner = p.aligner.state_dict() if p.aligner is not None else None
    else:
        model, ema, optimizer = sharded.full_state("model"), sharded.full_state("ema"), sharded.optimizer_state()
        aligner = sharded.full_state("aligner") if p.aligner is not None else None
    # train.posthoc_ema's copies: a key of its own, absent when off (the checkpoint is then what it always was)
    posthoc = {"posthoc_ema": p.posthoc.checkpoint_state(sharded)} if p.posthoc is not None else {}
    if sharded is not None and rank != 0:
        return None
    return {
        "step": step,
        "ema_updates": ema_updates,
        "processes": world,
        "config": cfg.to_dict(),
        "model": model,
        "ema": ema,
        "aligner": aligner,
        "optimizer": optimizer,
        "stats": p.stats.to_dict(),
        "levels": p.levels,
        "encoder": p.encoder.identity(),
        # fp16's loss scale: a resumed run scales its next step as the run that went on would have
        "loss_scale": p.loss_scale.state_dict() if p.loss_scale is not None else None,
        **posthoc,
    }


@contextlib.contextmanager
def must_fit(run_dir: Path, step):
    """Turns torch's load errors into one that names the checkpoint and the likely cause."""
    try:
        yield
    except (RuntimeError, KeyError, ValueError, IndexError) as e:
        raise RunConfigError(
            f"the newest checkpoint in {run_dir / 'checkpoints'} (step {step}) does not fit this "
            f"run's model/aligner: {str(e).splitlines()[0]} ... Is it from another run or model size? Move it away "
            f"or use another --out."
        ) from None


@dataclass
class Resumed:
    step: int
    ema_updates: int
    optimizer_state: dict  # loaded once the optimiser's parameters are final (after sharding)
    message: str


def restore(run_dir: Path, parts: Parts, cfg: Config, world: int) -> tuple[Resumed | None, list[str]]:
    """Loads the newest checkpoint into the (unsharded) modules and the statistics into `parts` (measured afresh on
    a new run, which returns None). Also returns the messages of checkpoints skipped as unreadable."""
    p = parts
    state, _, skipped = load_latest_everywhere(run_dir / "checkpoints", p.device)
    if state is None and skipped:
        raise RunConfigError(
            f"{run_dir / 'checkpoints'} holds checkpoints but none is readable:\n  " + "\n  ".join(skipped)
            + "\nMove them away to start afresh, or restore a good copy."
        )
    if state is None:
        p.stats = compute_stats(p)
        return None, skipped
    with must_fit(run_dir, state.get("step")):
        p.model.load_state_dict(state["model"])
        p.ema.load_state_dict(state["ema"])
        if p.aligner is not None:
            p.aligner.load_state_dict(state["aligner"])
        optimizer_state = state["optimizer"]
    if p.posthoc is not None:  # shaped as the model, which fitted; its own error names what it lacks
        p.posthoc.load(state.get("posthoc_ema"), run_dir / "checkpoints")
    if p.loss_scale is not None and state.get("loss_scale"):  # not in a checkpoint of a bf16 or fp32 run (auto on
        p.loss_scale.load_state_dict(state["loss_scale"])     # another GPU): the scale then starts afresh
    # what the run keeps of the mapped checkpoint gets memory of its own (checkpoint.owned); on a GPU, loading
    # the optimiser's state copies it there
    if p.device.type == "cpu":
        optimizer_state = owned(optimizer_state)
    p.stats = PriorStats.from_dict(owned(state["stats"]))
    step, t = state["step"], cfg.train
    if t.steps < step:  # before config.yaml is written: the run's record keeps its length
        raise RunConfigError(
            f"train.steps={t.steps}, but {run_dir} is at step {step} (its newest checkpoint): a run is not "
            f"shortened. Give train.steps={step} or more to resume it; `ahpa sample --run` and `ahpa export --run` "
            "read its EMA without training"
        )
    saved_world = state.get("processes")  # None in checkpoints from before it was recorded
    saved_by = f"{saved_world} process{'es' if saved_world != 1 else ''}"
    moved = (f" (saved by {saved_by}, now {world}: {t.batch_size // (world * t.grad_accum)} samples per process per "
             "micro-step)") if saved_world not in (None, world) else ""
    message = (f"resumed from step {step}{moved}" if step < t.steps else
               f"the run is complete (step {step}): writing its export and closing plots again")
    return Resumed(step, state["ema_updates"], optimizer_state, message), skipped
