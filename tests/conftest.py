"""Shared test helpers: tiny configs and the location of ../shared (skipped when absent)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# the test models are tiny: one thread avoids OpenMP spin-waiting, which dominates on 2 shared cores
torch.set_num_threads(1)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def shared_path(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs {path} (the project's shared data, not in the repository); absent here")
    return path


TINY = [
    "model.preset=S/1", "model.hidden_size=32", "model.depth=3", "model.num_heads=2",
    "data.source=procedural", "data.resolution=16", "data.procedural_size=64",
    "prior.encoder=ahpa-vae:random", "prior.stats_images=32",
    "align.depth=2", "align.projector_dim=32",
    "train.batch_size=8", "train.lr=0.001", "train.log_every=1", "train.ckpt_every=1000", "train.sample_every=0",
    "sample.steps=4", "sample.micro_batch=8", "sample.grid_images=8",
]


@pytest.fixture
def tiny():
    """A function returning a tiny Config with extra overrides."""
    from ahpa import config

    return lambda *extra: config.load(None, [*TINY, *extra])
