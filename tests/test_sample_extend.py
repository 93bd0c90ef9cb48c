"""`ahpa sample` with a larger --num than a finished file holds extends it (FID-10K during development, then FID-50K)
instead of refusing the new --num; the result is bitwise a fresh run's, and the old file survives a killed extension."""

import json

import numpy as np
import pytest

from ahpa.cli import main
from ahpa.config import SampleCfg
from ahpa.train.loop import Trainer
from tests.test_sample import fake_iter_samples


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from ahpa import config
    from tests.conftest import TINY

    run = tmp_path_factory.mktemp("extend") / "run"
    Trainer(config.load(None, [*TINY, "train.steps=2"]), run).run()
    return run


@pytest.mark.parametrize("solver, classes", [("heun", []), ("euler-maruyama", ["--class", "3,1,2"])])
def test_a_larger_num_extends_a_finished_file_into_a_fresh_runs_file(run_dir, tmp_path, capsys, solver, classes):
    """5 samples in chunks of 2, then 11: the full chunks are kept and the short last one ([4, 5)) is sampled again
    within the full chunk [4, 6) a fresh run computes (guided, so its rows pair across the chunk). The file, labels
    and record are a fresh run's of 11 (sample i's noise, the SDE's too, and label depend on i, not on --num); the
    chunk size stays the file's whatever --batch says."""
    args = ["sample", "--run", str(run_dir), "--solver", solver, "--steps", "3", "--micro-batch", "4", "--cfg-scale",
            "2", *classes]
    out, fresh = tmp_path / "s.npz", tmp_path / "fresh.npz"
    assert main([*args, "--num", "5", "--batch", "2", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main([*args, "--num", "11", "--batch", "3", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert (f"extending {out} from 5 to 11 samples: its first 4 are kept, the rest sampled in chunks of 2 (the file's; "
            "--batch 3 is not used); its last 1 (a short chunk) is sampled again") in captured.err
    assert f"wrote 11 samples to {out}" in captured.out
    assert main([*args, "--num", "11", "--batch", "2", "--out", str(fresh)]) == 0
    with np.load(out) as a, np.load(fresh) as b:
        assert a["arr_0"].shape == (11, 16, 16, 3)
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
    assert json.loads((tmp_path / "s.npz.json").read_text()) == json.loads((tmp_path / "fresh.npz.json").read_text())
    assert json.loads((tmp_path / "s.npz.json").read_text())["num"] == 11 and not (tmp_path / "s.npz.parts").exists()
    capsys.readouterr()
    assert main([*args, "--num", "11", "--out", str(out)]) == 0
    assert "already complete: 11 samples" in capsys.readouterr().out


def test_a_smaller_num_or_other_settings_are_refused_before_a_model_loads(run_dir, tmp_path, capsys, monkeypatch):
    """Fewer samples than the file holds would cut it short: refused with the way to evaluate its first N. A larger
    --num with another setting changed is not an extension: refused naming both."""
    from ahpa.train import resume

    args = ["sample", "--run", str(run_dir), "--steps", "1", "--micro-batch", "2", "--batch", "2"]
    out = tmp_path / "s.npz"
    assert main([*args, "--num", "4", "--out", str(out)]) == 0
    before = out.read_bytes()

    def no_model(*a, **k):
        raise AssertionError("a model was loaded for a refused file")

    monkeypatch.setattr(resume, "run_sampler", no_model)
    capsys.readouterr()
    assert main([*args, "--num", "3", "--out", str(out)]) == 2
    assert (f"is finished with 4 samples, more than the 3 asked for; a finished sample file is not cut short: evaluate "
            f"its first 3 (`ahpa eval {out} --num 3`), or choose another --out") in capsys.readouterr().err
    assert main([*args, "--num", "8", "--seed", "1", "--out", str(out)]) == 2
    assert ("finished with other settings (num: the file has 4, command gives 8; seed: the file has 0, command gives 1)"
            in capsys.readouterr().err)
    assert out.read_bytes() == before and not (tmp_path / "s.npz.parts").exists()


def test_a_killed_extension_keeps_the_old_file_and_a_rerun_finishes_it(tmp_path, monkeypatch):
    """Killed after its first new chunk, the extension left the old file and record as they were, and a rerun samples
    only the chunks missing; a rerun of the old --num is told of the extension under way. Killed between the new file
    and its record, the rerun writes both again from the same samples."""
    from ahpa import sample_writer

    calls = []
    monkeypatch.setattr(sample_writer, "iter_samples", fake_iter_samples(calls))
    out, ident, cfg = tmp_path / "s.npz", {"model_sha256": "x"}, SampleCfg()
    record = sample_writer.record_path(out)
    sample_writer.write_samples(None, out, 5, 0, 2, cfg, ident)
    before, record_before, calls[:] = out.read_bytes(), record.read_text(), []

    def killed(n):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sample_writer.write_samples(None, out, 11, 0, 3, cfg, ident, on_progress=killed)
    assert calls == [(4, 6)] and out.read_bytes() == before and record.read_text() == record_before
    with pytest.raises(sample_writer.SampleSettingsError, match=rf"holds a partial extension of {out} \(5 samples\) to "
                       r"11 with other settings \(num: partial has 11, command gives 5\); rerun that command"):
        sample_writer.write_samples(None, out, 5, 0, 2, cfg, ident)
    told, calls[:] = [], []
    assert sample_writer.write_samples(None, out, 11, 0, 3, cfg, ident, on_extend=lambda *a: told.append(("extend", a)),
                                       on_resume=lambda *a: told.append(("resume", a))) == out
    assert calls == [(6, 8), (8, 10), (10, 11)]  # the chunks of 2 that were missing, nothing of [0, 4) again
    assert told == [("extend", (5, 4, 2)), ("resume", (6, 2))]
    with np.load(out) as f:
        assert np.array_equal(f["arr_0"][:, 0, 0, 0], np.arange(11)) and np.array_equal(f["arr_1"], np.arange(11))
    assert json.loads(record.read_text())["num"] == 11 and not (tmp_path / "s.npz.parts").exists()
    # killed once the new file is in place, before its record: the old record never claims more than OUT holds
    write_text = sample_writer.atomic_write_text

    def no_record(path, text):
        if path == record:
            raise KeyboardInterrupt
        write_text(path, text)

    monkeypatch.setattr(sample_writer, "atomic_write_text", no_record)
    with pytest.raises(KeyboardInterrupt):
        sample_writer.write_samples(None, out, 14, 0, 2, cfg, ident)
    assert json.loads(record.read_text())["num"] == 11
    with np.load(out) as f:
        assert len(f["arr_1"]) == 14
    monkeypatch.setattr(sample_writer, "atomic_write_text", write_text)
    calls[:] = []
    sample_writer.write_samples(None, out, 14, 0, 2, cfg, ident)
    with np.load(out) as f:
        assert np.array_equal(f["arr_0"][:, 0, 0, 0], np.arange(14)) and np.array_equal(f["arr_1"], np.arange(14))
    assert calls == [] and json.loads(record.read_text())["num"] == 14 and not (tmp_path / "s.npz.parts").exists()


def test_a_partial_extension_whose_file_is_gone_or_replaced_is_refused(tmp_path, monkeypatch):
    """The extension takes the first samples of OUT when it finishes: OUT moved away, or written over by another
    file, is named with the fix instead of a file of other samples (or a crash) at the end."""
    from ahpa import sample_writer

    monkeypatch.setattr(sample_writer, "iter_samples", fake_iter_samples([]))
    out, cfg = tmp_path / "s.npz", SampleCfg()
    sample_writer.write_samples(None, out, 4, 0, 2, cfg, {"model_sha256": "x"})

    def killed(n):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sample_writer.write_samples(None, out, 8, 0, 2, cfg, {"model_sha256": "x"}, on_progress=killed)
    moved = out.rename(tmp_path / "moved.npz")
    with pytest.raises(FileNotFoundError, match=rf"s\.npz\.parts extends the finished {out} past its first 4 samples, "
                       rf"but {out} is gone: put it back, or delete .*s\.npz\.parts to sample anew"):
        sample_writer.write_samples(None, out, 8, 0, 2, cfg, {"model_sha256": "x"})
    moved.rename(out)
    record = sample_writer.record_path(out)
    record.write_text(record.read_text().replace('"x"', '"y"'))
    with pytest.raises(FileNotFoundError, match=r"holds other samples now \(model_sha256: the file has 'y', command "
                                                r"gives 'x'\)"):
        sample_writer.write_samples(None, out, 8, 0, 2, cfg, {"model_sha256": "x"})


def test_a_file_extended_by_another_launch_meanwhile_is_not_extended_again(tmp_path, monkeypatch):
    """Two launches extend one --out: the second saw the old file, then took the lock the first gave back once it
    had extended the file. It is refused, and the file is the first launch's."""
    from ahpa import lock, sample_writer

    calls = []
    monkeypatch.setattr(sample_writer, "iter_samples", fake_iter_samples(calls))
    out, ident = tmp_path / "s.npz", {"model_sha256": "x"}
    sample_writer.write_samples(None, out, 4, 0, 2, SampleCfg(), ident)
    hold, record = lock.hold, sample_writer.record_path(out)

    def the_other_launch_extends_first(path, what):
        record.write_text(record.read_text().replace('"num": 4', '"num": 6'))
        return hold(path, what)

    monkeypatch.setattr(lock, "hold", the_other_launch_extends_first)
    calls[:] = []
    with pytest.raises(FileExistsError, match="was finished by another launch meanwhile"):
        sample_writer.write_samples(None, out, 6, 0, 2, SampleCfg(), ident)
    assert calls == []
    lock.release(tmp_path / "s.npz.parts" / lock.LOCK_FILE)



def killed_extension(tmp_path, monkeypatch):
    """A finished file of 4 samples (chunks of 2, sample i filled with i) whose extension to 8 was killed after its
    first new chunk: (out, identity, cfg, the calls list of the fake sampler)."""
    from ahpa import sample_writer

    calls = []
    monkeypatch.setattr(sample_writer, "iter_samples", fake_iter_samples(calls))
    out, ident, cfg = tmp_path / "s.npz", {"model_sha256": "x"}, SampleCfg()
    sample_writer.write_samples(None, out, 4, 0, 2, cfg, ident)

    def killed(n):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sample_writer.write_samples(None, out, 8, 0, 2, cfg, ident, on_progress=killed)
    return out, ident, cfg, calls


def test_a_killed_extension_of_whole_chunks_resumes(tmp_path, monkeypatch):
    """The usual extension, 10K in chunks of 1,000 to 50K, keeps every sample of the file: the file then holds exactly
    the samples the extension takes, and a rerun after a kill must resume it, not refuse the file as too short."""
    from ahpa import sample_writer

    out, ident, cfg, calls = killed_extension(tmp_path, monkeypatch)
    calls[:] = []
    assert sample_writer.write_samples(None, out, 8, 0, 2, cfg, ident) == out
    assert calls == [(6, 8)]
    with np.load(out) as f:
        assert np.array_equal(f["arr_0"][:, 0, 0, 0], np.arange(8)) and np.array_equal(f["arr_1"], np.arange(8))


def test_a_file_replaced_by_a_shorter_one_under_its_record_is_not_extended(tmp_path, monkeypatch):
    """A partial extension takes the first samples of OUT at the end: an OUT that now holds fewer (another file put
    in its place, its record kept) is named before anything is sampled, rather than a file short of samples."""
    from ahpa import sample_writer

    out, ident, cfg, calls = killed_extension(tmp_path, monkeypatch)
    sample_writer.write_samples(None, tmp_path / "short.npz", 2, 0, 2, cfg, ident)
    (tmp_path / "short.npz").replace(out)
    calls[:] = []
    with pytest.raises(FileNotFoundError, match=rf"past its first 4 samples, but {out} holds 2 samples now"):
        sample_writer.write_samples(None, out, 8, 0, 2, cfg, ident)
    assert calls == []


def test_a_record_without_a_valid_num_or_chunk_size_is_refused_by_name(tmp_path, monkeypatch):
    """An extension continues the file's chunks, and compares its num: a record edited or written by hand without
    them (no num, or no chunk size, or 0) is refused naming the field, not a TypeError or ZeroDivisionError."""
    from ahpa import sample_writer

    calls = []
    monkeypatch.setattr(sample_writer, "iter_samples", fake_iter_samples(calls))
    out, ident = tmp_path / "s.npz", {"model_sha256": "x"}
    sample_writer.write_samples(None, out, 4, 0, 2, SampleCfg(), ident)
    record = sample_writer.record_path(out)
    saved, before = json.loads(record.read_text()), out.read_bytes()
    cases = [({k: v for k, v in saved.items() if k != "num"}, r"finished with other settings \(num: the file has None"),
             ({k: v for k, v in saved.items() if k != "batch"}, r"records no valid chunk size \(batch: None in s\.npz\.json\)"),
             ({**saved, "batch": 0}, r"records no valid chunk size \(batch: 0 in s\.npz\.json\)")]
    calls[:] = []
    for edited, message in cases:
        record.write_text(json.dumps(edited))
        with pytest.raises(sample_writer.SampleSettingsError, match=message):
            sample_writer.write_samples(None, out, 6, 0, 2, SampleCfg(), ident)
    assert calls == [] and out.read_bytes() == before


def test_a_file_removed_before_its_extension_takes_the_lock_is_named_before_sampling(tmp_path, monkeypatch):
    """The extension saw the finished file, then another launch or a person removed it before the lock was taken: it
    says so at once, instead of sampling every new chunk and failing at the end for want of the file's first ones."""
    from ahpa import lock, sample_writer

    calls = []
    monkeypatch.setattr(sample_writer, "iter_samples", fake_iter_samples(calls))
    out, ident = tmp_path / "s.npz", {"model_sha256": "x"}
    sample_writer.write_samples(None, out, 4, 0, 2, SampleCfg(), ident)
    hold = lock.hold

    def removed_meanwhile(path, what):
        out.unlink(missing_ok=True)
        return hold(path, what)

    monkeypatch.setattr(lock, "hold", removed_meanwhile)
    calls[:] = []
    with pytest.raises(FileNotFoundError, match="was removed meanwhile; rerun to sample it"):
        sample_writer.write_samples(None, out, 8, 0, 2, SampleCfg(), ident)
    assert calls == [] and not (tmp_path / "s.npz.parts" / "settings.json").exists()


def test_parts_left_beside_a_finished_file_do_not_block_its_extension(tmp_path, monkeypatch):
    """Parts a finished run left behind (killed while it removed them) used to refuse a larger --num with 'finished by
    another launch meanwhile', which no launch had done, on every rerun: they are the file's, and go as they do for a
    rerun with the file's num."""
    from ahpa import sample_writer

    calls = []
    monkeypatch.setattr(sample_writer, "iter_samples", fake_iter_samples(calls))
    out, parts, ident = tmp_path / "s.npz", tmp_path / "s.npz.parts", {"model_sha256": "x"}
    sample_writer.write_samples(None, out, 4, 0, 2, SampleCfg(), ident)
    record = json.loads(sample_writer.record_path(out).read_text())
    parts.mkdir()
    (parts / "settings.json").write_text(json.dumps({**record, "extends": None}))
    calls[:] = []
    assert sample_writer.write_samples(None, out, 6, 0, 2, SampleCfg(), ident) == out
    assert calls == [(4, 6)] and not parts.exists()
    with np.load(out) as f:
        assert np.array_equal(f["arr_1"], np.arange(6))


def test_an_extension_of_whole_chunks_says_so_and_its_bar_starts_at_the_samples_kept(run_dir, tmp_path, capsys):
    """4 samples in chunks of 2, then 6: every sample is kept, and the line says nothing of a short chunk sampled
    again; the bar counts the kept samples from the start, so that it ends at 6 of 6."""
    args = ["sample", "--run", str(run_dir), "--steps", "1", "--micro-batch", "2", "--batch", "2"]
    out = tmp_path / "s.npz"
    assert main([*args, "--num", "4", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main([*args, "--num", "6", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"extending {out} from 4 to 6 samples: its first 4 are kept, the rest sampled in chunks of 2\n" in err
    assert "sampled again" not in err
    assert "| 4/6 [" in err and "| 6/6 [" in err and "| 0/6 [" not in err


def test_an_extension_that_keeps_nothing_says_so_in_plain_words(run_dir, tmp_path, capsys):
    """A file of one short chunk (8 samples of the default chunks of 64) keeps none of them: the line said 'its first
    0 are kept, ...; its last 8 (a short chunk) are sampled again'; it now says none is kept, and why. A single
    sample sampled again is 'is', not 'are'."""
    args = ["sample", "--run", str(run_dir), "--steps", "1", "--micro-batch", "2"]
    out = tmp_path / "s.npz"
    assert main([*args, "--num", "3", "--batch", "4", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main([*args, "--num", "6", "--batch", "4", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert (f"extending {out} from 3 to 6 samples: none of its 3 is kept (one short chunk, sampled again as part of a "
            "full chunk, as a fresh run samples them); all sampled in chunks of 4\n") in err
    assert "first 0" not in err
    small = tmp_path / "small.npz"
    assert main([*args, "--num", "5", "--batch", "4", "--out", str(small)]) == 0
    capsys.readouterr()
    assert main([*args, "--num", "8", "--batch", "4", "--out", str(small)]) == 0
    assert "its last 1 (a short chunk) is sampled again" in capsys.readouterr().err
