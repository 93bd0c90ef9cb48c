"""The study report's "EMA length" subsection (benchmarks/study_ema.py): post-hoc EMA rows ("eval_ema",
"ema_refused") read beside the eval rows, tabled per EMA length, paired with vanilla SiT, and left out of every
other table. Rows are built from the shape of a committed eval row."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from tests.conftest import run_script

ROOT = Path(__file__).resolve().parents[1]
with gzip.open(ROOT / "docs/study/pilot-long/results.jsonl.gz", "rt") as f:  # a real row: train.ema_decay 0.9999, warm-up
    TEMPLATE = next(r for r in map(json.loads, f) if r["kind"] == "eval")
REASON = "--posthoc-sigma 0.1 at step 4,000: residual 12.0% above the 10% accepted"


@pytest.fixture(autouse=True)
def benchmarks_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))


def eval_row(method, seed, step, fd, key="k", **config):
    return {**TEMPLATE, "study": key, "method": method, "seed": seed, "step": step, "images": 32 * step,
            "fd": {"FD-r20": fd, "FD-r32": fd + 1}, "config": {**TEMPLATE["config"], **config}}


def ema_row(method, seed, step, sigma, fd, key="k", residual=0.01, **config):
    keep = {k: v for k, v in eval_row(method, seed, step, fd, key, **config).items()
            if k not in ("metrics", "levels", "router", "ms_per_step", "train_s")}
    return {**keep, "kind": "eval_ema", "ema_sigma": sigma, "ema_residual": residual, "ema_snapshots": 16}


def refused_row(method, seed, step, sigma, key="k"):
    return {"kind": "ema_refused", "study": key, "method": method, "seed": seed, "step": step, "ema_sigma": sigma,
            "reason": REASON}


def run_row(method, seed, key="k"):
    return {"kind": "run", "study": key, "method": method, "seed": seed, "ms_per_step_steady": 50.0, "complete": True,
            "config": TEMPLATE["config"]}


# FD-r20 at step 4000: (the run's EMA, sigma_rel 0.05, sigma_rel 0.10) per (method, seed); None: refused
FDS = {("none", 0): (10.0, 10.5, 9.8), ("none", 1): (10.2, 10.7, 10.0),
       ("ahpa-soft", 0): (9.9, 9.0, 9.7), ("ahpa-soft", 1): (10.1, 9.2, 9.9), ("ahpa-soft", 2): (50.0, 50.0, None),
       ("vae-level:stage2", 0): (9.95, 10.2, 9.9), ("vae-level:stage2", 1): (10.15, 10.4, 10.4)}


def study_rows() -> list[dict]:
    rows = []
    for (m, s), (own, at05, at10) in FDS.items():
        rows += [eval_row(m, s, 2000, own + 3), eval_row(m, s, 4000, own), run_row(m, s), ema_row(m, s, 4000, 0.05, at05)]
        rows.append(ema_row(m, s, 4000, 0.10, at10) if at10 is not None else refused_row(m, s, 4000, 0.10))
    # reconstructions of a run without an eval row at that step: listed, not averaged
    return rows + [ema_row("multi-uniform", 0, 4000, 0.05, 1.0), ema_row("multi-uniform", 0, 4000, 0.10, 1.0)]


def section(rows: list[dict], tmp_path) -> str:
    from study_ema import ema_section
    from study_report import method_order

    series, ema = {}, {}
    for r in rows:
        if r["kind"] == "eval":
            series.setdefault((r["method"], r["seed"]), []).append(r)
        elif r["kind"] in ("eval_ema", "ema_refused"):
            ema[(r["study"], r["method"], r["seed"], r["step"], r["ema_sigma"])] = r
    methods = method_order({m for m, _ in series})
    return "\n".join(ema_section("k", series, ema, methods, ["FD-r20", "FD-r32"], tmp_path))


def test_the_ema_length_table_averages_complete_seeds_and_marks_each_methods_best(tmp_path):
    text = section(study_rows(), tmp_path)
    # the run's EMA's sigma_rel comes from the rows' config: 0.9999 with warm-up at step 4000
    assert "| method | n seeds | run's EMA (σ_rel≈0.091) | σ_rel 0.05 | σ_rel 0.1 | best σ_rel |" in text
    assert "| none | 2 (0, 1) | 10.100 | 10.600 | **9.900** | 0.1 |" in text
    # seed 2's 0.10 was refused: it is left out of every column (its 50.0 would show), and said so
    assert "| ahpa-soft | 2 (0, 1) | 10.000 | **9.100** | 9.800 | 0.05 |" in text
    assert "ahpa-soft seed 2 (lacks σ_rel 0.1 (refused))" in text
    assert "| multi-uniform | 0 | — | — | — | — |" in text
    assert "multi-uniform seed 0 (lacks the run's own EMA (no eval row at step 4000))" in text
    assert "**FD-r32** by EMA length at step 4000:" in text and "| none | 2 (0, 1) | 11.100 | 11.600 | **10.900** | 0.1 |" in text
    assert f"- σ_rel 0.1 at step 4000: ahpa-soft seed 2. Reason (ahpa-soft seed 2): {REASON}" in text
    assert "largest per σ_rel: 0.05: 1.00%, 0.1: 1.00%; from 16 snapshots." in text
    # the reconstruction nearest sigma_rel 0.091 (0.10) against the run's own EMA: vae-level seed 1, 10.40 - 10.15
    assert "(0.1 for 0.091) minus the run's own EMA, largest |difference| +0.2500 (FD-r20; vae-level:stage2 seed 1)" in text
    assert (tmp_path / "ema-length-FD-r20-k.png").is_file() and "![FD-r20 against the EMA length](ema-length-FD-r20-k.png)" in text


def test_the_paired_table_sets_each_method_at_its_best_length_against_vanillas_best(tmp_path):
    text = section(study_rows(), tmp_path).split("**FD-r32** by EMA length")[0]
    # (a) the run's EMA, (b) the same sigma_rel, (c) each at its own best (ahpa-soft 0.05, none 0.10)
    assert ("| ahpa-soft | 0, 1 | -0.100 (-0.100 / -0.100) | -1.500 (-1.500 / -1.500) | -0.100 (-0.100 / -0.100) | "
            "-0.800 (-0.800 / -0.800) at 0.05 vs 0.1 |") in text
    # vae-level is ahead of vanilla SiT at the run's EMA, behind it with each at its best: the line names it
    assert ("| vae-level:stage2 | 0, 1 | -0.050 (-0.050 / -0.050) | -0.300 (-0.300 / -0.300) | +0.250 (+0.100 / +0.400) | "
            "+0.250 (+0.100 / +0.400) at 0.1 vs 0.1 |") in text
    assert "The sign against vanilla SiT changes from (a) to (c) for: vae-level:stage2 (-0.050 → +0.250)" in text
    # without the flip, the line says none changed
    rows = [r for r in study_rows() if not (r["method"] == "vae-level:stage2")]
    assert "No method's sign against vanilla SiT changes from (a) to (c)." in section(rows, tmp_path)


def test_the_run_emas_length_follows_its_config(tmp_path):
    rows = [{**r, "config": {**r["config"], "train.ema_warmup": False}} if "config" in r else r for r in study_rows()]
    text = section(rows, tmp_path)
    assert "run's EMA (σ_rel≈0.300)" in text  # 0.9999 without warm-up still holds 67% of the initial weights
    assert "(0.1 for 0.300) minus the run's own EMA" in text and "differ by up to 0.200" in text


def test_post_hoc_rows_leave_the_report_as_it_was_and_add_their_section(tmp_path):
    """The whole report with and without post-hoc EMA rows: the same text but the new subsection (last in its study's
    section) and the list of post-hoc rows whose study has no eval rows."""
    plain = [r for r in study_rows() if r["kind"] in ("eval", "run")]
    lost = ema_row("none", 0, 4000, 0.05, 7.0, key="lost", **{"train.lr": 1e-3})  # other settings: another study
    for name, rows in (("a", plain), ("b", study_rows() + [lost])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        run_script(["benchmarks/study_report.py", "--results", str(tmp_path / name / "results.jsonl"),
                    "--out", str(tmp_path / name / "report")])
    a, b = ((tmp_path / n / "report" / "README.md").read_text() for n in "ab")
    start = b.index("### EMA length (post-hoc reconstruction)")
    orphans = b.index("## Post-hoc EMA rows of studies without evaluation rows")
    assert b[:start] + b[orphans:].split("\n\n", 2)[2] == a
    assert "| ahpa-soft | 2 (0, 1) | 10.000 | **9.100** | 9.800 | 0.05 |" in b[start:orphans]
    assert "- study `lost`, none, seed 0, step 4000: σ_rel 0.05" in b[orphans:]


def test_load_rows_keys_post_hoc_rows_by_sigma_moves_them_with_their_cadence_and_keeps_the_last(tmp_path):
    from study_report import load_rows

    fine, coarse = {"study.eval_every": 1000}, {"study.eval_every": 2000}
    rows = [eval_row("none", 0, 2000, 9.0, key="fine", **fine), eval_row("none", 1, 2000, 9.1, key="coarse", **coarse),
            refused_row("none", 1, 2000, 0.05, key="coarse"), ema_row("none", 1, 2000, 0.05, 8.0, key="coarse", **coarse),
            refused_row("none", 1, 2000, 0.10, key="coarse")]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ema = {}
    _, evals, _ = load_rows([tmp_path / "r.jsonl"], ema=ema)
    assert sorted(evals) == [("fine", "none", 0, 2000), ("fine", "none", 1, 2000)]  # post-hoc rows are not eval rows
    assert sorted(ema) == [("fine", "none", 1, 2000, 0.05), ("fine", "none", 1, 2000, 0.10)]
    got = ema[("fine", "none", 1, 2000, 0.05)]  # the rerun's reconstruction replaced the earlier refusal
    assert got["kind"] == "eval_ema" and got["evaluated_as"] == "coarse" and got["fd"]["FD-r20"] == 8.0
    assert ema[("fine", "none", 1, 2000, 0.10)]["kind"] == "ema_refused"  # a row without config moves by its key
    assert load_rows([tmp_path / "r.jsonl"])[1] == evals  # without `ema`, as before
    bad = {k: v for k, v in ema_row("none", 0, 2000, 0.05, 8.0).items() if k != "ema_residual"}
    (tmp_path / "r.jsonl").write_text(json.dumps(rows[0]) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(SystemExit, match=r"r.jsonl, line 2: a eval_ema row without ema_residual"):
        load_rows([tmp_path / "r.jsonl"], ema={})
