"""train.compile and sample.compile give one graph per compiled module, without graph breaks or recompilation.

A graph break (an `.item()`, a branch on a tensor's value, an unsupported call in the SiT or the aligner) or a graph
recompiled every step (a Python number that changes from step to step) keeps the training step correct and makes it
slow on a GPU: the code between the pieces runs eagerly, and CUDA graphs (`train.compile_mode=reduce-overhead`, the
study's setting) are skipped for a broken graph. test_train's compiled-against-eager test cannot see either, so here
the modules are compiled with dynamo's counting backend (the traced graphs run eagerly: no inductor, seconds on a CPU)
and the graphs are counted over several steps.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

from ahpa import sample
from ahpa.train.loop import Trainer
from tests.test_train import tiny_external

STEPS = 4  # every step after the first must reuse the first's graphs


@pytest.fixture
def compiled(monkeypatch):
    """The counters of every module torch.compile compiles from here on, in the order compiled."""
    torch._dynamo.reset()  # no graph cached by an earlier test of this process
    counters.clear()
    made: list[CompileCounterWithBackend] = []
    real = torch.compile

    def counting_compile(model, mode=None, **kwargs):
        made.append(CompileCounterWithBackend("eager"))
        return real(model, backend=made[-1])  # `mode` picks inductor's options: nothing to pick here

    monkeypatch.setattr(torch, "compile", counting_compile)
    yield made
    torch._dynamo.reset()


def graphs(made: list[CompileCounterWithBackend]) -> list[int]:
    return [c.frame_count for c in made]


@pytest.mark.parametrize("extra", [
    ["align.method=none"],
    ["align.router=soft"],
    ["align.router=topk"],
    ["align.router=snr"],
    ["align.method=multi-uniform"],
    ["align.method=vae-latent"],
    ["align.method=repa"],
    ["align.router_t_bins=4"],
    ["align.token_fraction=0.5"],
    ["align.shared_trunk=false", "align.level_depths=[stage1:1,latent:3]"],
    ["train.activation_checkpointing=2"],
    ["train.grad_accum=2"],
    ["train.precision=fp16"],
], ids=lambda extra: ",".join(extra))
def test_a_compiled_training_step_is_one_graph_per_module_reused_every_step(tmp_path, tiny, compiled, extra):
    cfg = tiny(f"train.steps={STEPS}", "train.compile=true", *extra)
    tr = Trainer(cfg, tmp_path / "run", external=tiny_external() if "align.method=repa" in extra else None)
    modules = 1 if "align.method=none" in extra else 2  # the SiT, and the aligner where there is alignment
    for _ in range(STEPS):
        tr.train_step()
        assert graphs(compiled) == [1] * modules  # a second graph of a module: a break or a recompilation
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == modules


def test_ending_alignment_recompiles_the_sit_once(tmp_path, tiny, compiled):
    """align.stop_step: from that step on the SiT no longer returns the aligned block's tokens, one more graph of it;
    the aligner is no longer called."""
    tr = Trainer(tiny("train.steps=6", "train.compile=true", "align.stop_step=3"), tmp_path / "run")
    seen = []
    for _ in range(6):
        tr.train_step()
        seen.append(graphs(compiled))
    assert seen == [[1, 1]] * 3 + [[2, 1]] * 3
    assert dict(counters["graph_break"]) == {}


def test_compiled_sampling_is_one_graph_for_every_solver_guidance_and_batch(tmp_path, tiny, compiled):
    """sample.compile: every network call has the micro-batch's shape (a short last batch is padded), guided or not
    (the guidance interval switches the pairs off at t > 0.7) and at every t, so one graph serves them all."""
    Trainer(tiny("train.steps=1"), tmp_path / "run").run()
    bundle = sample.load_export(tmp_path / "run" / "model.safetensors", "cpu")
    for solver in ("euler", "heun", "euler-maruyama"):
        for n in (5, 8, 13):  # below, at and over the micro-batch of 8 guided rows: 4 images per call
            sample.generate(bundle, list(range(n)), [i % 3 for i in range(n)], 0,
                            {"solver": solver, "steps": 4, "cfg_scale": 1.5, "guidance_high": 0.7, "micro_batch": 8,
                             "compile": True})
            assert graphs(compiled) == [1], (solver, n)
    assert dict(counters["graph_break"]) == {}
