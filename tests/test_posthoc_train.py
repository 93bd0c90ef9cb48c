"""EDM2's post-hoc EMA in a run (train.posthoc_ema): off by default at no cost; on, power-function EMAs beside the
EMA that leave the training's numbers alone, snapshots at the interval, a bitwise resume; and `ahpa export
--posthoc-sigma`, whose reconstruction samples."""

import os
import re
import shutil
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import ahpa as ahpa_api
from ahpa import config, config_resume
from ahpa.cli import main
from ahpa.config import ConfigError
from ahpa.disk_space import size_text
from ahpa.sample import export_metadata
from ahpa.train.checkpoint import list_checkpoints, read_checkpoint
from ahpa.train.loop import Trainer
from ahpa.train.notes import ignored_settings_note
from ahpa.train.posthoc_export import reconstruct
from ahpa.train.posthoc_track import due, snapshot_info, snapshot_path
from ahpa.train.run_dir import RunConfigError
from tests.conftest import TINY
from tests.test_distributed import TINY as DIST_TINY
from tests.test_distributed import ahpa, cpu_fsdp, latest, max_diff

ON = ("train.posthoc_ema=[0.05,0.1]", "train.posthoc_every=2")


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_off_by_default_costs_nothing(tmp_path, tiny):
    tr = Trainer(tiny("train.steps=2"), tmp_path / "r")
    tr.run()
    assert tr.cfg.train.posthoc_ema == [] and tr.parts.posthoc is None  # no copies
    assert not (tmp_path / "r" / "posthoc").exists()  # no files
    assert "posthoc_ema" not in read_checkpoint(list_checkpoints(tmp_path / "r" / "checkpoints")[-1])
    assert not any("posthoc" in m for m in tr.messages)


def test_snapshots_appear_at_the_interval_and_the_run_trains_as_without(tmp_path, tiny):
    on = Trainer(tiny("train.steps=5", *ON), tmp_path / "on")
    note = next(m for m in on.messages if m.startswith("train.posthoc_ema="))
    assert "2 power-function EMAs" in note and "68,708 parameters (274.8 kB per process)" in note and "6 files" in note
    on.run()
    off = Trainer(tiny("train.steps=5"), tmp_path / "off")
    off.run()
    for name in ("model", "ema", "aligner"):  # the run's numbers are those of the run without
        assert same(getattr(on.parts, name).state_dict(), getattr(off.parts, name).state_dict()), name
    # every 2 steps and at the last, one file per sigma_rel, named by step and sigma_rel
    names = sorted(p.name for p in (tmp_path / "on" / "posthoc").iterdir())
    assert names == [f"step_{s:09d}.sigma_{r}.safetensors" for s in (2, 4, 5) for r in ("0.05", "0.1")]
    for i, sigma in enumerate((0.05, 0.1)):
        path = snapshot_path(tmp_path / "on" / "posthoc", 5, sigma)
        info = snapshot_info(path)
        assert (info["step"], info["sigma_rel"]) == (5, sigma) and info["gamma"] == on.parts.posthoc.gammas[i]
        assert same(load_file(str(path)), on.parts.posthoc.copies[i].state_dict())  # the backbone alone, as trained
    a, b = (c.state_dict() for c in on.parts.posthoc.copies)
    assert not same(a, b) and not same(a, on.parts.ema.state_dict())
    assert read_checkpoint(list_checkpoints(tmp_path / "on" / "checkpoints")[-1])["posthoc_ema"]["sigma_rel"] == [0.05, 0.1]


def test_the_first_step_starts_the_average_and_a_skipped_step_counts_the_weights_it_left(tmp_path, tiny, monkeypatch):
    """Each copy is the power-function average of the weights after steps 1..t, w_tau = (tau^(g+1) - (tau-1)^(g+1)) /
    t^(g+1), the same trajectory for every sigma_rel: what the reconstruction's least squares assume. A skipped step
    (non-finite loss) leaves the weights as they were, and those weights are the trajectory's at that step. Leaving
    the averages untouched instead (as the EMA is) put each copy's own average in that step's place: the copies then
    averaged different trajectories (here 5% of the third step's change off for sigma_rel 0.2)."""
    tr = Trainer(tiny("train.steps=4", "train.posthoc_ema=[0.05,0.2]", "train.posthoc_every=2"), tmp_path / "r")
    real = Trainer._loss

    def loss(self, batch, d, align_on):  # step 3 (index 2) is skipped
        value, metrics = real(self, batch, d, align_on)
        return (value * float("nan"), metrics) if self.step == 2 else (value, metrics)

    monkeypatch.setattr(Trainer, "_loss", loss)
    thetas = []
    for _ in range(4):
        tr.train_step()
        thetas.append({k: v.detach().double().clone() for k, v in tr.parts.model.state_dict().items()})
    assert tr.bad_total.item() == 1 and all(torch.equal(thetas[2][k], thetas[1][k]) for k in thetas[1])
    change = max((thetas[3][k] - thetas[0][k]).abs().max().item() for k in thetas[0])
    for copy_, gamma in zip(tr.parts.posthoc.copies, tr.parts.posthoc.gammas):
        w = [(tau ** (gamma + 1) - (tau - 1) ** (gamma + 1)) / 4 ** (gamma + 1) for tau in range(1, 5)]
        expected = {k: sum(wt * th[k] for wt, th in zip(w, thetas)) for k in thetas[0]}
        error = max((v.double() - expected[k]).abs().max().item() for k, v in copy_.state_dict().items())
        assert error < 1e-4 * change, (gamma, error, change)


def test_a_resumed_run_equals_an_uninterrupted_one_bitwise(tmp_path, tiny):
    straight = Trainer(tiny("train.steps=6", *ON), tmp_path / "a")
    straight.run()
    Trainer(tiny("train.steps=3", *ON), tmp_path / "b").run()
    # a snapshot of a step after the checkpoint resumed from (a launch that died after writing it): not kept
    stale = snapshot_path(tmp_path / "b" / "posthoc", 9, 0.05)
    shutil.copyfile(snapshot_path(tmp_path / "b" / "posthoc", 2, 0.05), stale)
    second = Trainer(tiny("train.steps=6", *ON), tmp_path / "b")
    assert second.step == 3
    second.run()
    for a, b in zip(straight.parts.posthoc.copies, second.parts.posthoc.copies):
        assert same(a.state_dict(), b.state_dict())
    assert not stale.exists()
    for step in (2, 4, 6):
        for sigma in (0.05, 0.1):
            a, b = (load_file(str(snapshot_path(tmp_path / r / "posthoc", step, sigma))) for r in ("a", "b"))
            assert same(a, b), (step, sigma)


def test_the_default_spacing_is_16_snapshot_steps_a_run_and_an_explicit_one_is_kept(tmp_path, tiny):
    """train.posthoc_every=0 (the default) spaces them ceil(train.steps / 16) apart; 500, the old default, gave a
    400K-step XL/2 run 800 snapshot steps (4.3 TB at [0.05, 0.10]) and a 32-step run only its last."""
    on = "train.posthoc_ema=[0.05,0.1]"
    assert config.load(None, []).train.posthoc_every == 0

    def written(*extra, start=0):
        t = config.load(None, [on, *extra]).train
        return [s for s in range(start + 1, t.steps + 1) if due(t, s)]

    assert written("train.steps=32") == list(range(2, 33, 2))
    assert written("train.steps=400000")[:2] == [25000, 50000] and len(written("train.steps=400000")) == 16
    assert written("train.steps=40") == [3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 33, 36, 39, 40]  # ceil(40/16) = 3
    assert written("train.steps=32", "train.posthoc_every=5") == [5, 10, 15, 20, 25, 30, 32]  # as before
    # lengthened on resume from step 32 (train.steps is resumable): the steps still to come are spaced 4 apart
    assert written("train.steps=64", start=32) == list(range(36, 65, 4))
    run = Trainer(tiny("train.steps=32", on), tmp_path / "r")
    assert any("every 2 steps (train.posthoc_every=0: train.steps / 16) and at the last" in m for m in run.messages)
    run.run()
    assert sorted(p.name for p in (tmp_path / "r" / "posthoc").iterdir()) == \
        [f"step_{s:09d}.sigma_{r}.safetensors" for s in range(2, 33, 2) for r in ("0.05", "0.1")]
    # lengthened: the snapshots of steps 2..32 stay as they were (a power-function EMA at step t does not depend on
    # the run's length) and the reconstruction at step 64 takes them with those of 36..64
    before = {p.name: p.read_bytes() for p in (tmp_path / "r" / "posthoc").iterdir()}
    Trainer(tiny("train.steps=64", on), tmp_path / "r").run()
    after = {p.name: p for p in (tmp_path / "r" / "posthoc").iterdir()}
    assert all(after[name].read_bytes() == data for name, data in before.items())
    assert sorted(int(n[5:14]) for n in after if n.endswith("0.05.safetensors")) == [*range(2, 33, 2), *range(36, 65, 4)]
    assert reconstruct(tmp_path / "r", 0.07)[1].step == 64


def _tree(run):
    """Every file's size and time, but the lock's: any Trainer probes it (ahpa.lock.check_free), holding nothing."""
    return {str(p.relative_to(run)): (p.stat().st_size, p.stat().st_mtime_ns) for p in run.rglob("*")
            if p.is_file() and p.name != ".lock"}


def test_snapshots_that_would_not_fit_on_the_disk_are_refused_before_any_step(tmp_path, tiny, monkeypatch, capsys):
    """Rank 0 compares the snapshots still to write (steps from the current one to train.steps x sigma_rel x the fp32
    backbone's bytes) with the free space of the run directory's disk, and refuses before training, leaving nothing
    a rerun with a fix would trip on (a new run's config.yaml would hold it to the sigma_rel that did not fit)."""
    per_file = 68_708 * 4  # the tiny backbone's parameters (the cost note's count), fp32
    free = {"bytes": 16 * 2 * per_file - 1}  # one byte short of 16 snapshot steps (steps=32, auto) x 2 sigma_rel
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=free["bytes"]))
    run = tmp_path / "r"
    with pytest.raises(RunConfigError) as refused:
        Trainer(tiny("train.steps=32", ON[0]), run)
    message = str(refused.value)
    assert f"need {size_text(32 * per_file)} (16 snapshot steps from step 0 to 32 x 2 sigma_rel x " \
           f"{size_text(per_file)}), and the run directory {run} has {size_text(free['bytes'])} free" in message
    for fix in ("a larger train.posthoc_every (now 2, by 0: train.steps / 16)", "fewer sigma_rel in train.posthoc_ema",
                "another --out", "--no-space-check"):
        assert fix in message, fix
    assert not run.exists()  # nothing written: the new run directory it made is gone
    assert main(["train", "--out", str(run), *TINY, "train.steps=32", ON[0]]) == 2
    assert "the snapshots still to write need" in capsys.readouterr().err and not run.exists()
    free["bytes"] += 1  # exactly enough: it trains
    Trainer(tiny("train.steps=32", ON[0]), run).run()
    assert len(list((run / "posthoc").iterdir())) == 32
    # resumed and lengthened to 40 (every 3 from step 32: 33, 36, 39 and the last) with less room: refused with the
    # checkpoints, snapshots and records left exactly as they were
    free["bytes"] = 4 * 2 * per_file - 1
    before = _tree(run)
    with pytest.raises(RunConfigError, match="need .* [(]4 snapshot steps from step 32 to 40 x 2 sigma_rel"):
        Trainer(tiny("train.steps=40", ON[0]), run)
    assert _tree(run) == before
    # the file system misreports: --no-space-check trains anyway
    assert main(["train", "--out", str(run), "--no-space-check", *TINY, "train.steps=40", ON[0]]) == 0
    assert snapshot_path(run / "posthoc", 40, 0.1).is_file() and os.path.getsize(snapshot_path(run / "posthoc", 40, 0.1))


@pytest.mark.parametrize("value,match", [
    ("[0.3]", "out of range"), ("[0.05,0.05]", "out of range"), ("[0]", "out of range"), ("[-0.1]", "out of range"),
    ("[abc]", "list of numbers, got the item 'abc'"), ("0.05,x", "list of numbers"),
])
def test_bad_sigma_rel_values_are_refused(value, match):
    with pytest.raises(ConfigError, match=f"train.posthoc_ema.*{match}"):
        config.load(None, [f"train.posthoc_ema={value}"])


def test_sigma_rel_forms_the_interval_and_resume():
    assert config.load(None, ["train.posthoc_ema=0.05,0.1"]).train.posthoc_ema == [0.05, 0.1]
    assert config.load(None, ["train.posthoc_ema=0.07"]).train.posthoc_ema == [0.07]
    assert config.load(None, ["train.posthoc_ema=[]"]).train.posthoc_ema == []
    with pytest.raises(ConfigError, match=r"train.posthoc_every=-1 is out of range.*0 \(auto"):
        config.load(None, ["train.posthoc_every=-1"])
    base = config.load(None, list(ON))
    assert not config_resume.resume_conflicts(base, config.load(None, [ON[0], "train.posthoc_every=7"]))  # a cadence
    assert config_resume.resume_conflicts(base, config.load(None, ["train.posthoc_ema=[0.05]", ON[1]]))  # other averages
    note = ignored_settings_note(config.load(None, ["train.posthoc_every=7"]), ["latent"])
    assert any("does not read train.posthoc_every=7" in n for n in note)


def test_a_reconstruction_exports_samples_and_refuses_what_it_cannot_represent(tmp_path, tiny, capsys):
    run = tmp_path / "r"
    Trainer(tiny("train.steps=8", *ON), run).run()  # snapshots of steps 2, 4, 6, 8
    out = tmp_path / "e.safetensors"
    assert main(["export", "--run", str(run), "--out", str(out), "--posthoc-sigma", "0.07"]) == 0
    printed = capsys.readouterr().out
    assert "sigma_rel 0.07 at step 8, from 8 snapshots" in printed and "profile residual" in printed
    meta = export_metadata(out)["posthoc_ema"]
    assert (meta["sigma_rel"], meta["step"], len(meta["snapshots"])) == (0.07, 8, 8) and 0 < meta["residual"] < 0.1
    assert f"{meta['residual']:.2%}" in printed
    assert main(["sample", "--model", str(out), "--num", "2", "--batch", "2", "--steps", "2",
                 "--out", str(tmp_path / "s.npz")]) == 0
    with np.load(tmp_path / "s.npz") as f:
        assert f["arr_0"].shape == (2, 16, 16, 3)
    # a tracked length at a snapshot's step is that snapshot
    state, rec = reconstruct(run, 0.1, step=6)
    snap = load_file(str(snapshot_path(run / "posthoc", 6, 0.1)))
    assert rec.residual < 1e-5 and max((state[k] - snap[k]).abs().max().item() for k in snap) < 1e-5
    refused = [
        (["--posthoc-sigma", "0.005"], "residual of .* above the 10% accepted: they represent sigma_rel 0.0"),
        (["--posthoc-sigma", "0.3"], r"sigma_rel is in \(0, 0.2887\)"),
        (["--posthoc-sigma", "0.07", "--step", "1"], "0 post-hoc EMA snapshots of a step up to 1 .* at least 2"),
        (["--posthoc-sigma", "0.07", "--step", "9"], "after the newest snapshot"),
        (["--max-residual", "0.2"], "with --posthoc-sigma only"),
    ]
    for extra, match in refused:
        assert main(["export", "--run", str(run), "--out", str(tmp_path / "x.safetensors"), *extra]) == 2
        err = capsys.readouterr().err
        assert __import__("re").search(match, err), (extra, err)
    assert not (tmp_path / "x.safetensors").exists()
    Trainer(tiny("train.steps=1"), tmp_path / "plain").run()
    assert main(["export", "--run", str(tmp_path / "plain"), "--out", str(out), "--posthoc-sigma", "0.07"]) == 2
    assert "holds no post-hoc EMA snapshots" in capsys.readouterr().err


@pytest.mark.parametrize("sharding", ["DDP", pytest.param("FSDP2", marks=cpu_fsdp)])
def test_two_processes_track_and_snapshot_as_one(tmp_path, sharding):
    """Under DDP each process updates its full copies; under FSDP2 its local shards, gathered for the checkpoint and
    the snapshots (rank 0 writes). The same tolerance as the other two-process tests (all-reduce order: 1e-5)."""
    args = [*DIST_TINY, "train.steps=4", *ON]
    ahpa(1, "train", "--out", str(tmp_path / "one"), *args)
    res = ahpa(2, "train", "--out", str(tmp_path / "two"), *args, *(["train.fsdp=true"] if sharding == "FSDP2" else []))
    assert ("sharded over 2 processes (FSDP2)" in res.stderr) == (sharding == "FSDP2")
    assert "per process, sharded" in res.stderr if sharding == "FSDP2" else "274.8 kB per process)" in res.stderr
    a, b = latest(tmp_path / "one")["posthoc_ema"], latest(tmp_path / "two")["posthoc_ema"]
    assert a["sigma_rel"] == b["sigma_rel"] == [0.05, 0.1]
    for wa, wb in zip(a["weights"], b["weights"]):
        assert wa.keys() == wb.keys() and max_diff(wa, wb) < 1e-5
    for step in (2, 4):
        for sigma in (0.05, 0.1):
            fa, fb = (load_file(str(snapshot_path(tmp_path / r / "posthoc", step, sigma))) for r in ("one", "two"))
            assert fa.keys() == fb.keys() and max_diff(fa, fb) < 1e-5
    assert sorted(p.name for p in (tmp_path / "two" / "posthoc").iterdir()) == \
        sorted(p.name for p in (tmp_path / "one" / "posthoc").iterdir())


def test_the_notebooks_sweep_of_the_docs_samples_as_the_export_of_each_length(tmp_path, tiny, monkeypatch):
    """docs/extending.md's sweep over sigma_rel in Python (ahpa.posthoc_reconstruct loaded into one bundle) runs as
    written and draws the images that `ahpa export --posthoc-sigma` of the same length samples."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "extending.md").read_text()
    code = textwrap.dedent(re.search(r"A sweep loads each.*?```python\n(.*?)```", doc, re.S).group(1))
    Trainer(tiny("train.steps=8", *ON), tmp_path / "runs" / "notebook").run()
    monkeypatch.chdir(tmp_path)
    ns = {"ahpa": ahpa_api, "torch": torch}
    exec(code, ns)
    assert ns["rec"].sigma_rel == 0.10 and ns["rec"].residual < 1e-6  # the last length swept is a tracked one
    out = tmp_path / "e.safetensors"
    assert main(["export", "--run", "runs/notebook", "--out", str(out), "--posthoc-sigma", "0.1"]) == 0
    exported = ahpa_api.load_export(out, "cpu")
    again = ahpa_api.generate(exported, range(8), torch.arange(8) % exported.num_classes, 0, ns["run_cfg"].sample)
    assert torch.equal(ns["images"], again)


def test_the_space_check_counts_the_snapshots_a_resume_rewrites_as_free(tmp_path, tiny, monkeypatch):
    """A run killed after its last checkpoint left snapshots of later steps; the resume deletes them before it writes
    them again (drop_after), so their room is the resume's to use: the check counts it, and says so when it refuses."""
    run = tmp_path / "r"
    Trainer(tiny("train.steps=32", "train.ckpt_every=16", "train.keep_checkpoints=0", *ON), run).run()
    (run / "checkpoints" / list_checkpoints(run / "checkpoints")[-1].name).unlink()  # the newest is step 16's now
    after = [p for p in (run / "posthoc").iterdir() if int(p.name[5:14]) > 16]
    rewritten = sum(p.stat().st_size for p in after)
    assert len(after) == 16  # steps 18-32, every 2, x 2 sigma_rel
    free = {"bytes": 0}  # a full disk: only the rewritten snapshots' room
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=free["bytes"]))
    trainer = Trainer(tiny("train.steps=32", "train.ckpt_every=16", "train.keep_checkpoints=0", *ON), run)
    assert trainer.step == 16
    trainer.run()
    assert sorted(p.name for p in (run / "posthoc").iterdir() if int(p.name[5:14]) > 16) == sorted(p.name for p in after)
    # lengthened by 8 steps (4 more snapshot steps) on the same full disk: refused, naming both figures
    (run / "checkpoints" / list_checkpoints(run / "checkpoints")[-1].name).unlink()
    with pytest.raises(RunConfigError, match=f"has {re.escape(size_text(0))} free and {re.escape(size_text(rewritten))} in the snapshots "
                                             "after step 16, which the resume rewrites"):
        Trainer(tiny("train.steps=40", "train.ckpt_every=16", "train.keep_checkpoints=0", *ON), run)
