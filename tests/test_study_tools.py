"""The convergence study's tooling (benchmarks/study.py, study_report.py, study_gpu_job.sh) at its smallest sizes,
and the report's pure functions on made-up rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import run_script as _run

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def recorded_inputs() -> dict:
    """What study.py's rows record of the default data file and decoder (hashed here apart from the library)."""
    import hashlib

    return {"data": hashlib.sha256((SHARED / "data/cifar10/train16k.npz").read_bytes()).hexdigest(),
            "decoder": hashlib.sha256((SHARED / "weights/taef2/taef2_decoder.pth").read_bytes()).hexdigest()}


@pytest.mark.skipif(not (SHARED / "data/cifar10/train16k.npz").is_file(), reason="needs ../shared (CIFAR-10, TAEF2, detectors)")
def test_study_smoke_merges_into_a_report(tmp_path, monkeypatch):
    results = tmp_path / "r.jsonl"
    _run(["benchmarks/study.py", "--size", "smoke", "--methods", "none,ahpa-soft", "--steps", "4", "--eval-every", "2",
          "--eval-num", "20", "--eval-batch", "10", "--grid-images", "4", "--cache", str(tmp_path / "cache"),
          "--results", str(results)])
    rows = [json.loads(l) for l in results.read_text().splitlines()]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [(r["method"], r["step"]) for r in evals] == [("none", 2), ("none", 4), ("ahpa-soft", 2), ("ahpa-soft", 4)]
    assert len({r["study"] for r in evals}) == 1  # methods share the study key: comparable
    assert set(evals[0]["fd"]) == {"FD-r20", "FD-r32"} and evals[-1]["router"]["mode"] == "soft"
    cost = {r["method"]: r["tflop_per_step"] for r in evals}  # the heads add FLOPs to the aligned steps only
    assert cost["none"]["aligned"] == cost["none"]["flow"] == cost["ahpa-soft"]["flow"] < cost["ahpa-soft"]["aligned"]
    # rows recorded before the field existed get the same figure from their config (study_fill_flops.py)
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from study_fill_flops import cost_of

    assert [cost_of({k: v for k, v in r.items() if k != "tflop_per_step"}) for r in evals] == [r["tflop_per_step"] for r in evals]
    # an ablation of the router's own switches, or of lambda, is named by them and stays in the same study (same key)
    _run(["benchmarks/study.py", "--size", "smoke", "--methods", "ahpa-soft", "--variant", "align.router_entropy=0",
          "--variant", "align.weight=1.5",
          "--steps", "4", "--eval-every", "2", "--eval-num", "20", "--eval-batch", "10", "--grid-images", "0",
          "--cache", str(tmp_path / "cache"), "--results", str(results)])
    rows = [json.loads(l) for l in results.read_text().splitlines()]
    ablation = [r for r in rows if r["kind"] == "eval" and r["method"] == "ahpa-soft[weight=1.5,router_entropy=0]"]
    assert len(ablation) == 2 and ablation[0]["study"] == evals[0]["study"]
    assert ablation[0]["config"]["align.weight"] == evals[0]["config"]["align.weight"] != 1.5  # the study's lambda
    assert ablation[0]["variant"] == ["align.weight=1.5", "align.router_entropy=0"]  # canonical order, as labelled
    # a second seed joins the same study (the seed is not part of the key); the time budget, spent by the first
    # method, skips the second: a row of its own
    _run(["benchmarks/study.py", "--size", "smoke", "--methods", "none,ahpa-soft", "--seed", "1", "--steps", "4",
          "--eval-every", "2", "--eval-num", "20", "--eval-batch", "10", "--grid-images", "0", "--budget-s", "1",
          "--cache", str(tmp_path / "cache"), "--results", str(results)])
    rows = [json.loads(l) for l in results.read_text().splitlines()]
    seed1 = rows[-1]
    assert seed1["kind"] == "skipped" and seed1["method"] == "ahpa-soft"
    assert seed1["seed"] == 1 and seed1["study"] == evals[0]["study"]
    assert rows[-2]["kind"] == "run" and rows[-2]["seed"] == 1 and rows[-2]["method"] == "none"
    # every row names its data file and decoder by content (the study key holds neither): study_inputs.py
    assert {r["kind"] for r in rows} == {"eval", "run", "skipped"}
    assert all(r["inputs"] == recorded_inputs() for r in rows)
    bad = subprocess.run([sys.executable, "benchmarks/study.py", "--variant", "train.lr=1", "--results", str(results)],
                         capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert bad.returncode != 0 and "train.lr=1" in bad.stderr
    with_none = subprocess.run([sys.executable, "benchmarks/study.py", "--methods", "none,ahpa-soft", "--variant",
                                "align.weight=1.5", "--results", str(results)], capture_output=True, text=True, cwd=ROOT,
                               env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert with_none.returncode != 0 and "'none' does not have" in with_none.stderr  # nothing written for it
    _run(["benchmarks/study_report.py", "--results", str(results), "--out", str(tmp_path / "report"), "--smoke"])
    text = (tmp_path / "report" / "README.md").read_text()
    assert "SMOKE TEST" in text and "| ahpa-soft | 0 |" in text and "| ahpa-soft[weight=1.5,router_entropy=0] | 0 |" in text
    assert "**Training speed-up per FLOP**" in text
    assert list((tmp_path / "report").glob("router-*-ahpa-soft-seed0.png"))
    # paired with vanilla SiT of the same seed (seed 0 only: ahpa-soft has no seed 1), at the last step
    fd = {r["method"]: r["fd"]["FD-r20"] for r in evals if r["step"] == 4}
    assert f"| ahpa-soft | 4 | 0 | {fd['ahpa-soft'] - fd['none']:+.3f} ({fd['ahpa-soft'] - fd['none']:+.3f}) |" in text


@pytest.mark.skipif(not (SHARED / "data/cifar10/train16k.npz").is_file(), reason="needs ../shared (CIFAR-10, TAEF2, detectors)")
def test_study_stops_a_diverged_run_and_the_report_says_so(tmp_path, monkeypatch):
    """A run whose steps turn non-finite stops at the next check (the library's rule) instead of training on and
    being evaluated with an EMA that the skipped steps froze; its rows say why, and the report flags them."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import study

    from ahpa.train.loop import Trainer

    real = Trainer._loss

    def loss(self, batch, d, align_on):  # from step 12 on, every loss is NaN
        value, metrics = real(self, batch, d, align_on)
        return (value * float("nan"), metrics) if self.step >= 12 else (value, metrics)

    monkeypatch.setattr(Trainer, "_loss", loss)
    monkeypatch.setattr(study, "DIVERGENCE_CHECK_EVERY", 2)
    results = tmp_path / "r.jsonl"
    study.main(["--size", "smoke", "--methods", "none", "--steps", "40", "--eval-every", "10", "--eval-num", "20",
                "--eval-batch", "10", "--grid-images", "0", "--cache", str(tmp_path / "cache"), "--results", str(results)])
    rows = [json.loads(l) for l in results.read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [10, 20, 30]  # none after the run diverged
    assert [r["metrics"]["skipped_steps"] for r in rows if r["kind"] == "eval"] == [0, 8, 10]
    run = rows[-1]
    assert run["kind"] == "run" and run["complete"] is False and run["steps"] == 32
    assert run["diverged"] == "stopped at step 32: 20 steps in a row had a non-finite loss or gradient"
    _run(["benchmarks/study_report.py", "--results", str(results), "--out", str(tmp_path / "report"), "--smoke"])
    text = (tmp_path / "report" / "README.md").read_text()
    assert "| none | 0 | " in text and "diverged: stopped at step 32" in text
    assert "skipped 8 of the 10 steps before it" in text


@pytest.mark.skipif(not (SHARED / "data/cifar10/train16k.npz").is_file(), reason="needs ../shared (CIFAR-10, TAEF2, detectors)")
def test_study_forgives_fp16_overflows_as_the_library_does(tmp_path, monkeypatch):
    """On a GPU without bf16 (auto: fp16), the loss scale's first overflows are skipped steps but no sign of
    divergence, as in Trainer.run: a scale far too large overflows most of the first 20 steps, and the run goes on."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import study

    from ahpa.train import build, loss_scale

    real = build.autocast_dtype
    monkeypatch.setattr(build, "autocast_dtype", lambda p, d: torch.float16 if p == "auto" else real(p, d))
    monkeypatch.setattr(loss_scale, "INIT_SCALE", 2.0 ** 40)
    monkeypatch.setattr(study, "DIVERGENCE_CHECK_EVERY", 2)
    results = tmp_path / "r.jsonl"
    study.main(["--size", "smoke", "--methods", "none", "--steps", "20", "--eval-every", "20", "--eval-num", "10",
                "--eval-batch", "10", "--grid-images", "0", "--cache", str(tmp_path / "cache"), "--results", str(results)])
    rows = [json.loads(l) for l in results.read_text().splitlines()]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert len(evals) == 1 and evals[0]["metrics"]["skipped_steps"] > 10  # more than half of the steps overflowed
    assert rows[-1]["kind"] == "run" and rows[-1]["complete"] is True and "diverged" not in rows[-1]


@pytest.mark.skipif(not (SHARED / "data/cifar10/train16k.npz").is_file(), reason="needs ../shared (CIFAR-10, TAEF2, detectors)")
def test_study_gpu_job_runs_lanes_side_by_side_and_merges_them(tmp_path):
    """The device job script, rehearsed on the CPU at the smoke size: lanes run at once, every row knows how many
    shared the device, one merged study.jsonl/log comes back, and a lane that fails before its first evaluation is
    run again without CUDA graphs instead of costing the job."""
    inputs = tmp_path / "inputs"  # the layout the job expects in .carry/
    (inputs / "detectors").mkdir(parents=True)
    (inputs / "train16k.npz").symlink_to(SHARED / "data/cifar10/train16k.npz")
    (inputs / "taef2").symlink_to(SHARED / "weights/taef2")
    for name in ("cifar10-resnet20.pt", "cifar10-resnet32.pt"):
        (inputs / "detectors" / name).symlink_to(SHARED / "detectors" / name)
    out = tmp_path / "out"
    flags = (f"--size smoke --device cpu --compile off --cache {tmp_path / 'cache'} --workers 1 --eval-num 20 "
             "--eval-batch 10 --grid-images 4")
    env = {**os.environ, "OUT": str(out), "STUDY_INPUTS": str(inputs), "STUDY_LIMIT_S": "400", "STUDY_FLAGS": flags,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    # lane 2's first try fails before any evaluation (the config refuses the mode); its rerun without CUDA graphs
    # (--compile-mode default; argparse keeps the last) trains, eagerly here
    # (lane 2 quotes its variant as docs/study.md does: split as a shell splits it, the quotes do not reach study.py)
    job = subprocess.run(["bash", "benchmarks/study_gpu_job.sh", "4", "0", "2", "--methods none",
                          "--methods vae-level --level stage2 --variant 'align.weight=1.5' --compile-mode bogus"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    rows = [json.loads(l) for l in (out / "study.jsonl").read_text().splitlines()]
    evals = [(r["method"], r["step"]) for r in rows if r["kind"] == "eval"]
    assert sorted(evals) == [("none", 2), ("none", 4), ("vae-level:stage2[weight=1.5]", 2), ("vae-level:stage2[weight=1.5]", 4)]
    assert {r["lanes"] for r in rows} == {2} and len({r["study"] for r in rows if r["kind"] == "eval"}) == 1
    log = (out / "study.log").read_text()
    assert "lane 2: the run failed" in log and "lane 1: exit 0" in log and "lane 2: exit 0" in log
    assert len(list(out.glob("samples-*.png"))) == 2 and (out / "env.txt").is_file()
    # a lane the study would waste (a router switch on a method without a router: a copy of its baseline) is refused
    # before any lane trains, and the job's status says so
    bad = subprocess.run(["bash", "benchmarks/study_gpu_job.sh", "4", "0", "2", "--methods none",
                          "--methods multi-uniform --variant align.router_entropy=0"],
                         cwd=ROOT, env={**env, "OUT": str(tmp_path / "bad")}, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "lane 2 (--methods multi-uniform --variant align.router_entropy=0) is refused" in bad.stdout
    assert "multi-uniform does not read it" in bad.stdout and not (tmp_path / "bad" / "study.jsonl").exists()


def test_study_keys_of_recorded_results_stay_the_same(monkeypatch):
    """Results already recorded (docs/study/*/results.jsonl) are merged with new runs by study key. The key must not
    depend on where the checkout or the weights lie (the encoder enters as its kind and weights' sha256), and a new
    config field that changes no method's math (a compile switch, a cadence) must be in study_key's skip list, or
    every later run lands in a new table. A change of the math itself should change the key: then update these."""
    if not (SHARED / "weights/taef2").is_dir():
        pytest.skip(f"needs the TAEF2 weights in {SHARED / 'weights/taef2'} (../shared beside the checkout)")
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import study

    for size, extra, key in (("smoke", [], "adedc4dc64e8"),  # docs/study/smoke
                             ("pilot", [], "a7174156e906"),  # the CPU pilot (docs/study/pilot)
                             ("gpu", ["--steps", "500", "--eval-every", "500", "--lr", "2e-4"], "aff84c87544a"),  # calibration
                             ("gpu", ["--steps", "8000", "--eval-every", "2000"], "e5becbe478cd")):  # GPU job 2's lr, now the default
        args = study.parse_args(["--size", size, "--results", "unused.jsonl", *extra])
        for method in ("none", "ahpa-soft"):
            cfg = study.study_config(args, study.SIZES[size], method, variants=False)
            assert study.study_key(cfg, args, size)[0] == key, (size, method)
        cfg.train.wandb, cfg.train.wandb_name = "me/study", "a-name"  # where a copy of the metrics goes: no math
        assert study.study_key(cfg, args, size)[0] == key
        # the same weights elsewhere give the same key (the GPU jobs read them from .carry/)
        moved = study.parse_args(["--size", size, "--results", "unused.jsonl", *extra,
                                  "--encoder", f"taef2:{SHARED / 'weights' / '..' / 'weights' / 'taef2'}"])
        cfg = study.study_config(moved, study.SIZES[size], "none", variants=False)
        assert study.study_key(cfg, moved, size)[0] == key


def test_speed_up_over_vanilla_is_read_off_the_fd_curves(monkeypatch):
    """The study's headline: at which step a method reaches vanilla SiT's FD at step s (linear between evaluations),
    with bounds where the curves do not bracket it."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from study_tables import step_reaching, steps_to_match_none

    curve = [(1000, 10.0), (2000, 9.0), (3000, 8.5)]
    assert step_reaching(curve, 9.5) == ("at", 1500.0)
    assert step_reaching(curve, 10.5) == ("before", 1000) and step_reaching(curve, 8.0) == ("after", 3000)

    def rows(fds):
        return [{"step": 1000 * (i + 1), "fd": {"FD-r20": f}} for i, f in enumerate(fds)]

    series = {("none", 0): rows([10.0, 9.0, 8.5]), ("fast", 0): rows([9.0, 8.5, 8.4]),
              ("fast", 1): rows([9.0, 8.0, 7.0]), ("none", 1): rows([10.0, 9.5, 9.0])}
    table = "\n".join(steps_to_match_none(series, ["FD-r20"], ["none", "fast"]))
    # seed 0: none's 9.0 at 2000 reached at step 1000 (before: >2.00); none's 8.5 at 3000 reached at 2000 (1.50)
    # seed 1: none's 9.5 at 2000 before 1000 (>2.00); none's 9.0 at 3000 at step 1000 (>3.00)
    assert "| fast | (>1.00 / >1.00) | (>2.00 / >2.00) | (1.50 / >3.00) |" in table
    assert steps_to_match_none(series, ["FD-r20"], ["none", "fast"], per_flop=True) == []  # no FLOPs recorded


def test_speed_up_per_flop_charges_the_heads_until_the_alignment_stops(monkeypatch):
    """Per FLOP, a method that needs half the steps but twice the FLOPs per step is no faster; after align.stop_step
    its steps cost what vanilla SiT's do."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from study_tables import steps_to_match_none, tflop_to

    assert tflop_to({"aligned": 2.0, "flow": 1.0, "stop_step": 0}, 1500) == 3000
    assert tflop_to({"aligned": 2.0, "flow": 1.0, "stop_step": 1000}, 1500) == 2500

    def rows(fds, aligned, stop=0):
        cost = {"aligned": aligned, "flow": 1.0, "stop_step": stop}
        return [{"step": 1000 * (i + 1), "fd": {"FD-r20": f}, "tflop_per_step": cost} for i, f in enumerate(fds)]

    series = {("none", 0): rows([10.0, 9.0, 8.0, 7.0], 1.0), ("heavy", 0): rows([9.0, 7.0, 6.0, 5.0], 2.0),
              ("stopped", 0): rows([9.0, 7.0, 6.0, 5.0], 2.0, stop=1000)}
    steps = "\n".join(steps_to_match_none(series, ["FD-r20"], ["none", "heavy", "stopped"]))
    flops = "\n".join(steps_to_match_none(series, ["FD-r20"], ["none", "heavy", "stopped"], per_flop=True))
    # none's 8.0 at 3000 is reached at step 1500 and its 7.0 at 4000 at step 2000: 2x in steps. Per FLOP that is
    # 3000 / (2 x 1500) = 4000 / (2 x 2000) = 1x for heavy; with the heads stopped at 1000,
    # 3000 / (2 x 1000 + 500) = 1.2x and 4000 / (2 x 1000 + 1000) = 1.33x
    assert "| heavy | (>1.00) | (>2.00) | 2.00x (2.00) | 2.00x (2.00) |" in steps
    assert "| heavy | (>0.50) | (>1.00) | 1.00x (1.00) | 1.00x (1.00) |" in flops
    assert "| stopped | (>0.50) | (>1.00) | 1.20x (1.20) | 1.33x (1.33) |" in flops


def test_study_window_means_average_a_stopped_metric_over_its_own_steps(monkeypatch):
    """With align.stop_step inside an evaluation window, the alignment's metrics exist for only some of its steps:
    their mean is over those steps, not diluted by the steps after the stop."""
    import torch

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import study

    steps = [{"loss/flow": 1.0, "loss/align": 0.4, "align/level_loss": [0.2, 0.6]}] * 2 + [{"loss/flow": 3.0}] * 2
    sums, seen = {}, {}
    for m in steps:
        for k, v in {**m, "good_steps": 1.0}.items():
            sums[k] = sums.get(k, 0) + torch.tensor(v)
            seen[k] = seen.get(k, 0) + 1
    row = study.window_means(sums, 4, seen)
    assert row["loss/flow"] == pytest.approx(2.0) and row["loss/align"] == pytest.approx(0.4)
    assert row["align/level_loss"] == pytest.approx([0.2, 0.6]) and row["skipped_steps"] == 0


def test_study_report_plots_level_losses_of_a_run_whose_alignment_stopped(monkeypatch, tmp_path):
    """Evaluation rows after align.stop_step carry no per-level losses: the plot draws the rows that have them."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from study_plots import plot_levels

    def row(step, metrics):
        return {"step": step, "images": 32 * step, "levels": ["latent", "stage2"], "metrics": metrics}

    series = {("ahpa-soft[stop_step=2]", 0): [row(1, {"align/level_loss": [0.3, 0.5]}), row(2, {"align/level_loss": [0.2, 0.4]}),
                                               row(3, {"loss/flow": 1.0})]}
    assert plot_levels(series, 32, tmp_path / "levels.png", ["ahpa-soft[stop_step=2]"])
    assert (tmp_path / "levels.png").stat().st_size > 0


def test_study_report_pairs_each_ablation_with_its_own_method(monkeypatch):
    """`method[variant]` is compared with `method` of the same seed (what the variant alone changed), at the
    furthest step both reached; a variant without its method in the results has no row."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from study_tables import paired_with_base

    def rows(fds):
        return [{"step": 1000 * (i + 1), "fd": {"FD-r20": f}} for i, f in enumerate(fds)]

    series = {("ahpa-soft", 0): rows([10.0, 9.0]), ("ahpa-soft[stop_step=1000]", 0): rows([10.0, 9.25]),
              ("ahpa-soft", 1): rows([10.0, 9.5]), ("ahpa-soft[stop_step=1000]", 1): rows([10.0, 9.55]),
              ("stage2[weight=1.5]", 0): rows([9.0, 8.0])}
    methods = ["ahpa-soft", "ahpa-soft[stop_step=1000]", "stage2[weight=1.5]"]
    table = "\n".join(paired_with_base(series, ["FD-r20"], methods))
    assert "| ahpa-soft[stop_step=1000] | 2000 | 0, 1 | +0.150 (+0.250 / +0.050) |" in table
    assert "stage2[weight=1.5]" not in table


def test_study_report_sets_each_ahpa_run_against_the_baselines_of_its_variant(monkeypatch):
    """The study's question: AHPA minus each alignment baseline trained with the same variant, same seed, at every
    step; vanilla SiT and runs of another variant are not its baselines."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from study_tables import ahpa_against_baselines

    def rows(fds):
        return [{"step": 1000 * (i + 1), "fd": {"FD-r20": f}} for i, f in enumerate(fds)]

    series = {("ahpa-soft[weight=1.5]", 0): rows([9.0, 8.0]), ("ahpa-soft[weight=1.5]", 1): rows([9.0, 8.2]),
              ("multi-uniform[weight=1.5]", 0): rows([8.8, 8.1]), ("multi-uniform[weight=1.5]", 1): rows([8.9, 8.0]),
              ("vae-level:stage2", 0): rows([9.5, 8.5]), ("none", 0): rows([10.0, 9.0])}
    table = "\n".join(ahpa_against_baselines(series, "FD-r20", list(dict.fromkeys(m for m, _ in series))))
    assert ("| ahpa-soft[weight=1.5] | multi-uniform[weight=1.5] | 0, 1 | 1000: +0.150 (0/2); 2000: +0.050 (1/2) |"
            in table)
    assert "vae-level:stage2" not in table and "| none" not in table


def test_study_report_stores_pngs_with_a_palette_once(monkeypatch, tmp_path):
    """The report's PNGs travel with every device call (64 MiB with the study's inputs): compact_png rewrites a
    full-colour file with a 256-colour palette, keeps its size in pixels and its colours close, and leaves a file
    it already compacted alone."""
    import numpy as np
    from PIL import Image

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from study_plots import compact_png

    rng = np.random.default_rng(0)
    # a smooth image with noise, like a sample grid: many distinct colours
    ramp = np.linspace(0, 255, 96)
    rgb = np.stack([np.add.outer(ramp, ramp) / 2, np.tile(ramp, (96, 1)), np.tile(ramp[:, None], (1, 96))], -1)
    img = np.clip(rgb + rng.normal(0, 4, rgb.shape), 0, 255).astype(np.uint8)
    path = tmp_path / "grid.png"
    Image.fromarray(img).save(path)
    before = path.stat().st_size
    assert compact_png(path)
    with Image.open(path) as im:
        assert im.mode == "P" and im.size == (96, 96)
        back = np.asarray(im.convert("RGB")).astype(float)
    assert path.stat().st_size < before
    assert np.abs(back - img).mean() < 7  # 256 colours: ~4.5 levels of 255 on average here (32 colours: ~11)
    again = path.read_bytes()
    assert not compact_png(path) and path.read_bytes() == again


def test_study_report_sweeps_the_learning_rate_across_keys_that_differ_in_it_alone(monkeypatch, tmp_path):
    """Each lr is a study key of its own; the sweep table sets vanilla SiT's curves side by side, flags a window of
    skipped steps, and leaves out a key that differs in anything else (its curve would not be the lr's effect)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from study_report import lr_sweeps

    def row(key, lr, step, fd, skipped=0, steps=8000):
        cfg = {"train.lr": lr, "train.steps": steps, "model.preset": "S/1"}
        return (key, "none", 0, step), {"study": key, "step": step, "fd": {"FD-r20": fd, "FD-r32": fd - 0.3},
                                        "metrics": {"skipped_steps": skipped}, "config": cfg}

    evals = dict([row("a", 2e-4, 2000, 7.2), row("a", 2e-4, 4000, 5.7), row("b", 8e-4, 2000, 5.4),
                  row("b", 8e-4, 4000, 4.3, skipped=1500), row("c", 8e-4, 2000, 9.9, steps=500)])
    # a rate that diverged before its first evaluation has only its run row: it still shows, as the sweep's edge
    diverged = {("d", "none", 0): {"kind": "run", "study": "d", "config": {**evals[("a", "none", 0, 2000)]["config"], "train.lr": 3.2e-3},
                                   "diverged": "stopped at step 400: 150 of the last 200 steps had a non-finite loss or gradient"}}
    evals[("b", "none", 0, 4000)]["window_steps"] = 1800  # recorded: the footnote says it, not the gap between rows
    text = "\n".join(lr_sweeps(evals, diverged, tmp_path))
    assert "| 0.0002 | `a` | 7.200 / 6.900 | 5.700 / 5.400 |" in text
    assert "| 0.0008 | `b` | 5.400 / 5.100 | 4.300 / 4.000† |" in text
    assert "skipped 1500 of the 1800 steps before it" in text and "`c`" not in text
    assert "| 0.0032 | `d` | — | — |" in text and "diverged: stopped at step 400" in text
    assert (tmp_path / "lr-sweep-0.png").is_file()
    assert lr_sweeps(dict([row("a", 2e-4, 2000, 7.2)]), {}, tmp_path) == []  # one lr is no sweep


def test_study_report_lists_a_run_that_stopped_before_its_first_evaluation(tmp_path):
    """A run that diverged before its first evaluation writes only its run row; the report lists it."""
    results = tmp_path / "r.jsonl"
    results.write_text(json.dumps({"kind": "run", "study": "k1", "method": "ahpa-soft", "seed": 1, "config": {},
                                   "diverged": "stopped at step 200: 20 steps in a row had a non-finite loss or gradient"}) + "\n")
    _run(["benchmarks/study_report.py", "--results", str(results), "--out", str(tmp_path / "report")])
    text = (tmp_path / "report" / "README.md").read_text()
    assert "## Runs without an evaluation" in text
    assert "- study `k1`, ahpa-soft, seed 1: stopped at step 200: 20 steps in a row" in text


def test_report_merges_keys_that_differ_only_in_the_evaluation_cadence(tmp_path):
    """Evaluating draws none of training's random numbers, so runs evaluated every 4,000 steps join the table of the
    same settings evaluated every 2,000 (under the finer cadence's key), with their sample grids; a key that differs
    in anything else stays a study of its own."""
    def row(key, method, step, fd, every, lr=8e-4):
        cfg = {"train.lr": lr, "train.batch_size": 4, "model.preset": "S/1", "study.eval_every": every}
        return {"kind": "eval", "study": key, "method": method, "seed": 0, "variant": [], "step": step, "images": 4 * step,
                "fd": {"FD-r20": fd}, "ms_per_step": 1.0, "metrics": {}, "levels": [], "router": None, "config": cfg}

    def run(key, method, every, lr=8e-4):
        return {"kind": "run", "study": key, "method": method, "seed": 0, "ms_per_step_steady": 1.0, "complete": True,
                "config": row(key, method, 0, 0, every, lr)["config"]}
    rows = [row("fine", "none", 2000, 5.4, 2000), row("fine", "none", 4000, 4.3, 2000), run("fine", "none", 2000),
            row("coarse", "ahpa-soft", 4000, 4.0, 4000), run("coarse", "ahpa-soft", 4000),
            row("other", "ahpa-soft", 4000, 9.9, 4000, lr=2e-4),
            row("coarse", "none", 4000, 7.7, 4000)]  # a rerun of none under the coarse cadence: the home rows win
    results = tmp_path / "r.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from PIL import Image
    Image.new("RGB", (8, 8)).save(tmp_path / "samples-coarse-ahpa-soft-seed0-step4000.png")  # beside the results, as a job leaves it
    _run(["benchmarks/study_report.py", "--results", str(results), "--out", str(tmp_path / "report")])
    text = (tmp_path / "report" / "README.md").read_text()
    fine = text.split("## Study `fine`")[1].split("## Study")[0]
    assert "| none | 0 | 5.400 | 4.300 |" in fine and "| ahpa-soft | 0 | — | 4.000 |" in fine
    assert "study `coarse` (the same settings, evaluated every 4000 steps)" in fine
    assert "ahpa-soft-seed0-step4000: ![samples](samples-coarse-ahpa-soft-seed0-step4000.png)" in fine
    assert (tmp_path / "report" / "samples-coarse-ahpa-soft-seed0-step4000.png").is_file()
    assert "## Study `coarse`" not in text and "## Study `other`" in text  # moved, and not merged


def test_report_reads_gzipped_rows_with_appended_members(monkeypatch, tmp_path):
    """The pilots' rows are stored gzipped; a later run's rows are appended as another gzip member
    (`gzip -nc R.jsonl >> results.jsonl.gz`), and the report reads both, from the file or its folder."""
    import gzip
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from study_report import load_rows

    def row(step):
        return json.dumps({"kind": "eval", "study": "k", "method": "none", "seed": 0, "step": step, "config": {}}) + "\n"
    f = tmp_path / "results.jsonl.gz"
    f.write_bytes(gzip.compress(row(1000).encode()) + gzip.compress(row(2000).encode()))
    for where in (f, tmp_path):
        files, evals, _ = load_rows([where])
        assert files == [f] and sorted(k[3] for k in evals) == [1000, 2000]


@pytest.mark.skipif(not (SHARED / "data/cifar10/train16k.npz").is_file(), reason="needs ../shared (CIFAR-10, TAEF2, detectors)")
def test_study_checks_a_compiled_evaluation_against_the_eager_one(tmp_path):
    """--eval-compiled-too evaluates each point again with the sampler compiled: the row keeps the eager protocol's
    fd and adds fd_compiled (the same samples' seeds, so only rounding differs), and the report sets them side by side."""
    results = tmp_path / "r.jsonl"
    _run(["benchmarks/study.py", "--size", "smoke", "--methods", "none", "--steps", "2", "--eval-every", "2",
          "--eval-num", "20", "--eval-batch", "10", "--grid-images", "0", "--cache", str(tmp_path / "cache"),
          "--eval-compiled-too", "--results", str(results)])
    row = next(json.loads(l) for l in results.read_text().splitlines() if '"kind": "eval"' in l)
    assert set(row["fd_compiled"]) == set(row["fd"]) and row["eval_s_compiled"] > 0
    assert all(abs(row["fd_compiled"][k] - row["fd"][k]) < 0.01 * row["fd"][k] for k in row["fd"])
    _run(["benchmarks/study_report.py", "--results", str(results), "--out", str(tmp_path / "report"), "--smoke"])
    text = (tmp_path / "report" / "README.md").read_text()
    assert "**Compiled evaluation against the eager protocol**" in text and "| none | 0 | 2 |" in text


def rows(fds, first=1000):
    return [{"step": first * (i + 1), "fd": {"FD-r20": f}} for i, f in enumerate(fds)]


def test_load_rows_keeps_the_last_row_of_a_key(tmp_path, monkeypatch):
    """a rerun's row replaces the earlier one of the same (study, method, seed, step), also across files."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from study_report import load_rows

    def row(fd, kind="eval"):
        return json.dumps({"kind": kind, "study": "k", "method": "none", "seed": 0, "step": 1000, "fd": {"FD-r20": fd},
                           "config": {}}) + "\n"
    (tmp_path / "a.jsonl").write_text(row(9.0) + row(8.0))
    (tmp_path / "b.jsonl").write_text(row(7.0))
    _, evals, _ = load_rows([tmp_path / "a.jsonl"])
    assert evals[("k", "none", 0, 1000)]["fd"]["FD-r20"] == 8.0
    _, evals, _ = load_rows([tmp_path])  # files in name order: b after a
    assert evals[("k", "none", 0, 1000)]["fd"]["FD-r20"] == 7.0


def test_paired_with_none_uses_the_furthest_step_and_the_seeds_that_reached_it(monkeypatch):
    """method minus none (sign), at the furthest step any seed pair reached, with only those seeds."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from study_tables import paired_with_none

    series = {("none", 0): rows([10.0, 9.0, 8.0]), ("m", 0): rows([9.5, 8.5, 7.0]),
              ("none", 1): rows([10.0, 9.0]), ("m", 1): rows([9.0, 8.0])}  # seed 1 stopped at 2000
    table = "\n".join(paired_with_none(series, ["FD-r20"], ["none", "m"]))
    assert "| m | 3000 | 0 | -1.000 (-1.000) |" in table


def test_speed_up_is_the_mean_over_seeds_each_against_its_own_none(monkeypatch):
    """seed s is compared with none of seed s, and the headline is the mean of the seeds' ratios."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from study_tables import steps_to_match_none

    series = {("none", 0): rows([10.0, 9.0, 8.0, 7.0]), ("m", 0): rows([9.0, 7.0, 6.0, 5.0]),   # 2x
              ("none", 1): rows([10.0, 9.5, 9.0, 8.0]), ("m", 1): rows([10.0, 9.5, 9.0, 8.0])}  # 1x
    table = "\n".join(steps_to_match_none(series, ["FD-r20"], ["none", "m"]))
    # s = 4000: seed 0 reaches none's 7.0 at 2000 (2.00x), seed 1 reaches its own none's 8.0 at 4000 (1.00x)
    assert table.splitlines()[-1].endswith("| 1.50x (2.00 / 1.00) |")


def test_reaching_a_target_is_the_last_crossing_of_a_noisy_curve(monkeypatch):
    """a curve that dips below the target and comes back above has reached it only at its last crossing
    (ahpa.compare.images_to_reach, shared by `ahpa compare` and the study's speed-up), interpolated from the right end."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from study_tables import step_reaching

    from ahpa.compare import images_to_reach

    noisy = [(1000, 10.0), (2000, 9.0), (3000, 10.0), (4000, 8.0)]
    assert images_to_reach(noisy, 9.5) == 3250.0  # not 1500 (the first crossing)
    assert images_to_reach([(1000, 10.0), (2000, 9.0)], 9.75) == 1250.0  # asymmetric: the interpolation's direction
    dip = [(1000, 9.0), (2000, 10.0), (3000, 8.0)]
    assert step_reaching(dip, 9.5) == ("at", 2250.0)  # not ("before", 1000): its first point was below, then above


def test_report_marks_diverged_and_unfinished_runs(tmp_path, monkeypatch):
    """the 'complete' column: yes (run row), no (diverged) (run row that stopped), no (no run row)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from study_report import report_study

    cfg = {"train.batch_size": 4, "study.eval_every": 1000}
    evals = {("k", m, 0, 1000): {"kind": "eval", "study": "k", "method": m, "seed": 0, "step": 1000, "images": 4000,
                                  "fd": {"FD-r20": 5.0}, "metrics": {}, "levels": [], "router": None, "config": cfg}
             for m in ("none", "ahpa-soft", "ahpa-snr")}
    runs = {("k", "none", 0): {"ms_per_step_steady": 1.0, "complete": True},
            ("k", "ahpa-soft", 0): {"ms_per_step_steady": 1.0, "complete": False, "diverged": "stopped at step 1200: x"}}
    text = "\n".join(report_study("k", evals, runs, tmp_path, []))
    assert "| none | 0 | 5.000 | 1.0 | yes |" in text
    assert "| ahpa-soft | 0 | 5.000 | 1.0 | no (diverged) |" in text
    assert "| ahpa-snr | 0 | 5.000 | — | no |" in text


def test_study_evaluation_feeds_one_class_balanced_seed0_sample_set_to_every_detector(monkeypatch):
    """every evaluation of every method draws samples 0..num-1 with labels i % 10 and noise seed 0, once,
    and both detectors see the very same images."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import ahpa.sample
    import study
    from ahpa.config import SampleCfg
    from ahpa.metrics import FeatureStats

    calls = []

    def generate(bundle, indices, labels, seed, cfg):
        calls.append((list(indices), labels.tolist(), seed))
        idx = torch.tensor(indices)
        return ((idx[:, None, None, None] * 37 + seed * 101 + torch.arange(48).view(1, 4, 4, 3)) % 256).to(torch.uint8)

    monkeypatch.setattr(ahpa.sample, "generate", generate)
    seen = {}

    class Det:
        def __init__(self, name):
            self.name, self.dim, self.device = name, 6, torch.device("cpu")

        def features(self, x):
            seen.setdefault(self.name, []).append(x.clone())
            return x.flatten(1)[:, :6].double() + torch.arange(6.0)

    refs = [FeatureStats(dim=6).update(torch.randn(64, 6, generator=torch.Generator().manual_seed(i)) * 50) for i in (0, 1)]
    fd = study.evaluate(SimpleNamespace(num_classes=10), [Det("A"), Det("B")], refs, 30, 10, SampleCfg(steps=2))
    assert set(fd) == {"A", "B"}
    assert [i for c in calls for i in c[0]] == list(range(30))  # each sample once: one set for both detectors
    assert all(c[2] == 0 for c in calls)  # the same noise for every method and evaluation (study.eval_seed 0)
    assert all(lab == [i % 10 for i in idx] for idx, lab, _ in calls)  # class-balanced
    assert all(torch.equal(a, b) for a, b in zip(seen["A"], seen["B"], strict=True))


@pytest.mark.skipif(not (SHARED / "data/cifar10/train16k.npz").is_file(), reason="needs ../shared (CIFAR-10, TAEF2, detectors)")
def test_study_run_evaluates_the_ema_times_synced_windows_and_reports_the_steady_rate(monkeypatch, tmp_path):
    """each evaluation samples the EMA backbone; each timed window is closed by a device sync before its
    clock is read; the run's steady ms/step is the median of the windows after the first (warm-up excluded)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import benchlib
    import study
    from ahpa.train.loop import Trainer

    events, trainers = [], []
    real_init, real_step, real_sync = Trainer.__init__, Trainer.train_step, benchlib.sync

    def init(self, *a, **k):
        real_init(self, *a, **k)
        trainers.append(self)

    def step(self):
        events.append("step")
        if self.step == 0:
            time.sleep(0.3)  # a slow first step, as compilation makes it
        return real_step(self)

    def evaluate(bundle, detectors, refs, num, batch, scfg):
        events.append("eval")
        assert bundle.model is trainers[-1].parts.ema  # the EMA weights, not the trained ones
        return {d.name: 1.0 for d in detectors}

    monkeypatch.setattr(Trainer, "__init__", init)
    monkeypatch.setattr(Trainer, "train_step", step)
    monkeypatch.setattr(benchlib, "sync", lambda device: (events.append("sync"), real_sync(device)))
    monkeypatch.setattr(study, "evaluate", evaluate)
    results = tmp_path / "r.jsonl"
    study.main(["--size", "smoke", "--methods", "ahpa-soft", "--steps", "4", "--eval-every", "2", "--eval-num", "20",
                "--eval-batch", "10", "--grid-images", "0", "--cache", str(tmp_path / "cache"), "--results", str(results)])
    assert events == ["sync", "step", "step", "sync", "eval"] * 2
    out = [json.loads(line) for line in results.read_text().splitlines()]
    ev, run = [r for r in out if r["kind"] == "eval"], out[-1]
    assert run["ms_per_step_first_window"] == ev[0]["ms_per_step"] > 100  # the slow step is in the first window
    assert run["ms_per_step_steady"] == ev[1]["ms_per_step"] < 100  # the median of the windows after the first


def test_study_flops_per_step_are_three_times_an_independent_forward_count(monkeypatch):
    """`tflop_per_step` against torch's FlopCounterMode on the
    backbone's and the heads' forward (the SiT formula leaves out adaLN and the embedders: within 2%)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import study
    from benchlib import count_flops
    from ahpa.align.objective import Aligner
    from ahpa.config import AlignCfg
    from ahpa.models.sit import SiT, SiTConfig

    torch.manual_seed(0)
    model = SiT(SiTConfig(hidden_size=64, depth=2, num_heads=4, patch_size=1, input_size=8, in_channels=8, num_classes=10))
    aligner = Aligner(64, ["a", "b"], [16, 8], AlignCfg(projector_dim=128), "uniform", "cosine")
    B, n = 4, model.cfg.num_tokens
    x, t, y = torch.randn(B, 8, 8, 8), torch.rand(B), torch.randint(0, 10, (B,))
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.MATH):  # the CPU's fused SDPA kernel is not in FlopCounterMode's table; its matmuls are
        fwd = count_flops(lambda: model(x, t, y))
    heads = count_flops(lambda: aligner.projector(torch.randn(B, n, 64)))
    batch = 4096  # the record is rounded to 1e-6 TFLOP: a batch large enough for these tiny networks
    cost = study.tflop_per_step(model, aligner, batch, 0)
    assert cost["flow"] * 1e12 / batch == pytest.approx(3 * fwd / B, rel=0.03)
    assert (cost["aligned"] - cost["flow"]) * 1e12 / batch == pytest.approx(3 * heads / B, rel=1e-3)


def test_an_ablation_typed_in_another_order_is_one_run_and_a_wasted_one_is_refused(monkeypatch):
    """The same variants in another order used to make another label, so its seeds did not merge (job 3's seed 1
    typed the other way would have been two one-seed rows). Variants a method does not read (a copy of its baseline
    under another name), align.levels on vae-level, and a level the cache lacks are refused before anything trains."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import study

    base = ["--size", "smoke", "--results", "/nonexistent.jsonl", "--encoder", "taef2:/nonexistent"]
    labels = {study.method_label("ahpa-soft", study.parse_args(base + ["--variant", a, "--variant", b]))
              for a, b in (("align.weight=1.5", "align.projector_dim=512"), ("align.projector_dim=512", "align.weight=1.5"))}
    assert labels == {"ahpa-soft[weight=1.5,projector_dim=512]"}  # the published label (GPU job 3)
    with pytest.raises(SystemExit, match="align.weight is given twice"):
        study.parse_args(base + ["--variant", "align.weight=1.5", "--variant", "align.weight=2"])
    levels = ["stage1", "stage2", "stage3", "stage4", "latent"]
    args = study.parse_args(base + ["--variant", "align.router_entropy=0"])
    size = study.SIZES["smoke"]
    study.check_methods(args, size, ["ahpa-soft"], levels)  # the router reads it
    with pytest.raises(SystemExit, match="align.router_entropy=0: multi-uniform does not read it"):
        study.check_methods(args, size, ["ahpa-soft", "multi-uniform"], levels)
    args = study.parse_args(base + ["--variant", "align.levels=[latent,stage4]"])
    with pytest.raises(SystemExit, match="vae-level aligns the level --level names"):
        study.check_methods(args, size, ["vae-level"], levels)
    with pytest.raises(SystemExit, match="vae-level: align.levels names 'stage5'"):
        study.check_methods(study.parse_args(base + ["--level", "stage5"]), size, ["none", "vae-level"], levels)


def test_the_report_lists_skipped_methods_knows_smoke_rows_and_names_bad_inputs(tmp_path, monkeypatch):
    """A method the time budget skipped is listed under its study (it used to vanish); rows of the smoke size get the
    smoke banner without --smoke; a missing results file or a folder without rows is one line, exit non-zero."""
    src = ROOT / "docs/study/smoke/results.jsonl"
    rows = src.read_text() + json.dumps({"kind": "skipped", "study": "adedc4dc64e8", "method": "ahpa-snr", "seed": 3,
                                         "reason": "time budget"}) + "\n"
    (tmp_path / "r.jsonl").write_text(rows)
    _run(["benchmarks/study_report.py", "--results", str(tmp_path / "r.jsonl"), "--out", str(tmp_path / "report")])
    text = (tmp_path / "report" / "README.md").read_text()
    assert text.startswith("# Convergence study: SMOKE TEST, not results")
    assert "## Methods skipped by the time budget\n\n- study `adedc4dc64e8`, ahpa-snr, seed 3: time budget" in text
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    for given in (tmp_path / "nope.jsonl", tmp_path / "report"):
        res = subprocess.run([sys.executable, "benchmarks/study_report.py", "--results", str(given), "--out",
                              str(tmp_path / "x")], cwd=ROOT, env=env, capture_output=True, text=True)
        assert res.returncode != 0 and "Traceback" not in res.stderr
        assert ("no such file or folder" if given.name == "nope.jsonl" else "no study rows") in res.stderr


def test_fd_curves_average_the_seeds_every_method_has(monkeypatch, tmp_path):
    """A second seed of some methods must not move their curves alone: the plotted means are over the seeds every
    method has (here 0), at the steps they all reached; without a common seed each method keeps its own, said so."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from study_plots import mean_curve, plot_fd, seed_sets

    def rows(fds):
        return [{"step": 1000 * (i + 1), "images": 256000 * (i + 1), "fd": {"FD-r20": f}} for i, f in enumerate(fds)]

    series = {("none", 0): rows([10.0, 9.0]), ("none", 1): rows([12.0, 11.0]), ("ahpa-soft", 0): rows([9.0, 8.0]),
              ("ahpa-soft", 1): rows([11.0]), ("ahpa-snr", 0): rows([9.5, 8.5])}
    chosen, common = seed_sets(series, ["none", "ahpa-soft", "ahpa-snr"])
    assert common and chosen == {"none": [0], "ahpa-soft": [0], "ahpa-snr": [0]}
    assert mean_curve(series, "FD-r20", "none", chosen["none"]) == ([256000, 512000], [10.0, 9.0])
    # over both seeds: only the step both reached
    assert mean_curve(series, "FD-r20", "ahpa-soft", [0, 1]) == ([256000], [10.0])
    plot_fd(series, "FD-r20", 256, tmp_path / "fd.png", ["none", "ahpa-soft", "ahpa-snr"])
    assert (tmp_path / "fd.png").stat().st_size > 0

    apart = {("none", 0): rows([10.0]), ("ahpa-soft", 1): rows([9.0]), ("ahpa-soft", 2): rows([8.0])}
    chosen, common = seed_sets(apart, ["none", "ahpa-soft"])
    assert not common and chosen == {"none": [0], "ahpa-soft": [1, 2]}
    plot_fd(apart, "FD-r20", 256, tmp_path / "apart.png", ["none", "ahpa-soft"])
    assert (tmp_path / "apart.png").stat().st_size > 0


def test_report_figures_leave_room_for_long_labels_and_the_router_colourbar(monkeypatch, tmp_path):
    """A variant's label runs to ~120 characters: the speed bars and the FD legend make room for it instead of
    matplotlib giving up on the layout (a warning, and labels cut off), and the router panels share a colourbar."""
    import warnings

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from PIL import Image
    from study_plots import plot_fd, plot_router, plot_speed

    long = "ahpa-soft[weight=1.5,projector_dim=128,shared_trunk=false,level_depths=[stage1:1,stage2:2,stage3:2,stage4:3,latent:3]]"
    series = {(m, 0): [{"step": 1000, "images": 256000, "fd": {"FD-r20": 9.0}}] for m in ("none", long)}
    runs = {("k", m, 0): {"ms_per_step_steady": 50.0} for m in ("none", long)}
    t = [i / 10 for i in range(11)]
    # pure yellow (1) and purple (0) only near t = 0, at the panels' left edges: the right edge of the figure holds
    # them only in a colourbar
    router = {"mode": "soft", "levels": ["stage1", "latent"], "t": t, "weights": [[1 - x / 2, x / 2] for x in t]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Tight layout not applied", "not compatible with tight_layout"
        plot_fd(series, "FD-r20", 256, tmp_path / "fd.png", ["none", long])
        plot_speed(runs, "k", tmp_path / "speed.png", ["none", long])
        plot_router([{"step": 1000, "router": router}, {"step": 2000, "router": router}], tmp_path / "router.png", "x")
    import numpy as np

    with Image.open(tmp_path / "router.png") as im:
        # the colourbar's viridis ramp: a column right of the panels holds its yellow end and its purple end
        rgb = np.asarray(im.convert("RGB")).astype(int)
    right = rgb[:, int(rgb.shape[1] * 0.9):]
    assert ((right[..., 0] > 200) & (right[..., 1] > 200) & (right[..., 2] < 80)).any()  # yellow, g = 1
    assert ((right[..., 0] < 90) & (right[..., 1] < 30) & (right[..., 2] > 60)).any()  # dark purple, g = 0


def test_the_fd_figure_draws_the_means_its_legend_names_and_speed_bars_keep_the_report_order(monkeypatch):
    """Read off the figures themselves (the test above checks the means and seeds apart from the plot): each method's
    line is the mean over the seeds its legend entry names, a method's other seeds are drawn faint and named so, and
    the y label and title say what the curves are; without a common seed, that the means are over different seeds.
    The speed bars run top to bottom in the report's method order."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import study_plots

    from ahpa.train.plots import pyplot

    figures = []
    monkeypatch.setattr(study_plots, "save_figure", lambda fig, path, dpi=110: figures.append(fig))

    def rows(fds):
        return [{"step": 1000 * (i + 1), "images": 256000 * (i + 1), "fd": {"FD-r20": f}} for i, f in enumerate(fds)]

    def drawn(ax):  # (legend entry, FDs) of each line, in drawing order; a faint line has none
        return [("faint" if line.get_label().startswith("_") else line.get_label(), list(line.get_ydata()))
                for line in ax.get_lines()]

    try:
        series = {("none", 0): rows([10.0, 9.0]), ("none", 1): rows([12.0, 11.0]), ("ahpa-soft", 0): rows([9.0, 8.0])}
        study_plots.plot_fd(series, "FD-r20", 256, "fd.png", ["none", "ahpa-soft"])
        ax = figures[-1].axes[0]
        assert drawn(ax) == [("none (seed 0; 1 faint)", [10.0, 9.0]), ("faint", [10.0, 9.0]), ("faint", [12.0, 11.0]),
                             ("ahpa-soft (seed 0)", [9.0, 8.0])]
        assert ax.get_ylabel() == "FD-r20, seed 0" and ax.get_title() == "faint: each seed alone"

        apart = {("none", 0): rows([10.0]), ("ahpa-soft", 1): rows([9.0]), ("ahpa-soft", 2): rows([7.0])}
        study_plots.plot_fd(apart, "FD-r20", 256, "apart.png", ["none", "ahpa-soft"])
        ax = figures[-1].axes[0]
        assert drawn(ax)[0] == ("none (seed 0)", [10.0]) and drawn(ax)[1] == ("ahpa-soft (seeds 1, 2)", [8.0])
        assert ax.get_ylabel() == "FD-r20, mean over each method's own seeds"
        assert ax.get_title().startswith("no seed common to every method: means over different seeds")

        runs = {("k", m, 0): {"ms_per_step_steady": ms} for m, ms in (("none", 50.0), ("ahpa", 60.0), ("repa", 55.0))}
        study_plots.plot_speed(runs, "k", "speed.png", ["none", "repa", "ahpa"])
        ax = figures[-1].axes[0]
        top_down = sorted(zip(ax.get_yticks(), (t.get_text() for t in ax.get_yticklabels())),
                          key=lambda tick: tick[0], reverse=not ax.yaxis_inverted())
        assert [name for _, name in top_down] == ["none", "repa", "ahpa"]
    finally:
        for fig in figures:
            pyplot().close(fig)


@pytest.mark.skipif(not (SHARED / "data/cifar10/train16k.npz").is_file(), reason="needs ../shared (CIFAR-10, TAEF2, detectors)")
def test_study_evaluates_reconstructed_ema_lengths_beside_the_runs_own(tmp_path):
    """--ema-lengths tracks EDM2's post-hoc EMAs and evaluates each listed sigma_rel, reconstructed from the run's
    snapshots, as rows of their own kind: the run's own rows, its training and its study key are those of a run
    without the flag, and a length the snapshots cannot represent is refused with its reason."""
    common = ["benchmarks/study.py", "--size", "smoke", "--methods", "ahpa-soft", "--steps", "16", "--eval-every", "8",
              "--eval-num", "20", "--eval-batch", "10", "--grid-images", "0", "--cache", str(tmp_path / "cache")]
    _run([*common, "--results", str(tmp_path / "plain.jsonl")])
    _run([*common, "--ema-lengths", "0.05,0.15,0.28", "--results", str(tmp_path / "ema.jsonl")])
    plain, ema = ([json.loads(l) for l in (tmp_path / f).read_text().splitlines()] for f in ("plain.jsonl", "ema.jsonl"))
    own = [r for r in ema if r["kind"] == "eval"]
    assert [(r["study"], r["step"], r["fd"]) for r in own] == [(r["study"], r["step"], r["fd"]) for r in plain
                                                               if r["kind"] == "eval"]
    assert own[-1]["metrics"] == [r for r in plain if r["kind"] == "eval"][-1]["metrics"]  # the same training
    made = [r for r in ema if r["kind"] == "eval_ema"]
    assert [(r["step"], r["ema_sigma"]) for r in made] == [(16, 0.05), (16, 0.15)]  # the last point only
    assert all(r["study"] == own[0]["study"] and set(r["fd"]) == set(own[0]["fd"]) and r["ema_snapshots"] > 0
               for r in made)
    assert made[0]["ema_residual"] < 1e-3  # a tracked length at a snapshot's step is that snapshot
    assert made[0]["fd"] != own[-1]["fd"]  # another average of the weights than the run's own EMA
    refused = [r for r in ema if r["kind"] == "ema_refused"]
    assert [(r["step"], r["ema_sigma"]) for r in refused] == [(16, 0.28)] and "residual" in refused[0]["reason"]
    assert all(r["inputs"] == recorded_inputs() for r in ema)  # every kind names its data file and decoder
    bad = subprocess.run([sys.executable, "benchmarks/study.py", "--ema-lengths", "0.3", "--results", str(tmp_path / "x")],
                         capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert bad.returncode == 2 and "0.3: a sigma_rel lies in (0, 0.2887)" in bad.stderr


def test_the_smoke_and_pilot_banners_describe_the_rows_not_the_sizes_defaults(monkeypatch):
    """A smoke run of 20 samples was bannered "evaluated on 500 samples" (the size's default, written as text)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from study_report import banner_values

    pilot = {"study.size": "pilot", "model.preset": "S/1", "model.hidden_size": 96, "model.depth": 6,
             "train.batch_size": 32, "study.limit": 4096, "data.resolution": 32, "study.eval_num": 2000}
    assert banner_values([{"config": pilot}]) == {"hidden": "96", "depth": "6", "tokens": "16", "batch": "32",
                                                  "images": "4,096", "side": "32x32", "eval_num": "2,000"}
    quick = {**pilot, "study.eval_num": 20, "model.preset": "S/2"}
    values = banner_values([{"config": pilot}, {"config": quick}, {"kind": "skipped"}])
    assert values["eval_num"] == "2,000 or 20" and values["tokens"] == "16 or 4"
