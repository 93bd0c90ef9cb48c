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


def test_the_sit_gets_the_null_class_where_the_draws_drop_the_label_and_the_samples_own_elsewhere(tiny_cache, tmp_path):
    """train.label_dropout (classifier-free guidance's training): the SiT's labels are the batch's, each replaced by
    the null class where the step's draws drop it; read off the SiT's forward. A mask taken the other way (90% of
    the labels dropped), or a dropped label set to a class of the data, trains a guided model that guides wrongly."""
    import torch

    from ahpa.data.order import batch_indices

    tr = Trainer(cache_cfg(tiny_cache, "train.steps=4", "align.method=none", "data.prefetch=false",
                           "train.label_dropout=0.5"), tmp_path / "r")
    p, seen = tr.parts, []
    hook = p.model.register_forward_pre_hook(lambda module, args: seen.append(args[2].clone()))
    B, mc = tr.cfg.train.batch_size, p.model.cfg
    for step in range(3):
        draws = tr._draws(step, B, (mc.in_channels, mc.input_size, mc.input_size))
        idx = batch_indices(step, B, len(p.source), tr.cfg.train.seed)
        labels = p.source.fetch(idx, draws["flip"], draws.get("posterior")).labels
        tr.train_step()
        drop = draws["drop"]
        assert drop.any() and not drop.all()  # both kinds in the batch: the check can tell a mask from its inverse
        assert seen[-1].dtype == labels.dtype and torch.equal(seen[-1][drop], torch.full_like(labels[drop], p.model.null_class))
        assert torch.equal(seen[-1][~drop], labels[~drop]) and (labels < p.model.null_class).all()
    hook.remove()
    p.source.close()


def test_a_steps_metrics_over_micro_batches_are_their_means_as_one_batch_logs_them(tiny_cache, tmp_path):
    """train.grad_accum=2 logs the same metrics as one batch of the same step (to rounding): each micro-batch's are
    averaged, not summed, and every metric of both micro-batches counts."""
    import torch

    steps = {}
    for accum in (1, 2):
        tr = Trainer(cache_cfg(tiny_cache, "train.steps=4", "align.router=soft", "data.prefetch=false",
                               f"train.grad_accum={accum}"), tmp_path / f"a{accum}")
        steps[accum] = [tr.train_step() for _ in range(2)]
        tr.parts.source.close()
    for one, two in zip(steps[1], steps[2]):
        assert one.keys() == two.keys() and {"loss/flow", "loss/align", "align/level_loss"} <= set(one)
        for k in one:
            assert torch.allclose(one[k], two[k], rtol=1e-5, atol=1e-7), (k, one[k], two[k])


def test_the_steps_constants_are_the_value_and_dtype_asked_made_once(tiny_cache, tmp_path):
    """Trainer._constant keeps each (value, dtype) apart: a zero cached for float32 metrics is not the bf16 one, nor a
    label constant of another value the same dtype's zero."""
    import torch

    tr = Trainer(cache_cfg(tiny_cache, "train.steps=2", "align.method=none"), tmp_path / "r")
    asked = [(0, torch.float32), (0, torch.bfloat16), (0, torch.int64), (7, torch.int64), (7, torch.float32)]
    made = [tr._constant(v, dtype) for v, dtype in asked]
    for (v, dtype), c in zip(asked, made):
        assert c.dtype == dtype and c.shape == () and c.item() == v and c.device == tr.parts.device
    assert all(tr._constant(v, dtype) is c for (v, dtype), c in zip(asked, made))  # made once
    tr.parts.source.close()


def test_the_log_windows_one_foreach_add_takes_the_same_metrics_only_and_pairs_them_by_name():
    """The fast path of ahpa.train.logger.add_to_window is for a step with the window's metrics: given in another
    order they are still added by name; a step with one more metric (or as many, of other names) takes the per-metric
    adds, each new metric starting its own sum."""
    import torch

    from ahpa.train.logger import add_to_window

    sums = {}
    add_to_window(sums, {"a": torch.tensor(1.0), "b": torch.tensor([2.0, 3.0])})
    add_to_window(sums, {"b": torch.tensor([20.0, 30.0]), "a": torch.tensor(10.0)})  # another order
    assert sums["a"].item() == 11.0 and sums["b"].tolist() == [22.0, 33.0]
    add_to_window(sums, {"a": torch.tensor(100.0), "b": torch.tensor([1.0, 1.0]), "c": torch.tensor(5.0)})  # one more
    assert (sums["a"].item(), sums["b"].tolist(), sums["c"].item()) == (111.0, [23.0, 34.0], 5.0)
    add_to_window(sums, {"a": torch.tensor(1.0), "b": torch.tensor([1.0, 1.0]), "d": torch.tensor(7.0)})  # as many
    assert (sums["a"].item(), sums["c"].item(), sums["d"].item()) == (112.0, 5.0, 7.0)
