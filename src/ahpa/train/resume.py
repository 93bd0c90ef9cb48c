"""A run's EMA backbone from its newest checkpoint (or one chosen by step), for sampling and export, without
rebuilding its training.

Neither needs the run's data, cache, aligner or optimiser, nor its number of processes: a run sampled or exported
on another machine, after its cache was deleted, or on any number of GPUs, needs only its directory and its VAE.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ahpa import config as config_mod
from ahpa.config import Config
from ahpa.config_rules import REGISTERED_KEYS
from ahpa.data.class_names import class_names
from ahpa.device import as_device
from ahpa.models.sit import SiT
from ahpa.priors.registry import load_encoder, parse_spec
from ahpa.priors.targets import PriorStats
from ahpa.sample import SamplerBundle
from ahpa.train.build import autocast_dtype, sit_config
from ahpa.train.checkpoint import (CheckpointError, checkpoint_path, checkpoint_step, list_checkpoints,
                                   load_latest_everywhere, owned, read_checkpoint)
from ahpa.train.distributed import all_true
from ahpa.transport.path import get_path


def _checkpoint_of_step(run_dir: Path, step: int, device: torch.device) -> dict:
    """The checkpoint of `step`, read by every process (each reads the one file named: no choice to agree on); a
    process that cannot read it fails, and every process with it."""
    path = checkpoint_path(run_dir / "checkpoints", step)
    if not path.is_file():
        have = [checkpoint_step(p) for p in list_checkpoints(run_dir / "checkpoints")]
        raise FileNotFoundError(f"{run_dir} has no checkpoint of step {step}; it has those of steps "
                                f"{', '.join(map(str, have)) or 'none'} (train.keep_checkpoints keeps the newest N)")
    state, error = None, None
    try:
        state = read_checkpoint(path)
    except (CheckpointError, EOFError, RuntimeError, OSError) as e:
        error = e
    if not all_true(error is None, device):
        raise CheckpointError(f"{path} cannot be read" + (f": {error}" if error else " by every process"))
    return state


def _first_mismatch(e: RuntimeError) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[1] if len(lines) > 1 else lines[0]  # torch's first line is a heading


def run_sampler(run_dir: str | Path, device: str | torch.device, encoder: str | None = None,
                step: int | None = None) -> tuple[SamplerBundle, int, Config]:
    """(what sampling needs, the checkpoint's step, the run's config). `encoder` names where the run's VAE is on
    this machine when its config.yaml names a path that is not here; its weights must be the run's. `step` takes the
    checkpoint of that step instead of the newest (an FD against training steps, a partial sample file to finish)."""
    run_dir, device = Path(run_dir), as_device(device)
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.yaml)")
    # the SiT alone: a method, loss, router mode or REPA encoder kind of a package not installed here is not needed
    cfg = config_mod.load(cfg_file, unresolved=REGISTERED_KEYS)
    if step is None:
        state, _, skipped = load_latest_everywhere(run_dir / "checkpoints", device)
    else:
        state, skipped = _checkpoint_of_step(run_dir, step, device), []
    if state is None:
        raise FileNotFoundError(f"{run_dir} has no valid checkpoint yet" + "".join(f"\n  {m}" for m in skipped))
    spec = config_mod.absolute_spec(encoder) if encoder else cfg.prior.encoder  # an export names it from anywhere
    if not encoder:
        try:
            parse_spec(spec)
        except ValueError as e:  # the run's kind, registered where it trained: say whose spec it is
            raise ValueError(f"{run_dir} decodes with {spec!r} (its config.yaml's prior.encoder): {e}") from None
    try:
        vae = load_encoder(spec, device)
    except FileNotFoundError as e:
        if encoder:  # the user's own --encoder is what is missing
            raise FileNotFoundError(f"--encoder {encoder!r}: {e}") from None
        raise FileNotFoundError(f"{run_dir} decodes with {spec!r}, which is not here ({e}); name where that VAE is on "
                                "this machine with --encoder KIND:PATH") from None
    # checked wherever both hashes are known (a file's weights, also a hub id's in the local hub cache; not a random VAE's)
    recorded = (state.get("encoder") or {}).get("weights_sha256")
    found = getattr(vae, "weights_sha256", None)
    if recorded and found and found != recorded:
        raise ValueError(f"{spec!r} is not the VAE {run_dir} was trained with: its weights' sha256 is {found[:12]}..., "
                         f"the run's {recorded[:12]}... (the run's config names {cfg.prior.encoder!r}; --encoder names "
                         "where the run's VAE is now)")
    num_classes = state["ema"]["y_embedder.weight"].shape[0] - 1  # the label table's last row is the null class
    model = SiT(sit_config(cfg, vae, num_classes))
    try:
        model.load_state_dict(state["ema"])
    except RuntimeError as e:  # named: a VAE of another latent shape (--encoder), or a config.yaml edited since
        trained = (state.get("encoder") or {}).get("spec") or cfg.prior.encoder
        why = (f"--encoder {encoder!r} is not shaped like the VAE the run was trained with ({trained!r})" if encoder
               else f"was {cfg_file}'s model section edited after training?")
        raise ValueError(f"{run_dir}'s checkpoint does not fit the SiT its config describes ({_first_mismatch(e)}): "
                         f"{why}") from None
    latent_stats = PriorStats.from_dict(owned(state["stats"])).latent
    bundle = SamplerBundle(model.to(device).eval(), get_path(cfg.transport.path), latent_stats, vae, device,
                           autocast_dtype(cfg.train.precision, device), class_names=class_names(cfg.data))
    return bundle, state["step"], cfg
