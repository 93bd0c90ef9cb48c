"""The published study reports (docs/study/*/README.md) are what docs/study.md's "Commands" write from the committed
rows, so that anyone can rerun them. A report left stale after rows were appended, a report whose text depends on
the run (an order, a clock, a path), or a published report without its command fails here."""

from __future__ import annotations

import difflib
import json
import os
import re
import subprocess
import sys

import pytest

from tests import doc_commands
from tests.doc_commands import ROOT

REPORTS = [c for c in doc_commands.find() if c.file == "docs/study.md" and c.program == "benchmarks/study_report.py"]


def out_of(cmd) -> str:
    words = list(cmd.args)
    return words[words.index("--out") + 1]


def test_every_published_report_has_its_command():
    published = sorted(p.parent.relative_to(ROOT).as_posix() for p in (ROOT / "docs/study").glob("*/README.md"))
    assert sorted(out_of(c) for c in REPORTS) == published, "docs/study.md, Commands: one study_report.py line per report"


# pilot-long's 380 rows and ~100 figures take about a minute on one CPU thread
@pytest.mark.parametrize("cmd", [pytest.param(c, marks=[pytest.mark.slow] if "pilot-long" in out_of(c) else [])
                                 for c in REPORTS], ids=out_of)
def test_published_report_regenerates_from_its_rows(cmd, tmp_path):
    words = list(cmd.args)
    words[words.index("--out") + 1] = str(tmp_path)  # the documented command, writing beside instead of over it
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    res = subprocess.run([sys.executable, cmd.program, *words], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    published = ROOT / out_of(cmd)
    new, old = (tmp_path / "README.md").read_text(), (published / "README.md").read_text()
    diff = "".join(list(difflib.unified_diff(old.splitlines(True), new.splitlines(True), "published", "regenerated"))[:40])
    assert new == old, f"{published / 'README.md'} is not what `{cmd.text.strip()}` writes now:\n{diff}"
    # the figures by name (their bytes depend on matplotlib's version)
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(p.name for p in published.glob("*.png"))


def test_the_hand_check_in_study_md_prints_the_number_it_quotes():
    """docs/study.md shows how to check one number of its tables from the committed rows; the snippet must still run
    and print that number (a renamed key or label, or a row changed under it, fails here)."""
    text = (ROOT / "docs/study.md").read_text()
    found = re.search(r"\*\*Checking a number by hand\.\*\*(.*?)```python\n(.*?)```", text, re.S)
    assert found, "docs/study.md: the 'Checking a number by hand' paragraph and its python block"
    quoted = re.search(r"is (\d+\.\d+) below", found.group(1)).group(1)
    res = subprocess.run([sys.executable, "-c", found.group(2)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == f"-{quoted}"


def test_fd_pairs_in_the_gpu_job_tables_are_rows_of_the_results():
    """Each 'FD-r20 / FD-r32' pair in the tables of docs/study.md's GPU sections is a row of docs/study/gpu/results.jsonl
    (or compile-modes.jsonl), or the difference of two rows of one seed at one step, at the precision written."""
    rows = [json.loads(line) for name in ("results.jsonl", "compile-modes.jsonl")
            for line in (ROOT / "docs/study/gpu" / name).read_text().splitlines() if line.strip()]
    evals = {(r["study"], r["method"], r["seed"], r["step"]): r for r in rows if r["kind"] == "eval" and len(r["fd"]) == 2}
    pairs = [(r["fd"]["FD-r20"], r["fd"]["FD-r32"]) for r in evals.values()]
    pairs += [(a["fd"]["FD-r20"] - b["fd"]["FD-r20"], a["fd"]["FD-r32"] - b["fd"]["FD-r32"])
              for a in evals.values() for b in evals.values() if a is not b and (a["seed"], a["step"]) == (b["seed"], b["step"])]
    text = (ROOT / "docs/study.md").read_text().replace("−", "-")
    sections = re.split(r"^## ", text, flags=re.M)
    checked = 0
    for section in (s for s in sections if s.startswith("GPU")):
        for line in (li for li in section.splitlines() if li.startswith("|")):
            for x, y in re.findall(r"(-?\d+\.\d+) / (-?\d+\.\d+)", line):
                digits = len(x.split(".")[1])
                assert any(f"{a:.{digits}f}" == x and f"{b:.{digits}f}" == y for a, b in pairs), \
                    f"docs/study.md: {x} / {y} in `{line[:80]}` is no row of docs/study/gpu/results.jsonl"
                checked += 1
    assert checked >= 30  # the calibration's, job 1's, job 2's and job 3's tables were read
