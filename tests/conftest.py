"""Shared test helpers: tiny configs and the location of ../shared (skipped when absent)."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

# the test models are tiny: one thread avoids OpenMP spin-waiting, which dominates on 2 shared cores
torch.set_num_threads(1)

# reference statistics that `ahpa eval` and runs share go to a directory of the test session's, not the user's cache
# (subprocesses inherit it)
os.environ["AHPA_CACHE"] = tempfile.mkdtemp(prefix="ahpa-test-cache-")
atexit.register(shutil.rmtree, os.environ["AHPA_CACHE"], ignore_errors=True)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def shared_path(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs {path} (the project's shared data, not in the repository); absent here")
    return path


def run_script(args: list[str], timeout: int = 600) -> str:
    """Runs a script of the repository (benchmarks/..., with src on the path) in a fresh interpreter; its stdout.
    A failure shows the end of both streams."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root / "src")}
    out = subprocess.run([sys.executable, *args], cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def hold_lock(path: Path, env: dict | None = None) -> subprocess.Popen:
    """Another launch holding the lock file `path` (what a running `ahpa train` or `ahpa sample` holds), until the
    caller kills it."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root / "src"), **(env or {})}
    proc = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; from ahpa import lock; "
                             "lock.hold(Path(sys.argv[1]), 'x'); print('held', flush=True); time.sleep(600)", str(path)],
                            env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


class FakeEntryPoint:
    """An installed package's entry point (what importlib.metadata gives): `load` runs its module ("ahpa.plugins") or
    returns the loader ("ahpa.encoders" or "ahpa.external_encoders", then `name` is the kind); `value` is what it names, `{package}_mod` unless
    given."""

    class _Dist:
        def __init__(self, name):
            self.name = name

    def __init__(self, package, load, name=None, value=None):
        self.name, self.value, self.dist = name or package, value or f"{package}_mod", self._Dist(package)
        self._load = load

    def load(self):
        return self._load()


@pytest.fixture
def packages(monkeypatch):
    """Installs fake packages for this test: packages(FakeEntryPoint, ..., encoders=[FakeEntryPoint, ...],
    externals=[...]) for the "ahpa.plugins", "ahpa.encoders" and "ahpa.external_encoders" groups; the plugins are
    imported afresh, and every registry is restored."""
    import importlib.metadata

    from ahpa import external_kinds, plugins
    from ahpa.align.methods import LOSSES, METHODS, ROUTER_MODES
    from ahpa.priors import registry

    for reg in (METHODS, ROUTER_MODES, LOSSES, registry.ENCODERS, external_kinds.EXTERNALS):
        monkeypatch.setattr(reg, "entries", dict(reg.entries))
    monkeypatch.setattr(plugins, "_loaded", False)
    monkeypatch.setattr(plugins, "_failures", [])

    def install(*modules, encoders=(), externals=()):
        groups = {plugins.GROUP: list(modules), registry.ENTRY_POINT_GROUP: list(encoders),
                  external_kinds.ENTRY_POINT_GROUP: list(externals)}
        monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: groups.get(group, []))

    return install


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


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """A prepared cache: 40 procedural 16x16 images through the seeded random ahpa-vae (a posterior to sample),
    stored flips, shards of 16 (batches cross shards), grid 4."""
    import numpy as np

    from ahpa.data.prepare import PrepareOptions, prepare
    from ahpa.data.procedural import make_shapes

    root = tmp_path_factory.mktemp("tiny-cache")
    images, labels = make_shapes(40, 16, seed=0)
    np.savez(root / "shapes.npz", images=images, labels=labels)
    prepare(PrepareOptions(images=str(root / "shapes.npz"), vae="ahpa-vae:random", resolution=16, out=str(root / "cache"),
                           grid=4, shard_size=16, batch=16, workers=0, device="cpu", flips="stored"))
    return root / "cache"


def cache_cfg(cache: Path, *extra: str):
    """A tiny run on `tiny_cache`."""
    from ahpa import config

    return config.load(None, [
        "model.preset=S/1", "model.hidden_size=32", "model.depth=2", "model.num_heads=2",
        "data.source=cache", f"data.path={cache}", "data.resolution=16", "prior.encoder=ahpa-vae:random",
        "align.depth=1", "align.projector_dim=32", "train.batch_size=12", "train.log_every=1", "train.ckpt_every=1000",
        "train.sample_every=0", "train.device=cpu", *extra,
    ])
