"""DDP on CPU with gloo, through torchrun: 2 processes x b equal 1 process x 2b.

Tolerance: the gradient all-reduce sums in another order than one process does, so weights agree
to float32 rounding (measured max |diff| ~3e-8 after 4 steps), not bitwise; we assert 1e-5.

The runs use the fixed `snr` router. A learned router starts exactly uniform, where its true
gradient is zero by symmetry; Adam divides that gradient's rounding noise by its own magnitude, so
two summation orders give updates of order lr in opposite directions (measured 5e-4 after 4 steps).
That is Adam on a zero gradient, not a DDP difference, so it is kept out of these comparisons.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ahpa.train.checkpoint import list_checkpoints, read_checkpoint
from tests.conftest import TINY

TINY = [*TINY, "align.router=snr"]

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


def ahpa(nproc: int, *args: str) -> None:
    cmd = [*TORCHRUN, f"--nproc_per_node={nproc}", "-m", "ahpa.cli", *args] if nproc > 1 else [sys.executable, "-m", "ahpa.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


def latest(run: Path) -> dict:
    return read_checkpoint(list_checkpoints(run / "checkpoints")[-1])


def max_diff(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("ddp") / "one"
    ahpa(1, "train", "--out", str(run), *TINY, "train.steps=4")
    return run


def test_two_processes_match_one(one_process_run, tmp_path):
    ahpa(2, "train", "--out", str(tmp_path / "two"), *TINY, "train.steps=4")
    a, b = latest(one_process_run), latest(tmp_path / "two")
    assert a["step"] == b["step"] == 4
    for part in ("model", "ema", "aligner"):
        assert max_diff(a[part], b[part]) < 1e-5, part


def test_save_on_two_resume_on_one(one_process_run, tmp_path):
    run = tmp_path / "switch"
    ahpa(2, "train", "--out", str(run), *TINY, "train.steps=2")
    ahpa(1, "train", "--out", str(run), *TINY, "train.steps=4")
    a, b = latest(one_process_run), latest(run)
    assert b["step"] == 4
    for part in ("model", "ema", "aligner", "optimizer"):
        if part == "optimizer":
            sa, sb = a[part]["state"], b[part]["state"]
            assert max(max_diff(sa[i], sb[i]) for i in sa) < 1e-5
        else:
            assert max_diff(a[part], b[part]) < 1e-5, part


def test_sampling_on_two_processes_writes_the_same_file(one_process_run, tmp_path):
    common = ["sample", "--model", str(one_process_run / "model.safetensors"), "--num-samples", "11", "--batch", "3",
              "--steps", "3", "--micro-batch", "4"]
    ahpa(1, *common, "--out", str(tmp_path / "one.npz"))
    ahpa(2, *common, "--out", str(tmp_path / "two.npz"))
    with np.load(tmp_path / "one.npz") as a, np.load(tmp_path / "two.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
    assert not (tmp_path / "two.npz.parts").exists()
