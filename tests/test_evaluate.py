"""Evaluation during training: samples streamed into detector statistics, reference statistics cached."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ahpa.config import SampleCfg
from ahpa.metrics.images import share_count
from ahpa.metrics import compute_stats, load_detector, load_reference
from ahpa.sample import iter_samples, load_export
from ahpa.train import evaluate as ev

CFG = SampleCfg(solver="euler", steps=3, micro_batch=8)


class TinyDetector(nn.Module):
    """uint8 [N, 3, H, W] -> float [N, 9]: mean colour and six pooled random-conv responses."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3, stride=2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0
        pooled = F.relu(self.conv(x)).mean(dim=(2, 3))  # [N, 6]
        return torch.cat([x.mean(dim=(2, 3)), pooled], dim=1)  # [N, 9]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from ahpa import config
    from ahpa.train.loop import Trainer
    from tests.conftest import TINY

    root = tmp_path_factory.mktemp("evaluate")
    Trainer(config.load(None, [*TINY, "train.steps=2"]), root / "run").run()
    det_file = root / "tiny-resnet20.pt"
    with warnings.catch_warnings():  # torch >= 2.10 deprecates TorchScript authoring; the detector format is TorchScript
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(TinyDetector().eval()).save(str(det_file))
    ref = root / "ref.npz"
    rng = np.random.default_rng(0)
    np.savez(ref, images=rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8), labels=np.arange(40) % 10)
    bundle = load_export(root / "run" / "model.safetensors", torch.device("cpu"))
    return bundle, load_detector(f"torchscript:{det_file}"), ref


def test_streamed_fd_matches_written_samples(setup):
    bundle, det, ref = setup
    assert det.name == "FD-r20"  # named from the file stem, as ahpa eval names it
    ref_stats = load_reference(ref, det, None)
    got = ev.evaluate_fd(bundle, det, ref_stats, num=13, seed=5, cfg=CFG, batch=5)
    # the same samples written out and measured the way `ahpa eval` measures a file
    images = np.concatenate([imgs.numpy() for _, imgs, _ in iter_samples(bundle, 0, 13, 5, 13, CFG)])
    expected = compute_stats(images, det).frechet_distance(ref_stats)
    # same images; only float32 round-off of the detector on other batch compositions differs
    assert set(got) == {"FD-r20"} and got["FD-r20"] == pytest.approx(expected, rel=1e-5)
    again = ev.evaluate_fd(bundle, det, ref_stats, num=13, seed=5, cfg=CFG, batch=8)  # batch size is irrelevant
    assert again["FD-r20"] == pytest.approx(expected, rel=1e-5)
    other = ev.evaluate_fd(bundle, det, ref_stats, num=13, seed=6, cfg=CFG, batch=8)
    assert other["FD-r20"] != pytest.approx(expected, rel=1e-3)


def test_ranks_share_the_samples(setup):
    bundle, det, _ = setup
    whole = ev.sample_stats(bundle, det, 11, 0, CFG, 4)
    parts = [ev.sample_stats(bundle, det, 11, 0, CFG, 4, rank=r, world_size=2) for r in range(2)]
    assert [p.count for p in parts] == [7, 4]  # batches 0, 2 and 1
    assert [share_count(11, 4, r, 2) for r in range(2)] == [7, 4] and share_count(11, 4) == 11
    seen = []  # a progress bar's updates: this rank's batches, summing to its share
    ev.sample_stats(bundle, det, 11, 0, CFG, 4, rank=0, world_size=2, on_batch=seen.append)
    assert seen == [4, 3]
    merged = parts[0].merge(parts[1])
    assert merged.count == 11
    assert np.allclose(merged.mean, whole.mean, rtol=1e-6, atol=1e-9)
    assert np.allclose(merged.cov, whole.cov, rtol=1e-6, atol=1e-9)


def test_reference_statistics_are_cached(setup, tmp_path, monkeypatch):
    bundle, det, ref = setup
    first = load_reference(ref, det, tmp_path / "cache")
    files = list((tmp_path / "cache").glob("*.npz"))
    assert len(files) == 1 and files[0].name.startswith("FD-r20-") and first.count == 40

    def no_recompute(*a, **k):
        raise AssertionError("reference statistics recomputed despite the cache")

    from ahpa.metrics import reference as reference_mod

    monkeypatch.setattr(reference_mod, "reference_stats", no_recompute)
    cached = load_reference(ref, det, tmp_path / "cache")
    assert cached.count == 40 and cached.detector == "FD-r20"
    assert np.allclose(cached.mean, first.mean) and np.allclose(cached.cov, first.cov)
    monkeypatch.undo()

    with np.load(ref) as f:  # a changed reference gets a new key, not the stale statistics
        np.savez(ref, images=f["images"][:30], labels=f["labels"][:30])
    assert load_reference(ref, det, tmp_path / "cache").count == 30
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2


def test_bad_evaluation_inputs(setup, tmp_path):
    bundle, det, ref = setup
    stats = load_reference(ref, det, None)
    stats.detector = "FID"
    with pytest.raises(ValueError, match="computed for FID, not FD-r20"):
        ev.evaluate_fd(bundle, det, stats, 4, 0, CFG, 4)
    with pytest.raises(ValueError, match="at least 2 samples"):
        ev.evaluate_fd(bundle, det, load_reference(ref, det, None), 1, 0, CFG, 4)
    with pytest.raises(FileNotFoundError, match="eval.ref"):
        load_reference(tmp_path / "none.npz", det, tmp_path)


def test_evaluation_during_training_is_logged(setup, tmp_path, monkeypatch):
    import json

    from ahpa import config
    from ahpa.train.loop import Trainer
    from tests.conftest import TINY

    _, det, ref = setup
    cfg = config.load(None, [*TINY, "train.steps=4", "eval.every=2", f"eval.detectors=[{det.spec}]", f"eval.ref={ref}",
                             "eval.num=16", "eval.batch=8"])
    told, shown = [], []  # what a CLI shows: each evaluation's FD, and a bar for each grid and evaluation

    def progress(label, total):
        shown.append([label, total, 0])
        return lambda n: shown[-1].__setitem__(2, shown[-1][2] + n)

    with_grid = config.load(None, [*TINY, "train.steps=4", "eval.every=2", f"eval.detectors=[{det.spec}]",
                                   f"eval.ref={ref}", "eval.num=16", "eval.batch=8", "train.sample_every=4"])
    Trainer(with_grid, tmp_path / "run").run(
        on_eval=lambda step, fd: told.append((step, fd)), progress=progress)
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    assert [r["step"] for r in evals] == [2, 4]
    name = f"eval/{det.name}"
    assert all(r[name] > 0 for r in evals)
    assert told == [(r["step"], {det.name: r[name]}) for r in evals]
    assert shown == [["eval", 16, 16], ["grid", 8, 8], ["eval", 16, 16]]  # the grid at step 4, then its evaluation
    assert {r["eval_setup"] for r in evals} == {f"eval.num=16 eval.ref={ref} eval.seed=0 sampler=euler-4 cfg-scale=1.0 "
                                                "guidance=[0.0, 1.0]"}  # what compare tells a curve measured two ways by
    assert (tmp_path / "run" / "eval.png").exists() and any((tmp_path / "run" / "eval_ref").iterdir())
    # the reference is measured once per machine: a second run takes the statistics from the shared cache
    import ahpa.metrics.reference as reference

    measured = []
    real = reference.measure
    monkeypatch.setattr(reference, "measure", lambda *a, **k: measured.append(1) or real(*a, **k))
    monkeypatch.setattr(reference, "reference_stats", lambda *a, **k: measured.append(1) or pytest.fail("re-measured"))
    Trainer(cfg, tmp_path / "run2").run()
    assert not measured and sorted(p.name for p in (tmp_path / "run2" / "eval_ref").iterdir()) == sorted(
        p.name for p in (tmp_path / "run" / "eval_ref").iterdir())


def test_a_stop_saves_once_before_evaluating_and_the_resume_evaluates_that_step(setup, tmp_path):
    """Asked to stop (SIGTERM) at a step due a checkpoint and an evaluation, the run saves once and goes: a
    scheduler's grace period has no room for 10,000 samples. The resume evaluates that step first, as it does after
    a process died between its checkpoint and its evaluation; and a finished run trained further is not DONE."""
    import json

    from ahpa import config
    from ahpa.train.loop import Trainer
    from tests.conftest import TINY

    _, det, ref = setup
    base = [*TINY, "train.ckpt_every=2", "eval.every=2", f"eval.detectors=[{det.spec}]", f"eval.ref={ref}",
            "eval.num=16", "eval.batch=8"]
    run = tmp_path / "run"
    trainer = Trainer(config.load(None, [*base, "train.steps=4"]), run)
    saves = []
    trainer.save = lambda save=trainer.save: saves.append(trainer.step) or save()
    assert trainer.run(should_stop=lambda: trainer.step >= 2)["stopped"] and saves == [2]

    def eval_steps():
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [r["step"] for r in rows if f"eval/{det.name}" in r]

    assert eval_steps() == []
    Trainer(config.load(None, [*base, "train.steps=4"]), run).run()
    assert eval_steps() == [2, 4] and (run / "DONE").exists()
    # died after the last checkpoint, before the last evaluation and DONE: the rerun evaluates, then completes
    rows = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("".join(r + "\n" for r in rows if not ('"step": 4' in r and "eval/" in r)))
    (run / "DONE").unlink()
    Trainer(config.load(None, [*base, "train.steps=4"]), run).run()
    assert eval_steps() == [2, 4] and (run / "DONE").exists()
    # a reference that changed since the earlier evaluations is measured afresh, and the run says so
    os.utime(ref, ns=(ref.stat().st_atime_ns, ref.stat().st_mtime_ns + 10**9))
    trainer = Trainer(config.load(None, [*base, "train.steps=8"]), run)
    assert any(m.startswith(f"eval.ref is measured afresh for {det.name}") for m in trainer.messages)
    trainer.run(should_stop=lambda: True)
    assert not (run / "DONE").exists()  # a SLURM script that requeues until DONE exists goes on requeueing


def test_an_evaluation_asks_to_stop_after_each_batch_every_process_has(setup):
    """`stop` is asked after each batch that every rank has, so that a collective inside it runs alike everywhere:
    11 samples in batches of 4 on 2 ranks are batches 0 and 2 on rank 0 and batch 1 on rank 1, and each asks once.
    A reason raises EvaluationStopped with it, before the next batch is generated."""
    bundle, det, _ = setup
    asked = {0: [], 1: []}
    for rank in (0, 1):
        ev.sample_stats(bundle, det, 11, 0, CFG, 4, rank=rank, world_size=2,
                        stop=lambda rank=rank: asked[rank].append(1) and 0)
    assert asked == {0: [1], 1: [1]}
    seen = []
    with pytest.raises(ev.EvaluationStopped) as stopped:
        ev.sample_stats(bundle, det, 16, 0, CFG, 4, on_batch=seen.append, stop=lambda: 15 if seen else 0)
    assert stopped.value.reason == 15 and seen == [4]


def test_a_stop_during_an_evaluation_saves_that_step_and_the_resume_evaluates_it(setup, tmp_path):
    """A signal that arrives while the run evaluates (10,000 or 50,000 samples: longer than torchrun's 30 s before
    it kills) gives the evaluation up between two batches, logs the steps since the last log row, saves that step
    (also where no checkpoint was due) and goes; the resume from it evaluates it first."""
    import json

    from ahpa import config
    from ahpa.train.loop import Trainer
    from tests.conftest import TINY

    _, det, ref = setup
    base = [*TINY, "train.ckpt_every=4", "train.log_every=4", "eval.every=3", f"eval.detectors=[{det.spec}]",
            f"eval.ref={ref}", "eval.num=24", "eval.batch=8"]
    run = tmp_path / "run"
    trainer = Trainer(config.load(None, [*base, "train.steps=4"]), run)
    saves, batches = [], []
    trainer.save = lambda save=trainer.save: saves.append(trainer.step) or save()

    def progress(kind, total):
        return batches.append if kind == "eval" else None

    result = trainer.run(should_stop=lambda: 15 if batches else 0, progress=progress)
    assert result["stopped"] == 15 and result["step"] == 3 and saves == [3] and batches == [8]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3] and f"eval/{det.name}" not in rows[0]  # steps 1-3 logged, no FD
    Trainer(config.load(None, [*base, "train.steps=4"]), run).run()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if f"eval/{det.name}" in r] == [3, 4] and (run / "DONE").exists()


def test_ahpa_eval_and_runs_share_reference_statistics_and_a_broken_shared_cache_stops_nothing(setup, tmp_path, monkeypatch):
    """`ahpa eval` with the detector's relative path measures the reference once; a run naming the same file (its
    config holds the absolute path) takes those statistics. A shared cache that cannot be used costs a measurement,
    never the run."""
    import ahpa.metrics.reference as reference
    from ahpa import config
    from ahpa.cli import main
    from ahpa.train.loop import Trainer
    from tests.conftest import TINY

    _, det, ref = setup
    det_file = Path(det.spec.partition(":")[2])
    monkeypatch.setenv("AHPA_CACHE", str(tmp_path / "shared"))
    monkeypatch.chdir(det_file.parent)
    assert main(["eval", str(ref), "--ref", str(ref), "--detector", f"torchscript:{det_file.name}", "--batch", "8"]) == 0
    monkeypatch.setattr(reference, "reference_stats", lambda *a, **k: pytest.fail("measured again"))
    base = [*TINY, "train.steps=1", "eval.every=1", f"eval.detectors=[torchscript:{det_file.name}]", f"eval.ref={ref}",
            "eval.num=8", "eval.batch=8"]
    Trainer(config.load(None, base), tmp_path / "run").run()
    monkeypatch.undo()
    monkeypatch.chdir(det_file.parent)
    monkeypatch.setenv("AHPA_CACHE", "/tmp/" + "x" * 300)  # a name too long for the file system: every call fails
    Trainer(config.load(None, base), tmp_path / "run2").run()
    monkeypatch.setenv("AHPA_CACHE", "off")
    assert reference.default_cache_dir() is None


def test_a_reference_folder_of_photos_is_read_at_the_run_resolution(setup, tmp_path):
    """eval.ref may be the user's own image folder, photos of any size: it is read at data.resolution as
    prepare reads training images, so the first evaluation does not fail on the sizes after hours of training."""
    import json

    from PIL import Image

    from ahpa import config
    from ahpa.train.loop import Trainer
    from tests.conftest import TINY

    _, det, _ = setup
    photos = tmp_path / "photos" / "cats"
    photos.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i, (h, w) in enumerate([(20, 30), (40, 17), (9, 12), (16, 16)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(photos / f"{i}.jpg")
    cfg = config.load(None, [*TINY, "train.steps=2", "eval.every=2", f"eval.detectors=[{det.spec}]",
                             f"eval.ref={tmp_path / 'photos'}", "eval.num=8", "eval.batch=8"])
    trainer = Trainer(cfg, tmp_path / "run")
    assert not [m for m in trainer.messages if "resolution gap" in m]  # read at the samples' size
    trainer.run()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r[f"eval/{det.name}"] > 0 for r in rows if f"eval/{det.name}" in r] == [True]
    # an .npz of another size is measured as it is, and the run says what that does to its FD (as `ahpa eval` does)
    small = tmp_path / "small.npz"
    np.savez(small, images=rng.integers(0, 256, (8, 8, 8, 3), dtype=np.uint8), labels=np.arange(8) % 2)
    cfg = config.load(None, [*TINY, "train.steps=2", "eval.every=2", f"eval.detectors=[{det.spec}]", f"eval.ref={small}"])
    assert [m for m in Trainer(cfg, tmp_path / "run8").messages if "holds 8x8 images and the samples are 16x16" in m]


def test_a_run_says_before_training_when_its_evaluations_have_fewer_images_than_features(setup, tmp_path):
    """`ahpa eval` warns that an FD of as many images as features or fewer is biased upward; a run that evaluates with
    such an eval.num (a small CPU run; eval.num=1000 under Inception's 2048) or reference said nothing, and its FD curve
    read as any other."""
    from ahpa import config
    from ahpa.train.loop import Trainer
    from tests.conftest import TINY

    _, det, ref = setup  # 9 features, a reference of 40 images
    few = tmp_path / "few.npz"
    np.savez(few, images=np.random.default_rng(2).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8))
    base = [*TINY, "train.steps=2", "eval.every=2", f"eval.detectors=[{det.spec}]", "eval.batch=8"]
    said = Trainer(config.load(None, [*base, f"eval.ref={few}", "eval.num=8"]), tmp_path / "few").messages
    assert [m for m in said if m.startswith(f"8 samples for 9 features ({det.name}): the covariance is rank-deficient")
            and "eval.num above 9" in m]
    assert [m for m in said if m.startswith(f"eval.ref: 6 reference images for 9 features ({det.name})")]
    said = Trainer(config.load(None, [*base, f"eval.ref={ref}", "eval.num=10"]), tmp_path / "enough").messages
    assert not [m for m in said if "rank-deficient" in m]
    # as many as features: rank-deficient too (a covariance of n images has rank n - 1 at most)
    nine = tmp_path / "nine.npz"
    np.savez(nine, images=np.random.default_rng(3).integers(0, 256, (9, 16, 16, 3), dtype=np.uint8))
    said = Trainer(config.load(None, [*base, f"eval.ref={nine}", "eval.num=9"]), tmp_path / "nine").messages
    assert [m for m in said if m.startswith(f"9 samples for 9 features ({det.name})")]
    assert [m for m in said if m.startswith(f"eval.ref: 9 reference images for 9 features ({det.name})")]
    # stored statistics of an unknown number of images (ADM's reference batches record none): nothing to say
    from ahpa.metrics import compute_stats

    stats = compute_stats(np.load(ref)["images"], det)
    np.savez(tmp_path / "stats.npz", mu=stats.mean, sigma=stats.cov, detector=det.name)
    said = Trainer(config.load(None, [*base, f"eval.ref={tmp_path / 'stats.npz'}", "eval.num=10"]),
                   tmp_path / "stored").messages
    assert not [m for m in said if "rank-deficient" in m], said


def test_several_detectors_share_one_set_of_samples(setup, tmp_path):
    bundle, det, ref = setup
    ref_stats = load_reference(ref, det, tmp_path)
    alone = ev.evaluate_fd(bundle, det, ref_stats, 16, 0, CFG, 8)
    both = ev.evaluate_fd(bundle, [det, det], [ref_stats, ref_stats], 16, 0, CFG, 8)
    assert both == alone  # same name twice: same figure, from samples generated once


def test_evaluation_settings_fail_before_the_first_training_step(setup, tmp_path):
    """What would fail the first evaluation fails when the run is built, naming the setting: otherwise the study
    config's eval.every=2000 would report it after 2,000 steps of training. A file of the wrong kind is named too."""
    from ahpa import config
    from ahpa.train.loop import Trainer
    from tests.conftest import TINY

    _, det, ref = setup
    base = [*TINY, "train.steps=4", "eval.every=2"]
    listing, fid_stats = tmp_path / "ref.txt", tmp_path / "fid-stats.npz"
    cases = [([f"eval.ref={ref}"], ValueError, "eval.detectors is empty"),
             ([f"eval.detectors=[{det.spec}]"], ValueError, "eval.ref is empty"),
             ([f"eval.detectors=[{det.spec}]", f"eval.ref={tmp_path / 'none.npz'}"], FileNotFoundError, "eval.ref .* does not exist: .* eval.every=0"),
             ([f"eval.detectors=[torchscript:{tmp_path / 'none.pt'}]", f"eval.ref={ref}"], FileNotFoundError, "none.pt"),
             ([f"eval.detectors=[inception:{det.spec.partition(':')[2]}]", f"eval.ref={ref}"], ValueError,
              r"does not take Inception-v3's forward\(img, return_features=True\) .* torchscript:FILE"),
             ([f"eval.detectors=[{det.spec}]", f"eval.ref={listing}"], ValueError, "neither a folder of images nor an .npz"),
             ([f"eval.detectors=[{det.spec}]", f"eval.ref={fid_stats}"], ValueError, r"eval.ref: statistics in .* were computed for FID, not FD-"),
             ([f"eval.detectors=[{det.spec}]", f"eval.ref={tmp_path / 'no-images'}"], ValueError, "no images found under")]
    (tmp_path / "no-images").mkdir()
    (tmp_path / "no-images" / "notes.txt").write_text("not an image")
    listing.write_text("a.png\n")
    np.savez(fid_stats, mu=np.zeros(9), sigma=np.eye(9), detector="FID")
    for extra, error, message in cases:
        with pytest.raises(error, match=message):
            Trainer(config.load(None, [*base, *extra]), tmp_path / "run")
    # a finished run, rerun to export or sample, evaluates nothing: its evaluation settings are not held against it
    done = [*TINY, "train.steps=2", "eval.every=2", f"eval.ref={ref}", "eval.detectors=[torchscript:/moved/away.pt]"]
    Trainer(config.load(None, [*TINY, "train.steps=2"]), tmp_path / "done").run()
    assert Trainer(config.load(None, done), tmp_path / "done").evaluator is None
    not_torchscript = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, not_torchscript)
    with pytest.raises(ValueError, match="is not a TorchScript file"):
        load_detector(f"torchscript:{not_torchscript}")


def test_a_complete_run_given_evaluation_settings_says_it_is_not_evaluated_again(setup, tmp_path):
    """Following a README that trains a run, then adds eval.every to the same --out: the complete run is not evaluated
    again (by design), and now says so instead of doing nothing silently."""
    from ahpa import config
    from ahpa.train.loop import Trainer
    from tests.conftest import TINY

    _, det, ref = setup
    Trainer(config.load(None, [*TINY, "train.steps=2"]), tmp_path / "run").run()
    again = Trainer(config.load(None, [*TINY, "train.steps=2", "eval.every=1", f"eval.detectors=[{det.spec}]",
                                       f"eval.ref={ref}", "eval.num=16", "eval.batch=8"]), tmp_path / "run")
    assert any(m.startswith("eval.every=1: the run is complete and is not evaluated again") for m in again.messages)
    # run anyway (a requeued job): its record keeps saying how it was trained, with no evaluations, and no new start
    before = {name: (tmp_path / "run" / name).read_bytes() for name in ("config.yaml", "starts.jsonl", "metrics.jsonl")}
    again.run()
    assert {name: (tmp_path / "run" / name).read_bytes() for name in before} == before


def test_a_resume_that_evaluates_otherwise_says_so_and_eval_png_breaks_the_line(setup, tmp_path, monkeypatch):
    """eval.num changed on a resume: the curve would join 16-sample and 8-sample FDs as one line (read as a jump in
    quality). The trainer says so when it starts, and eval.png draws the later part as a line of its own."""
    from ahpa import config
    from ahpa.train import plots
    from ahpa.train.loop import Trainer
    from tests.conftest import TINY

    _, det, ref = setup
    ev_args = ["eval.every=1", f"eval.detectors=[{det.spec}]", f"eval.ref={ref}", "eval.batch=8"]
    Trainer(config.load(None, [*TINY, "train.steps=2", *ev_args, "eval.num=16"]), tmp_path / "run").run()
    drawn = {}
    monkeypatch.setattr(plots, "line_plot", lambda series, *a, **k: drawn.update(series))
    same = Trainer(config.load(None, [*TINY, "train.steps=3", *ev_args, "eval.num=16"]), tmp_path / "run")
    assert not [m for m in same.messages if "mixes two ways" in m]
    same.run()
    assert list(drawn) == ["FD-r20"] and len(drawn["FD-r20"]) == 3
    other = Trainer(config.load(None, [*TINY, "train.steps=4", *ev_args, "eval.num=8"]), tmp_path / "run")
    assert [m for m in other.messages if "earlier evaluations used eval.num=16" in m and "from now on eval.num=8" in m]
    other.run()
    assert [len(drawn[k]) for k in ("FD-r20", "FD-r20 [eval.num=8]")] == [3, 1]


def test_the_reference_a_run_measures_when_it_is_built_reports_progress(setup, tmp_path):
    """A run that evaluates measures eval.ref when it is built: minutes for 50,000 images, and `ahpa train` said
    nothing meanwhile. Trainer(progress=...) opens a "reference" bar with the number of images it reads (it had none:
    no ETA), counted per batch, and none once it is cached."""
    from ahpa import config
    from ahpa.train.loop import Trainer
    from tests.conftest import TINY

    _, det, _ = setup
    ref = tmp_path / "fresh-ref.npz"  # a reference no earlier test measured
    np.savez(ref, images=np.random.default_rng(11).integers(0, 256, (24, 16, 16, 3), dtype=np.uint8))
    args = [*TINY, "train.steps=1", "eval.every=1", f"eval.detectors=[{det.spec}]", f"eval.ref={ref}", "eval.num=8",
            "eval.batch=10"]
    counts = {}

    def progress(label, total):
        counts[label] = [total, 0]
        return lambda n: counts[label].__setitem__(1, counts[label][1] + n)

    Trainer(config.load(None, args), tmp_path / "a", progress=progress)
    assert counts == {f"reference [{det.name}]": [24, 24]}
    counts.clear()
    Trainer(config.load(None, args), tmp_path / "b", progress=progress)  # cached once per machine: nothing measured
    assert counts == {}


def test_what_changed_in_an_evaluation_setup_keeps_a_bracketed_value_whole():
    """The guidance interval is written with a space ("guidance=[0.0, 0.7]"): what changed is named as that item,
    not as a stray "0.7]" (the trainer's note on resume, eval.png's legend and ahpa compare show it)."""
    from ahpa.train import eval_setup

    before = "eval.num=200 sampler=euler-50 cfg-scale=1.5 guidance=[0.0, 1.0]"
    after = "eval.num=200 sampler=euler-50 cfg-scale=1.5 guidance=[0.0, 0.7]"
    assert eval_setup.items(after)[-1] == "guidance=[0.0, 0.7]"
    assert eval_setup.changed(after, before) == "guidance=[0.0, 0.7]"


def test_ahpa_train_prints_each_evaluation_above_its_bar(setup, tmp_path, capsys):
    """`ahpa train` shows each evaluation's FD on its own line (the bar redraws over anything else), with the step,
    the images seen and the number of EMA samples, so the FD curve stays on screen while the run trains."""
    from ahpa.cli import main
    from tests.conftest import TINY

    _, det, ref = setup
    assert main(["train", "--out", str(tmp_path / "run"), *TINY, "train.steps=2", "train.batch_size=4", "eval.every=2",
                 f"eval.detectors=[{det.spec}]", f"eval.ref={ref}", "eval.num=8", "eval.batch=8"]) == 0
    err = capsys.readouterr().err
    assert f"step 2 (8 images): {det.name} " in err and "(8 EMA samples)" in err


def test_eval_png_names_its_one_metric(tmp_path, monkeypatch):
    """A run evaluated with one detector drew eval.png as one unnamed line under "Fréchet distance": neither a legend
    (drawn for two lines or more) nor a title said it was FD-r20, not FID. With several, the legend names them."""
    import json

    from ahpa.train import plots

    rows = [{"step": s, "images": 16 * s, "eval/FD-r20": 9.0 - s} for s in (10, 20)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    drawn = []
    monkeypatch.setattr(plots, "line_plot", lambda series, path, *a, **kw: drawn.append((list(series), kw)) or path)
    plots.eval_curves(tmp_path / "metrics.jsonl", tmp_path / "eval.png")
    assert drawn[-1][0] == ["FD-r20"] and drawn[-1][1]["title"] == "FD-r20"
    rows = [{**r, "eval/FD-r32": 8.0} for r in rows]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plots.eval_curves(tmp_path / "metrics.jsonl", tmp_path / "eval.png")
    assert drawn[-1][0] == ["FD-r20", "FD-r32"] and drawn[-1][1]["title"] == ""
