"""Reopen a finished or running run directory (for export and sampling)."""

from __future__ import annotations

from pathlib import Path

from ahpa import config as config_mod
from ahpa.train.loop import Trainer


def trainer_from_run(run_dir: str | Path, device: str = "auto") -> Trainer:
    run_dir = Path(run_dir)
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.yaml)")
    cfg = config_mod.load(cfg_file, [f"train.device={device}"])
    trainer = Trainer(cfg, run_dir)
    if trainer.step == 0:
        raise FileNotFoundError(f"{run_dir} has no valid checkpoint yet")
    return trainer
