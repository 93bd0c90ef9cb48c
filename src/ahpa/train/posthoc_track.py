"""EDM2's post-hoc EMA while training (opt-in, train.posthoc_ema): a power-function EMA of the backbone per sigma_rel,
updated after every optimiser step beside the run's exponential EMA, kept in the checkpoint, and saved every
train.posthoc_every steps (0, the default: 16 times a run, `interval`) and at the run's last step to RUN/posthoc/ as
snapshots, from which
`ahpa export --posthoc-sigma` reconstructs the EMA of another length after training (ahpa.train.posthoc_export; the
math: ahpa.train.posthoc_ema).

A snapshot is one safetensors file per sigma_rel, `step_000004000.sigma_0.05.safetensors`: the backbone's state dict
in fp32 (no optimiser, no aligner), with its step, sigma_rel and exponent in the metadata (META_KEY), which is what the
reconstruction reads (the name is for people).
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ahpa.atomic import atomic_path
from ahpa.config import TrainCfg
from ahpa.disk_space import free_space, size_text
from ahpa.models.sit import SiT
from ahpa.train.ema import ema_update
from ahpa.train.posthoc_ema import power_beta, std_to_exp
from ahpa.train.run_dir import RunConfigError

DIRECTORY = "posthoc"
META_KEY = "ahpa_posthoc"
PATTERN = re.compile(r"^step_(\d{9})\.sigma_(.+)\.safetensors$")


def snapshot_path(directory: Path, step: int, sigma_rel: float) -> Path:
    # repr: the shortest text that reads back as the same float, so two sigma_rel never share a name
    return Path(directory) / f"step_{step:09d}.sigma_{sigma_rel!r}.safetensors"


def list_snapshots(directory: Path) -> list[Path]:
    """A run's snapshot files (RUN/posthoc), by step then sigma_rel."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if PATTERN.match(p.name))


def snapshot_info(path: Path) -> dict:
    """A snapshot's metadata ({"step", "sigma_rel", "gamma", ...}), from its header alone."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = (f.metadata() or {}).get(META_KEY)
    except Exception as e:  # safetensors raises its own error type for a file that is not one of its own
        raise ValueError(f"{path}: not a readable post-hoc EMA snapshot ({e}); move it out of the posthoc folder") from None
    if meta is None:
        raise ValueError(f"{path}: no '{META_KEY}' metadata, so not a post-hoc EMA snapshot; move it out of the folder")
    return json.loads(meta)


class PowerEMAs:
    """One frozen copy of the backbone per sigma_rel, each a power-function EMA of the trained weights. Under FSDP the
    copies are sharded as the EMA is (ahpa.train.fsdp.Sharded), so the update is foreach arithmetic on local shards."""

    def __init__(self, ema: SiT, sigmas: list[float]):
        self.sigmas = [float(s) for s in sigmas]
        self.gammas = [std_to_exp(s) for s in self.sigmas]
        # copies of the (frozen, eval) EMA rather than of the model: no activation checkpointing, no gradients
        self.copies = [copy.deepcopy(ema) for _ in self.sigmas]
        self._pairs: list[tuple[list, list]] = []

    def bind(self, model: torch.nn.Module) -> None:
        """Lists the parameters the update walks, once, after sharding (which replaces them), as the EMA's are."""
        trained = list(model.parameters())
        self._pairs = [(list(c.parameters()), trained) for c in self.copies]

    def update(self, t: int) -> None:
        """hat <- beta_t hat + (1 - beta_t) theta after optimiser step t (1-based: the first step's t = 1 gives beta 0,
        the average starts at the weights after it): ema_update's arithmetic, without a host sync (beta_t is a Python
        float of the step count). Also after a skipped step: its weights are the previous step's, and they are the
        trajectory's at step t. Left as they were (as the EMA is), each copy would put its own average in that step's
        place, and the copies would no longer average one trajectory, which the reconstruction assumes."""
        for (averaged, trained), gamma in zip(self._pairs, self.gammas):
            ema_update(averaged, trained, power_beta(gamma, t))

    def states(self, sharded) -> list[dict]:
        """Each copy's full state dict; under FSDP (`sharded`) every process calls it and rank 0 alone gets them."""
        if sharded is None:
            return [c.state_dict() for c in self.copies]
        return [sharded.full_state(f"posthoc_{i}") for i in range(len(self.copies))]

    def checkpoint_state(self, sharded) -> dict:
        return {"sigma_rel": list(self.sigmas), "weights": self.states(sharded)}

    def load(self, state: dict | None, where: Path) -> None:
        """Puts a checkpoint's copies back (before sharding); refuses one that holds other sigma_rel or none."""
        held = None if state is None else state.get("sigma_rel")
        if held != self.sigmas:
            raise RunConfigError(f"the newest checkpoint in {where} holds post-hoc EMAs for sigma_rel {held}, but the run "
                                 f"tracks {self.sigmas} (train.posthoc_ema): is it from another run? Move it away or "
                                 "use another --out")
        for c, weights in zip(self.copies, state["weights"]):
            c.load_state_dict(weights)

    def snapshot(self, sharded, rank: int, run_dir: Path, step: int) -> list[Path]:
        """Writes this step's snapshots from rank 0, each atomically; every process calls it (FSDP gathers)."""
        states = self.states(sharded)
        if rank != 0:
            return []
        written = []
        for sigma, gamma, state in zip(self.sigmas, self.gammas, states):
            meta = {"step": step, "sigma_rel": sigma, "gamma": gamma, "sit": self.copies[0].cfg.to_dict()}
            path = snapshot_path(run_dir / DIRECTORY, step, sigma)
            tensors = {k: v.detach().float().contiguous().cpu() for k, v in state.items()}
            with atomic_path(path) as tmp:
                save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta), "format": "pt"})
            written.append(path)
        return written


# snapshot steps of a run under train.posthoc_every=0: 16 evenly spaced represent sigma_rel 0.025-0.255 within a
# 10% profile residual tracking [0.05, 0.10], nearly all that a sigma_rel can be (0.2887), and the run's first half
# still holds 8, which represent 0.035-0.215 (docs/method.md, "Post-hoc EMA"), for a reconstruction at its midpoint
AUTO_SNAPSHOTS = 16


def interval(t: TrainCfg) -> int:
    """Steps between snapshots: train.posthoc_every, or under 0 (auto) ceil(train.steps / 16), which makes 16
    snapshot steps of a run of 256 steps or more, the last included (fewer, at least 9, of a shorter one). Of the
    train.steps of this launch: a resume that lengthens the run spaces the steps still to come more widely, which the
    reconstruction takes (it reads each snapshot's step from the file), and leaves those written as they are."""
    return t.posthoc_every or math.ceil(t.steps / AUTO_SNAPSHOTS)


def due(t: TrainCfg, step: int) -> bool:
    """Whether step `step` (just taken) writes snapshots: every `interval` steps, and the run's last."""
    return bool(t.posthoc_ema) and (step % interval(t) == 0 or step == t.steps)


def steps_to_write(t: TrainCfg, start: int) -> int:
    """How many snapshot steps a run at step `start` still writes, up to train.steps (those after `start` that an
    earlier launch wrote are removed and written again: drop_after)."""
    if start >= t.steps:
        return 0
    every = interval(t)
    return t.steps // every - start // every + (t.steps % every != 0)


def snapshot_bytes(powers: PowerEMAs) -> int:
    """The tensor bytes of one snapshot file (fp32, as `snapshot` writes them; its header is a few kB more)."""
    return sum(v.numel() * 4 for v in powers.copies[0].state_dict().values())


def check_space(t: TrainCfg, powers: PowerEMAs, run_dir: Path, start: int) -> None:
    """Refuses a run whose snapshots still to write need more than the free space of the run directory's disk: found
    when it starts, a setting to change; found when the disk fills, a crash days in, with the checkpoints (which
    train.keep_checkpoints prunes, and this leaves out) on the same full disk."""
    steps, per_file = steps_to_write(t, start), snapshot_bytes(powers)
    need = steps * len(powers.sigmas) * per_file
    disk, free = free_space(Path(run_dir) / DIRECTORY)
    # a resume first deletes the snapshots of steps after its own (drop_after): their room counts as free
    rewritten = sum(p.stat().st_size for p in snapshots_after(run_dir, start))
    if need > free + rewritten:
        every = interval(t)
        now = f"{every:,}, by 0: train.steps / {AUTO_SNAPSHOTS}" if not t.posthoc_every else f"{every:,}"
        where = f"{disk} (the run directory's disk)" if Path(disk) != Path(run_dir) else f"the run directory {disk}"
        raise RunConfigError(
            f"train.posthoc_ema={powers.sigmas}: the snapshots still to write need {size_text(need)} ({steps:,} "
            f"snapshot steps from step {start:,} to {t.steps:,} x {len(powers.sigmas)} sigma_rel x "
            f"{size_text(per_file)}), and {where} has {size_text(free)} free"
            + (f" and {size_text(rewritten)} in the snapshots after step {start:,}, which the resume rewrites" if rewritten else "")
            + f". Give a larger train.posthoc_every (now {now}), fewer sigma_rel in train.posthoc_ema, or another --out "
            "on a larger disk. If the file system misreports its free space, add --no-space-check to `ahpa "
            "train` (Trainer(..., space_check=False))")


def drop_after(run_dir: Path, step: int) -> None:
    """Removes snapshots of steps after `step`, the one a run resumes from: written by the launch that died after its
    last checkpoint, they are rewritten as the run passes them again (bitwise the same, the run being deterministic),
    and one it never reaches again (a run resumed from an older checkpoint) would be of another trajectory."""
    for path in snapshots_after(run_dir, step):
        path.unlink(missing_ok=True)


def snapshots_after(run_dir: Path, step: int) -> list[Path]:
    """The run's snapshots of steps after `step`: those a resume from `step` deletes and writes again."""
    return [p for p in list_snapshots(Path(run_dir) / DIRECTORY) if int(PATTERN.match(p.name).group(1)) > step]


def cost_note(t: TrainCfg, powers: PowerEMAs | None, world: int, sharding: bool) -> list[str]:
    """What the post-hoc EMAs cost, said when the run starts: memory per copy, and the files and disk of snapshots."""
    if powers is None:
        return []
    ema = powers.copies[0]
    per_copy = sum(p.numel() * p.element_size() for p in ema.parameters())
    n, every, per_file = len(powers.sigmas), interval(t), snapshot_bytes(powers)
    snapshots = steps_to_write(t, 0)
    held = f"{size_text(per_copy / world)} per process, sharded" if sharding else f"{size_text(per_copy)} per process"
    spacing = f"every {every:,} steps" + (f" (train.posthoc_every=0: train.steps / {AUTO_SNAPSHOTS})"
                                         if not t.posthoc_every else "")
    return [f"train.posthoc_ema={powers.sigmas}: {n} power-function EMA{'s' if n > 1 else ''} beside the EMA, each a "
            f"copy of the backbone's {ema.num_params():,} parameters ({held}); {spacing} and at the last, "
            f"{n} snapshot file{'s' if n > 1 else ''} of {size_text(per_file)} to posthoc/: {snapshots * n} files, "
            f"{size_text(snapshots * n * per_file)} over {t.steps:,} steps (`ahpa export --posthoc-sigma` "
            "reconstructs any EMA length from them)"]
