"""EDM2's post-hoc EMA while training (opt-in, train.posthoc_ema): a power-function EMA of the backbone per sigma_rel,
updated after every optimiser step beside the run's exponential EMA, kept in the checkpoint, and saved every
train.posthoc_every steps (and at the run's last step) to RUN/posthoc/ as snapshots, from which
`ahpa export --posthoc-sigma` reconstructs the EMA of another length after training (ahpa.train.posthoc_export; the
math: ahpa.train.posthoc_ema).

A snapshot is one safetensors file per sigma_rel, `step_000004000.sigma_0.05.safetensors`: the backbone's state dict
in fp32 (no optimiser, no aligner), with its step, sigma_rel and exponent in the metadata (META_KEY), which is what the
reconstruction reads (the name is for people).
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ahpa.atomic import atomic_path
from ahpa.config import TrainCfg
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


def due(t: TrainCfg, step: int) -> bool:
    """Whether step `step` (just taken) writes snapshots: every train.posthoc_every steps, and the run's last."""
    return bool(t.posthoc_ema) and (step % t.posthoc_every == 0 or step == t.steps)


def drop_after(run_dir: Path, step: int) -> None:
    """Removes snapshots of steps after `step`, the one a run resumes from: written by the launch that died after its
    last checkpoint, they are rewritten as the run passes them again (bitwise the same, the run being deterministic),
    and one it never reaches again (a run resumed from an older checkpoint) would be of another trajectory."""
    for path in list_snapshots(run_dir / DIRECTORY):
        if int(PATTERN.match(path.name).group(1)) > step:
            path.unlink(missing_ok=True)


def _size(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def cost_note(t: TrainCfg, powers: PowerEMAs | None, world: int, sharding: bool) -> list[str]:
    """What the post-hoc EMAs cost, said when the run starts: memory per copy, and the files and disk of snapshots."""
    if powers is None:
        return []
    ema = powers.copies[0]
    per_copy = sum(p.numel() * p.element_size() for p in ema.parameters())
    n = len(powers.sigmas)
    snapshots = t.steps // t.posthoc_every + (t.steps % t.posthoc_every != 0)
    held = f"{_size(per_copy / world)} per process, sharded" if sharding else f"{_size(per_copy)} per process"
    return [f"train.posthoc_ema={powers.sigmas}: {n} power-function EMA{'s' if n > 1 else ''} beside the EMA, each a "
            f"copy of the backbone's {ema.num_params():,} parameters ({held}); every {t.posthoc_every:,} steps and "
            f"at the last, {n} snapshot file{'s' if n > 1 else ''} of {_size(per_copy)} to posthoc/: {snapshots * n} "
            f"files, {_size(snapshots * n * per_copy)} over {t.steps:,} steps (a larger train.posthoc_every writes "
            "fewer; `ahpa export --posthoc-sigma` reconstructs any EMA length from them)"]
