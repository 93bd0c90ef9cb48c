"""The study's guided evaluation: `study.py --eval-cfg` rows and the report's "With classifier-free guidance" section."""

from __future__ import annotations

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
                             capture_output=True, text=True, cwd=ROOT, env=env)
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
