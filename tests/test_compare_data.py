"""`ahpa compare --out` writes compare.json beside compare.md: the table's and the notes' values as data, the table
written from the same structure (ahpa/compare_data.py), no NaN, and the docs' example that reads it runs."""

import contextlib
import io
import json
import math
import re
import warnings
from pathlib import Path

import pytest

from ahpa.cli import main
from tests.test_compare import _evaluated, _rows
from tests.test_compare_seeds import _seeds

DOC = Path(__file__).resolve().parents[1] / "docs" / "evaluation.md"


def _flops(run, flops):
    (run / "starts.jsonl").write_text(json.dumps({"step": 0, "train_flops_per_image": flops}) + "\n")
    return run


def _no_nan(text):
    def refuse(name):
        raise AssertionError(f"compare.json holds a bare {name}, which JSON has not")
    return json.loads(text, parse_constant=refuse)


def _seed_runs(root):
    """Two seeds of vanilla SiT (100 FLOPs an image), two of AHPA (120), and one AHPA run of another weight (110)
    at the baseline's last value by its first evaluation: a lower bound."""
    runs = [*_seeds(root, "none", [10.0, 8.0, 6.0], [10.4, 8.4, 6.4]),
            *_seeds(root, "ahpa", [9.0, 7.0, 5.0], [9.4, 7.4, 5.4]),
            _evaluated(root, "early", [6.0, 5.9, 5.0], "align.method=ahpa", "align.weight=2.0")]
    for run, flops in zip(runs, [100.0, 100.0, 120.0, 120.0, 110.0]):
        _flops(run, flops)
    return runs


def _cell_number(cell):
    return float(re.sub(r"[^0-9.]", "", cell))


def test_compare_json_holds_the_numbers_of_the_table_for_groups_of_seeds(tmp_path, capsys):
    runs, out = _seed_runs(tmp_path), tmp_path / "cmp"
    assert main(["compare", *map(str, runs), "--out", str(out)]) == 0
    md = (out / "compare.md").read_text()
    data = _no_nan((out / "compare.json").read_text())
    assert data["schema"] == 1 and data["metric"] == "FD-r20" and data["metrics"] == ["FD-r20"]
    assert data["baseline"] == "none-s0 (2 seeds: 0, 1)"
    table = _rows(md)
    for row in data["rows"]:
        cells = table[row["name"] + (" (baseline)" if row["baseline"] else "")].strip("| ").split(" | ")
        assert cells[1] == row["label"] and int(cells[2].replace(",", "")) == row["last"]["images"]
        assert [_cell_number(c) for c in cells[3:7]] == pytest.approx(
            [row["last"]["value"], row["best"], row["at_baseline_last"], row["images_to_reach"]], abs=1e-3)
        for cell, speed in zip(cells[7:9], [row["speed_up"], row["speed_up_per_flop"]]):
            assert speed["kind"] in ("exact", "lower_bound")
            assert cell.startswith(">= ") == (speed["kind"] == "lower_bound")
            assert _cell_number(cell) == pytest.approx(speed["value"], abs=5e-3)
        assert cells[9] == "{median:.0f} ({min:.0f}-{max:.0f})".format(**row["img_per_s"])
    # compare.md's table is written from this structure: the JSON read back gives the same table
    from ahpa import compare_data

    lines = md.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("| run |")))
    assert compare_data.markdown_table(data) == "\n".join(lines[start:start + 2 + len(data["rows"])])
    none, ahpa, early = data["rows"]
    # the groups: their means (ahpa's crosses the baseline's 6.2 at 250 images: 300 / 250) and each seed's values
    assert ahpa["speed_up"] == {"kind": "exact", "value": pytest.approx(1.2)}
    assert ahpa["speed_up_per_flop"] == {"kind": "exact", "value": pytest.approx(1.2 * 100 / 120)}
    curve = ahpa["curves"]["FD-r20"]
    assert curve["step"] == [1, 2, 3] and curve["images"] == [100, 200, 300]
    assert curve["value"] == pytest.approx([9.2, 7.2, 5.2]) and curve["seeds"] == [[9.0, 7.0, 5.0], [9.4, 7.4, 5.4]]
    assert ahpa["flow_loss"]["value"] == pytest.approx([1.0, 0.5, 1 / 3]) and "seeds" not in ahpa["flow_loss"]
    assert [(m["name"], m["seed"], m["finished"]) for m in ahpa["runs"]] == [("ahpa-s0", 0, True), ("ahpa-s1", 1, True)]
    assert ahpa["runs"][1]["path"] == str(runs[3].resolve()) and ahpa["group"] and ahpa["finished"]
    assert [(p["seed"], p["kind"]) for p in ahpa["paired_speed_ups"]] == [(0, "exact"), (1, "exact")]
    assert none["baseline"] and none["speed_up"] == {"kind": "exact", "value": 1.0} and none["paired_speed_ups"] == []
    # a lower bound is a kind, not a ">=" in a string; the settings that differ, per row
    assert early["speed_up"] == {"kind": "lower_bound", "value": pytest.approx(3.0)}
    assert early["speed_up_per_flop"] == {"kind": "lower_bound", "value": pytest.approx(3.0 * 100 / 110)}
    assert ">= 3.00x | >= 2.73x" in table["early"]
    assert (none["settings"]["align.method"], ahpa["settings"]["align.weight"], early["settings"]["align.weight"]) == \
        ("none", 0.5, 2.0) and "align.weight" in none["settings_not_read"]
    assert none["settings"]["train.seed"] == [0, 1] and early["settings"]["train.seed"] == 0
    # the notes, as the lines compare.md shows
    notes = data["notes"]
    assert [f"- {line}" in md for line in notes["seed_groups"] + notes["paired_seeds"]] == [True] * 4
    assert notes["unfinished"] == [] and notes["table"] == [] and data["non_finite"] == []
    assert "compare.json" in capsys.readouterr().out


def test_compare_json_has_no_nan_and_marks_what_is_not_comparable(tmp_path, capsys):
    """A diverged flow loss (NaN, inf in metrics.jsonl) is null in compare.json with where it was; a run evaluated
    otherwise than the baseline has a kind, not a speed-up; a baseline that did not improve gives its note."""
    base = _evaluated(tmp_path, "none", [10.0, 8.0, 6.0], "align.method=none")
    other = _evaluated(tmp_path, "fewer", [9.0, 7.0, 5.0], "align.method=ahpa",
                       setup="eval.num=100 sampler=euler-50 guidance=[0.0, 1.0]")
    with open(other / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "images": 400, "loss/flow": NaN}\n{"step": 5, "images": 500, "loss/flow": -Infinity}\n')
    out = tmp_path / "cmp"
    assert main(["compare", str(base), str(other), "--out", str(out)]) == 0
    text = (out / "compare.json").read_text()
    data = _no_nan(text)
    assert "NaN" not in text and "Infinity" not in text
    fewer = data["rows"][1]
    assert fewer["flow_loss"]["value"][3:] == [None, None] and fewer["flow_loss"]["step"][3:] == [4, 5]
    assert data["non_finite"] == [{"at": "/rows/1/flow_loss/value/3", "was": "nan"},
                                  {"at": "/rows/1/flow_loss/value/4", "was": "-inf"}]
    assert fewer["speed_up"] == {"kind": "not_comparable", "value": None}
    assert "not comparable" in _rows(capsys.readouterr().out)["fewer"]
    assert fewer["evaluated_otherwise"].startswith("eval.num=100")
    assert data["notes"]["evaluated_otherwise"][0].startswith("fewer: eval.num=100")
    # a baseline at or below its last value from its first evaluation on: no speed-up read, and why
    flat = _evaluated(tmp_path, "flat", [6.0, 7.0, 7.5], "align.method=none")
    ahpa = _evaluated(tmp_path, "b", [9.0, 7.0, 5.0], "align.method=ahpa")
    assert main(["compare", str(flat), str(ahpa), "--out", str(out)]) == 0
    data = _no_nan((out / "compare.json").read_text())
    assert [r["speed_up"]["kind"] for r in data["rows"]] == ["not_read", "not_read"]
    note = data["notes"]["table"][0]
    assert note.startswith("No speed-up is read from these curves") and note in capsys.readouterr().out


def test_the_documented_example_prints_a_latex_row_per_method(tmp_path, monkeypatch):
    text = DOC.read_text()
    code = re.search(r"## Comparing runs: `ahpa compare`\n.*?```python\n(.*?)```", text, re.S).group(1)
    assert len(code.strip().splitlines()) <= 12  # a short example
    monkeypatch.chdir(tmp_path)
    runs = _seed_runs(Path("runs"))
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["compare", *map(str, runs), "--out", "runs/compare-seeds"]) == 0
    printed = io.StringIO()
    # a file the example leaves open is a ResourceWarning in a reader's own script (`json.load(open(...))` was)
    with contextlib.redirect_stdout(printed), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        exec(compile(code, str(DOC), "exec"), {})
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []
    sd = math.sqrt(2 * 0.2 ** 2)  # of 6.0 and 6.4, of 5.0 and 5.4
    assert printed.getvalue().splitlines() == [
        f"none & 6.20 $\\pm$ {sd:.2f} & 1.00$\\times$ \\\\",
        f"ahpa (soft) & 5.20 $\\pm$ {sd:.2f} & 1.20$\\times$ \\\\",
        "ahpa (soft) & 5.00 & $\\geq$3.00$\\times$ \\\\"]
