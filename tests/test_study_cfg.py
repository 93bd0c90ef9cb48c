"""The study's guided evaluation: `study.py --eval-cfg` rows and the report's "With classifier-free guidance" section."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import run_script as _run
from tests.test_study_tools import recorded_inputs

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


@pytest.mark.skipif(not (SHARED / "data/cifar10/train16k.npz").is_file(), reason="needs ../shared (CIFAR-10, TAEF2, detectors)")
def test_study_evaluates_the_final_ema_with_guidance_beside_the_runs_own(tmp_path):
    """--eval-cfg adds rows of kind eval_cfg at the last point; the run's own rows, its training and its study key are
    those of a run without the flag, and guidance changes the samples (another FD)."""
    common = ["benchmarks/study.py", "--size", "smoke", "--methods", "none", "--steps", "8", "--eval-every", "4",
              "--eval-num", "20", "--eval-batch", "10", "--grid-images", "0", "--cache", str(tmp_path / "cache")]
    _run([*common, "--results", str(tmp_path / "plain.jsonl")])
    _run([*common, "--eval-cfg", "1.5,1.8@0.7", "--results", str(tmp_path / "cfg.jsonl")])
    plain, cfg = ([json.loads(l) for l in (tmp_path / f).read_text().splitlines()] for f in ("plain.jsonl", "cfg.jsonl"))
    own = [r for r in cfg if r["kind"] == "eval"]
    assert [(r["study"], r["step"], r["fd"], r["metrics"]) for r in own] == \
        [(r["study"], r["step"], r["fd"], r["metrics"]) for r in plain if r["kind"] == "eval"]
    guided = [r for r in cfg if r["kind"] == "eval_cfg"]
    assert [(r["step"], r["cfg_scale"], r["guidance_interval"]) for r in guided] == [(8, 1.5, [0.0, 1.0]),
                                                                                   (8, 1.8, [0.0, 0.7])]
    assert all(r["study"] == own[0]["study"] and set(r["fd"]) == set(own[0]["fd"]) for r in guided)
    assert guided[0]["fd"] != own[-1]["fd"] != guided[1]["fd"]
    assert all(r["inputs"] == recorded_inputs() for r in cfg)  # every kind names its data file and decoder
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    for bad, said in (("1.0", "a guidance scale is above 1"), ("1.5@1.2", "HIGH in (0, 1]"), ("x", "SCALE or SCALE@HIGH")):
        out = subprocess.run([sys.executable, "benchmarks/study.py", "--eval-cfg", bad, "--results", str(tmp_path / "x")],
                             capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)  # a value let through would train
        assert out.returncode == 2 and said in out.stderr, out.stderr


def _row(kind, method, seed, fd, **more):
    config = {"study.size": "pilot", "study.eval_every": 4000, "train.batch_size": 32, "model.preset": "S/1"}
    return {"kind": kind, "study": "k1", "method": method, "seed": seed, "step": 4000, "images": 128000,
            "fd": {"FD-r20": fd}, "config": config, **more}


def test_report_section_pairs_each_guided_fd_with_vanilla_sits_of_the_same_seed(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from study_cfg import cfg_section
    from study_report import load_rows

    rows = []
    for method, seed, plain, guided in (("none", 0, 8.6, 6.0), ("none", 1, 8.4, 6.2), ("ahpa-soft", 0, 8.5, 6.1),
                                        ("ahpa-soft", 1, 8.2, 5.9)):
        rows += [_row("eval", method, seed, plain),
                 _row("eval_cfg", method, seed, guided, cfg_scale=1.5, guidance_interval=[0.0, 1.0])]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    guided: dict = {}
    _, evals, _ = load_rows([tmp_path / "r.jsonl"], guided=guided)
    assert len(evals) == 4 and len(guided) == 4  # eval_cfg rows are not eval rows
    series = {}
    for (_, m, s, _), r in evals.items():
        series.setdefault((m, s), []).append(r)
    lines = cfg_section("k1", series, guided, ["none", "ahpa-soft"], ["FD-r20"])
    assert "| none | 0, 1 | 8.500 | 6.100 |" in lines and "| ahpa-soft | 0, 1 | 8.350 | 6.000 |" in lines
    # unguided: -0.1 and -0.2 (both seeds ahead); guided: +0.1 and -0.3
    assert "| ahpa-soft | -0.150 (2/2) | -0.100 (1/2) |" in lines
    assert cfg_section("other", series, guided, ["none", "ahpa-soft"], ["FD-r20"]) == []

    broken = dict(rows[1])
    del broken["guidance_interval"]
    (tmp_path / "bad.jsonl").write_text(json.dumps(broken) + "\n")
    with pytest.raises(SystemExit, match="line 1: an eval_cfg row without guidance_interval"):
        load_rows([tmp_path / "bad.jsonl"], guided={})


@pytest.fixture
def study_cfg(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import study_cfg

    return study_cfg


def test_guidance_list_reads_scales_and_intervals_and_refuses_what_cannot_guide(study_cfg):
    parse = study_cfg.guidance_list
    # spaces and an empty item (a trailing comma) are forgiven; HIGH defaults to 1 (the whole trajectory) and may be 1
    assert parse(" 1.5, 1.8@0.7 ,") == [(1.5, 1.0), (1.8, 0.7)]
    assert parse("2@1,4@0.05") == [(2.0, 1.0), (4.0, 0.05)]
    for bad, said in (("1", "above 1"), ("0.5", "above 1"), ("1.5@0", r"HIGH in \(0, 1\]"), ("1.5@-0.2", "HIGH in"),
                      ("1.5@1.01", "HIGH in"), ("1.5@x", "SCALE or SCALE@HIGH"), ("@0.7", "SCALE or SCALE@HIGH"),
                      ("", "no guidance scale given"), (" , ", "no guidance scale given")):
        with pytest.raises(argparse.ArgumentTypeError, match=said):
            parse(bad)


def test_guided_rows_sample_with_the_guidance_they_record(study_cfg, capsys):
    """Each row's FD comes from samples drawn with its own scale and interval (t in [0, HIGH]), the rest of the
    sampler as the unguided evaluation's, the same number of samples and batch."""
    from types import SimpleNamespace

    from ahpa.config import SampleCfg

    calls = []

    def evaluate(bundle, detectors, refs, num, batch, scfg):
        calls.append((bundle, detectors, refs, num, batch, scfg))
        return {"FD-r20": 10 * scfg.cfg_scale + scfg.guidance_high}

    base = SampleCfg(solver="euler", steps=50, cfg_scale=1.0, micro_batch=10)
    args = SimpleNamespace(eval_cfg=[(1.5, 1.0), (1.8, 0.7)], eval_num=20, eval_batch=10)
    rows = list(study_cfg.guided_rows("bundle", evaluate, args, ["det"], ["ref"], base))
    assert [(r["kind"], r["cfg_scale"], r["guidance_interval"], r["fd"]) for r in rows] == [
        ("eval_cfg", 1.5, [0.0, 1.0], {"FD-r20": 16.0}), ("eval_cfg", 1.8, [0.0, 0.7], {"FD-r20": 18.7})]
    for (bundle, dets, refs, num, batch, scfg), (scale, high) in zip(calls, args.eval_cfg, strict=True):
        assert (bundle, dets, refs, num, batch) == ("bundle", ["det"], ["ref"], 20, 10)
        assert (scfg.cfg_scale, scfg.guidance_low, scfg.guidance_high) == (scale, 0.0, high)
        assert (scfg.solver, scfg.steps, scfg.micro_batch) == ("euler", 50, 10)
    assert "cfg 1.8, t <= 0.7: FD-r20 18.7000" in capsys.readouterr().out


def _rows(method, seed, step, plain, guided):
    """An eval row and its eval_cfg rows ({(scale, high): fd}) of one run at `step`."""
    out = [{**_row("eval", method, seed, plain), "step": step}]
    for (scale, high), fd in guided.items():
        out.append({**_row("eval_cfg", method, seed, fd, cfg_scale=scale, guidance_interval=[0.0, high]), "step": step})
    return out


def test_report_section_means_seeds_says_missing_ones_and_pairs_only_shared_seeds(study_cfg, tmp_path):
    """Three seeds, one missing from a guided column of each method, a tie with vanilla SiT, one scale guided over two
    intervals (the whole trajectory and t <= 0.7: two columns) and a second step: the values below are worked by hand."""
    from study_report import load_rows

    whole, late, strong = (1.5, 1.0), (1.8, 0.7), (1.8, 1.0)
    rows = [  # at step 4000; each method lacks one seed in one guided column
        *_rows("none", 0, 4000, 9.0, {whole: 6.0, late: 5.5, strong: 5.8}),
        *_rows("none", 1, 4000, 8.0, {whole: 6.2, late: 5.6, strong: 5.9}),
        *_rows("none", 2, 4000, 6.0, {whole: 5.0, strong: 4.9}),
        *_rows("ahpa-soft", 0, 4000, 8.0, {whole: 5.9, late: 5.4, strong: 5.7}),
        *_rows("ahpa-soft", 1, 4000, 8.0, {whole: 6.4, late: 5.4, strong: 5.9}),
        *_rows("ahpa-soft", 2, 4000, 6.5, {late: 4.9, strong: 4.8}),
        # an earlier step, after the later one in the file
        *_rows("none", 0, 2000, 12.0, {whole: 10.0}),
        *_rows("ahpa-soft", 0, 2000, 11.0, {whole: 10.5}),
    ]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    guided: dict = {}
    _, evals, _ = load_rows([tmp_path / "r.jsonl"], guided=guided)
    assert len(guided) == 8 + 8 + 2  # no two columns of one scale collide
    series: dict = {}
    for (_, m, s, _), r in sorted(evals.items(), key=lambda kv: kv[0][3]):
        series.setdefault((m, s), []).append(r)
    lines = study_cfg.cfg_section("k1", series, guided, ["none", "ahpa-soft"], ["FD-r20"])
    tables = [line for line in lines if line.startswith("|") and not line.startswith("|---")]
    assert tables == [
        "| method | seeds | no guidance | cfg 1.5 |",
        "| none | 0 | 12.000 | 10.000 |",
        "| ahpa-soft | 0 | 11.000 | 10.500 |",
        "| method | no guidance | cfg 1.5 |",
        "| ahpa-soft | -1.000 (1/1) | +0.500 (0/1) |",
        "| method | seeds | no guidance | cfg 1.5 | cfg 1.8, t <= 0.7 | cfg 1.8 |",
        # means over the seeds each column has: (9 + 8 + 6) / 3, (6.0 + 6.2 + 5.0) / 3, (5.5 + 5.6) / 2, ...
        "| none | 0, 1, 2 | 7.667 | 5.733 | 5.550 (no seed 2) | 5.533 |",
        "| ahpa-soft | 0, 1, 2 | 7.500 | 6.150 (no seed 2) | 5.233 | 5.467 |",
        "| method | no guidance | cfg 1.5 | cfg 1.8, t <= 0.7 | cfg 1.8 |",
        # differences over the seeds both have: (-1 + 0 + 0.5) / 3 with the tie not ahead; (-0.1 + 0.2) / 2 over
        # seeds 0, 1 (ahpa-soft lacks 2); (-0.1 - 0.2) / 2 over 0, 1 (vanilla lacks 2); (-0.1 + 0 - 0.1) / 3
        "| ahpa-soft | -0.167 (1/3) | +0.050 (1/2) | -0.150 (2/2) | -0.067 (2/3) |",
    ]
    assert [line for line in lines if line.startswith("**")] == ["**FD-r20** at step 2000:", "**FD-r20** at step 4000:"]
    # without vanilla SiT among the methods, no paired table (nothing to pair with)
    alone = study_cfg.cfg_section("k1", series, guided, ["ahpa-soft"], ["FD-r20"])
    assert not any("minus vanilla SiT" in line for line in alone)
    assert "| ahpa-soft | 0, 1, 2 | 7.500 | 6.150 (no seed 2) | 5.233 | 5.467 |" in alone
