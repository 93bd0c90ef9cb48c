import json

import pytest

from ahpa import compare, config
from ahpa.cli import main


def _run(root, name, method, fds, weight=0.5):
    """A run directory as the trainer writes one: config.yaml, metrics.jsonl with log and eval rows, DONE."""
    d = root / name
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(config.dump(config.load(None, [f"align.method={method}", f"align.weight={weight}"])))
    rows = []
    for i, fd in enumerate(fds, 1):
        rows.append({"step": i, "images": 100 * i, "loss/flow": 1.0 / i, "img_per_s": 50.0 + i})
        rows.append({"step": i, "images": 100 * i, "eval/FD-r20": fd})
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "DONE").write_text("{}\n")
    return d


def test_images_to_reach_and_value_at_interpolate_between_evaluations():
    curve = [(100, 9.0), (200, 7.0), (300, 5.0)]
    assert compare.images_to_reach(curve, 6.0) == 250.0
    assert compare.images_to_reach(curve, 9.5) == 100.0 and compare.images_to_reach(curve, 4.0) is None
    assert compare.value_at(curve, 250) == 6.0 and compare.value_at(curve, 300) == 5.0
    # noisy evaluations: a dip below the target that does not last is not reaching it
    noisy = [(100, 5.5), (200, 7.0), (300, 5.0)]
    assert compare.images_to_reach(noisy, 6.0) == 250.0 and compare.images_to_reach(noisy, 5.5) == 275.0
    assert compare.value_at(curve, 400) is None


def test_compare_ranks_against_the_vanilla_run_and_names_what_differs(tmp_path, capsys):
    base = _run(tmp_path, "sit", "none", [10.0, 8.0, 6.0])
    ahpa = _run(tmp_path, "ahpa", "ahpa", [9.0, 7.0, 5.0], weight=1.5)
    slow = _run(tmp_path, "repa", "multi-uniform", [11.0, 9.0, 7.0])
    out = tmp_path / "cmp"
    assert main(["compare", str(ahpa), str(base), str(slow), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert "| 5.000 | 5.000 | 5.000 | 250 | 1.20x | 52 |" in rows["ahpa"]  # reaches 6.0 at 250 of the baseline's 300
    assert "1.00x" in rows["sit (baseline)"] and "not reached" in rows["repa"]
    assert "- `align.weight`: ahpa=1.5, sit=0.5, repa=0.5" in text and "- `align.method`:" in text
    assert (out / "compare.md").read_text() in text and (out / "FD-r20.png").is_file() and (out / "flow-loss.png").is_file()
    # a baseline whose first evaluation was already below its last: still 1.00x, not 3.00x
    wobbly = _run(tmp_path, "wobbly", "none", [6.5, 8.0, 7.0])
    assert main(["compare", str(wobbly), str(ahpa), "--baseline", "wobbly"]) == 0
    rows = {line.split(" | ")[0].strip("| "): line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")}
    assert "| 300 | 1.00x |" in rows["wobbly (baseline)"] and "| 200 | 1.50x |" in rows["ahpa"]
    assert main(["compare", str(ahpa), str(base), "--baseline", "nope"]) == 2
    assert "--baseline 'nope' is none of the runs: ahpa, sit" in capsys.readouterr().err
    assert main(["compare", str(tmp_path)]) == 2
    assert "is not a run directory (no config.yaml)" in capsys.readouterr().err


def test_compare_reads_a_real_run_without_evaluations(tmp_path, tiny, capsys):
    from ahpa.train.loop import Trainer

    Trainer(tiny("train.steps=2"), tmp_path / "a").run()
    Trainer(tiny("train.steps=2", "align.method=none"), tmp_path / "b").run()
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    text = capsys.readouterr().out
    assert "No run has evaluations" in text and "baseline b" in text
    assert "`align.method`: a='ahpa', b='none'" in text
    assert "Trained in different environments" not in text  # the same machine and code


def test_a_run_records_each_start_and_compare_names_other_environments(tmp_path, tiny, capsys):
    import torch

    from ahpa.provenance import environment, last_start, source_revision
    from ahpa.train.loop import Trainer

    Trainer(tiny("train.steps=1"), tmp_path / "a").run()
    Trainer(tiny("train.steps=2"), tmp_path / "a").run()  # resumed: a second start, from step 1
    rows = [json.loads(line) for line in (tmp_path / "a" / "starts.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1] and last_start(tmp_path / "a") == rows[1]
    assert rows[0]["torch"] == torch.__version__ and rows[0]["processes"] == 1 and rows[0]["device"].startswith("cpu")
    assert rows[0]["source"] == source_revision() and set(environment()) <= set(rows[0])
    # runs measured on other hardware: their img/s is no comparison, and compare says so
    b = _run(tmp_path, "b", "none", [1.0])
    (b / "starts.jsonl").write_text(json.dumps({**rows[1], "device": "NVIDIA H200", "processes": 8}) + "\n")
    assert main(["compare", str(tmp_path / "a"), str(b)]) == 0
    text = capsys.readouterr().out
    assert "Trained in different environments" in text
    assert f"- device: a={rows[1]['device']}, b=NVIDIA H200" in text and "- processes: a=1, b=8" in text
    assert "- torch:" not in text  # the same torch: not listed


def test_a_damaged_metrics_file_is_named_and_a_torn_last_line_is_dropped(tmp_path):
    d = _run(tmp_path, "x", "none", [1.0])
    rows = len(compare.read_run(d).flow)
    with open(d / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "loss/fl')  # a kill during the append
    assert len(compare.read_run(d).flow) == rows
    with open(d / "metrics.jsonl", "a") as f:
        f.write('\n{"step": 10, "loss/flow": 1.0}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 3: not JSON"):
        compare.read_run(d)


def test_the_source_revision_is_this_checkouts_commit_and_none_for_an_installed_copy(tmp_path):
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from ahpa.provenance import source_revision

    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        pytest.skip("not run from a git checkout")
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert source_revision() in (head, head + "+dirty")
    # the package copied elsewhere (as pip installs it): no checkout of its own, even inside another repository
    site = tmp_path / "site"
    shutil.copytree(root / "src" / "ahpa", site / "ahpa", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    out = subprocess.run([sys.executable, "-c", "from ahpa.provenance import source_revision; print(source_revision())"],
                         env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True)
    assert out.stdout.strip() == "None", out.stderr
