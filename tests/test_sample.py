import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from ahpa.cli import main
from ahpa.config import SampleCfg
from ahpa.sample import iter_samples, load_export, write_npz
from ahpa.train.loop import Trainer
from tests.conftest import hold_lock


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from ahpa import config
    from tests.conftest import TINY

    run = tmp_path_factory.mktemp("sample") / "run"
    Trainer(config.load(None, [*TINY, "train.steps=2"]), run).run()
    return run


def collect(bundle, n, batch, cfg, seed=0):
    parts = [(imgs.numpy(), ys.numpy()) for _, imgs, ys in iter_samples(bundle, 0, n, seed, batch, cfg)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def fake_iter_samples(calls):
    """An iter_samples whose sample i is an image filled with i (its label i): cheap and checkable."""

    def fake_iter(bundle, lo, hi, seed, n, cfg, labels=None):
        calls.append((lo, hi))
        idx = np.arange(lo, hi)
        images = np.broadcast_to((idx % 256).astype(np.uint8)[:, None, None, None], (hi - lo, 2, 2, 3)).copy()
        yield lo, torch.from_numpy(images), torch.from_numpy(idx) if labels is None else labels[lo:hi]

    return fake_iter


@pytest.mark.parametrize("solver", ["euler", "heun", "euler-maruyama"])
def test_samples_do_not_depend_on_batch_size(run_dir, solver):
    bundle = load_export(run_dir / "model.safetensors", torch.device("cpu"))
    cfg = SampleCfg(solver=solver, steps=4, cfg_scale=1.5, micro_batch=8)
    a, la = collect(bundle, 13, 7, cfg)
    b, lb = collect(bundle, 13, 16, cfg)
    assert a.dtype == np.uint8 and a.shape == (13, 16, 16, 3)
    # the same noise and labels per index; the images bitwise equal where the kernels do not depend on the batch
    # size (torch 2.13, CPU), else within their rounding (torch 2.4.1: one pixel of 9,984 off by one level)
    diff = np.abs(a.astype(int) - b.astype(int))
    assert np.array_equal(la, lb) and diff.max() <= 1 and (diff > 0).mean() < 1e-3
    assert np.array_equal(la, np.arange(13) % bundle.num_classes)  # class-balanced labels
    c, _ = collect(bundle, 13, 16, cfg, seed=1)
    assert not np.array_equal(a, c)


def test_generate_takes_labels_as_a_list_and_names_wrong_ones(run_dir):
    """Labels as a list or an array sample as a tensor does; one label too few or a class the model lacks is named
    (an IndexError from the embedding, or a size mismatch of 16 against 14, before); the null class samples without
    a class."""
    from ahpa.sample import generate

    bundle = load_export(run_dir / "model.safetensors", "cpu")
    cfg = SampleCfg(steps=2, micro_batch=4)
    k = bundle.num_classes
    assert torch.equal(generate(bundle, [0, 1], [0, k - 1], 0, cfg), generate(bundle, [0, 1], torch.tensor([0, k - 1]), 0, cfg))
    generate(bundle, [0], [k], 0, cfg)  # the null class
    with pytest.raises(ValueError, match="3 sample indices but 1 labels"):
        generate(bundle, [0, 1, 2], [0], 0, cfg)
    with pytest.raises(ValueError, match=rf"labels 0..{k + 1} lie outside this model's classes 0..{k - 1}"):
        generate(bundle, [0, 1], [0, k + 1], 0, cfg)


def test_generate_draws_a_samples_noise_by_its_index_whatever_its_type(run_dir):
    """Sample indices and a seed given as a tensor or numpy's ints (torch.arange(8), list(np.arange(8))) drew other
    noise than the same ints do, and than `ahpa sample` draws: the seed was hashed from their repr(). Indices that
    are not a list of integers are refused, and so are labels left out."""
    from ahpa.sample import generate

    bundle = load_export(run_dir / "model.safetensors", "cpu")
    cfg = SampleCfg(steps=2, micro_batch=4)
    want = generate(bundle, [0, 1, 2], [0, 1, 2], 0, cfg)
    for indices in (torch.arange(3), np.arange(3), list(np.arange(3)), range(3)):
        assert torch.equal(generate(bundle, indices, [0, 1, 2], np.int64(0), cfg), want), type(indices)
    assert torch.equal(generate(bundle, [1], [1], torch.tensor(0), cfg), want[1:2])
    for bad in (3, [0.5, 1.0], torch.tensor([[0, 1]]), [True, False]):
        with pytest.raises(ValueError, match="generate: (sample )?indices must be"):
            generate(bundle, bad, [0, 1], 0, cfg)
    with pytest.raises(ValueError, match="generate: seed must be an integer, got float 0.5"):
        generate(bundle, [0], [0], 0.5, cfg)
    with pytest.raises(ValueError, match=f"generate: labels are required.*{bundle.num_classes} .this model's null class"):
        generate(bundle, [0], None, 0, cfg)


@pytest.mark.parametrize("bad, message", [
    (SampleCfg(steps=0), r"generate: sample.steps=0 is out of range; it must be at least 1"),
    (SampleCfg(cfg_scale=float("nan")), r"generate: sample.cfg_scale=nan is out of range"),
    (SampleCfg(micro_batch=0), r"generate: sample.micro_batch=0 is out of range"),
    (SampleCfg(guidance_low=0.8, guidance_high=0.2), r"generate: sample.guidance_low=0.8 exceeds"),
    ({"steps": "four"}, r"generate: sample.steps must be an integer"),
    ("euler", r"generate: expected a SampleCfg \(or a dict of its keys\), got str"),
])
def test_generate_checks_its_settings_as_the_cli_does(run_dir, bad, message):
    """ahpa.generate took settings the CLI refuses and returned decoded noise (steps=0), black images (cfg_scale=nan)
    or a raw range() error (micro_batch=0); the config's own checks now run on its SampleCfg."""
    from ahpa.sample import generate

    bundle = load_export(run_dir / "model.safetensors", "cpu")
    with pytest.raises(ValueError, match=message):
        generate(bundle, [0, 1], [0, 1], 0, bad)


def test_generate_refuses_labels_that_are_not_integers(run_dir):
    """Labels [0.5, 1.7] were cast to classes [0, 1] without a word; a dict of settings samples as its SampleCfg."""
    from ahpa.sample import generate

    bundle = load_export(run_dir / "model.safetensors", "cpu")
    with pytest.raises(ValueError, match="labels must be integer class indices, got torch.float32"):
        generate(bundle, [0, 1], [0.5, 1.7], 0, SampleCfg(steps=1, micro_batch=2))
    with pytest.raises(ValueError, match="labels must be integer class indices, got torch.float64"):
        generate(bundle, [0, 1], np.array([0.0, 1.0]), 0, SampleCfg(steps=1, micro_batch=2))
    assert torch.equal(generate(bundle, [0, 1], np.array([0, 1]), 0, {"steps": 1, "micro_batch": 2}),
                       generate(bundle, [0, 1], [0, 1], 0, SampleCfg(steps=1, micro_batch=2)))

def test_an_export_samples_with_its_runs_sampler_settings_where_options_are_left_out(tmp_path, capsys):
    """`ahpa sample --model` drew with the --help defaults (guidance over [0, 1], 50 steps) where `--run` drew with the
    run's sample section (the ImageNet configs' 0.7 interval): the same model gave other samples. The export records
    its run's solver, steps, cfg-scale and guidance interval, and --model takes them where the command does not
    give them, so both draw the same images; an option given still wins, and an export without them (from before,
    or a conversion) keeps the defaults."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from ahpa import config
    from tests.conftest import TINY

    run = tmp_path / "run"
    Trainer(config.load(None, [*TINY, "train.steps=2", "sample.steps=3", "sample.cfg_scale=2.5",
                               "sample.guidance_high=0.6", "sample.solver=euler"]), run).run()
    model, common = run / "model.safetensors", ["--num", "6", "--batch", "3", "--micro-batch", "8"]
    assert load_export(model, "cpu").sample_settings == {"solver": "euler", "steps": 3, "cfg_scale": 2.5,
                                                         "guidance_low": 0.0, "guidance_high": 0.6}
    assert main(["sample", "--run", str(run), "--out", str(tmp_path / "r.npz"), *common]) == 0
    assert main(["sample", "--model", str(model), "--out", str(tmp_path / "m.npz"), *common]) == 0
    assert main(["sample", "--model", str(model), "--out", str(tmp_path / "g.npz"), *common, "--guidance-high", "1"]) == 0
    with np.load(tmp_path / "r.npz") as r, np.load(tmp_path / "m.npz") as m, np.load(tmp_path / "g.npz") as g:
        assert np.array_equal(r["arr_0"], m["arr_0"]) and not np.array_equal(m["arr_0"], g["arr_0"])
    with safe_open(str(model), framework="pt") as f:  # an export from before the field
        state, meta = {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["ahpa"])
    meta.pop("sample")
    save_file(state, str(tmp_path / "old.safetensors"), metadata={"ahpa": json.dumps(meta), "format": "pt"})
    assert load_export(tmp_path / "old.safetensors", "cpu").sample_settings is None
    capsys.readouterr()
    assert main(["sample", "--model", str(tmp_path / "old.safetensors"), "--out", str(tmp_path / "o.npz"), *common,
                 "--steps", "0"]) == 2  # the defaults' checks as before: the command line's value is refused
    assert "command line" in capsys.readouterr().err


def test_cli_sample_from_run_and_export_agree(run_dir, tmp_path, capsys):
    common = ["--num", "9", "--steps", "3", "--micro-batch", "8", "--batch", "5"]
    assert main(["sample", "--run", str(run_dir), "--out", str(tmp_path / "a.npz"), *common]) == 0
    assert main(["sample", "--model", str(run_dir / "model.safetensors"), "--out", str(tmp_path / "b.npz"), *common]) == 0
    with np.load(tmp_path / "a.npz") as a, np.load(tmp_path / "b.npz") as b:
        assert a["arr_0"].shape == (9, 16, 16, 3) and a["arr_1"].dtype == np.int64
        assert np.array_equal(a["arr_0"], b["arr_0"])
    # a finished file is not written over. The same request (another --batch: the file does not depend on it) is
    # complete and exits 0, as a requeued job or a rerun pipeline step needs; other settings are refused, named
    before = (tmp_path / "a.npz").read_bytes()
    capsys.readouterr()
    for batch in (["--batch", "3"], ["--batch", "5"]):
        assert main(["sample", "--run", str(run_dir), "--out", str(tmp_path / "a.npz"), *common[:-2], *batch]) == 0
        out, err = capsys.readouterr()
        assert "a.npz is already complete: 9 samples with these settings (a.npz.json); nothing to do" in out
        assert "img" not in err  # nothing sampled: no progress bar
    assert main(["sample", "--run", str(run_dir), "--out", str(tmp_path / "a.npz"), *common, "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert "a.npz' is finished with other settings (steps: the file has 3, command gives 2)" in err
    assert "img" not in err  # refused before the model loads: no progress bar began
    # the model's identity, compared once it is loaded: the export's sha256 is not the run's checkpoint's
    assert main(["sample", "--model", str(run_dir / "model.safetensors"), "--out", str(tmp_path / "a.npz"), *common]) == 2
    assert "finished with other settings (model_sha256: the file has None, command gives " in capsys.readouterr().err
    assert (tmp_path / "a.npz").read_bytes() == before
    with np.load(tmp_path / "a.npz") as f:
        assert sorted(f.files) == ["arr_0", "arr_1"]  # the record is beside the file, not in it (ADM's readers)
    # a finished file without a record (written before OUT.json existed, or the record deleted) is not written over
    (tmp_path / "a.npz.json").unlink()
    assert main(["sample", "--run", str(run_dir), "--out", str(tmp_path / "a.npz"), *common]) == 2
    assert "exists without a readable record of its settings (a.npz.json); a finished sample file is not written " \
           "over" in capsys.readouterr().err


def test_sample_from_a_run_takes_its_sampler_settings(run_dir, tmp_path):
    """--run without sampler options samples as the run's config.yaml says (TINY: 4 steps, micro-batch 8), as its
    grids did; --model has no run, so the same file needs the options spelled out."""
    assert main(["sample", "--run", str(run_dir), "--num", "5", "--out", str(tmp_path / "a.npz")]) == 0
    assert main(["sample", "--model", str(run_dir / "model.safetensors"), "--num", "5", "--steps", "4",
                 "--micro-batch", "8", "--out", str(tmp_path / "b.npz")]) == 0
    with np.load(tmp_path / "a.npz") as a, np.load(tmp_path / "b.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"])
    # --compile too: left out, the run's sample.compile holds (a run compiled for speed samples compiled)
    from ahpa.cli import build_parser
    from ahpa.commands.sample import SAMPLER_OPTIONS

    parse = lambda *extra: build_parser().parse_args(["sample", "--run", "r", "--num", "1", "--out", "a.npz", *extra])  # noqa: E731
    assert "compile" in SAMPLER_OPTIONS and parse().compile is None
    assert parse("--compile").compile is True and parse("--no-compile").compile is False


def test_bad_sample_inputs(tmp_path, capsys, run_dir):
    assert main(["sample", "--model", str(tmp_path / "none.safetensors"), "--num", "2", "--out", str(tmp_path / "x.npz")]) == 2
    assert "does not exist" in capsys.readouterr().err
    checkpoint = next((run_dir / "checkpoints").iterdir())
    assert main(["sample", "--model", str(checkpoint), "--num", "2", "--out", str(tmp_path / "x.npz")]) == 2
    assert "not a safetensors file" in (err := capsys.readouterr().err) and "--run RUN_DIR" in err
    assert main(["sample", "--model", str(run_dir), "--num", "2", "--out", str(tmp_path / "x.npz")]) == 2
    assert "is a directory; a run directory is sampled with --run" in capsys.readouterr().err
    assert main(["sample", "--run", str(run_dir), "--num", "2", "--steps", "0", "--out", str(tmp_path / "x.npz")]) == 2
    assert "sample.steps=0 is out of range" in capsys.readouterr().err
    assert main(["sample", "--run", str(run_dir), "--num", "2", "--out", str(tmp_path / "x.png")]) == 2
    assert "must end in .npz" in capsys.readouterr().err
    # an export whose VAE moved: the error names the recorded VAE and the option that names its new place
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(run_dir / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
    meta["ahpa"] = meta["ahpa"].replace('"ahpa-vae:random"', '"ahpa-vae:/moved/vae"')
    save_file(load_file(str(run_dir / "model.safetensors")), str(tmp_path / "moved.safetensors"), metadata=meta)
    args = ["sample", "--model", str(tmp_path / "moved.safetensors"), "--num", "2", "--steps", "2", "--micro-batch", "8"]
    assert main([*args, "--out", str(tmp_path / "y.npz")]) == 2
    assert "'ahpa-vae:/moved/vae', which is not here" in (err := capsys.readouterr().err) and "--encoder" in err
    assert main([*args, "--encoder", "ahpa-vae:random", "--out", str(tmp_path / "y.npz")]) == 0
    assert not (tmp_path / "x.npz").exists()
    with pytest.raises(ValueError, match=r"\.npz"):
        write_npz(tmp_path / "x.png", np.zeros((1, 2, 2, 3), np.uint8), np.zeros(1))
    assert not (tmp_path / "x.npz").exists()


def test_the_sample_file_is_written_a_piece_at_a_time_in_the_adm_layout(tmp_path):
    """50,000 samples at 256 are 9.8 GB: the final file is written from the chunks one at a time (here 16 pieces of
    1 MB with under 3 MB allocated at the peak), and reads back as np.savez's file does."""
    import tracemalloc

    rng = np.random.default_rng(0)
    pieces = [rng.integers(0, 256, (16, 128, 128, 3), dtype=np.uint8) for _ in range(2)]
    labels = np.arange(32 * 8) % 10

    def stream():
        for i in range(16):
            yield pieces[i % 2].copy()  # a fresh megabyte each time, as a chunk read from disk is

    tracemalloc.start()
    write_npz(tmp_path / "s.npz", stream(), labels, (256, 128, 128, 3))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 3 * 2**20, peak
    with np.load(tmp_path / "s.npz") as f:
        assert sorted(f.files) == ["arr_0", "arr_1"] and f["arr_0"].dtype == np.uint8 and f["arr_1"].dtype == np.int64
        assert np.array_equal(f["arr_0"], np.concatenate([pieces[i % 2] for i in range(16)]))
        assert np.array_equal(f["arr_1"], labels)
    with pytest.raises(ValueError, match="255 rows written for an array of 256"):
        write_npz(tmp_path / "t.npz", [pieces[0]] * 15 + [pieces[0][:15]], labels, (256, 128, 128, 3))
    assert not (tmp_path / "t.npz").exists()


def test_compiled_sampling_matches_eager_with_one_graph(run_dir):
    """sample.compile: the same images as eager up to rounding, and one compiled graph for every batch size (each
    network call has the fixed micro-batch's shape), so a 50K run compiles once."""
    from torch._dynamo.utils import counters

    bundle = load_export(run_dir / "model.safetensors", torch.device("cpu"))
    eager = SampleCfg(solver="heun", steps=3, cfg_scale=1.5, micro_batch=8)
    compiled = SampleCfg(solver="heun", steps=3, cfg_scale=1.5, micro_batch=8, compile=True)
    torch._dynamo.reset()
    counters.clear()
    a, la = collect(bundle, 11, 11, eager)
    b, lb = collect(bundle, 11, 5, compiled)  # batches of 5, 5 and 1
    diff = np.abs(a.astype(int) - b.astype(int))
    assert np.array_equal(la, lb) and diff.max() <= 2 and (diff > 0).mean() < 0.02
    assert counters["stats"]["unique_graphs"] == 1
    assert bundle.compiled is not None and bundle.network(True) is bundle.compiled


def test_a_partial_run_from_before_a_new_sampler_setting_resumes_with_its_default(run_dir, tmp_path):
    """settings.json of a partial run written before `compile` existed lacks the key: it ran eager (the default), so
    an eager command resumes it and a compiled one is refused, naming the setting."""
    import json

    from ahpa.sample_writer import SampleSettingsError, write_samples

    bundle = load_export(run_dir / "model.safetensors", torch.device("cpu"))
    cfg = SampleCfg(steps=2, micro_batch=4)
    out = tmp_path / "s.npz"
    parts = out.with_name(out.name + ".parts")
    parts.mkdir()
    settings = {"num": 6, "seed": 0, "batch": 3, **vars(cfg), "model": "m"}
    for k in ("compile", "grid_images"):
        settings.pop(k)
    (parts / "settings.json").write_text(json.dumps(settings))
    with pytest.raises(SampleSettingsError, match="compile: partial has False, command gives True"):
        write_samples(bundle, out, 6, 0, 3, SampleCfg(steps=2, micro_batch=4, compile=True), {"model": "m"})
    assert write_samples(bundle, out, 6, 0, 3, cfg, {"model": "m"}) == out and out.exists()


def test_a_run_samples_and_exports_with_its_directory_and_vae_alone(tmp_path, capsys):
    """Sampling or exporting a run reads its checkpoint's EMA, not its training: its data may be gone (a cache
    deleted, the run copied to another machine). A VAE no longer where config.yaml says is named with --encoder,
    and must have the run's weights."""
    from ahpa import config
    from ahpa.data.procedural import make_shapes
    from ahpa.priors.kl_vae import KLVAE
    from tests.conftest import TINY

    images, labels = make_shapes(32, 16, seed=0)
    np.savez(tmp_path / "set.npz", images=images, labels=labels)
    KLVAE.random().save(tmp_path / "vae")
    run = tmp_path / "run"
    Trainer(config.load(None, [*TINY, "data.source=npz", f"data.path={tmp_path / 'set.npz'}",
                               f"prior.encoder=ahpa-vae:{tmp_path / 'vae'}", "train.steps=2"]), run).run()
    (tmp_path / "set.npz").unlink()
    (tmp_path / "vae").rename(tmp_path / "vae-here")
    KLVAE.random(seed=1).save(tmp_path / "other-vae")
    args = ["sample", "--run", str(run), "--num", "3", "--steps", "2", "--micro-batch", "8"]
    assert main([*args, "--out", str(tmp_path / "a.npz")]) == 2
    assert "which is not here" in (err := capsys.readouterr().err) and "--encoder" in err
    assert main([*args, "--encoder", f"ahpa-vae:{tmp_path / 'other-vae'}", "--out", str(tmp_path / "a.npz")]) == 2
    assert "is not the VAE" in capsys.readouterr().err
    assert main([*args, "--encoder", f"ahpa-vae:{tmp_path / 'vae-here'}", "--out", str(tmp_path / "a.npz")]) == 0
    assert main(["export", "--run", str(run), "--encoder", f"ahpa-vae:{tmp_path / 'vae-here'}",
                 "--out", str(tmp_path / "m.safetensors")]) == 0
    assert main(["sample", "--model", str(tmp_path / "m.safetensors"), *args[3:], "--out", str(tmp_path / "b.npz")]) == 0
    with np.load(tmp_path / "a.npz") as a, np.load(tmp_path / "b.npz") as b:
        assert a["arr_0"].shape == (3, 16, 16, 3) and np.array_equal(a["arr_0"], b["arr_0"])


def test_a_resume_with_another_batch_keeps_the_partial_runs_chunks(tmp_path, monkeypatch):
    """The chunks already written set the chunk size; a rerun with another --batch must reuse them, not
    regenerate from sample 0 (the module promises a killed job loses at most one batch)."""
    import numpy as np

    from ahpa import sample_writer
    from ahpa.config import SampleCfg

    calls = []
    fake_iter = fake_iter_samples(calls)
    monkeypatch.setattr(sample_writer, "iter_samples", fake_iter)
    out, ident = tmp_path / "s.npz", {"model_sha256": "x"}

    def killed_after_first_chunk(n):
        raise KeyboardInterrupt

    resumed = []
    with pytest.raises(KeyboardInterrupt):
        sample_writer.write_samples(None, out, 10, 0, 4, SampleCfg(), ident, on_progress=killed_after_first_chunk,
                                    on_resume=lambda *a: resumed.append(a))
    assert calls == [(0, 4)] and resumed == []  # a first start resumes nothing, and says nothing of it
    calls.clear()
    sample_writer.write_samples(None, out, 10, 0, 8, SampleCfg(), ident,  # rerun with another --batch
                                on_resume=lambda *a: resumed.append(a))
    assert calls == [(4, 8), (8, 10)]  # chunk 0 reused, chunks of the partial run's size 4
    assert resumed == [(4, 4)]  # 4 images there, chunks of 4
    # stopped after its last chunk, a short one, before the file was put together: all of them are there
    out, resumed = tmp_path / "t.npz", []
    with pytest.raises(KeyboardInterrupt):
        sample_writer.write_samples(None, out, 10, 0, 4, SampleCfg(), ident,
                                    on_progress=lambda n: calls[-1] == (8, 10) and killed_after_first_chunk(n))
    calls.clear()
    sample_writer.write_samples(None, out, 10, 0, 4, SampleCfg(), ident, on_resume=lambda *a: resumed.append(a))
    assert calls == [] and resumed == [(10, 4)]
    with np.load(out) as f:
        assert np.array_equal(f["arr_1"], np.arange(10)) and np.array_equal(f["arr_0"][:, 0, 0, 0], np.arange(10))
    # killed before its first chunk: a rerun with another --batch still hears that the first attempt's size is kept
    out, resumed = tmp_path / "u.npz", []

    def fails(*args):
        raise RuntimeError("out of memory")
        yield

    monkeypatch.setattr(sample_writer, "iter_samples", fails)
    with pytest.raises(RuntimeError):
        sample_writer.write_samples(None, out, 10, 0, 4, SampleCfg(), ident)
    probe = [sys.executable, "-c", "import sys; from pathlib import Path; from ahpa import lock; lock.hold(Path(sys.argv[1]), 'x')",
             str(tmp_path / "u.npz.parts" / ".lock")]
    assert subprocess.run(probe, capture_output=True, timeout=120).returncode == 0  # the error gave the output back
    monkeypatch.setattr(sample_writer, "iter_samples", fake_iter)
    sample_writer.write_samples(None, out, 10, 0, 8, SampleCfg(), ident, on_resume=lambda *a: resumed.append(a))
    assert resumed == [(0, 4)]


def test_a_sample_file_finished_by_the_launch_that_held_it_is_not_written_over(tmp_path, monkeypatch):
    """Two launches on one --out: the second checks that the file is not finished, then takes the lock the first
    gave back when it finished the file. It is refused, and the finished file is untouched."""
    from ahpa import lock, sample_writer
    from ahpa.config import SampleCfg

    calls = []
    monkeypatch.setattr(sample_writer, "iter_samples", lambda *a: calls.append(a) or iter(()))
    out = tmp_path / "s.npz"
    hold = lock.hold

    def the_other_launch_finishes_first(path, what):
        out.write_bytes(b"the other launch's samples")
        return hold(path, what)

    monkeypatch.setattr(lock, "hold", the_other_launch_finishes_first)
    with pytest.raises(FileExistsError, match="was finished by another launch meanwhile"):
        sample_writer.write_samples(None, out, 4, 0, 2, SampleCfg(), {"model_sha256": "x"})
    assert calls == [] and out.read_bytes() == b"the other launch's samples"
    lock.release(tmp_path / "s.npz.parts" / lock.LOCK_FILE)


def test_a_sample_output_whose_parts_cannot_be_made_is_named_with_the_fix(tmp_path, monkeypatch):
    """The main process cannot make OUT.parts (here: a file where a folder is named): the error every process raises
    names the parts folder and says to choose another --out, and nothing is generated."""
    from ahpa import sample_writer
    from ahpa.config import SampleCfg

    calls = []
    monkeypatch.setattr(sample_writer, "iter_samples", lambda *a: calls.append(a) or iter(()))
    (tmp_path / "a-file").write_text("")
    out = tmp_path / "a-file" / "s.npz"
    with pytest.raises(OSError, match=r"cannot write the sample output's parts '.*a-file/s\.npz\.parts' \(.*\); choose "
                                      "another --out"):
        sample_writer.write_samples(None, out, 4, 0, 2, SampleCfg(), {"model_sha256": "x"})
    assert calls == []


def test_write_samples_never_writes_over_a_finished_file(tmp_path, monkeypatch):
    """write_samples itself (the library path, every process before any collective) refuses a finished sample
    file. Nothing is generated and the file is untouched."""
    from ahpa import sample_writer
    from ahpa.config import SampleCfg

    calls = []
    monkeypatch.setattr(sample_writer, "iter_samples", lambda *a: calls.append(a) or iter(()))
    out = tmp_path / "done.npz"
    out.write_bytes(b"50K samples of another model")
    with pytest.raises(FileExistsError, match="a finished sample file is not written over"):
        sample_writer.write_samples(None, out, 4, 0, 2, SampleCfg(), {"model_sha256": "x"})
    assert calls == [] and out.read_bytes() == b"50K samples of another model"
    assert not (tmp_path / "done.npz.parts").exists()


def test_an_export_refuses_a_vae_of_other_latent_channels(run_dir):
    """`ahpa sample --encoder` naming a VAE whose latents have other channels ended in a convolution's raw error after
    sampling had started; it is refused when the export loads, naming both."""
    from ahpa.priors.diffusers_vae import DiffusersVAE

    wide = DiffusersVAE.from_config({"block_out_channels": [32, 64], "down_block_types": ["DownEncoderBlock2D"] * 2,
                                     "up_block_types": ["UpDecoderBlock2D"] * 2, "layers_per_block": 1,
                                     "norm_num_groups": 8, "latent_channels": 8})
    channels = load_export(run_dir / "model.safetensors", "cpu").model.cfg.in_channels
    with pytest.raises(ValueError, match=rf"has latents of 8 channels, but .* was trained on latents of {channels}"):
        load_export(run_dir / "model.safetensors", "cpu", encoder=wide)


def test_a_chunk_size_below_1_is_refused_before_the_parts_are_made(run_dir, tmp_path, monkeypatch, capsys):
    """--batch 0 or -3 left OUT.parts/settings.json with that chunk size, which every corrected rerun kept and
    failed on. It is refused before anything is written; write_samples refuses it too, and a partial attempt that
    saved one (before the check) is resumed with the command's chunk size instead."""
    import json

    from ahpa import sample_writer

    for bad in ("0", "-3"):
        out = tmp_path / f"b{bad}.npz"
        assert main(["sample", "--run", str(run_dir), "--num", "2", "--out", str(out), "--batch", bad]) == 2
        assert "--batch must be positive" in capsys.readouterr().err
        assert not out.with_name(out.name + ".parts").exists()
    calls = []
    monkeypatch.setattr(sample_writer, "iter_samples", fake_iter_samples(calls))
    with pytest.raises(ValueError, match="batch .* must be a positive integer, got 0"):
        sample_writer.write_samples(None, tmp_path / "w.npz", 2, 0, 0, SampleCfg(), {"model_sha256": "x"})
    out = tmp_path / "old.npz"
    parts = out.with_name(out.name + ".parts")
    parts.mkdir()
    (parts / "settings.json").write_text(json.dumps({"num": 5, "seed": 0, "batch": 0, **vars(SampleCfg()),
                                                     "model_sha256": "x"}))
    resumed = []
    assert sample_writer.write_samples(None, out, 5, 0, 2, SampleCfg(), {"model_sha256": "x"},
                                       on_resume=lambda *a: resumed.append(a)) == out
    assert calls == [(0, 2), (2, 4), (4, 5)] and resumed == [(0, 2)]
    with np.load(out) as f:
        assert np.array_equal(f["arr_1"], np.arange(5))


def test_guidance_is_refused_on_an_empty_interval_and_the_summary_names_the_interval(run_dir, tmp_path, capsys):
    """--guidance-low 0.8 --guidance-high 0.2 sampled unguided while the summary said cfg-scale 2; it is refused,
    naming both, and a guided file's summary names the interval it was guided on."""
    args = ["sample", "--run", str(run_dir), "--num", "1", "--steps", "1", "--micro-batch", "2", "--cfg-scale", "2"]
    assert main([*args, "--guidance-low", "0.8", "--guidance-high", "0.2", "--out", str(tmp_path / "a.npz")]) == 2
    assert "sample.guidance_low=0.8 exceeds sample.guidance_high=0.2" in capsys.readouterr().err
    assert not (tmp_path / "a.npz.parts").exists()
    assert main([*args, "--guidance-high", "0.7", "--out", str(tmp_path / "b.npz")]) == 0
    assert "(euler, 1 steps, cfg-scale 2.0 for t in [0.0, 0.7])" in capsys.readouterr().out


def test_sample_refusals_read_once_and_draw_no_bar(run_dir, tmp_path, capsys):
    """A range error was prefixed twice ('ahpa sample: error: ahpa sample: ...'); a resume refused for other settings
    first drew an empty progress bar; --run naming a file said it 'does not exist; it is a file'."""
    import json

    args = ["sample", "--run", str(run_dir), "--num", "2", "--micro-batch", "2"]
    assert main([*args, "--steps", "0", "--out", str(tmp_path / "a.npz")]) == 2
    err = capsys.readouterr().err
    assert "ahpa sample: error: command line: sample.steps=0 is out of range" in err and err.count("ahpa sample") == 1
    parts = tmp_path / "b.npz.parts"
    parts.mkdir()
    (parts / "settings.json").write_text(json.dumps({"num": 2, "seed": 0, "batch": 64, "steps": 7}))
    assert main([*args, "--steps", "1", "--out", str(tmp_path / "b.npz")]) == 2
    err = capsys.readouterr().err
    assert "holds a partial sampling run with other settings (steps: partial has 7, command gives 1" in err
    assert "0%" not in err and "img" not in err
    assert main(["sample", "--run", str(run_dir / "model.safetensors"), "--num", "2", "--out", str(tmp_path / "c.npz")]) == 2
    assert "is a file, not a run directory: an export is sampled with --model" in capsys.readouterr().err


def test_write_samples_returns_a_file_finished_with_the_same_settings(tmp_path, monkeypatch):
    """A finished file keeps its settings in OUT.json; write_samples called again with them (another chunk size
    too) generates nothing and returns the file; other settings are refused, naming each difference."""
    from ahpa import sample_writer

    calls = []
    monkeypatch.setattr(sample_writer, "iter_samples", fake_iter_samples(calls))
    out, ident = tmp_path / "s.npz", {"model_sha256": "x"}
    assert sample_writer.write_samples(None, out, 5, 0, 2, SampleCfg(), ident) == out
    before, calls[:] = out.read_bytes(), []
    assert sample_writer.record_path(out) == tmp_path / "s.npz.json"
    assert sample_writer.write_samples(None, out, 5, 0, 4, SampleCfg(), ident,
                                       on_start=lambda: calls.append("started")) == out
    assert calls == [] and out.read_bytes() == before and not (tmp_path / "s.npz.parts").exists()
    with pytest.raises(sample_writer.SampleSettingsError, match=r"is finished with other settings \(num: the file has "
                                                                r"5, command gives 6; model_sha256: the file has 'x', command gives 'y'\)"):
        sample_writer.write_samples(None, out, 6, 0, 2, SampleCfg(), {"model_sha256": "y"})
    assert calls == [] and out.read_bytes() == before


def test_sample_takes_the_classes_to_sample_and_a_resume_keeps_them(run_dir, tmp_path, capsys):
    """--seed's help said it seeds the labels (they are i mod C); --class K (repeated or a comma list) samples those
    classes round-robin, records them in arr_1, and is part of the file's identity."""
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    assert "sample i has class i mod C" in " ".join(capsys.readouterr().out.split())
    args = ["sample", "--run", str(run_dir), "--num", "5", "--steps", "1", "--micro-batch", "2", "--batch", "2"]
    out = str(tmp_path / "c.npz")
    assert main([*args, "--class", "3", "--class", "1,2", "--out", out]) == 0
    # the summary says which, with the names the data gave them (the procedural shapes')
    assert re.search(r", classes 3 \('[a-z ]+'\), 1 \('[a-z ]+'\), 2 \('[a-z ]+'\)\)$", capsys.readouterr().out.rstrip())
    with np.load(out) as f:
        assert f["arr_1"].tolist() == [3, 1, 2, 3, 1]
        images = f["arr_0"]
    assert main([*args, "--out", str(tmp_path / "all.npz")]) == 0
    with np.load(tmp_path / "all.npz") as f:  # sample 3 has class 3 both ways: the same noise, the same image
        assert f["arr_1"].tolist() == [0, 1, 2, 3, 4] and np.array_equal(f["arr_0"][3], images[3])
    capsys.readouterr()
    assert main([*args, "--class", "3,1,2", "--out", out]) == 0  # the same classes in the same order
    assert "already complete" in capsys.readouterr().out
    assert main([*args, "--class", "1", "--out", out]) == 2
    assert "classes: the file has [3, 1, 2], command gives [1]" in capsys.readouterr().err
    assert main([*args, "--out", out]) == 2
    assert "classes: the file has [3, 1, 2], command gives every class" in capsys.readouterr().err
    assert main([*args, "--class", "99", "--out", str(tmp_path / "d.npz")]) == 2
    assert f"--class 99: run {run_dir} has classes 0..7" in capsys.readouterr().err
    assert main([*args, "--class", "x", "--out", str(tmp_path / "d.npz")]) == 2
    assert f"--class 'x' is no class of run {run_dir}; its classes: warm disc, warm square," in capsys.readouterr().err


def test_sample_takes_classes_by_the_names_the_training_data_gave_them(run_dir, tmp_path, capsys):
    """A class folder's name (here the procedural shapes' names) is a --class value, from a run and from its export
    (the run's model.safetensors or `ahpa export`'s), which records the names; the file is the one the indices make (its record holds indices). A misspelt name gets a
    near spelling; a model whose data named no classes says to give indices."""
    from ahpa.sample import export_metadata

    args = ["sample", "--num", "4", "--steps", "1", "--micro-batch", "2", "--batch", "2"]
    out = str(tmp_path / "named.npz")
    assert main([*args, "--run", str(run_dir), "--class", "cool ring,warm disc", "--out", out]) == 0
    with np.load(out) as f:
        assert f["arr_1"].tolist() == [6, 0, 6, 0]
    capsys.readouterr()
    assert main([*args, "--run", str(run_dir), "--class", "6", "--class", "0", "--out", out]) == 0
    assert "already complete" in capsys.readouterr().out
    model = run_dir / "model.safetensors"
    assert export_metadata(model)["class_names"][6] == "cool ring"
    # `ahpa export` records them as the run's own model.safetensors does (it wrote none: its exports took indices only)
    exported = tmp_path / "exported.safetensors"
    assert main(["export", "--run", str(run_dir), "--out", str(exported)]) == 0
    assert export_metadata(exported)["class_names"] == export_metadata(model)["class_names"]
    assert main([*args, "--model", str(model), "--class", "cool rnig", "--out", str(tmp_path / "m.npz")]) == 2
    assert "--class 'cool rnig' is no class of model" in (err := capsys.readouterr().err) and "did you mean 'cool ring'" in err
    assert main([*args, "--model", str(model), "--class", "cool plus", "--out", str(tmp_path / "m.npz")]) == 0
    with np.load(tmp_path / "m.npz") as f:
        assert f["arr_1"].tolist() == [7, 7, 7, 7]
    # an export without names (made before they were recorded, or of unnamed data)
    from safetensors import safe_open
    from safetensors.torch import save_file
    import json

    with safe_open(str(model), framework="pt") as f:
        state, meta = {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["ahpa"])
    meta.pop("class_names")
    save_file(state, str(tmp_path / "old.safetensors"), metadata={"ahpa": json.dumps(meta), "format": "pt"})
    assert main([*args, "--model", str(tmp_path / "old.safetensors"), "--class", "cool plus", "--out", str(tmp_path / "o.npz")]) == 2
    assert "records no class names" in capsys.readouterr().err


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGHUP"])
def test_a_scheduler_signal_stops_sampling_as_ctrl_c_does(run_dir, tmp_path, monkeypatch, capsys, signum):
    """SIGTERM (a scheduler's preemption) and SIGHUP ended `ahpa sample` mid progress bar without a word; they now
    say what Ctrl-C says, exit 128 + the signal, keep the chunks written, and the handlers are given back."""
    import os
    import signal

    from ahpa import sample_writer

    sig = getattr(signal, signum)
    before = signal.getsignal(sig)
    real = sample_writer.iter_samples

    def signalled_after_first_chunk(bundle, lo, *a):
        if lo > 0:
            os.kill(os.getpid(), sig)
        yield from real(bundle, lo, *a)

    monkeypatch.setattr(sample_writer, "iter_samples", signalled_after_first_chunk)
    out = tmp_path / "s.npz"
    args = ["sample", "--run", str(run_dir), "--num", "4", "--steps", "1", "--micro-batch", "2", "--batch", "2"]
    assert main([*args, "--out", str(out)]) == 128 + sig
    assert "interrupted; rerun the same command to resume" in capsys.readouterr().err
    assert signal.getsignal(sig) is before and not out.exists()
    assert sorted(p.name for p in (tmp_path / "s.npz.parts").glob("chunk_*")) == ["chunk_0000000000.npz"]
    monkeypatch.setattr(sample_writer, "iter_samples", real)
    assert main([*args, "--out", str(out)]) == 0
    assert "resuming" in capsys.readouterr().err and out.exists()


def test_a_resumed_bar_starts_at_the_samples_there_and_counts_only_those_sampled(run_dir, tmp_path, monkeypatch,
                                                                                capsys):
    """Resumed, the bar counted the chunks found in OUT.parts as sampled in its first second: a 2-process walkthrough
    showed 3,283 img/s where it sampled 180 (3,900 of 6,000 there). It now starts at them, as an extension's bar starts
    at the samples kept, so that tqdm's rate counts what this launch samples."""
    from ahpa import sample_writer

    real_iter, real_write = sample_writer.iter_samples, sample_writer.write_samples

    def killed_after_first_chunk(bundle, lo, *a):
        if lo > 0:
            raise KeyboardInterrupt
        yield from real_iter(bundle, lo, *a)

    progress = []

    def write_samples(*a, on_progress, **k):
        return real_write(*a, on_progress=lambda n: (progress.append(n), on_progress(n)), **k)

    monkeypatch.setattr(sample_writer, "iter_samples", killed_after_first_chunk)
    out = tmp_path / "s.npz"
    args = ["sample", "--run", str(run_dir), "--num", "6", "--steps", "1", "--micro-batch", "2", "--batch", "2",
            "--out", str(out)]
    assert main(args) == 130
    capsys.readouterr()
    monkeypatch.setattr(sample_writer, "iter_samples", real_iter)
    monkeypatch.setattr(sample_writer, "write_samples", write_samples)
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "resuming" in err and progress == [2, 2]  # the chunks [2, 4) and [4, 6); [0, 2) was there
    assert "| 2/6 [" in err and "| 6/6 [" in err and "| 0/6 [" not in err


def test_guidance_warns_on_a_model_without_a_trained_null_class(run_dir, tmp_path, capsys):
    """--cfg-scale on a model trained with train.label_dropout=0 (its null class never trained) or with a single class
    was silently accepted. The run's config says so with --run; an export records label_dropout and is warned about
    when written and when guided. An export from before the field (none recorded) gets no warning."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from ahpa import config
    from ahpa.sample import unguidable
    from tests.conftest import TINY

    nodrop = tmp_path / "nodrop"
    Trainer(config.load(None, [*TINY, "train.steps=1", "train.label_dropout=0"]), nodrop).run()
    args = ["--num", "1", "--steps", "1", "--micro-batch", "2"]
    assert main(["sample", "--run", str(nodrop), *args, "--cfg-scale", "2", "--out", str(tmp_path / "a.npz")]) == 0
    assert "ahpa sample: warning: cfg-scale 2.0: the model was trained with train.label_dropout=0" in capsys.readouterr().err
    assert main(["sample", "--run", str(nodrop), *args, "--out", str(tmp_path / "b.npz")]) == 0  # no guidance
    assert "warning" not in capsys.readouterr().err
    export = tmp_path / "nodrop.safetensors"
    assert main(["export", "--run", str(nodrop), "--out", str(export)]) == 0
    assert "ahpa export: warning: the model was trained with train.label_dropout=0" in capsys.readouterr().err
    assert load_export(export, "cpu").label_dropout == 0
    assert main(["sample", "--model", str(export), *args, "--cfg-scale", "2", "--out", str(tmp_path / "c.npz")]) == 0
    assert "label_dropout=0" in capsys.readouterr().err
    with safe_open(str(export), framework="pt") as f:
        meta = f.metadata()
    old = json.loads(meta["ahpa"])
    del old["label_dropout"]
    save_file(load_file(str(export)), str(tmp_path / "old.safetensors"), metadata={**meta, "ahpa": json.dumps(old)})
    assert main(["sample", "--model", str(tmp_path / "old.safetensors"), *args, "--cfg-scale", "2",
                 "--out", str(tmp_path / "d.npz")]) == 0
    assert "warning" not in capsys.readouterr().err
    # the run's own export (trained with label dropout) records it and samples guided without a word
    assert load_export(run_dir / "model.safetensors", "cpu").label_dropout == config.TrainCfg().label_dropout
    # one class: both branches learn the same images (guidance does not rescale the velocity, as this said before)
    assert unguidable(1, 0.1).startswith("the model has a single class (its data had no labels): the class and the "
                                         "null class learn the same images")
    assert unguidable(10, 0.1) is None and unguidable(10, None) is None


def test_export_names_its_format_and_says_when_it_replaces_another_model(run_dir, tmp_path, capsys):
    """ahpa export wrote a safetensors file named x.npz (which ahpa eval would be fed) and replaced an export of
    another model without a word; the suffix rule is convert's, and replacing different content is noted."""
    from ahpa import config
    from tests.conftest import TINY

    assert main(["export", "--run", str(run_dir), "--out", str(tmp_path / "x.npz")]) == 2
    assert "--out '" in (err := capsys.readouterr().err) and "must end in .safetensors" in err
    assert not (tmp_path / "x.npz").exists()
    out = str(tmp_path / "m.safetensors")
    for _ in range(2):  # the same model again: nothing to say
        assert main(["export", "--run", str(run_dir), "--out", out]) == 0
        assert "replaced" not in capsys.readouterr().err
    other = tmp_path / "other"
    Trainer(config.load(None, [*TINY, "train.steps=1", "train.seed=1"]), other).run()
    assert main(["export", "--run", str(other), "--out", out]) == 0
    assert f"ahpa export: note: replaced {out}, which held a different export (another run or model)" in capsys.readouterr().err


def test_sample_and_export_take_an_earlier_checkpoint_by_step(tmp_path, capsys):
    """An FD against training steps (or a partial sample file of a run trained on since) needs a kept checkpoint other
    than the newest: --step N takes it; a step the run did not keep is named with those it did."""
    from safetensors.torch import load_file

    from ahpa import config
    from ahpa.train.checkpoint import checkpoint_path, read_checkpoint
    from tests.conftest import TINY

    run = tmp_path / "run"
    Trainer(config.load(None, [*TINY, "train.steps=3", "train.ckpt_every=1"]), run).run()
    for step in (1, 3):
        out = tmp_path / f"step{step}.safetensors"
        assert main(["export", "--run", str(run), "--step", str(step), "--out", str(out)]) == 0
        assert f"(step {step})" in capsys.readouterr().out
        ema = read_checkpoint(checkpoint_path(run / "checkpoints", step))["ema"]
        assert all(torch.equal(v, ema[k].float()) for k, v in load_file(str(out)).items())
    assert main(["export", "--run", str(run), "--step", "7", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "has no checkpoint of step 7; it has those of steps 1, 2, 3" in capsys.readouterr().err
    early, late = tmp_path / "early.npz", tmp_path / "late.npz"
    for step, out in ((1, early), (3, late)):
        assert main(["sample", "--run", str(run), "--step", str(step), "--num", "4", "--out", str(out),
                     "--device", "cpu"]) == 0
    assert not np.array_equal(np.load(early)["arr_0"], np.load(late)["arr_0"])
    assert main(["sample", "--model", str(tmp_path / "step1.safetensors"), "--step", "1", "--num", "4",
                 "--out", str(tmp_path / "m.npz")]) == 2
    assert "--step chooses a checkpoint of a run: give it with --run" in capsys.readouterr().err


def test_a_class_name_that_holds_a_comma_is_given_whole(tmp_path, capsys):
    """A class folder named "a,b" could not be given: the comma split it into "a" and "b". A whole --class that is a
    class's name is that class; other values split as before, and --help says how such a name is given."""
    from PIL import Image

    from ahpa.data.prepare import PrepareOptions, prepare
    from tests.conftest import cache_cfg

    folder = tmp_path / "images"
    for k, name in enumerate(["a,b", "c"]):
        (folder / name).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(np.full((16, 16, 3), 20 * i + 100 * k, np.uint8)).save(folder / name / f"{i}.png")
    prepare(PrepareOptions(images=str(folder), vae="ahpa-vae:random", resolution=16, out=str(tmp_path / "cache"),
                           grid=4, batch=16, workers=0, device="cpu"))
    run = tmp_path / "run"
    Trainer(cache_cfg(tmp_path / "cache", "train.steps=1"), run).run()
    args = ["sample", "--run", str(run), "--num", "4", "--steps", "1", "--micro-batch", "2", "--batch", "2"]
    assert main([*args, "--class", "a,b", "--out", str(tmp_path / "ab.npz")]) == 0, capsys.readouterr().err
    with np.load(tmp_path / "ab.npz") as f:
        assert f["arr_1"].tolist() == [0, 0, 0, 0]
    capsys.readouterr()
    assert main([*args, "--class", "a,b", "--out", str(tmp_path / "ab.npz")]) == 0
    assert "already complete" in capsys.readouterr().out
    assert main([*args, "--class", "c", "--class", "a,b", "--out", str(tmp_path / "cab.npz")]) == 0
    with np.load(tmp_path / "cab.npz") as f:
        assert f["arr_1"].tolist() == [1, 0, 1, 0]
    assert main([*args, "--class", "1,0", "--out", str(tmp_path / "10.npz")]) == 0  # indices split as before
    with np.load(tmp_path / "10.npz") as f:
        assert f["arr_1"].tolist() == [1, 0, 1, 0]
    capsys.readouterr()
    assert main([*args, "--class", "c,a,b", "--out", str(tmp_path / "x.npz")]) == 2  # no class's name: split
    assert f"--class 'a' is no class of run {run}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    assert "A name that holds a comma is given whole" in " ".join(capsys.readouterr().out.split())


def test_class_values_that_are_indices_stay_indices_though_a_class_has_that_name():
    """Class folders named by numbers ("0", "1", "10", "2": sorted as text, folder "2" is class 3): --class 2 is
    class 2, as it always was; only a value that is not all indices is looked up whole among the names."""
    from ahpa.commands.sample import parse_classes

    names = ["0", "1", "10", "2", "a,b"]
    assert parse_classes(["2"], names) == [2] and parse_classes(["2,1"], names) == [2, 1]
    assert parse_classes(["a,b", "10"], names) == ["a,b", 10]
    assert parse_classes(["a,b"], None) == ["a", "b"]  # before the model loads: split, resolved once it has


def test_a_finished_file_of_other_classes_is_refused_before_a_model_loads(run_dir, tmp_path, capsys, monkeypatch):
    """The CLI compares the options given, --class among them, with a finished file's record before it loads a
    model (an XL/2 model and its VAE take minutes to load, only to be refused)."""
    from ahpa.train import resume

    args = ["sample", "--run", str(run_dir), "--num", "3", "--steps", "1", "--micro-batch", "2"]
    out = str(tmp_path / "c.npz")
    assert main([*args, "--class", "3,1", "--out", out]) == 0
    capsys.readouterr()

    def no_model(*a, **k):
        raise AssertionError("a model was loaded for a refused file")

    monkeypatch.setattr(resume, "run_sampler", no_model)
    assert main([*args, "--class", "1", "--out", out]) == 2
    assert "classes: the file has [3, 1], command gives [1]" in capsys.readouterr().err


def test_write_samples_refuses_an_empty_list_of_classes_and_a_torn_record(tmp_path, monkeypatch):
    """classes=[] would sample from no class (a modulo by zero deep in the sampler); a finished file whose OUT.json
    record is torn (not JSON) is refused as one without a record, naming it, not with a JSON parser's error."""
    from ahpa import sample_writer

    calls = []
    monkeypatch.setattr(sample_writer, "iter_samples", fake_iter_samples(calls))
    with pytest.raises(ValueError, match="classes is an empty list"):
        sample_writer.write_samples(None, tmp_path / "e.npz", 2, 0, 2, SampleCfg(), {"model_sha256": "x"}, classes=[])
    out = tmp_path / "s.npz"
    assert sample_writer.write_samples(None, out, 2, 0, 2, SampleCfg(), {"model_sha256": "x"}) == out
    sample_writer.record_path(out).write_text('{"num": 2, "se')
    before, calls[:] = out.read_bytes(), []
    with pytest.raises(FileExistsError, match=r"exists without a readable record of its settings \(s\.npz\.json\)"):
        sample_writer.write_samples(None, out, 2, 0, 2, SampleCfg(), {"model_sha256": "x"})
    assert calls == [] and out.read_bytes() == before


def test_parts_left_beside_a_finished_file_do_not_block_its_reruns(tmp_path, monkeypatch):
    """A kill while a finished run removed OUT.parts, or a launch refused because another finished OUT meanwhile,
    leaves parts beside the finished file: every rerun was refused ("finished by another launch meanwhile") until
    they were deleted by hand. A rerun with the file's settings now finds it complete and removes them; the parts of
    an extension of the file (another num) are kept, and so are parts another launch holds."""
    import json
    import shutil

    from ahpa import sample_writer

    calls = []
    monkeypatch.setattr(sample_writer, "iter_samples", fake_iter_samples(calls))
    out, parts, ident = tmp_path / "s.npz", tmp_path / "s.npz.parts", {"model_sha256": "x"}
    sample_writer.write_samples(None, out, 4, 0, 2, SampleCfg(), ident)
    record = json.loads(sample_writer.record_path(out).read_text())
    before = out.read_bytes()
    for left in ({"settings.json": json.dumps({**record, "extends": None}), "chunk_0000000000.npz": "x"}, {}):
        parts.mkdir()
        for name, text in left.items():
            (parts / name).write_text(text)
        assert sample_writer.check_finished(out, {"num": 4, "seed": 0})  # the CLI says "already complete"
        calls[:] = []
        assert sample_writer.write_samples(None, out, 4, 0, 2, SampleCfg(), ident) == out
        assert calls == [] and not parts.exists() and out.read_bytes() == before
    # a command these leftovers do not belong to (fewer samples) is refused, naming them with the way out
    parts.mkdir()
    (parts / "settings.json").write_text(json.dumps({**record, "extends": None}))
    with pytest.raises(FileExistsError, match=r"or s.npz.parts is left over beside it from a killed run: rerun with "
                                              r"the file's settings \(which removes it\)"):
        sample_writer.write_samples(None, out, 2, 0, 2, SampleCfg(), ident)
    shutil.rmtree(parts)
    # an unfinished extension of the file to 6: a rerun of 4 is refused, the parts stay
    parts.mkdir()
    (parts / "settings.json").write_text(json.dumps({**record, "num": 6, "extends": 4}))
    with pytest.raises(sample_writer.SampleSettingsError, match="partial extension"):
        sample_writer.write_samples(None, out, 4, 0, 2, SampleCfg(), ident)
    assert (parts / "settings.json").exists()
    shutil.rmtree(parts)
    # parts another launch holds are not removed from under it; the file is complete all the same
    parts.mkdir()
    holder = hold_lock(parts / ".lock")
    try:
        calls[:] = []
        assert sample_writer.write_samples(None, out, 4, 0, 2, SampleCfg(), ident) == out
        assert calls == [] and parts.exists() and out.read_bytes() == before
    finally:
        holder.kill()
        holder.wait()


def test_a_grid_of_few_classes_repeats_them_across_its_rows(tmp_path):
    """A grid of 2 or 3 classes was one class per column, 2 or 3 wide and 32 or 21 tall (a strip); a row now holds the
    classes repeated, at least 8 wide where that fits in 16, so each column still holds one class. The run's grids
    (samples.png) follow the same rule."""
    from PIL import Image

    from ahpa.commands.sample import draw_grid
    from ahpa.train.plots import class_columns

    assert [class_columns(k) for k in (1, 2, 3, 5, 8, 10, 16, 17)] == [8, 8, 9, 10, 8, 10, 16, None]
    images = np.random.default_rng(0).integers(0, 256, (64, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", arr_0=images, arr_1=np.arange(64) % 2)
    assert draw_grid(tmp_path / "s.npz", tmp_path / "g.png", classes=2) == 64
    with Image.open(tmp_path / "g.png") as im:  # 16-pixel samples drawn 4x (64) with 2-pixel gaps: 8 x 8
        assert im.size == (8 * 66 + 2, 8 * 66 + 2)
        tile = np.asarray(im.convert("RGB"))[2 + 66:66 + 66:4, 2 + 3 * 66:66 + 3 * 66:4]  # row 1, column 3: sample 11
        assert np.array_equal(tile, images[11])
    assert draw_grid(tmp_path / "s.npz", tmp_path / "g3.png", classes=3) == 63  # whole rows of 9
    with Image.open(tmp_path / "g3.png") as im:
        assert im.size == (9 * 66 + 2, 7 * 66 + 2)


def test_sample_draws_a_grid_of_the_files_first_samples(run_dir, tmp_path, capsys):
    """--grid PNG shows what was sampled without a script: the file's first samples, a class per column (sample i has
    class i mod C), also for a file already complete; a --grid that is no .png is refused before a model loads."""
    from PIL import Image

    args = ["sample", "--run", str(run_dir), "--steps", "1", "--micro-batch", "2", "--batch", "2"]
    out, png = tmp_path / "s.npz", tmp_path / "grid.png"
    assert main([*args, "--num", "5", "--out", str(out), "--grid", str(png)]) == 0
    # which column is which class, as the data named them (the grid itself does not say)
    assert (f"grid of its first 5 samples: {png}; its columns, left to right: warm disc, warm square, warm ring, "
            "warm plus, cool disc, cool square, cool ring, cool plus\n") in capsys.readouterr().out
    with Image.open(png) as im, np.load(out) as f:
        # 16-pixel samples drawn 4x (64) with 2-pixel gaps: one row of 5; the third tile is sample 2
        assert im.size == (5 * 66 + 2, 68)
        tile = np.asarray(im.convert("RGB"))[2:66:4, 2 + 2 * 66:66 + 2 * 66:4]
        assert np.array_equal(tile, f["arr_0"][2])
    png.unlink()
    assert main([*args, "--num", "5", "--out", str(out), "--grid", str(png)]) == 0  # complete: the grid all the same
    assert "already complete" in (text := capsys.readouterr().out) and "grid of its first 5 samples" in text
    assert png.exists()
    assert main([*args, "--num", "4", "--out", str(tmp_path / "c.npz"), "--grid", str(png), "--class", "1,0"]) == 0
    assert "its columns, left to right: warm square, warm disc, 4 times along each row" in capsys.readouterr().out
    assert main([*args, "--num", "5", "--out", str(tmp_path / "t.npz"), "--grid", str(tmp_path / "g.jpg")]) == 2
    assert "--grid" in capsys.readouterr().err and not (tmp_path / "t.npz.parts").exists()


def test_a_killed_run_beside_a_record_whose_file_was_deleted_resumes(tmp_path, monkeypatch):
    """Deleting a finished OUT to sample it again may leave its record (OUT.json). A run killed then holds parts with
    the record's very settings, but no finished file: they are that run's progress, not a finished file's leftovers,
    and the rerun resumes them instead of removing them and sampling everything again."""
    from ahpa import sample_writer

    calls = []
    monkeypatch.setattr(sample_writer, "iter_samples", fake_iter_samples(calls))
    out, ident = tmp_path / "s.npz", {"model_sha256": "x"}
    sample_writer.write_samples(None, out, 4, 0, 2, SampleCfg(), ident)
    out.unlink()

    def killed(n):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sample_writer.write_samples(None, out, 4, 0, 2, SampleCfg(), ident, on_progress=killed)
    calls[:] = []
    assert sample_writer.write_samples(None, out, 4, 0, 2, SampleCfg(), ident) == out
    assert calls == [(2, 4)]
    with np.load(out) as f:
        assert np.array_equal(f["arr_1"], np.arange(4))


def test_a_class_name_holding_a_comma_is_listed_as_written_when_a_class_is_refused():
    """`--class 'red,blue,circle'` splits at its commas, and 'red' was refused listing "circle, red,blue, square":
    three names or four? With a comma in a name the names are quoted, and the message says how to give that one."""
    from ahpa.data.class_names import class_indices

    names = ["circle", "red,blue", "square"]
    with pytest.raises(ValueError) as e:
        class_indices(["red", "blue", "circle"], names, 3, "run r")
    assert str(e.value) == ("--class 'red' is no class of run r; its classes: 'circle', 'red,blue', 'square'; a name "
                            "that holds a comma is given whole, as its own --class (--class 'red,blue')")
    assert class_indices(["red,blue", "circle"], names, 3, "run r") == [1, 0]
    with pytest.raises(ValueError, match=r"its classes: circle, square$"):  # no comma in any name: as before
        class_indices(["red"], ["circle", "square"], 2, "run r")


def test_the_default_batch_is_the_micro_batch_and_a_padded_one_is_named(run_dir, tmp_path, capsys, monkeypatch):
    """Every network and decoder call runs --micro-batch rows, padded. --batch defaulted to 64 whatever the micro-batch,
    so a run of the study config (micro_batch 250) sampled 64 images in calls of 250 rows: 3.9x the work at cfg 1
    (1,000 CIFAR samples of a tiny SiT through TAEF2, Heun 10 steps, 2 CPU cores: 64 s, against 18 s at 250 for the
    same file). Now the default is the run's micro-batch (8 here), and a --batch that pads its calls is named."""
    from ahpa.transport import guidance

    rows = []  # (rows a call computed, rows whose output was kept)
    real = guidance.fixed_batch

    def counted(fn, micro_batch, *inputs):
        rows.append((-(-inputs[0].shape[0] // micro_batch) * micro_batch, inputs[0].shape[0]))
        return real(fn, micro_batch, *inputs)

    monkeypatch.setattr(guidance, "fixed_batch", counted)
    monkeypatch.setattr("ahpa.sample.fixed_batch", counted)
    args = ["sample", "--run", str(run_dir), "--num", "16", "--steps", "2"]
    assert main([*args, "--out", str(tmp_path / "default.npz")]) == 0
    assert "note" not in capsys.readouterr().err
    assert rows and all(computed == kept for computed, kept in rows)  # no padding
    assert json.loads((tmp_path / "default.npz.json").read_text())["batch"] == 8
    rows.clear()
    assert main([*args, "--batch", "5", "--out", str(tmp_path / "five.npz")]) == 0
    assert ("ahpa sample: note: --batch 5 fills the 8 rows of its network and decoder calls (--micro-batch 8) with 5 "
            "images, the rest padding that is computed and dropped: --batch 8 (or leaving it out) writes the same file "
            "with up to 1.6x less work") in " ".join(capsys.readouterr().err.split())
    with np.load(tmp_path / "default.npz") as a, np.load(tmp_path / "five.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"])  # the same file either way


def test_the_padding_note_is_not_about_a_batch_that_a_resume_does_not_use(run_dir, tmp_path, monkeypatch, capsys):
    """A resume keeps the first attempt's chunks (8 here, the micro-batch: no padding) and says --batch 5 is not used;
    the note then also said that --batch 5 padded every call and that --batch 8 would do less work, of chunks that
    were already 8."""
    from ahpa import sample_writer

    real_iter = sample_writer.iter_samples

    def killed_after_first_chunk(bundle, lo, *a):
        if lo > 0:
            raise KeyboardInterrupt
        yield from real_iter(bundle, lo, *a)

    monkeypatch.setattr(sample_writer, "iter_samples", killed_after_first_chunk)
    args = ["sample", "--run", str(run_dir), "--num", "16", "--steps", "1", "--out", str(tmp_path / "s.npz")]
    assert main(args) == 130
    capsys.readouterr()
    monkeypatch.setattr(sample_writer, "iter_samples", real_iter)
    assert main([*args, "--batch", "5"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "chunks of 8 (the first attempt's; --batch 5 is not used)" in err
    assert "ahpa sample: note" not in err, err
