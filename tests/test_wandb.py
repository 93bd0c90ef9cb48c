"""train.wandb: the W&B copy of a run's metrics, checked on real offline W&B runs (WANDB_MODE=offline: no network),
read back from the run files W&B writes."""

from __future__ import annotations

import json
import re
import struct
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from ahpa import compare, config, config_resume
from ahpa.train.loop import RunConfigError, Trainer

ID_FILE = "wandb_id"  # the run's W&B id, in the run directory
TAGGED = ("samples", "router")  # the images TensorBoard gets, by tag


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """W&B offline and silent, its own files under tmp_path; its session torn down after the test, so that the next
    one reads its environment afresh."""
    wandb = pytest.importorskip("wandb", reason="needs wandb (pip install wandb; scripts/setup.sh installs it)")
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": tmp_path / "wb-config",
                        "WANDB_CACHE_DIR": tmp_path / "wb-cache", "WANDB_DATA_DIR": tmp_path / "wb-data"}.items():
        monkeypatch.setenv(name, str(value))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    wandb.teardown()
    yield wandb
    wandb.teardown()


def wandb_records(path: Path) -> list:
    """The records of a W&B run file (RUN/wandb/*/run-ID.wandb): a LevelDB-style log, a 7-byte header (":W&B", magic,
    version) and then 32 KiB blocks of chunks, each a 7-byte header (crc32, length, type: 1 whole, 2 first, 3 middle,
    4 last) and its bytes, of wandb_internal Record protobufs. wandb >= 0.20 has no Python reader of its own."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} does not start as a W&B run file: {data[:7]!r}"
    records, pos, pieces = [], 7, b""
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if room < 7 or (kind == 0 and length == 0):  # a block's zero-padded end
            pos += room
            continue
        pieces += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            records.append(record)
            pieces = b""
    return records


def history(records) -> list[dict]:
    """Each history row as {key: value}, W&B's own keys (_step, _runtime, _timestamp) left out, an image as its tag."""
    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
            row = {k: v for k, v in items.items() if not k.startswith("_") and k.split("/")[0] not in TAGGED}
            row.update({tag: r.history.step.num for tag in TAGGED if any(k.startswith(tag + "/") for k in items)})
            rows.append({"_step": r.history.step.num, **row})
    return rows


def the_run(records):
    return next(r.run for r in records if r.WhichOneof("record_type") == "run")


def tiny_detector(root: Path) -> tuple[str, Path]:
    """A TorchScript detector (test_evaluate's: mean colour and a pooled random convolution) and a reference .npz: an
    evaluation in seconds."""
    from tests.test_evaluate import TinyDetector

    with warnings.catch_warnings():  # torch >= 2.10 deprecates TorchScript authoring; detectors are TorchScript
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(TinyDetector().eval()).save(str(root / "det.pt"))
    rng = np.random.default_rng(0)
    np.savez(root / "ref.npz", images=rng.integers(0, 256, (24, 16, 16, 3), dtype=np.uint8), labels=np.arange(24) % 8)
    return f"torchscript:{root / 'det.pt'}", root / "ref.npz"


def test_an_offline_wandb_run_gets_what_tensorboard_gets_and_a_resume_continues_it(tmp_path, tiny, offline_wandb):
    """Stopped at step 2 (its checkpoint saved, the evaluation due there not done) and resumed: both launches log to
    one W&B run (RUN/wandb_id), each launch's files a directory of RUN/wandb/; together they hold every scalar
    TensorBoard got under its name (per-level losses as align/level_loss/<level>), the evaluations with their step
    (eval/step), the sample grids and router plots, and the run's config."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    det, ref = tiny_detector(tmp_path)
    run = tmp_path / "run"
    cfg = tiny("train.steps=4", "train.ckpt_every=2", "train.sample_every=2", "align.router=soft", "eval.every=2",
               f"eval.detectors=[{det}]", f"eval.ref={ref}", "eval.num=16", "eval.batch=8", "train.wandb=ahpa-tests")
    trainer = Trainer(cfg, run)
    assert trainer.run(should_stop=lambda: trainer.step >= 2)["stopped"]
    run_id = (run / ID_FILE).read_text().strip()
    Trainer(cfg, run).run()
    # run.finish() can return before W&B's service has written the run's file: the second launch's held its 7-byte
    # header alone in 1 of 10 tries, complete 3 s later. Ending the service waits for it (40 of 40 complete)
    offline_wandb.teardown()
    assert (run / ID_FILE).read_text().strip() == run_id  # the resume kept it
    launches = sorted(run.glob("wandb/offline-run-*"))
    assert [p.name.rsplit("-", 1)[1] for p in launches] == [run_id, run_id]
    first, second = (wandb_records(p / f"run-{run_id}.wandb") for p in launches)
    for records in (first, second):
        r = the_run(records)
        assert (r.run_id, r.project, r.display_name) == (run_id, "ahpa-tests", "run")
        settings = {u.key: json.loads(u.value_json) for u in r.config.update}
        assert settings["align"]["method"] == "ahpa" and settings["train"]["wandb"] == "ahpa-tests"
    rows = history(first) + history(second)
    # the first launch: steps 1 and 2, with the router plot of the stop's checkpoint (a stop draws no grid); the
    # resume: step 2's evaluation first, then steps 3 and 4, with step 4's grid, router plot and evaluation
    assert [r["_step"] for r in rows] == [1, 2, 2, 3, 4]
    assert [sorted(t for t in TAGGED if t in r) for r in rows] == [[], ["router"], [], [], ["router", "samples"]]
    evals = [r for r in rows if "eval/FD-det" in r]
    assert [(r["_step"], r["eval/step"]) for r in evals] == [(2, 2), (4, 4)]
    assert all(r["eval/FD-det"] > 0 for r in evals)
    tb = EventAccumulator(str(run / "tb"))
    tb.Reload()
    scalars = set(tb.Tags()["scalars"])
    assert {"align/level_loss/latent", "loss/flow", "eval/FD-det"} <= scalars
    assert set().union(*rows) - {"_step", "eval/step", *TAGGED} == scalars
    assert set(tb.Tags()["images"]) == set(TAGGED)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = next(r for r in metrics if r["step"] == 4 and "loss/flow" in r)
    assert rows[-1]["loss/flow"] == pytest.approx(last["loss/flow"], rel=1e-12)


def test_a_run_is_refused_before_its_set_up_when_wandb_cannot_be_imported(tmp_path, tiny, monkeypatch):
    """train.wandb without wandb installed: refused at once, naming the setting and the install, with no run directory
    left behind."""
    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` raises ImportError for
    with pytest.raises(RunConfigError, match=r"train.wandb='proj' logs to Weights & Biases, but wandb cannot be "
                                             r"imported .*pip install wandb"):
        Trainer(tiny("train.wandb=proj"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_wandb_failing_to_start_stops_the_run_before_its_first_step(tmp_path, tiny, offline_wandb, monkeypatch):
    """Online W&B with no API key (W&B refuses at once, before any connection): the run stops before training, with
    W&B's reason and the ways out."""
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a key
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    offline_wandb.teardown()
    trainer = Trainer(tiny("train.wandb=proj", "train.steps=2"), tmp_path / "run")
    with pytest.raises(RunConfigError, match=r"W&B could not start .*wandb login.*WANDB_MODE=offline"):
        trainer.run()
    assert trainer.step == 0 and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_wandb_takes_each_step_once():
    """A resumed W&B run takes steps from its next one (the floor): earlier rows are not sent, as W&B would refuse
    them, except an evaluation, which goes to the floor (its step in eval/step); a new or offline run's floor is 0."""
    from ahpa.train.wandb_sink import wandb_step

    assert [wandb_step(s, 0, False) for s in (1, 2, 5)] == [1, 2, 5]
    assert [wandb_step(s, 5, False) for s in (3, 4, 5, 6)] == [None, None, 5, 6]
    assert [wandb_step(s, 5, True) for s in (3, 5, 6)] == [5, 5, 6]


def test_wandb_settings_are_logging_only():
    """They may change on resume and are not among the differences `ahpa compare` lists; a bad project is refused by
    name with the form it takes."""
    plain, logged = config.load(None, []), config.load(None, ["train.wandb=me/proj", "train.wandb_name=x"])
    assert (plain.train.wandb, plain.train.wandb_name) == ("", "")
    assert config_resume.resume_conflicts(plain, logged) == []
    assert {"train.wandb", "train.wandb_name"} <= set(compare.NOT_COMPARED)
    for bad in ("a/b/c", "me/", "pro:ject"):
        with pytest.raises(config.ConfigError, match=rf"train.wandb='{bad}' is not valid: give a W&B project as "
                                                     r"PROJECT or ENTITY/PROJECT"):
            config.load(None, [f"train.wandb={bad}"])


def test_a_run_that_fails_marks_its_wandb_run_failed_under_its_name_entity_and_project(tmp_path, tiny, offline_wandb,
                                                                                       monkeypatch):
    """A diverged run (every loss NaN: TooManyBadSteps) finishes its W&B run with exit code 1, which W&B shows as
    failed, not finished; train.wandb=ENTITY/PROJECT and train.wandb_name go to W&B as such, and the eval/* charts
    are drawn against eval/step."""
    from ahpa.train.divergence import TooManyBadSteps

    real = Trainer._loss

    def loss(self, batch, d, align_on):
        value, metrics = real(self, batch, d, align_on)
        return value * float("nan"), metrics

    monkeypatch.setattr(Trainer, "_loss", loss)
    run = tmp_path / "run"
    with pytest.raises(TooManyBadSteps):
        Trainer(tiny("train.steps=6", "train.max_bad_steps=2", "train.wandb=me/proj", "train.wandb_name=a name"), run).run()
    offline_wandb.teardown()  # its file written (as in the first test)
    run_id = (run / ID_FILE).read_text().strip()
    records = wandb_records(next(run.glob("wandb/offline-run-*")) / f"run-{run_id}.wandb")
    r = the_run(records)
    assert (r.entity, r.project, r.display_name) == ("me", "proj", "a name")
    exits = [x.exit for x in records if x.WhichOneof("record_type") == "exit"]
    assert [x.exit_code for x in exits] == [1]
    metrics = {x.metric.glob_name or x.metric.name: x.metric.step_metric for x in records
               if x.WhichOneof("record_type") == "metric"}
    assert metrics["eval/*"] == "eval/step"


def test_a_finished_run_ends_its_wandb_run_finished_and_a_rerun_of_it_logs_nothing(tmp_path, tiny, offline_wandb,
                                                                                  capsys):
    """A run that completes ends its W&B run with exit code 0, and `ahpa train` names RUN/wandb among what it made; the
    same command again (a requeued job: the run is complete, it trains nothing) starts no W&B run."""
    from ahpa.cli import main

    from tests.conftest import TINY

    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *TINY, "train.steps=2", "train.wandb=proj"]) == 0
    done = [line for line in capsys.readouterr().out.splitlines() if line.startswith("run complete:")]
    assert len(done) == 1 and done[0].endswith(", tb, wandb)"), done
    Trainer(tiny("train.steps=2", "train.wandb=proj"), run).run()
    offline_wandb.teardown()  # its file written (as in the first test)
    launches = list(run.glob("wandb/offline-run-*"))
    assert len(launches) == 1
    records = wandb_records(launches[0] / f"run-{(run / ID_FILE).read_text().strip()}.wandb")
    assert [x.exit.exit_code for x in records if x.WhichOneof("record_type") == "exit"] == [0]


def test_the_wandb_id_file_is_read_back_made_once_and_refused_when_it_is_not_an_id(tmp_path, tiny):
    """RUN/wandb_id: made on the first start (12 lowercase hex digits), read back as it is on every later one; text
    that is no W&B id (a hand edit, another tool's file) is refused with the fix, not handed to W&B. A directory that
    is no run (no config.yaml) but holds a wandb_id is refused as --out: a run there would log to that W&B run."""
    from ahpa.train.wandb_sink import stored_id

    made = stored_id(tmp_path)
    assert re.fullmatch(r"[0-9a-f]{12}", made) and (tmp_path / ID_FILE).read_text() == made + "\n"
    assert stored_id(tmp_path) == made
    (tmp_path / ID_FILE).write_text("abc123\n")
    assert stored_id(tmp_path) == "abc123"
    for bad in ("Run-1", "a b", "../x", "ABC"):
        (tmp_path / ID_FILE).write_text(bad + "\n")
        with pytest.raises(RunConfigError, match=rf"{ID_FILE} holds '{re.escape(bad)}', not a W&B run id .*delete the file"):
            stored_id(tmp_path)
    (tmp_path / ID_FILE).write_text(made + "\n")
    with pytest.raises(RunConfigError, match=rf"is not a run directory of ahpa \(no config.yaml\) but holds {ID_FILE}"):
        Trainer(tiny("train.steps=1"), tmp_path)


def test_a_wandb_install_that_fails_at_import_is_named_as_missing(monkeypatch):
    """An install that raises at import (not an ImportError: e.g. wandb against a protobuf it does not support
    raises TypeError) refuses train.wandb before set-up, with the error, like a missing one."""
    import importlib.abc

    from ahpa.train.wandb_sink import missing_wandb

    class Broken(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "wandb":
                raise TypeError("Descriptors cannot be created directly")
            return None

    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    monkeypatch.setattr(sys, "meta_path", [Broken(), *sys.meta_path])
    said = missing_wandb("proj")
    assert said.startswith("train.wandb='proj' logs to Weights & Biases, but wandb cannot be imported (TypeError: "
                           "Descriptors cannot be created directly): pip install wandb")


def test_a_wandb_project_is_split_into_entity_and_project_and_each_character_wandb_refuses_is_refused():
    """train.wandb=ENTITY/PROJECT -> (entity, project), PROJECT -> (None, project): W&B gets each where it belongs. W&B's
    names take none of \\ # ? % :, in either part; each is refused by the setting's name before the run starts."""
    from ahpa.config_rules import wandb_project

    assert wandb_project("me/proj") == ("me", "proj") and wandb_project("proj") == (None, "proj")
    for c in "\\#?%:":
        for bad in (f"pro{c}ject", f"me{c}/proj"):
            with pytest.raises(config.ConfigError, match=r"train.wandb=.* is not valid: give a W&B project as "):
                config.load(None, [f"train.wandb={bad}"])


def test_tensorboard_and_wandb_get_a_rows_numbers_and_its_levels_losses_by_name():
    """ahpa.train.logger.scalars: a row's numbers but its step and the images count (a count of evaluated images, not
    a metric), no text, and each level's loss under align/level_loss/<level> in the order the row names them."""
    from ahpa.train.logger import scalars

    row = {"step": 4, "images": 16, "eval/FD-det": 2.5, "eval_setup": "euler-4", "loss/flow": 1.0, "bad_steps": 0,
           "align/level_loss": [0.5, 0.25], "level_names": ["latent", "mid"]}
    assert scalars(row) == {"eval/FD-det": 2.5, "loss/flow": 1.0, "bad_steps": 0, "align/level_loss/latent": 0.5,
                            "align/level_loss/mid": 0.25}


def test_under_torchrun_rank_0_alone_logs_and_a_wandb_that_cannot_start_stops_every_process(tmp_path, offline_wandb):
    """Two processes: one W&B run, rank 0's, with every step; W&B refusing to start (online, no API key) stops both
    processes before the first step with W&B's reason printed once, not rank 1 alone in a collective that rank 0
    never joins."""
    import os
    import subprocess

    from tests.conftest import TINY

    def launch(out: Path, **env) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ahpa.cli",
               "train", "--out", str(out), *TINY, "train.steps=2", "train.wandb=proj"]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1", **env})

    res = launch(tmp_path / "run")
    assert res.returncode == 0, res.stderr[-3000:]
    run_id = (tmp_path / "run" / ID_FILE).read_text().strip()
    launches = list((tmp_path / "run").glob("wandb/offline-run-*"))
    assert [p.name.rsplit("-", 1)[1] for p in launches] == [run_id]
    assert [r["_step"] for r in history(wandb_records(launches[0] / f"run-{run_id}.wandb"))] == [1, 2]
    res = launch(tmp_path / "online", WANDB_MODE="online", HOME=str(tmp_path), NETRC=str(tmp_path / "no-netrc"))
    said = [line for line in res.stderr.splitlines() if line.startswith("ahpa train: error: train.wandb='proj': W&B "
                                                                       "could not start")]
    assert res.returncode != 0 and len(said) == 1 and "gloo" not in res.stderr.lower(), res.stderr[-3000:]
    assert not (tmp_path / "online" / "metrics.jsonl").exists()
