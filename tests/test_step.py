"""The training step queues its work and reads nothing back to the host: on a GPU every read-back waits for the
queued kernels, and the CPU could no longer run ahead of the GPU."""

from __future__ import annotations

import traceback

import pytest
from torch.utils._python_dispatch import TorchDispatchMode

from ahpa.train.loop import Trainer
from tests.conftest import cache_cfg


class _HostReads(TorchDispatchMode):
    """Counts the operators that read a tensor's value back to the host: on a GPU each waits for the queued work
    (`.item()`, `float(t)`, `if t:` and `bool(t)` are `_local_scalar_dense`; `nonzero`, `masked_select` and a
    boolean-mask index need the count of True values to size their output)."""

    READS = ("_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal")
    # on the CPU every tensor is a host tensor; these sites read tensors that are host tensors in a GPU run too
    HOST_SIDE = {"equal": "ahpa/data/prefetch.py"}  # the prefetcher compares the planned (idx, flip) with the asked

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.READS:
            site = next((f"{f.filename}:{f.lineno}" for f in reversed(traceback.extract_stack())
                         if "/ahpa/" in f.filename and "/tests/" not in f.filename), "?")
            if not (name in self.HOST_SIDE and self.HOST_SIDE[name] in site):
                self.seen.append(f"{name} at {site}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("extra", [(), ("data.prefetch=false", "align.router_t_bins=4", "align.token_fraction=0.5",
                                        "train.grad_accum=2"), ("align.method=vae-latent",),
                                   ("train.precision=fp16", "train.grad_accum=2")])  # the loss scale's schedule too
def test_the_training_step_reads_no_value_back_to_the_host(tiny_cache, tmp_path, extra):
    """The step queues its work and returns device tensors; values come back only when a log row is written. On
    the CPU this checks the operators that would read back (a GPU run counts every host sync: throughput.py)."""
    tr = Trainer(cache_cfg(tiny_cache, "train.steps=4", "align.router=soft", *extra), tmp_path / "r")
    tr.train_step()  # the first step may set things up
    with _HostReads() as reads:
        tr.train_step()
        tr.train_step()
    assert reads.seen == []
    tr.parts.source.close()
