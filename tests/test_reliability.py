"""Crash safety: SIGKILL at random moments, SIGTERM, non-finite steps, broken checkpoints, bad disks."""

import errno
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ahpa import config
from ahpa.train import checkpoint as ckpt
from ahpa.train.divergence import DivergenceWatch, bad_steps_verdict
from ahpa.train.loop import RunConfigError, TooManyBadSteps, Trainer
from tests.conftest import TINY, hold_lock

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ahpa.cli", *args], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def finish(*args: str) -> str:
    res = subprocess.run([sys.executable, "-m", "ahpa.cli", *args], env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stderr


def kill_randomly(args: list[str], times: int, seed: int, progress) -> None:
    """Start the command `times` times; each time SIGKILL it at a random moment after it made progress
    (`progress()` counts units of work on disk), so every kill interrupts real work."""
    rng = random.Random(seed)
    for _ in range(times):
        target = progress() + rng.randint(1, 3)
        proc = start(*args)
        deadline = time.time() + 120
        while progress() < target and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.05))
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_training_survives_sigkill_bitwise(tmp_path):
    args = [*TINY, "train.steps=14", "train.ckpt_every=1", "train.keep_checkpoints=2"]
    finish("train", "--out", str(tmp_path / "straight"), *args)
    run = ["train", "--out", str(tmp_path / "killed"), *args]
    kill_randomly(run, times=3, seed=0, progress=lambda: lines(tmp_path / "killed" / "metrics.jsonl"))
    assert not (tmp_path / "killed" / "DONE").exists()
    finish(*run)
    a, b = load_file(str(tmp_path / "straight" / "model.safetensors")), load_file(str(tmp_path / "killed" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [int(l.split(",")[0].split(":")[1]) for l in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 15))  # rows after the checkpoint a kill fell back to are redone, not doubled


def test_sampling_survives_sigkill(tmp_path):
    finish("train", "--out", str(tmp_path / "run"), *TINY, "train.steps=1")
    model = str(tmp_path / "run" / "model.safetensors")
    common = ["sample", "--model", model, "--num", "64", "--batch", "4", "--steps", "20", "--micro-batch", "4"]
    finish(*common, "--out", str(tmp_path / "straight.npz"))
    parts = tmp_path / "killed.npz.parts"
    kill_randomly([*common, "--out", str(tmp_path / "killed.npz")], times=3, seed=1,
                  progress=lambda: len(list(parts.glob("chunk_*.npz"))) if parts.exists() else 0)
    assert not (tmp_path / "killed.npz").exists()  # a killed job leaves parts, never a final file
    # resumed with the model copied elsewhere (its content is what counts) and another --batch (the chunks keep 4)
    shutil.copy(model, tmp_path / "copy.safetensors")
    common[2], common[6] = str(tmp_path / "copy.safetensors"), "8"
    done = 4 * len(list(parts.glob("chunk_*.npz")))
    err = finish(*common, "--out", str(tmp_path / "killed.npz"))
    assert (f"resuming {tmp_path / 'killed.npz'}.parts: {done} of 64 images are there; chunks of 4 (the first "
            "attempt's; --batch 8 is not used)") in err
    with np.load(tmp_path / "straight.npz") as a, np.load(tmp_path / "killed.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
    # a finished file of 10 extended to 64, killed midway: the 10 stay whole and in place, the rerun finishes the 64
    grown, record = tmp_path / "grown.npz", tmp_path / "grown.npz.json"
    common[6] = "4"  # straight's chunks: the same computation on any torch, bitwise
    finish(*common[:4], "10", *common[5:], "--out", str(grown))
    before, record_before, parts = grown.read_bytes(), record.read_text(), tmp_path / "grown.npz.parts"
    kill_randomly([*common, "--out", str(grown)], times=2, seed=2,
                  progress=lambda: len(list(parts.glob("chunk_*.npz"))) if parts.exists() else 0)
    assert parts.exists() and grown.read_bytes() == before and record.read_text() == record_before
    assert "extending" in finish(*common, "--out", str(grown))
    with np.load(tmp_path / "straight.npz") as a, np.load(grown) as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
    assert json.loads(record.read_text())["num"] == 64 and not parts.exists()


def test_sampling_refuses_a_partial_run_with_other_settings(tmp_path):
    finish("train", "--out", str(tmp_path / "run"), *TINY, "train.steps=1")
    parts = tmp_path / "m.npz.parts"
    parts.mkdir()
    (parts / "settings.json").write_text('{"num": 8, "seed": 0, "batch": 4, "steps": 99}')
    res = subprocess.run([sys.executable, "-m", "ahpa.cli", "sample", "--model", str(tmp_path / "run" / "model.safetensors"),
                          "--num", "8", "--batch", "4", "--steps", "3", "--out", str(tmp_path / "m.npz")],
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "steps: partial has 99, command gives 3" in res.stderr
    assert not (tmp_path / "m.npz").exists()
    # the same file name holding another model (an export written over after more training) is another model
    model = tmp_path / "run" / "model.safetensors"
    args = ["sample", "--model", str(model), "--num", "64", "--batch", "4", "--steps", "20", "--out", str(tmp_path / "o.npz")]
    parts = tmp_path / "o.npz.parts"
    kill_randomly(args, times=1, seed=0, progress=lambda: len(list(parts.glob("chunk_*.npz"))) if parts.exists() else 0)
    with safe_open(str(model), "pt") as f:
        weights, metadata = {k: f.get_tensor(k) + 1 for k in f.keys()}, f.metadata()
    save_file(weights, str(model), metadata=metadata)
    res = subprocess.run([sys.executable, "-m", "ahpa.cli", *args], env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "model_sha256: partial has" in res.stderr, res.stderr[-2000:]


def test_a_second_launch_on_a_run_or_sample_file_in_use_is_refused(tmp_path):
    """Two launches on one --out would resume the same checkpoint and write the same files (metrics rows doubled,
    checkpoints mixed; a sample file's chunks deleted under the other): the second is refused, naming the first; the
    lock dies with its holder, so a killed run leaves nothing that refuses the rerun."""
    run = tmp_path / "run"
    run.mkdir()
    holder = hold_lock(run / ".lock")
    try:
        res = subprocess.run([sys.executable, "-m", "ahpa.cli", "train", "--out", str(run), *TINY, "train.steps=1"],
                             env=ENV, capture_output=True, text=True, timeout=300)
        assert res.returncode == 2
        assert (f"ahpa train: error: run directory {run} is in use by another launch (pid {holder.pid} on "
                f"{socket.gethostname()}, since ") in res.stderr, res.stderr
        assert not (run / "config.yaml").exists() and not (run / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    finish("train", "--out", str(run), *TINY, "train.steps=1")  # the holder was killed: nothing stale refuses this
    parts = tmp_path / "s.npz.parts"
    parts.mkdir()
    holder = hold_lock(parts / ".lock")
    try:
        res = subprocess.run([sys.executable, "-m", "ahpa.cli", "sample", "--model", str(run / "model.safetensors"),
                              "--num", "4", "--steps", "2", "--out", str(tmp_path / "s.npz")],
                             env=ENV, capture_output=True, text=True, timeout=300)
        assert res.returncode == 2 and f"sample output '{tmp_path / 's.npz'}' is in use by another launch" in res.stderr
    finally:
        holder.kill()
        holder.wait()


def test_a_trainer_interrupted_inside_a_step_refuses_to_train_on_and_a_new_one_resumes(tmp_path):
    """Ctrl-C in a notebook lands inside a step (here between backward and the optimiser): run() again on that
    Trainer added the step's gradients twice and trained on from weights no run reaches, without a word. It is now
    refused, holding nothing, and a new Trainer resumes from the checkpoint to the weights of an uninterrupted run.
    A Trainer stopped between steps (an exception from on_log) trains on as before."""
    def cfg():
        return tiny_cfg("train.steps=4", "train.ckpt_every=2")

    whole = Trainer(cfg(), tmp_path / "whole")
    whole.run()
    tr = Trainer(cfg(), tmp_path / "run")
    real_step = tr.parts.optimizer.step

    def interrupted_step(*args, **kwargs):
        if tr.step == 2:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    tr.parts.optimizer.step = interrupted_step
    with pytest.raises(KeyboardInterrupt):
        tr.run()
    tr.parts.optimizer.step = real_step
    with pytest.raises(RunConfigError, match=r"interrupted inside step 3, part of which .* Build a new Trainer: it "
                                             r"resumes .* from its newest checkpoint \(step 2\)"):
        tr.run()
    probe = [sys.executable, "-c", "import sys; from pathlib import Path; from ahpa import lock; lock.hold(Path(sys.argv[1]), 'x')",
             str(tmp_path / "run" / ".lock")]
    assert subprocess.run(probe, env=ENV, capture_output=True, timeout=120).returncode == 0  # the refusal holds nothing
    resumed = Trainer(cfg(), tmp_path / "run")
    assert resumed.step == 2
    resumed.run()
    for a, b in zip(whole.parts.ema.parameters(), resumed.parts.ema.parameters()):
        assert torch.equal(a, b)

    def stop_at_log(step, row):
        if step == 2:
            raise KeyboardInterrupt

    between = Trainer(cfg(), tmp_path / "between")
    with pytest.raises(KeyboardInterrupt):
        between.run(on_log=stop_at_log)
    between.run()
    for a, b in zip(whole.parts.ema.parameters(), between.parts.ema.parameters()):
        assert torch.equal(a, b)


def test_a_trainer_does_not_train_a_run_that_went_on_without_it(tmp_path):
    """Two Trainers of one process on one directory (a notebook cell run twice), or a Trainer run again after a stop
    while another launch trained the run: the stale one refuses, instead of redoing the steps and logging each twice;
    while another launch holds the directory, a second run() of a Trainer that gave it back is refused."""
    out = tmp_path / "run"
    first = Trainer(tiny_cfg("train.steps=4", "train.ckpt_every=2"), out)
    stale = Trainer(tiny_cfg("train.steps=4", "train.ckpt_every=2"), out)  # built at step 0 as well
    first.run()
    with pytest.raises(RunConfigError, match=rf"{out} was trained to step 4 after this Trainer was built at step 0"):
        stale.run()
    probe = [sys.executable, "-c", "import sys; from pathlib import Path; from ahpa import lock; lock.hold(Path(sys.argv[1]), 'x')",
             str(out / ".lock")]
    assert subprocess.run(probe, env=ENV, capture_output=True, timeout=120).returncode == 0  # the refusal holds nothing
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # nothing logged twice
    stopped = Trainer(tiny_cfg("train.steps=8", "train.ckpt_every=2"), out)
    stopped.run(should_stop=lambda: stopped.step >= 6)  # gives the directory back on its way out
    holder = hold_lock(out / ".lock")  # another launch takes it
    try:
        with pytest.raises(OSError, match=f"run directory {out} is in use by another launch"):
            stopped.run()
    finally:
        holder.kill()
        holder.wait()
    stopped.run()  # the other launch ended without training: it goes on from its own step
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 8


def test_the_lock_is_given_back_though_a_forked_worker_lives_on(tmp_path):
    """The data loader forks workers that may outlive a run in the same process (persistent workers, a Trainer still
    referenced): the lock is the process's, so giving it back frees it though the fork still has the file open."""
    from ahpa import lock

    path = tmp_path / ".lock"
    probe = [sys.executable, "-c", "import sys; from pathlib import Path; from ahpa import lock; lock.hold(Path(sys.argv[1]), 'x')",
             str(path)]
    lock.hold(path, "x")
    pid = os.fork()
    if pid == 0:  # the worker: holds the inherited descriptor open, does nothing else
        time.sleep(60)
        os._exit(0)
    try:
        held = subprocess.run(probe, env=ENV, capture_output=True, text=True, timeout=120)
        assert held.returncode != 0 and "InUseError" in held.stderr
        lock.release(path)
        assert subprocess.run(probe, env=ENV, capture_output=True, text=True, timeout=120).returncode == 0
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        lock.release(path)


def test_a_run_from_python_holds_the_directory_while_it_trains_only(tmp_path, monkeypatch):
    """Trainer.run in a session that lives on (a notebook) holds the run directory while it trains; a Trainer built
    and not run (sampler_bundle only), refused (other settings), or ended, holds nothing: another launch may resume
    it (a refused Trainer kept it locked for the life of the notebook)."""
    probe = [sys.executable, "-c", "import sys; from pathlib import Path; from ahpa import lock; lock.hold(Path(sys.argv[1]), 'x')",
             str(tmp_path / "run" / ".lock")]

    def free() -> bool:
        return subprocess.run(probe, env=ENV, capture_output=True, text=True, timeout=120).returncode == 0

    trainer = Trainer(tiny_cfg("train.steps=1"), tmp_path / "run")
    assert free()  # built, not running
    seen = []
    step = Trainer.train_step
    monkeypatch.setattr(Trainer, "train_step", lambda self: seen.append(free()) or step(self))
    trainer.run()
    assert seen == [False] and free()  # held while training, given back at the end
    with pytest.raises(RunConfigError):
        Trainer(tiny_cfg("train.steps=2", "train.lr=0.5"), tmp_path / "run")  # other settings: refused
    assert free()


def test_a_trainer_refused_while_built_leaves_the_directory_as_it_found_it(tmp_path):
    """A Trainer refused after it made the run directory (here a cache that is not there, refused in build_parts)
    leaves no directory it made and no lock file: a new --out is gone again, parents it made too; an existing
    directory (a scheduler's log in it, or a run) keeps what it had and nothing more, and is free."""
    missing = ["data.source=cache", f"data.path={tmp_path / 'no-cache'}"]
    new = tmp_path / "new" / "run"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Trainer(tiny_cfg(*missing), new)
    assert not (tmp_path / "new").exists()
    res = subprocess.run([sys.executable, "-m", "ahpa.cli", "train", "--out", str(new), *TINY, *missing],
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "does not exist" in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "new").exists()
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "job.out").write_text("scheduler's log")
    with pytest.raises(FileNotFoundError):
        Trainer(tiny_cfg(*missing), logs)
    assert sorted(p.name for p in logs.iterdir()) == ["job.out"]
    run = tmp_path / "run"
    Trainer(tiny_cfg("train.steps=2"), run).run()
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    with pytest.raises(RunConfigError):
        Trainer(tiny_cfg(*missing), run)  # a cache in place of procedural data: other settings
    with pytest.raises(RunConfigError, match="is at step 2"):
        Trainer(tiny_cfg("train.steps=1"), run)  # refused after its parts are built
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    probe = [sys.executable, "-c", "import sys; from pathlib import Path; from ahpa import lock; lock.hold(Path(sys.argv[1]), 'x')",
             str(run / ".lock")]
    assert subprocess.run(probe, env=ENV, capture_output=True, timeout=120).returncode == 0


def test_a_trainer_interrupted_while_built_leaves_no_directory_it_made(tmp_path, monkeypatch):
    """Ctrl-C during the minutes of set-up (a KeyboardInterrupt, not an Exception) cleans up as a refusal does."""
    import ahpa.train.loop as loop

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "build_parts", interrupted)
    with pytest.raises(KeyboardInterrupt):
        Trainer(tiny_cfg(), tmp_path / "new" / "run")
    assert not (tmp_path / "new").exists()


def test_the_holder_named_is_the_one_that_holds_it_now(tmp_path):
    """The lock file keeps its text after its holder ends; the next holder's text replaces it whole, so the message
    names the launch that holds it now, not a mix with an earlier one's longer text."""
    from ahpa import lock

    path = tmp_path / ".lock"
    path.write_text("pid 4194303 on a-much-longer-host-name.cluster.example.org, since 2020-01-01 00:00:00")
    holder = hold_lock(path)
    try:
        with pytest.raises(lock.InUseError) as e:
            lock.hold(path, "run directory r")
    finally:
        holder.kill()
        holder.wait()
    assert re.search(rf"\(pid {holder.pid} on {re.escape(socket.gethostname())}, since \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d\): two",
                     str(e.value)), str(e.value)
    # a holder that wrote nothing (another program's lock, or the moment before the holder writes): the file is named
    path.write_text("")
    other = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); "
                              "fcntl.lockf(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(600)", str(path)],
                             env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "held"
        with pytest.raises(lock.InUseError, match=rf"in use by another launch \(a process that holds {re.escape(str(path))}\)"):
            lock.hold(path, "run directory r")
    finally:
        other.kill()
        other.wait()


def test_a_file_system_without_locks_refuses_nothing(tmp_path, monkeypatch):
    """A file system that implements no locks (some network file systems): nothing is held and nothing refused, as
    before there were locks, and a run on it trains; an error of another kind is not taken for that."""
    import fcntl

    from ahpa import lock

    def failing(code):
        def lockf(fd, op, *args):
            raise OSError(code, os.strerror(code))
        return lockf

    for code in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENOLCK):
        monkeypatch.setattr(fcntl, "lockf", failing(code))
        lock.hold(tmp_path / ".lock", "run directory r")
        lock.hold(tmp_path / ".lock", "run directory r")
        lock.release(tmp_path / ".lock")
    Trainer(tiny_cfg("train.steps=1"), tmp_path / "run").run()
    monkeypatch.setattr(fcntl, "lockf", failing(errno.EIO))
    with pytest.raises(OSError) as e:
        lock.hold(tmp_path / "other.lock", "run directory r")
    assert e.value.errno == errno.EIO and not isinstance(e.value, lock.InUseError)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])  # a scheduler; a closed terminal or ssh session
def test_sigterm_saves_and_exits(tmp_path, signum):
    out = tmp_path / "run"
    proc = start("train", "--out", str(out), *TINY, "train.steps=100000", "train.ckpt_every=100000")
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err.decode()[-2000:]
    assert "checkpoint saved" in err.decode()
    assert ckpt.list_checkpoints(out / "checkpoints") and not (out / "DONE").exists()


def tiny_cfg(*extra):
    return config.load(None, [*TINY, *extra])


def test_non_finite_steps_are_skipped_then_the_run_stops(tmp_path, monkeypatch):
    tr = Trainer(tiny_cfg("train.steps=3", "train.max_bad_steps=3"), tmp_path / "r")
    real = Trainer._loss
    poisoned = {1}

    def loss(self, batch, d, align_on):
        value, metrics = real(self, batch, d, align_on)
        return (value * float("nan"), metrics) if self.step in poisoned else (value, metrics)

    monkeypatch.setattr(Trainer, "_loss", loss)
    tr.train_step()
    before = {k: v.clone() for k, v in tr.parts.model.state_dict().items()}
    ema_before = {k: v.clone() for k, v in tr.parts.ema.state_dict().items()}
    aligner_before = {k: v.clone() for k, v in tr.parts.aligner.state_dict().items()}
    tr.train_step()  # step index 1: non-finite -> skipped
    assert all(torch.equal(before[k], v) for k, v in tr.parts.model.state_dict().items())
    assert all(torch.equal(ema_before[k], v) for k, v in tr.parts.ema.state_dict().items())
    # the aligner too: heads and router (no optimiser step) and the router's running loss means (no update)
    assert all(torch.equal(aligner_before[k], v) for k, v in tr.parts.aligner.state_dict().items())
    assert tr.bad_total.item() == 1
    row = tr.run()
    assert row["bad_steps"] == 1 and np.isfinite(row["loss/flow"])

    poisoned.update(range(0, 100))
    tr2 = Trainer(tiny_cfg("train.steps=10", "train.max_bad_steps=3", "train.log_every=1", "train.ckpt_every=1"), tmp_path / "r2")
    with pytest.raises(TooManyBadSteps, match="lower train.lr"):
        tr2.run()
    assert not ckpt.list_checkpoints(tmp_path / "r2" / "checkpoints")  # nothing written over a good state


def test_a_skipped_steps_metrics_leave_its_windows_means_to_the_good_steps(tmp_path, monkeypatch):
    """A non-finite step returns zeros (a metric each, grad_norm too) and good_steps 0, however non-finite its own
    metrics were: its window's means are the good steps' alone. A NaN left in would make the whole window's row NaN;
    a finite one would be averaged in over the good steps' count."""
    from ahpa.train.logger import add_to_window, window_means

    real = Trainer._loss

    def loss(self, batch, d, align_on):
        value, metrics = real(self, batch, d, align_on)
        if self.step != 1:
            return value, metrics
        return value * float("nan"), {k: v * float("nan") for k, v in metrics.items()}

    monkeypatch.setattr(Trainer, "_loss", loss)
    tr = Trainer(tiny_cfg("train.steps=3", "align.router=soft"), tmp_path / "r")
    steps = [tr.train_step() for _ in range(3)]
    assert [s["good_steps"].item() for s in steps] == [1.0, 0.0, 1.0]
    assert {"loss/flow", "loss/align", "align/level_loss", "grad_norm"} <= set(steps[1])
    assert all(torch.equal(v, torch.zeros_like(v)) for k, v in steps[1].items())
    sums = {}
    for s in steps:
        add_to_window(sums, s)
    row, n_good = window_means(sums)
    assert n_good == 2 and row.keys() == steps[0].keys() - {"good_steps"}
    for k, v in row.items():
        assert np.allclose(v, ((steps[0][k] + steps[2][k]) / 2).tolist(), rtol=1e-6), k


def test_a_window_of_skipped_steps_alone_logs_no_losses_and_the_bar_goes_on(tmp_path, monkeypatch, capsys):
    """Its means would be of no step: a flow loss of 0 was logged, drawn in TensorBoard and the loss plot. The row
    keeps the step counts; `ahpa train`'s bar shows no loss for it."""
    from ahpa.cli import main

    real = Trainer._loss

    def loss(self, batch, d, align_on):
        value, metrics = real(self, batch, d, align_on)
        return (value * float("nan"), metrics) if self.step == 1 else (value, metrics)

    monkeypatch.setattr(Trainer, "_loss", loss)
    assert main(["train", "--out", str(tmp_path / "r"), *TINY, "train.steps=3"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [("loss/flow" in r, r["skipped_in_window"], r["bad_steps"]) for r in rows] == [
        (True, 0, 0), (False, 1, 1), (True, 0, 1)]
    err = capsys.readouterr().err
    assert "flow=—" in err
    assert "1 of the 3 steps trained now were skipped (a non-finite loss or gradient" in err


def test_a_short_run_whose_every_step_is_skipped_is_not_complete(tmp_path, monkeypatch, capsys):
    """Shorter than train.max_bad_steps (20), so neither rule of the stretch applies: it trained nothing, and said
    "run complete" with exit code 0 (a short trial of a new loss is where this happens). It stops as a diverged run
    does, before its export; a run with good steps among them completes."""
    from ahpa.cli import main

    real = Trainer._loss

    def loss(self, batch, d, align_on):
        value, metrics = real(self, batch, d, align_on)
        return value * float("nan"), metrics

    monkeypatch.setattr(Trainer, "_loss", loss)
    assert main(["train", "--out", str(tmp_path / "r"), *TINY, "train.steps=4", "train.log_every=2"]) != 0
    err = capsys.readouterr()
    assert "every one of the 4 steps trained had a non-finite loss or gradient (step 4)" in err.err
    assert "run complete" not in err.out + err.err
    assert not (tmp_path / "r" / "DONE").exists() and not (tmp_path / "r" / "model.safetensors").exists()


def test_a_run_that_skips_most_steps_stops_though_never_enough_in_a_row(tmp_path, monkeypatch):
    """A diverging run can stay finite on a few batches: three steps of every four skipped, never four in a row."""
    real = Trainer._loss

    def loss(self, batch, d, align_on):
        value, metrics = real(self, batch, d, align_on)
        return (value * float("nan"), metrics) if self.step % 4 else (value, metrics)

    monkeypatch.setattr(Trainer, "_loss", loss)
    tr = Trainer(tiny_cfg("train.steps=16", "train.max_bad_steps=4", "train.log_every=8"), tmp_path / "r")
    with pytest.raises(TooManyBadSteps, match="6 of the last 8 steps had a non-finite"):
        tr.run()
    assert tr.step == 8 and tr.bad_total.item() == 6
    # log windows shorter than max_bad_steps are pooled until the stretch is long enough to judge
    tr = Trainer(tiny_cfg("train.steps=16", "train.max_bad_steps=4", "train.log_every=2"), tmp_path / "r2")
    with pytest.raises(TooManyBadSteps, match="3 of the last 4 steps"):
        tr.run()
    assert tr.step == 4
    rows = [json.loads(line) for line in (tmp_path / "r2" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 4 and rows[-1]["skipped_in_window"] == 2  # the window that stopped it is logged


def test_bad_steps_verdict():
    assert bad_steps_verdict(0, 100, 0, 20) is None
    assert bad_steps_verdict(50, 100, 3, 20) is None  # half is not more than half
    assert "51 of the last 100" in bad_steps_verdict(51, 100, 3, 20)
    assert bad_steps_verdict(10, 10, 10, 20) is None  # a window shorter than max_bad_steps: only the streak counts
    assert "20 steps in a row" in bad_steps_verdict(20, 100, 20, 20)
    watch = DivergenceWatch(max_bad_steps=20)
    assert [watch.update(10, 8, 2), watch.update(10, 4, 0)] == [None, "12 of the last 20 steps had a non-finite loss or gradient"]
    assert watch.update(10, 10, 10) is None  # a new stretch after the judged one: 10 steps are too few to judge


def test_broken_checkpoints_are_skipped_or_refused(tmp_path):
    run = tmp_path / "r"
    Trainer(tiny_cfg("train.steps=2", "train.ckpt_every=1"), run).run()
    cks = ckpt.list_checkpoints(run / "checkpoints")
    newest = cks[-1]
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated
    tr = Trainer(tiny_cfg("train.steps=2", "train.ckpt_every=1"), run)
    assert tr.step == 1 and any("skipped broken checkpoint step_000000002.pt" in m for m in tr.messages)
    ckpt.digest_path(cks[0]).unlink()  # a checkpoint copied without its digest: not read unchecked
    with pytest.raises(RunConfigError, match=r"none is readable(.|\n)*step_000000001.pt.sha256 is missing"):
        Trainer(tiny_cfg("train.steps=2"), run)
    cks[0].write_bytes(b"PK\x03\x04 not ours")  # a foreign file under our name
    with pytest.raises(RunConfigError, match="none is readable"):
        Trainer(tiny_cfg("train.steps=2"), run)

    other = tmp_path / "other"
    Trainer(tiny_cfg("train.steps=1", "model.hidden_size=48"), other).run()
    good = tmp_path / "good"
    Trainer(tiny_cfg("train.steps=1"), good).run()
    theirs = ckpt.list_checkpoints(other / "checkpoints")[-1]
    (good / "checkpoints" / "step_000000005.pt").write_bytes(theirs.read_bytes())
    (good / "checkpoints" / "step_000000005.pt.sha256").write_bytes(ckpt.digest_path(theirs).read_bytes())
    with pytest.raises(RunConfigError, match="does not fit this run's model"):
        Trainer(tiny_cfg("train.steps=6"), good)


def test_checkpoints_stream_to_the_file_and_are_mapped_back(tmp_path):
    """Saving needs the state and not a serialised copy of it (XL/2 with Adam: ~11 GB, on every rank); reading
    maps the file, so the state lives in the page cache that every rank of a node shares, not in each rank's own
    (anonymous) memory. A 256 MB state in a fresh process: the peak RSS of saving, and the anonymous memory after
    reading it and touching every value (the former streaming read held the whole state there)."""
    status = Path("/proc/self/status")
    if not status.exists() or "RssAnon" not in status.read_text():
        pytest.skip("needs Linux's /proc/self/status (RssAnon) to tell mapped from private memory")
    code = """
import resource, sys, torch
from pathlib import Path
from ahpa.train import checkpoint as ckpt
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
anon = lambda: int(next(l for l in open("/proc/self/status") if l.startswith("RssAnon")).split()[1]) / 1024
d = Path(sys.argv[1])
if sys.argv[2] == "save":
    state = {"w": [torch.full((2**22,), float(i)) for i in range(16)]}  # 256 MB
    held = peak()
    ckpt.save_checkpoint(d, 1, state, keep=0)
    print(peak() - held)
else:
    base = anon()
    state = ckpt.read_checkpoint(ckpt.checkpoint_path(d, 1))
    assert [float(w.sum()) for w in state["w"]] == [float(i * 2**22) for i in range(16)]
    print(anon() - base)
"""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    for mode in ("save", "read"):
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path), mode], env=env, check=True,
                             capture_output=True, text=True).stdout
        assert float(out.split()[-1]) < 64, f"{mode}: {out.split()[-1]} MB beyond the state"
    digest = (tmp_path / "step_000000001.pt.sha256").read_text()  # the format sha256sum -c reads
    assert re.fullmatch(r"[0-9a-f]{64}  step_000000001\.pt\n", digest)
    for step in (2, 3):  # the last N kept, each with its digest
        ckpt.save_checkpoint(tmp_path, step, {"w": torch.zeros(1)}, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000000003.pt", "step_000000003.pt.sha256"]


def test_a_resumed_run_keeps_nothing_of_the_mapped_checkpoint(tmp_path):
    """The checkpoint a run resumed from is mapped while loading; what the run keeps (statistics, and on the CPU the
    optimiser's state) is copied out, so once newer checkpoints replace it its file is closed and its disk space
    freed, not held (deleted, ~11 GB at XL/2) until the job ends. A digest left by a crashed save goes too."""
    import gc

    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs Linux's /proc/self/maps")
    run = tmp_path / "r"
    cfg = tiny_cfg("train.steps=1", "train.ckpt_every=1", "train.keep_checkpoints=1")
    Trainer(cfg, run).run()
    (run / "checkpoints" / "step_000000007.pt.sha256").write_text("0" * 64 + "  step_000000007.pt\n")  # an orphan
    tr = Trainer(tiny_cfg("train.steps=3", "train.ckpt_every=1", "train.keep_checkpoints=1"), run)
    assert tr.step == 1
    tr.run()
    gc.collect()
    held = [ln for ln in maps.read_text().splitlines() if str(run / "checkpoints") in ln]
    assert held == [], held
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000000003.pt", "step_000000003.pt.sha256"]


def test_checkpoints_of_the_earlier_layout_read_back(tmp_path):
    """Runs begun before checkpoints were mapped (the digest as a header before the payload) still resume."""
    run = tmp_path / "r"
    Trainer(tiny_cfg("train.steps=2", "train.ckpt_every=1"), run).run()
    for path in ckpt.list_checkpoints(run / "checkpoints"):  # rewritten in the earlier layout
        digest = ckpt.digest_path(path)
        path.write_bytes(digest.read_bytes()[:64] + b"\n" + path.read_bytes())
        digest.unlink()
    tr = Trainer(tiny_cfg("train.steps=3", "train.ckpt_every=1"), run)
    assert tr.step == 2 and not any("skipped" in m for m in tr.messages)
    newest = ckpt.list_checkpoints(run / "checkpoints")[-1]
    newest.write_bytes(newest.read_bytes()[:-1] + b"x")  # its header's digest still checks the payload
    assert Trainer(tiny_cfg("train.steps=3"), run).step == 1


def test_a_resume_drops_a_metrics_row_torn_by_a_kill(tmp_path):
    """A process killed while appending leaves half a line: the resume drops it, so the file stays valid JSONL
    (appending after the torn text would have glued the next row to it)."""
    Trainer(tiny_cfg("train.steps=2", "train.log_every=1", "train.ckpt_every=2"), tmp_path).run()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss/fl')
    Trainer(tiny_cfg("train.steps=4", "train.log_every=1", "train.ckpt_every=2"), tmp_path).run()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss/flow" in r] == [1, 2, 3, 4]


def test_a_directory_that_is_not_a_run_is_not_written_over(tmp_path):
    theirs = tmp_path / "project"
    theirs.mkdir()
    (theirs / "config.yaml").write_text("learning_rate: 0.1\n")  # another tool's config
    with pytest.raises(RunConfigError, match="config.yaml that cannot be read as a run's config.*learning_rate"):
        Trainer(tiny_cfg("train.steps=1"), theirs)
    assert (theirs / "config.yaml").read_text() == "learning_rate: 0.1\n" and len(list(theirs.iterdir())) == 1
    (theirs / "config.yaml").unlink()
    (theirs / "samples").mkdir()
    with pytest.raises(RunConfigError, match=r"\(no config.yaml\) but holds samples"):
        Trainer(tiny_cfg("train.steps=1"), theirs)
    (theirs / "samples").rmdir()
    (theirs / "losses.png").write_bytes(b"their plot")  # a run writes its plots at the top too
    with pytest.raises(RunConfigError, match=r"\(no config.yaml\) but holds losses.png"):
        Trainer(tiny_cfg("train.steps=1"), theirs)
    logs = tmp_path / "job"  # a scheduler's log in --out is no reason to refuse
    logs.mkdir()
    (logs / "slurm-1.out").write_text("")
    Trainer(tiny_cfg("train.steps=1"), logs).run()
    assert (logs / "DONE").exists()


def test_unwritable_run_dir_and_full_disk(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError, match="not writable"):
        Trainer(tiny_cfg(), tmp_path / "file" / "run")
    run = tmp_path / "r"
    tr = Trainer(tiny_cfg("train.steps=1"), run)
    tr.run()
    before = ckpt.list_checkpoints(run / "checkpoints")

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    tr.step = 7
    with pytest.raises(OSError, match="previous checkpoint is intact"):
        tr.save()
    assert ckpt.list_checkpoints(run / "checkpoints") == before
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]


def test_a_checkpoint_corrupted_inside_its_data_is_refused_by_its_digest(tmp_path):
    """torch.load reads a file whose tensor bytes changed without complaint; only the sha256 file tells. Truncated or
    replaced files, which torch.load rejects by itself, are tested elsewhere."""
    ckpt.save_checkpoint(tmp_path, 1, {"w": torch.full((64,), 1.0)}, keep=0)
    ckpt.save_checkpoint(tmp_path, 2, {"w": torch.full((64,), 1.5)}, keep=0)
    newest = ckpt.checkpoint_path(tmp_path, 2)
    data = newest.read_bytes()
    needle = torch.tensor([1.5] * 4).numpy().tobytes()
    assert data.count(needle) >= 1
    newest.write_bytes(data.replace(needle, torch.tensor([2.5] * 4).numpy().tobytes(), 1))  # a bit-rotted value
    with pytest.raises(ckpt.CheckpointError, match="checksum mismatch"):
        ckpt.read_checkpoint(newest)
    state, path, skipped = ckpt.load_latest(tmp_path)
    assert path.name == "step_000000001.pt" and float(state["w"][0]) == 1.0
    assert any("step_000000002.pt" in m and "checksum mismatch" in m for m in skipped)


def test_a_judged_stretch_leaves_nothing_to_the_next():
    """After a stretch is judged, its skipped steps must not count against the next one."""
    watch = DivergenceWatch(max_bad_steps=20)
    assert watch.update(20, 10, 0) is None  # exactly half: not diverged; judged, starts afresh
    assert watch.update(20, 1, 0) is None  # a clean stretch: 1 of 20
    assert watch.steps == 0 and watch.skipped == 0


def test_a_launchs_counts_outlive_its_judged_stretches_and_only_its_last_window_ends_it():
    """The launch's own counts are never reset with a judged stretch: the completion line reports them, and a launch
    that trained some steps before an all-skipped last stretch trained something (it is not "every one" skipped)."""
    watch = DivergenceWatch(max_bad_steps=4)
    assert watch.update(4, 0, 0) is None  # judged and reset
    assert watch.update(2, 2, 2, last=True) is None  # 2 of the launch's 6 steps: it trained 4
    assert (watch.launch_steps, watch.launch_skipped) == (6, 2)
    early = DivergenceWatch(max_bad_steps=20)
    assert early.update(2, 2, 2) is None  # a first window all skipped, the launch goes on
    assert early.update(2, 0, 0, last=True) is None
    # a streak long enough is said as one, not as "every one" of a short launch
    streak = DivergenceWatch(max_bad_steps=4).update(4, 4, 4, last=True)
    assert streak == "4 steps in a row had a non-finite loss or gradient"
    assert DivergenceWatch(max_bad_steps=20).update(3, 3, 3, last=True) == (
        "every one of the 3 steps trained had a non-finite loss or gradient")
