"""The study's rows name the files they were made from (benchmarks/study_inputs.py): study.py refuses to append a run
to rows of the same table made from another data file or decoder, before anything trains, and the report refuses to
merge such rows. Rows without the field (every row recorded before it) are unknown and merge as before."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DATA, TAEF2 = SHARED / "data/cifar10/train16k.npz", SHARED / "weights/taef2"
OTHER = "0" * 64  # another file's sha256


def sha(path: Path) -> str:  # independent of the library's sha256_file
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(autouse=True)
def benchmarks_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))


def write(path: Path, rows: list[dict]) -> str:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    path.write_text(text)
    return text


@pytest.mark.skipif(not DATA.is_file() or not TAEF2.is_dir(), reason="needs ../shared (CIFAR-10, TAEF2)")
def test_study_refuses_to_append_rows_of_other_inputs_before_anything_trains(tmp_path):
    import study
    from study_inputs import input_hashes

    flags = ["--size", "smoke", "--methods", "none,ahpa-soft", "--steps", "2", "--eval-every", "2", "--eval-num", "10",
             "--eval-batch", "10", "--grid-images", "0", "--cache", str(tmp_path / "cache")]
    args = study.parse_args([*flags, "--results", "unused.jsonl"])
    key, common = study.study_key(study.study_config(args, study.SIZES["smoke"], "none", variants=False), args, "smoke")
    ours = {"data": sha(DATA), "decoder": sha(TAEF2 / "taef2_decoder.pth")}
    assert input_hashes(DATA, args.encoder) == ours

    def row(inputs=None, **more):
        return {"kind": "eval", "study": key, "method": "none", "seed": 0, "step": 2, "fd": {"FD-r20": 1.0},
                "config": common, **({"inputs": inputs} if inputs else {}), **more}

    results = tmp_path / "r.jsonl"
    # line 1 predates the field (accepted as it is), line 2 is another train16k.npz
    before = write(results, [row(), row({**ours, "data": OTHER})])
    for check in ([], ["--check"]):  # the GPU job's check of each lane refuses it too, before any lane trains
        with pytest.raises(SystemExit) as e:
            study.main([*flags, *check, "--results", str(results)])
        said = str(e.value)
        assert f"--results {results}, line 2" in said and f"study {key}" in said and "inputs.data" in said
        assert f"sha256 {OTHER} there and {ours['data']} in this run" in said and "another --results file" in said
    assert results.read_text() == before and not (tmp_path / "cache").exists()  # nothing prepared, nothing written

    # another decoder beside the same encoder: the study key is the same, the decoder's sha256 is not
    other = tmp_path / "taef2"
    shutil.copytree(TAEF2, other)
    state = torch.load(other / "taef2_decoder.pth", map_location="cpu")
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = state[name] + 1e-3
    torch.save(state, other / "taef2_decoder.pth")
    moved = study.parse_args([*flags, "--results", "unused.jsonl", "--encoder", f"taef2:{other}"])
    assert study.study_key(study.study_config(moved, study.SIZES["smoke"], "none", variants=False), moved,
                           "smoke")[0] == key
    write(results, [row(ours)])
    with pytest.raises(SystemExit, match=rf"line 1: .*inputs\.decoder .* is sha256 {ours['decoder']} there and "
                                         rf"{sha(other / 'taef2_decoder.pth')} in this run"):
        study.main([*flags, "--check", "--encoder", f"taef2:{other}", "--results", str(results)])
    # a key that differs in the evaluation cadence alone shares the report's table: refused too
    write(results, [row({**ours, "data": OTHER}, study="coarse", config={**common, "study.eval_every": 4})])
    with pytest.raises(SystemExit, match="line 1: its rows of study coarse were made from other inputs"):
        study.main([*flags, "--check", "--results", str(results)])


def test_rows_of_other_settings_or_without_inputs_are_no_reason_to_refuse(tmp_path):
    from study_inputs import check_append

    ours, common = {"data": "a" * 64, "decoder": "b" * 64}, {"train.lr": 8e-4, "study.eval_every": 2}
    rows = [{"study": "k", "config": common},  # before the field
            {"study": "k", "config": common, "inputs": ours},
            {"study": "k", "config": common, "inputs": {"data": None, "decoder": ours["decoder"]}},  # data unknown
            {"study": "lr", "config": {**common, "train.lr": 2e-4}, "inputs": {**ours, "data": OTHER}}]  # another table
    write(tmp_path / "r.jsonl", rows)
    check_append(tmp_path / "r.jsonl", [("k", common)], ours)
    check_append(tmp_path / "missing.jsonl", [("k", common)], ours)  # a new file
    write(tmp_path / "r.jsonl", [*rows, {"study": "k", "config": common, "inputs": {**ours, "decoder": OTHER}}])
    with pytest.raises(SystemExit, match=f"line 5: .*inputs.decoder .* is sha256 {OTHER} there and {'b' * 64} in"):
        check_append(tmp_path / "r.jsonl", [("k", common)], ours)


def test_the_report_refuses_to_merge_rows_of_other_inputs(tmp_path):
    from study_report import load_rows

    ours = {"data": "a" * 64, "decoder": "b" * 64}

    def row(step, inputs=None, key="k", every=2000):
        return {"kind": "eval", "study": key, "method": "none", "seed": 0, "step": step, "fd": {"FD-r20": 1.0},
                "config": {"train.lr": 8e-4, "study.eval_every": every}, **({"inputs": inputs} if inputs else {})}

    # rows from before the field merge with rows that record it, as they always did
    write(tmp_path / "a.jsonl", [row(2000), row(4000, ours)])
    assert sorted(k[3] for k in load_rows([tmp_path / "a.jsonl"])[1]) == [2000, 4000]
    write(tmp_path / "b.jsonl", [row(6000), row(8000, {**ours, "data": OTHER})])
    with pytest.raises(SystemExit) as e:
        load_rows([tmp_path])
    said = str(e.value)
    assert said.startswith(f"{tmp_path / 'b.jsonl'}, line 2: study k's row was made from other inputs than "
                           f"{tmp_path / 'a.jsonl'}, line 2 (study k)")
    assert f"inputs.data (the training data file, --data) is sha256 {OTHER} here and {'a' * 64} there" in said
    assert "its own --results and --out" in said
    # keys that differ in the evaluation cadence alone are one table (merge_cadences): checked across them
    write(tmp_path / "b.jsonl", [row(8000, {**ours, "decoder": OTHER}, key="coarse", every=4000)])
    with pytest.raises(SystemExit, match=r"study coarse's row .* than .*a\.jsonl, line 2 \(study k\): field inputs\.decoder"):
        load_rows([tmp_path])
    write(tmp_path / "b.jsonl", [row(8000, {**ours, "decoder": OTHER}, key="other", every=4000) | {
        "config": {"train.lr": 2e-4, "study.eval_every": 4000}}])  # another lr: another table, no conflict
    assert len(load_rows([tmp_path])[1]) == 3


def test_a_run_whose_data_is_unknown_appends_and_gzipped_or_torn_files_are_read_as_the_report_reads_them(tmp_path):
    """This run's data file unknown (a folder of images: no sha256) is no conflict with rows that know theirs; a
    gzipped results file (a finished pilot's) is checked as its text, and lines that are no row (a row torn by a
    killed job, stray JSON) are skipped, the refusal naming the conflicting row's own line."""
    import gzip

    from study_inputs import check_append

    ours, common = {"data": "a" * 64, "decoder": "b" * 64}, {"train.lr": 8e-4, "study.eval_every": 2}
    write(tmp_path / "r.jsonl", [{"study": "k", "config": common, "inputs": ours}])
    check_append(tmp_path / "r.jsonl", [("k", common)], {"data": None, "decoder": ours["decoder"]})
    lines = ['{"study": "k", "config": {"train.lr": 8e-4, "stu', "[1, 2]", '"text"',
             json.dumps({"study": "k", "config": common, "inputs": {**ours, "data": OTHER}})]
    (tmp_path / "r.jsonl.gz").write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    with pytest.raises(SystemExit, match=rf"r\.jsonl\.gz, line 4: .*inputs\.data .* is sha256 {OTHER} there"):
        check_append(tmp_path / "r.jsonl.gz", [("k", common)], ours)


@pytest.mark.skipif(not TAEF2.is_dir(), reason="needs ../shared (TAEF2)")
def test_a_folder_of_images_has_no_data_sha256(tmp_path):
    """--data a folder of images: its rows record the data as unknown (None), the decoder as its weights' sha256."""
    from study_inputs import input_hashes

    (tmp_path / "images").mkdir()
    assert input_hashes(tmp_path / "images", f"taef2:{TAEF2}") == {"data": None, "decoder": sha(TAEF2 / "taef2_decoder.pth")}
