"""The training step queues its work and reads nothing back to the host: on a GPU every read-back waits for the
queued kernels, and the CPU could no longer run ahead of the GPU."""

from __future__ import annotations

import os
import traceback
from pathlib import Path

import pytest
from torch.utils._python_dispatch import TorchDispatchMode

import ahpa
from ahpa.train.loop import Trainer
from tests.conftest import cache_cfg

# the package's own files, by where it is: a checkout cloned as ahpa/ has "/ahpa/" in its .venv's torch files too
PACKAGE = os.path.realpath(os.path.dirname(ahpa.__file__)) + os.sep


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
                         if os.path.realpath(f.filename).startswith(PACKAGE)), "?")
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


def _eager_ops(tr, steps: int = 2) -> dict:
    """benchmarks/step_ops.py's count of one step's operators by phase, and the log window's sums of the loop."""
    import step_ops

    sums = {}
    for _ in range(2):  # the optimiser's state, the statistics' device copies
        step_ops.add_to_window(sums, tr.train_step())
    with step_ops.StepOps() as ops:
        for _ in range(steps):
            metrics = tr.train_step()
            ops.outside = "window sums"
            step_ops.add_to_window(sums, metrics)
            ops.outside = "outside the step"
    return ops.per_step(steps)


def test_the_eager_operators_alignment_adds_to_a_step_are_few(tiny_cache, tmp_path, monkeypatch):
    """train.compile compiles the SiT and the aligner; every other operator of the step runs eagerly, a kernel launch
    each on a GPU, where the study's small model is bound by them (docs/benchmarks.md, "The eager operators of a
    step"), counted here by benchmarks/step_ops.py's counter. No longer in the step: the metrics' sum over one
    micro-batch (0 + v / 1), a comparison and a zeros_like per metric for the skipped-step mask, one add per metric
    for the log window's sums, the linear path's velocity as six kernels, the label drop's full_like, a division by
    grad_accum=1 forward and backward, isfinite's six operators (three now), a copy of the running-mean terms, and
    views: of the draws, of each parameter for the EMA, two per level for the standardisation. The same counts on
    torch 2.4.1 and 2.13."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    counts = {}
    for method, extra in (("none", ["align.method=none"]), ("ahpa", ["align.router=soft"])):
        tr = Trainer(cache_cfg(tiny_cache, "train.steps=10", *extra), tmp_path / method)
        counts[method] = _eager_ops(tr)
        tr.parts.source.close()
    ahpa, none = counts["ahpa"]["phases"], counts["none"]["phases"]
    assert not [p for p in ahpa if p.startswith(("other", "unknown"))]  # every operator has its phase
    assert "metric accumulation" not in ahpa  # one micro-batch: its metrics as they are
    masks = ahpa["metric masks"]["by_op"]
    assert masks.get("gt") == 1 and "zeros_like" not in masks  # one comparison, one zero made once
    assert ahpa["window sums"]["by_op"] == {"_foreach_add_": 1}
    assert "ones_like" not in ahpa["loss"]["by_op"] or ahpa["loss"]["by_op"]["ones_like"] == 1  # the seed gradient
    assert "full_like" not in ahpa["loss"]["by_op"] and ahpa["skip check"]["ops"] == 3
    assert "detach (view)" not in ahpa["EMA"]["by_op"] and "clone" not in ahpa["running means"]["by_op"]
    assert not [op for phase in ("standardise", "draws") for op in ahpa[phase]["by_op"] if op.endswith("(view)")]
    # what alignment adds outside the compiled modules: the standardisation of its 4 levels (2 operators each), their
    # fetch, its loss terms, metrics and running means: 29.5 operators that launch a kernel per step, 49.5 before
    extra = counts["ahpa"]["totals"]["eager"]["launches"] - counts["none"]["totals"]["eager"]["launches"]
    assert extra <= 30, (extra, {p: v["launches"] for p, v in ahpa.items()}, {p: v["launches"] for p, v in none.items()})


def test_the_log_windows_sums_are_the_per_metric_sums_from_one_foreach_add():
    """ahpa.train.logger.add_to_window: the window's first step starts the sums as 0 + value (new tensors: -0.0 as
    +0.0, as before), later steps add all metrics in one foreach add, in place; a step with other metrics falls back to
    one add each. The same bits as the loop's per-metric adds."""
    import torch

    from ahpa.train.logger import add_to_window

    g = torch.Generator().manual_seed(0)
    steps = [{"loss": torch.randn((), generator=g), "levels": torch.randn(5, generator=g), "entropy": torch.tensor(-0.0),
              "half": torch.randn(3, generator=g).bfloat16()} for _ in range(4)]
    sums, plain = {}, {}
    for i, metrics in enumerate(steps):
        before = dict(sums)
        add_to_window(sums, metrics)
        for k, v in metrics.items():
            plain[k] = plain.get(k, 0) + v
        if i:  # in place: the same tensors
            assert all(sums[k] is before[k] for k in sums)
    assert all(sums[k].dtype == plain[k].dtype and torch.equal(sums[k].view(-1).view(torch.uint8), plain[k].view(-1).view(torch.uint8))
               for k in plain)
    assert all(m["loss"].data_ptr() != sums["loss"].data_ptr() for m in steps)  # the steps' metrics are left as they were
    add_to_window(sums, {"loss": torch.ones(())})  # other metrics: one add each
    assert sums["loss"] == plain["loss"] + 1 and set(sums) == set(plain)
