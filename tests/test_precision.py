"""train.precision=fp16: autocast with a dynamic loss scale (ahpa.train.loss_scale), for GPUs without bf16. On the
CPU, whose autocast computes float16 too: the scale's schedule, overflows forgiven by the divergence rule while a
non-finite loss is not, the scale resumed from the checkpoint, and which regions compute in fp16."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from ahpa import config
from ahpa.train import loss_scale
from ahpa.train.build import autocast_dtype
from ahpa.train.checkpoint import list_checkpoints, read_checkpoint
from ahpa.train.divergence import TooManyBadSteps
from ahpa.train.loop import Trainer
from tests.conftest import TINY

FP16 = [*TINY, "train.precision=fp16"]


def run_rows(tr: Trainer) -> list[dict]:
    rows = []
    tr.run(on_log=lambda step, row: rows.append(dict(row, step=step)))
    return rows


def test_the_scale_halves_on_an_overflow_not_below_1_and_doubles_after_interval_good_steps():
    t = torch.tensor
    scale, run = loss_scale.next_scale(t(8.0), t(5.0), t(1.0), interval=3)
    assert (scale.item(), run.item()) == (4.0, 0.0)  # an overflow restarts the count of good steps
    scale, run = loss_scale.next_scale(t(8.0), t(1.0), t(1.0), interval=3)
    assert (scale.item(), run.item()) == (4.0, 0.0)  # short of the interval too
    scale, run = loss_scale.next_scale(t(1.0), t(0.0), t(1.0), interval=3)
    assert scale.item() == 1.0  # not below 1: scaling down further cannot help
    scale, run = loss_scale.next_scale(t(4.0), t(1.0), t(0.0), interval=3)
    assert (scale.item(), run.item()) == (4.0, 2.0)
    scale, run = loss_scale.next_scale(t(4.0), t(2.0), t(0.0), interval=3)
    assert (scale.item(), run.item()) == (8.0, 0.0)  # the interval-th good step in a row doubles it


def test_only_an_overflow_of_a_finite_loss_above_scale_1_is_forgiven():
    t = torch.tensor
    assert loss_scale.forgiven(t(1.0), t(2.5), t(1024.0)).item() == 1.0
    assert loss_scale.forgiven(t(0.0), t(2.5), t(1024.0)).item() == 0.0  # not skipped at all
    assert loss_scale.forgiven(t(1.0), t(float("nan")), t(1024.0)).item() == 0.0  # the forward failed
    assert loss_scale.forgiven(t(1.0), t(float("inf")), t(1024.0)).item() == 0.0
    assert loss_scale.forgiven(t(1.0), t(2.5), t(1.0)).item() == 0.0  # no scaling matter


def test_the_scale_follows_torch_amp_grad_scaler_from_its_defaults():
    """The module's claim: GradScaler's schedule, from its initial scale and growth interval, step for step over
    overflows and the 2000 good steps in a row that double the scale (GradScaler on the CPU as the reference)."""
    ref = torch.amp.GradScaler("cpu")
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.0)
    ref.scale(torch.ones(()))  # GradScaler makes its scale on first use
    ours = loss_scale.LossScale(torch.device("cpu"))
    got, want = [], []
    for i in range(2010):
        overflow = i in (0, 1, 5)
        param.grad = torch.full((1,), float("inf") if overflow else 1.0)
        ref.step(opt)
        ref.update()
        ours.update(torch.tensor(float(overflow)), torch.tensor(1.0))
        got.append(float(ours.scale))
        want.append(ref.get_scale())
    assert got == want and got[0] == 2.0 ** 15 and got[-1] == 2.0 ** 14  # halved thrice, then doubled once


def test_an_overflow_at_scale_2_is_forgiven_and_the_next_at_scale_1_is_not():
    """Forgiven is judged by the scale the step ran at, before the update halves it."""
    s = loss_scale.LossScale(torch.device("cpu"), init=2.0)
    finite, overflow = torch.tensor(0.5), torch.tensor(1.0)
    assert s.update(overflow, finite).item() == 1.0 and s.scale.item() == 1.0
    assert s.update(overflow, finite).item() == 0.0 and s.scale.item() == 1.0


def test_auto_is_bf16_on_gpus_that_compute_in_it_and_fp16_on_older_ones(monkeypatch):
    cuda = torch.device("cuda", 0)
    for major, dtype in [(7, torch.float16), (8, torch.bfloat16), (9, torch.bfloat16)]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, m=major: (m, 0))
        assert autocast_dtype("auto", cuda) == dtype
    assert autocast_dtype("fp16", cuda) == torch.float16 and autocast_dtype("bf16", cuda) == torch.bfloat16
    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) is None and autocast_dtype("fp32", cpu) is None
    assert autocast_dtype("fp16", cpu) == torch.float16


def test_bf16_asked_of_a_gpu_without_bf16_arithmetic_gets_a_note(monkeypatch, tmp_path):
    from ahpa.train.notes import precision_note

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert "compute capability 7.5, which has no bf16 arithmetic" in precision_note("bf16", cuda)[0]
    assert precision_note("auto", cuda) == precision_note("fp16", cuda) == []
    assert precision_note("bf16", torch.device("cpu")) == []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert precision_note("bf16", cuda) == []
    # a run says it before training, beside its other notes
    import ahpa.train.loop as loop

    monkeypatch.setattr(loop, "precision_note", lambda precision, device: [f"note for {precision} on {device}"])
    tr = Trainer(config.load(None, [*TINY, "train.precision=bf16", "train.steps=1"]), tmp_path / "r")
    assert "note for bf16 on cpu" in tr.messages


def test_fp16_trains_as_fp32_does_to_its_rounding(tmp_path):
    """The scaled loss's gradients are unscaled before clipping and the optimiser: the same losses and gradient
    norms as fp32, to fp16's rounding (an unscaled gradient would read 65,536 times larger)."""
    runs = [run_rows(Trainer(config.load(None, [*TINY, f"train.precision={p}", "train.steps=4"]), tmp_path / p))
            for p in ("fp32", "fp16")]
    for key in ("loss/flow", "loss/align", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in runs[1]], [r[key] for r in runs[0]], rtol=2e-2)
    assert "loss_scale" not in runs[0][0] and runs[1][0]["loss_scale"] == 2.0 ** 16


def test_an_overflowing_scale_comes_down_and_its_skipped_steps_do_not_stop_the_run(tmp_path, monkeypatch):
    """A scale far above fp16's range overflows the first backward passes: each such step is skipped and halves the
    scale, without counting towards train.max_bad_steps, until the gradients fit; then the run trains."""
    monkeypatch.setattr(loss_scale, "INIT_SCALE", 2.0 ** 40)
    tr = Trainer(config.load(None, [*FP16, "train.steps=40", "train.max_bad_steps=3"]), tmp_path / "r")
    assert "fp16 autocast with a dynamic loss scale" in tr.messages[0]
    rows = run_rows(tr)
    overflows = sum(r["overflow_steps"] for r in rows)
    assert 3 < overflows < 40 and rows[-1]["bad_steps"] == 0  # more than max_bad_steps, forgiven
    assert rows[0]["overflow_steps"] == 1 and rows[0]["loss_scale"] == 2.0 ** 39
    assert all(r["overflow_steps"] == 1 for r in rows[:10])  # the first steps overflow, one after the other
    scales = [r["loss_scale"] for r in rows]
    assert scales == sorted(scales, reverse=True) and scales[-1] == 2.0 ** (40 - overflows)  # halved at each
    assert all(r["skipped_in_window"] == r["overflow_steps"] for r in rows)
    # a window of skipped steps alone has no means: no loss of 0 drawn or plotted (log_every=1 here)
    assert all("loss/flow" not in r and "grad_norm" not in r for r in rows if r["overflow_steps"])
    assert all(type(r["overflow_steps"]) is int for r in rows)  # a count, logged as one
    good = [r for r in rows if not r["overflow_steps"]]
    assert good and all(np.isfinite(r["loss/flow"]) and r["loss/flow"] > 0 for r in good)


def test_a_non_finite_loss_under_fp16_counts_and_stops_the_run(tmp_path, monkeypatch):
    real = Trainer._loss

    def loss(self, batch, d, align_on):
        value, metrics = real(self, batch, d, align_on)
        return value * float("nan"), metrics

    monkeypatch.setattr(Trainer, "_loss", loss)
    tr = Trainer(config.load(None, [*FP16, "train.steps=10", "train.max_bad_steps=3"]), tmp_path / "r")
    with pytest.raises(TooManyBadSteps, match="3 steps in a row"):
        tr.run()
    assert tr.bad_total.item() == 3
    assert tr.parts.loss_scale.scale.item() == 2.0 ** 13  # a skip halves the scale, whatever its cause


def test_a_nan_in_one_micro_batch_counts_though_the_last_is_finite(tmp_path, monkeypatch):
    """The loss scale judges the step's loss, every micro-batch's: a NaN loss in the first of two micro-batches is
    a failed forward pass, not an overflow to forgive."""
    real, calls = Trainer._loss, []

    def loss(self, batch, d, align_on):
        value, metrics = real(self, batch, d, align_on)
        calls.append(1)
        return (value * float("nan") if len(calls) % 2 else value), metrics

    monkeypatch.setattr(Trainer, "_loss", loss)
    tr = Trainer(config.load(None, [*FP16, "train.steps=10", "train.max_bad_steps=3", "train.grad_accum=2"]),
                 tmp_path / "r")
    with pytest.raises(TooManyBadSteps, match="3 steps in a row"):
        tr.run()


def test_fp16_trains_on_past_align_stop_step(tmp_path):
    """Once the alignment stops, the aligner's parameters get no gradient (None): the unscaling skips them."""
    tr = Trainer(config.load(None, [*FP16, "train.steps=4", "align.stop_step=2"]), tmp_path / "r")
    rows = run_rows(tr)
    assert len(rows) == 4 and "loss/align" not in rows[-1] and math.isfinite(rows[-1]["loss/flow"])
    assert any(p.grad is None for p in tr.parts.aligner.parameters())


def test_a_run_resumed_in_fp16_from_a_checkpoint_without_a_scale_starts_one(tmp_path, monkeypatch):
    """precision=auto resolves per GPU: a run begun in bf16 (here fp32) and resumed where auto means fp16 finds no
    scale in its checkpoint and starts the scale afresh."""
    from ahpa.train import build

    run_rows(Trainer(config.load(None, [*TINY, "train.steps=2", "train.ckpt_every=2"]), tmp_path / "r"))
    assert read_checkpoint(list_checkpoints(tmp_path / "r" / "checkpoints")[-1])["loss_scale"] is None
    real = build.autocast_dtype
    monkeypatch.setattr(build, "autocast_dtype", lambda precision, device: torch.float16 if precision == "auto"
                        else real(precision, device))
    rows = run_rows(Trainer(config.load(None, [*TINY, "train.steps=3"]), tmp_path / "r"))
    assert [r["step"] for r in rows] == [3] and rows[0]["loss_scale"] == 2.0 ** 16


def test_a_resumed_fp16_run_keeps_its_loss_scale(tmp_path, monkeypatch):
    """The scale and its count of good steps are in the checkpoint: resumed, the run scales as the straight run."""
    monkeypatch.setattr(loss_scale, "GROWTH_INTERVAL", 2)
    straight = run_rows(Trainer(config.load(None, [*FP16, "train.steps=5"]), tmp_path / "a"))
    assert [r["loss_scale"] for r in straight] == [2.0 ** 16, 2.0 ** 17, 2.0 ** 17, 2.0 ** 18, 2.0 ** 18]
    run_rows(Trainer(config.load(None, [*FP16, "train.steps=3", "train.ckpt_every=3"]), tmp_path / "b"))
    assert read_checkpoint(list_checkpoints(tmp_path / "b" / "checkpoints")[-1])["loss_scale"] == {
        "scale": 2.0 ** 17, "good_run": 1}
    resumed = run_rows(Trainer(config.load(None, [*FP16, "train.steps=5"]), tmp_path / "b"))
    assert [r["loss_scale"] for r in resumed] == [2.0 ** 18, 2.0 ** 18]
    assert [r["loss/flow"] for r in resumed] == [r["loss/flow"] for r in straight[3:]]


def test_fp16_computes_the_sit_and_its_sampling_in_fp16_and_the_vae_in_fp32(tmp_path):
    """The step's SiT and a run's sampling autocast to fp16; the on-the-fly VAE encoder stays fp32 (VAEs overflow
    fp16, ahpa.train.build). Read off the dtype the first layer of each network returns."""
    from ahpa.config import SampleCfg
    from ahpa.sample import iter_samples
    from ahpa.train.resume import run_sampler

    seen: dict[str, set] = {}

    def watch(name: str, net: nn.Module, kind: type) -> None:
        def hook(mod, args, out):
            seen.setdefault(name, set()).add(out.dtype)

        next(m for m in net.modules() if isinstance(m, kind)).register_forward_hook(hook)

    tr = Trainer(config.load(None, [*FP16, "train.steps=1"]), tmp_path / "run")
    watch("step", tr.net, nn.Linear)
    watch("on the fly", tr.parts.encoder, nn.Conv2d)
    row = tr.run()
    assert math.isfinite(row["loss/flow"])
    bundle = run_sampler(tmp_path / "run", torch.device("cpu"))[0]
    watch("sampling", bundle.model, nn.Linear)
    for _ in iter_samples(bundle, 0, 2, 0, 2, SampleCfg(steps=1, micro_batch=2)):
        pass
    assert seen == {"step": {torch.float16}, "on the fly": {torch.float32}, "sampling": {torch.float16}}
