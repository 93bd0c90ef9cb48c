import json

import pytest

from ahpa import compare, config
from ahpa.cli import main


def _run(root, name, method, fds, weight=0.5, flops=None):
    """A run directory as the trainer writes one: config.yaml, metrics.jsonl with log and eval rows, DONE, and with
    `flops` a start record of its training FLOPs per image."""
    d = root / name
    d.mkdir(parents=True)
    if flops is not None:
        (d / "starts.jsonl").write_text(json.dumps({"step": 0, "train_flops_per_image": flops}) + "\n")
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
    assert "| 5.000 | 5.000 | 5.000 | 250 | 1.20x | — | 52 (51-53) |" in rows["ahpa"]  # no FLOPs recorded: no per FLOP  # reaches 6.0 at 250 of the baseline's 300
    assert "1.00x" in rows["sit (baseline)"] and "not reached" in rows["repa"]
    # vanilla SiT reads no align.*: its value is not one side of the difference
    assert "- `align.weight`: ahpa=1.5, sit=(not read), repa=0.5" in text and "- `align.method`:" in text
    assert (out / "compare.md").read_text() in text and (out / "FD-r20.png").is_file() and (out / "flow-loss.png").is_file()
    # a baseline whose first evaluation was already below its last: still 1.00x, not 3.00x
    wobbly = _run(tmp_path, "wobbly", "none", [6.5, 8.0, 7.0])
    assert main(["compare", str(wobbly), str(ahpa), "--baseline", "wobbly"]) == 0
    rows = {line.split(" | ")[0].strip("| "): line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")}
    assert "| 300 | 1.00x |" in rows["wobbly (baseline)"] and "| 200 | 1.50x |" in rows["ahpa"]
    # its FD rose at its end: the speed-ups read against its last value are said to be so
    noisy = _run(tmp_path, "noisy", "none", [7.909, 7.650, 7.847])
    lower = _run(tmp_path, "lower", "ahpa", [8.029, 7.374, 7.591])  # below the baseline after its first evaluation
    assert main(["compare", str(noisy), str(lower)]) == 0
    text = capsys.readouterr().out
    assert "| 0.97x |" in text  # 123.9 images against 127.8: the rule's figure stands, with its note
    assert ("The baseline's FD-r20 rose at its end (lowest 7.650 at 200 images, last 7.847 at 300): speed-ups are read "
            "against its last value") in text
    assert main(["compare", str(base), str(ahpa)]) == 0 and "rose at its end" not in capsys.readouterr().out
    # a baseline whose FD rose after its first evaluation: a copy of it is not faster, and no speed-up is read
    rising = _run(tmp_path, "rising", "none", [7.0, 8.5, 8.835])
    copy = _run(tmp_path, "copy", "none", [7.0, 8.5, 8.835])
    assert main(["compare", str(rising), str(copy), str(ahpa)]) == 0
    text = capsys.readouterr().out
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert "| 100 | — |" in rows["copy"] and "| 108 | — |" in rows["ahpa"] and "3.00x" not in text
    assert "No speed-up is read from these curves: the baseline's FD-r20 was at or below its last value (8.835)" in text
    # a run at the baseline's last value by its first evaluation may have been there before: a lower bound
    early = _run(tmp_path, "early", "ahpa", [5.5, 5.8, 5.0])
    assert main(["compare", str(base), str(early)]) == 0
    rows = {line.split(" | ")[0].strip("| "): line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")}
    assert "| 100 | >= 3.00x |" in rows["early"] and "| 300 | 1.00x |" in rows["sit (baseline)"]
    assert main(["compare", str(ahpa), str(base), "--baseline", "nope"]) == 2
    assert "--baseline 'nope' is none of the runs: ahpa, sit" in capsys.readouterr().err
    assert main(["compare", str(tmp_path)]) == 2
    assert "is not a run directory (no config.yaml)" in capsys.readouterr().err


def test_a_baseline_evaluated_once_gives_speed_ups(tmp_path, capsys):
    """A baseline evaluated once (eval.every = its length) is at its last value from that evaluation on by
    definition, not a baseline that never improved: speed-ups are read from it (itself 1.00x, exact), and no note."""
    base = _run(tmp_path, "sit", "none", [6.0], flops=100.0)
    slower = _run(tmp_path, "ahpa", "ahpa", [7.0, 5.0], flops=120.0)  # crosses 6.0 at 150 images: 100 / 150
    early = _run(tmp_path, "early", "ahpa", [5.5], flops=110.0)  # at or below 6.0 by its first evaluation: a lower bound
    assert main(["compare", str(base), str(slower), str(early)]) == 0
    text = capsys.readouterr().out
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert "| 100 | 1.00x | 1.00x |" in rows["sit (baseline)"]
    # per FLOP: 100 images x 100 FLOPs over 150 x 120 = 0.56x; 100 x 100 over 100 x 110 = 0.91x (a bound too)
    assert "| 150 | 0.67x | 0.56x |" in rows["ahpa"] and "| 100 | >= 1.00x | >= 0.91x |" in rows["early"]
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert "No speed-up is read" not in text and not any("—" in line for line in table)


def test_a_run_whose_evaluations_changed_on_a_resume_is_named(tmp_path, capsys):
    """eval.* and sample.* may change on a resume; each evaluation row records what it used, and compare names a run
    whose curve mixes two ways of measuring (one curve against two references, or 500 samples then 200)."""
    base = _run(tmp_path, "sit", "none", [10.0, 8.0, 6.0])
    mixed = _run(tmp_path, "ahpa", "ahpa", [9.0, 7.0, 5.0])
    rows = [json.loads(line) for line in (mixed / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        if "eval/FD-r20" in r:
            r["eval_setup"] = "eval.num=500 eval.ref=a.npz" if r["images"] < 300 else "eval.num=200 eval.ref=a.npz"
    (mixed / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["compare", str(base), str(mixed)]) == 0
    text = capsys.readouterr().out
    assert "**Evaluations made differently within a run**" in text
    assert "- ahpa: eval.num=500 eval.ref=a.npz (images 100-200); then eval.num=200 eval.ref=a.npz (images 300-300)" in text
    assert main(["compare", str(mixed), str(base)]) == 0  # named wherever it comes in the list
    assert "- ahpa: eval.num=500 eval.ref=a.npz (images 100-200); then" in capsys.readouterr().out
    assert main(["compare", str(base), str(_run(tmp_path, "same", "ahpa", [9.0, 7.0, 5.0]))]) == 0
    assert "made differently" not in capsys.readouterr().out


def test_compare_reads_a_real_run_without_evaluations(tmp_path, tiny, capsys):
    from ahpa.train.loop import Trainer

    Trainer(tiny("train.steps=2"), tmp_path / "a").run()
    Trainer(tiny("train.steps=2", "align.method=none"), tmp_path / "b").run()
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    text = capsys.readouterr().out
    assert "No run has evaluations" in text and "baseline b" in text
    assert "`align.method`: a='ahpa', b='none'" in text
    assert "Trained in different environments" not in text  # the same machine and code
    # each start records the training FLOPs per image: the SiT's forward x 3, plus the heads' for AHPA
    a, b = (compare.read_run(tmp_path / n) for n in "ab")
    assert b.flops_per_image == 3 * Trainer(tiny("train.steps=2", "align.method=none"), tmp_path / "b").parts.model.flops_per_image()
    assert a.flops_per_image > b.flops_per_image


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


def test_a_run_resumed_by_other_software_says_so_when_it_resumes(tmp_path, tiny):
    """A resume under another torch, ahpa or extension package than the run's last start is said (steps before and
    after may differ in numerics), naming only what changed; not for the same software, a key an older record
    lacks, the device (compare's, for speeds) or a complete run rerun to export."""
    import torch

    from ahpa.train.loop import Trainer

    run = tmp_path / "a"
    Trainer(tiny("train.steps=1"), run).run()
    said = lambda tr: [m for m in tr.messages if "other software" in m]  # noqa: E731
    assert said(Trainer(tiny("train.steps=2"), run)) == []  # the same software
    starts = run / "starts.jsonl"
    row = json.loads(starts.read_text())
    del row["source"]  # an older record without the key: no difference claimed
    starts.write_text(json.dumps({**row, "torch": "2.4.1", "extensions": "walkpkg 0.1.0", "device": "NVIDIA H200"}) + "\n")
    tr = Trainer(tiny("train.steps=2"), run)
    assert said(tr) == [f"resuming at step 1 with other software than the run's last start: extensions walkpkg "
                        f"0.1.0 -> none; torch 2.4.1 -> {torch.__version__}; the steps before and after may "
                        "differ in numerics (the run's starts.jsonl records each start)"]
    tr.run()
    rows = starts.read_text().splitlines()
    starts.write_text(rows[0] + "\n" + json.dumps({**json.loads(rows[1]), "torch": "2.4.1"}) + "\n")
    assert said(Trainer(tiny("train.steps=2"), run)) == []  # complete: rerun to export, it trains nothing


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


def test_differing_environment_compares_only_recorded_facts_that_matter():
    from pathlib import Path

    from ahpa.compare import Run, differing_environment

    env = {"device": "NVIDIA H200", "processes": 8, "torch": "2.4.1", "cuda": "12.4", "ahpa": "0.1.0", "source": "abc"}

    def run(name, **changed):
        return Run(name, Path(name), {}, env={**env, **changed} if changed.get("recorded", True) else {})

    old = Run("old", Path("old"), {})  # a run from before starts.jsonl: nothing recorded, nothing to compare
    assert differing_environment([old, run("a"), run("b")]) == {}
    assert differing_environment([run("a"), run("b", source="def+dirty")]) == {"source": ["abc", "def+dirty"]}
    # where it ran and when are no difference in what trained it (starts.jsonl's host and time are not compared)
    a, b = run("a"), run("b")
    a.env["host"], b.env["host"] = "node1", "node2"
    assert differing_environment([a, b]) == {}
    assert differing_environment([old, run("a"), run("b", device="NVIDIA H100")]) == {
        "device": [None, "NVIDIA H200", "NVIDIA H100"]}


def test_compare_names_a_run_without_a_start_record_unrecorded(tmp_path, capsys):
    env = {"device": "NVIDIA H200", "processes": 8, "torch": "2.4.1", "cuda": "12.4", "ahpa": "0.1.0", "source": "abc"}
    runs = [_run(tmp_path, name, "ahpa", [1.0]) for name in ("a", "b", "c")]
    (runs[0] / "starts.jsonl").write_text(json.dumps({"step": 0, **env}) + "\n")
    (runs[1] / "starts.jsonl").write_text(json.dumps({"step": 0, **env, "processes": 1, "source": None}) + "\n")
    assert main(["compare", *map(str, runs)]) == 0
    text = capsys.readouterr().out
    # a run without starts.jsonl is "unrecorded"; a fact recorded as absent (an installed copy: no commit) is "none"
    assert "- processes: a=8, b=1, c=unrecorded" in text and "- source: a=abc, b=none, c=unrecorded" in text


def test_a_run_resumed_on_another_process_count_is_named_as_mixing_their_speeds(tmp_path, capsys):
    """A run started on 2 processes, resumed on 1 with train.grad_accum=2, then on 2 again (a walkthrough's): its
    img/s mixed the three, and compare, which reads each run's newest start, said nothing of it. A resume on a newer
    commit changes no speed and is not named here."""
    env = {"device": "cpu (x86_64)", "processes": 2, "torch": "2.13.0", "cuda": None, "ahpa": "0.1.0", "source": "abc"}
    a, b = _run(tmp_path, "a", "ahpa", [1.0]), _run(tmp_path, "b", "none", [1.0])
    starts = [{"step": 0, **env}, {"step": 170, **env, "processes": 1}, {"step": 300, **env, "source": "def"}]
    (a / "starts.jsonl").write_text("".join(json.dumps(s) + "\n" for s in starts))
    (b / "starts.jsonl").write_text(json.dumps({"step": 0, **env}) + "\n")
    assert main(["compare", str(b), str(a)]) == 0
    text = capsys.readouterr().out
    assert ("**Environments that changed within a run** (resumed on other GPUs, process counts or versions; its img/s "
            "mixes their speeds):\n- a: processes 2 (from step 0); then processes 1 (from step 170); then processes 2 "
            "(from step 300)\n") in text
    assert "- b:" not in text and "Trained in different environments" in text and "- source: b=abc, a=def" in text


def test_the_source_revision_is_marked_dirty_by_changed_tracked_files_only(tmp_path, monkeypatch):
    """A checkout's commit, "+dirty" once a tracked file differs from it (untracked files do not count); a copy of
    the package inside another repository (one with a commit) is no checkout of ahpa's."""
    import shutil
    import subprocess
    from pathlib import Path

    from ahpa import provenance

    if shutil.which("git") is None:
        pytest.skip("no git")
    root = Path(__file__).resolve().parents[1]

    def git(repo, *args):
        return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              capture_output=True, text=True, check=True).stdout.strip()

    def revision_of(package: Path) -> str | None:
        monkeypatch.setattr(provenance, "__file__", str(package / "provenance.py"))
        return provenance.source_revision()

    repo = tmp_path / "repo"
    shutil.copytree(root / "src" / "ahpa", repo / "src" / "ahpa", ignore=shutil.ignore_patterns("__pycache__"))
    git(tmp_path, "init", "-q", str(repo))
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "x")
    head = git(repo, "rev-parse", "HEAD")
    assert revision_of(repo / "src" / "ahpa") == head
    (repo / "notes.txt").write_text("untracked\n")
    assert revision_of(repo / "src" / "ahpa") == head
    with open(repo / "src" / "ahpa" / "provenance.py", "a") as f:
        f.write("# changed\n")
    assert revision_of(repo / "src" / "ahpa") == head + "+dirty"
    # the package copied into another repository's folder (as a vendored copy): that repository's commit is not ahpa's
    other = tmp_path / "other"
    shutil.copytree(root / "src" / "ahpa", other / "lib" / "ahpa", ignore=shutil.ignore_patterns("__pycache__"))
    git(tmp_path, "init", "-q", str(other))
    git(other, "add", "-A")
    git(other, "commit", "-qm", "x")
    assert revision_of(other / "lib" / "ahpa") is None


def test_the_environment_names_the_gpu_it_is_given_and_the_setup_note_the_per_process_batch(monkeypatch, tiny,
                                                                                              tmp_path):
    import types

    import torch

    from ahpa.provenance import environment
    from ahpa.train.notes import setup_note

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    env = environment(torch.device("cuda", 0), 8)
    assert env["device"] == "NVIDIA H200" and env["processes"] == 8
    parts = types.SimpleNamespace(amp=torch.bfloat16, loss_scale=None)  # bf16: no loss scale
    cfg = tiny("train.batch_size=256", "train.steps=1000", "train.grad_accum=2")
    assert setup_note(cfg, parts, 8, True, "NVIDIA H200") == (
        "training on 8 x NVIDIA H200 (FSDP2), bf16 autocast, eager: 1,000 steps of global batch 256 "
        f"(32 per process in 2 micro-batches), align.method={cfg.align.method}")
    assert "8 x NVIDIA H200 (DDP)" in setup_note(cfg, parts, 8, False, "NVIDIA H200")
    # with an aligner, what it resolved: the levels and block, the router mode and the loss (a method fixes them, a
    # package may bring them), and align.weight
    from ahpa.train.loop import Trainer

    for over, said in ((["align.router=snr", "align.weight=1.5"], "router snr; loss cosine; weight 1.5)"),
                       (["align.method=multi-uniform", "align.router=snr"], "router uniform; loss cosine; weight 0.5)"),
                       (["align.method=vae-latent"], "(levels latent at block 2; router uniform; loss smooth-l1; weight 0.5)")):
        tr = Trainer(tiny(*over), tmp_path / over[0])
        assert setup_note(tr.cfg, tr.parts, 1, False, "CPU").endswith(said), setup_note(tr.cfg, tr.parts, 1, False, "CPU")


def test_settings_a_run_did_not_read_are_no_difference():
    """Two cached runs with other prior.stats_images (a cache brings its statistics), a vanilla run's align.* and
    runs without evaluations' eval.* differ in nothing that was trained; a setting that one reader differs in is
    listed, the runs that did not read it shown as such."""
    from pathlib import Path

    def run(name, *overrides):
        return compare.Run(name, Path(name), config.flatten(config.load(None, list(overrides)).to_dict()))

    cached = ["data.source=cache", "data.path=c"]
    a = run("a", *cached, "prior.stats_images=64", "eval.num=100", "align.method=none", "align.weight=3")
    b = run("b", *cached, "prior.stats_images=512", "eval.num=200", "align.method=none", "align.weight=1")
    assert compare.differing_settings([a, b]) == {}
    c = run("c", *cached, "align.method=ahpa", "align.weight=1.5")
    d = run("d", *cached, "align.method=ahpa", "align.weight=0.5", "prior.external=dinov2:x")
    got = compare.differing_settings([a, c, d])
    assert got["align.weight"] == [compare.NOT_READ, 1.5, 0.5] and "prior.external" not in got
    assert repr(got["align.weight"][0]) == "(not read)"
    # read by one run, not by the others: nothing to compare it with
    e = run("e", "data.source=procedural", "prior.stats_images=64", "align.method=none")
    assert "prior.stats_images" not in compare.differing_settings([e, a]) and "data.source" in compare.differing_settings([e, a])
    # post-hoc EMAs kept beside the run's own change neither its model nor the EMA evaluated; an older run has no key
    f = run("f", *cached, "prior.stats_images=64", "eval.num=100", "align.method=none", "train.posthoc_ema=0.05,0.1",
            "train.posthoc_every=100")
    older = compare.Run("older", Path("older"), {k: v for k, v in a.settings.items() if "posthoc" not in k})
    assert compare.differing_settings([a, f]) == {} and compare.differing_settings([older, f]) == {}


def _evaluated(root, name, fds, *overrides, setup="eval.num=200 sampler=euler-50 guidance=[0.0, 1.0]", metric="FD-r20",
               inputs=None):
    """A run directory with config overrides, eval rows carrying `eval_setup`, and optionally an inputs.json."""
    d = root / name
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(config.dump(config.load(None, list(overrides))))
    rows = []
    for i, fd in enumerate(fds, 1):
        rows.append({"step": i, "images": 100 * i, "loss/flow": 1.0 / i, "img_per_s": 50.0 + i})
        if fd is not None:
            rows.append({"step": i, "images": 100 * i, f"eval/{metric}": fd, "eval_setup": setup})
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "DONE").write_text("{}\n")
    if inputs:
        (d / "inputs.json").write_text(json.dumps({k: {"value": v[0], "identity": v[1]} for k, v in inputs.items()}))
    return d


def _rows(text):
    return {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}


def test_runs_evaluated_otherwise_than_the_baseline_get_no_speed_up_and_equal_values_reach(tmp_path, capsys):
    """Two identical vanilla runs evaluated with 100 and 200 samples were "1.98x" apart (FD depends on the number of
    samples): such a run is named above the table and its speed-up is "not comparable". A copy whose FD differs by
    1e-13 (another batch size of the detector's pass) reaches the baseline's value: 1.00x in either order."""
    base = _evaluated(tmp_path, "none", [10.0, 8.0, 6.0], "align.method=none")
    fewer = _evaluated(tmp_path, "none-n100", [11.0, 9.0, 7.0], "align.method=none",
                       setup="eval.num=100 sampler=euler-50 guidance=[0.0, 1.0]")
    copy = _evaluated(tmp_path, "none-copy", [10.0, 8.0, 6.0 + 1.2e-13], "align.method=none", "eval.batch=50")
    assert main(["compare", str(base), str(fewer), str(copy)]) == 0
    text = capsys.readouterr().out
    rows = _rows(text)
    assert "not comparable" in rows["none-n100"] and "| 1.00x |" in rows["none-copy"]
    assert "**Evaluated otherwise than the baseline**" in text and "- none-n100: eval.num=100" in text
    assert "eval.batch" not in text  # equal to rounding: not a difference
    assert main(["compare", str(copy), str(base)]) == 0
    assert "| 1.00x |" in _rows(capsys.readouterr().out)["none"]


def test_compare_names_variants_reads_recorded_content_and_picks_an_evaluated_baseline(tmp_path, capsys):
    """The method column tells the router modes and levels apart; settings a method does not read (multi-uniform's
    align.router) are no difference; data compared by the content inputs.json records, not by its path; the default
    baseline is a vanilla run with evaluations; --baseline takes any path to a run."""
    same, other = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    noeval = _evaluated(tmp_path, "none-noeval", [None, None, None], "align.method=none",
                        inputs={"data.path": ("/d/train.npz", same)})
    base = _evaluated(tmp_path, "none", [10.0, 8.0, 6.0], "align.method=none", "data.source=npz", "data.path=/d/train.npz",
                      inputs={"data.path": ("/d/train.npz", same)})
    moved = _evaluated(tmp_path, "topk", [9.0, 7.0, 5.0], "align.router=topk", "data.source=npz",
                       "data.path=/scratch/train.npz", inputs={"data.path": ("/scratch/train.npz", same)})
    level = _evaluated(tmp_path, "level", [9.5, 7.5, 5.5], "align.method=vae-level", "align.levels=[stage2]",
                       "data.source=npz", "data.path=/d/train.npz", inputs={"data.path": ("/d/train.npz", same)})
    uniform = _evaluated(tmp_path, "uniform", [9.9, 7.9, 5.9], "align.method=multi-uniform", "data.source=npz",
                         "data.path=/d/train.npz", inputs={"data.path": ("/d/train.npz", other)})
    assert main(["compare", str(noeval), str(base), str(moved), str(level), str(uniform)]) == 0
    text = capsys.readouterr().out
    rows = _rows(text)
    assert text.startswith("# 5 runs; baseline none\n") and "none (baseline)" in rows
    assert "| ahpa (topk) |" in rows["topk"] and "| vae-level (stage2) |" in rows["level"]
    assert "no FD-r20 evaluations" in rows["none-noeval"]
    assert "`align.router`" not in text  # only the ahpa run reads it
    data = next(line for line in text.splitlines() if line.startswith("- `data.path`"))
    assert data == ("- `data.path`: (not read): none-noeval; '/d/train.npz' (sha256:aaaaaaaaaaaaaaa...): none, level; "
                    "'/scratch/train.npz' (sha256:aaaaaaaaaaaaaaa...): topk; '/d/train.npz' (sha256:bbbbbbbbbbbbbbb...): uniform")
    # another metric than the baseline's; --baseline by a path with a trailing slash; a shorter run not there yet
    r32 = _evaluated(tmp_path, "r32", [9.0, 7.0], "align.method=ahpa", metric="FD-r32")
    short = _evaluated(tmp_path, "short", [9.5, 7.5], "align.method=ahpa")
    assert main(["compare", str(base), str(r32), str(short), "--baseline", f"{base}/", "--metric", "fd-r20"]) == 0
    rows = _rows(capsys.readouterr().out)
    assert "no FD-r20 evaluations (has FD-r32)" in rows["r32"] and "not yet (shorter)" in rows["short"]
    assert main(["compare", str(noeval), str(moved), "--baseline", "none-noeval"]) == 0
    assert "The baseline none-noeval has no FD-r20 evaluations, so no speed-up is read" in capsys.readouterr().out


def test_compare_refuses_a_run_twice_and_a_foreign_out_and_replaces_its_own_plots(tmp_path, capsys):
    base = _evaluated(tmp_path, "none", [10.0, 8.0, 6.0], "align.method=none")
    assert main(["compare", str(base), str(tmp_path / "." / "none")]) == 2
    assert "is given twice" in capsys.readouterr().err
    assert main(["compare", str(base)]) == 0
    assert capsys.readouterr().out.startswith("# 1 run; baseline none")
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("x")
    assert main(["compare", str(base), "--out", str(foreign)]) == 2
    assert "holds other files" in capsys.readouterr().err and (foreign / "mine.txt").exists()
    out = tmp_path / "cmp"
    r32 = _evaluated(tmp_path, "r32", [9.0, 7.0], "align.method=ahpa", metric="FD-r32")
    assert main(["compare", str(base), str(r32), "--out", str(out)]) == 0
    assert (out / "FD-r32.png").exists()
    assert main(["compare", str(base), "--out", str(out)]) == 0  # a later comparison: the earlier plots go
    assert sorted(p.name for p in out.glob("*.png")) == ["FD-r20.png", "flow-loss.png"]
    assert "Plots: FD-r20.png, flow-loss.png" in (out / "compare.md").read_text()


def test_values_of_many_runs_are_grouped_and_the_largest_group_is_the_others():
    runs = [compare.Run(n, tmp, {}) for n, tmp in zip("abcde", [None] * 5)]
    assert compare.summarise_values(runs, [128, 128, 64, 128, 128]) == "64: c; 128: the others"
    assert compare.summarise_values(runs, [1, 1, 2, 2, compare.NOT_READ]) == "1: a, b; 2: c, d; (not read): e"
    assert compare.summarise_values(runs[:3], [128, 64, 128]) == "a=128, b=64, c=128"


def test_fds_that_agree_to_three_decimals_are_printed_with_enough_to_tell_them_apart(tmp_path, capsys):
    """13.633694 (the baseline) and 13.634336 both printed 13.634, beside "1.00x" and "not reached"."""
    base = _run(tmp_path, "none", "none", [14.0, 13.633694])
    ahpa = _run(tmp_path, "ahpa", "ahpa", [14.1, 13.634336])
    assert main(["compare", str(base), str(ahpa)]) == 0
    rows = {line.split(" | ")[0].strip("| "): line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")}
    assert "| 13.6337 |" in rows["none (baseline)"] and "| 13.6343 |" in rows["ahpa"] and "not reached" in rows["ahpa"]
    assert compare.digits([5.0, 6.0]) == 3 and compare.digits([10.0, 10.0 + 1e-13]) == 3  # rounding is not a difference


def test_how_an_evaluated_run_computes_is_no_difference_but_what_it_evaluates_is():
    """Runs that evaluate (eval.every set, so eval.* is read) and differ only in how they compute (the detector's
    batch, compiled or eager, checkpointed activations, the sampler's micro-batch, FSDP or DDP, micro-batches: a run
    resumed on fewer GPUs with train.grad_accum, then sharded) trained and measured the same thing to rounding:
    listing those would make a fair comparison look unfair. eval.num, read by both, still is."""
    from pathlib import Path

    def run(name, *overrides):
        cfg = config.load(None, ["eval.every=100", "eval.ref=r.npz", *overrides])
        return compare.Run(name, Path(name), config.flatten(cfg.to_dict()))

    a = run("a", "eval.batch=50", "train.compile=false", "sample.micro_batch=8")
    b = run("b", "eval.batch=250", "train.compile=true", "train.activation_checkpointing=2", "sample.micro_batch=64",
            "train.fsdp=true", "train.grad_accum=2")
    assert compare.differing_settings([a, b]) == {}
    c = run("c", "eval.num=100")
    d = run("d", "eval.num=200")
    assert compare.differing_settings([c, d]) == {"eval.num": [100, 200]}


def test_data_is_compared_by_its_recorded_content_not_its_path():
    """A copy of the same data at another path (a run on scratch) is the same data, and other data under the same
    path is not: inputs.json's content identity decides, where both runs recorded one."""
    from pathlib import Path

    same, other = "sha256:" + "a" * 64, "sha256:" + "b" * 64

    def run(name, path, identity):
        cfg = config.load(None, ["data.source=npz", f"data.path={path}"])
        return compare.Run(name, Path(name), config.flatten(cfg.to_dict()), identities={"data.path": identity})

    assert compare.differing_settings([run("a", "/d/train.npz", same), run("b", "/scratch/train.npz", same)]) == {}
    got = compare.differing_settings([run("a", "/d/train.npz", same), run("b", "/d/train.npz", other)])
    assert [str(v) for v in got["data.path"]] == ["'/d/train.npz' (sha256:aaaaaaaaaaaaaaa...)",
                                                  "'/d/train.npz' (sha256:bbbbbbbbbbbbbbb...)"]


def test_a_curve_that_reaches_the_target_within_rounding_reaches_it_at_that_evaluation():
    """A last value above the target by less than the rounding tolerance counts as reaching it at that evaluation's
    images, not at a point interpolated past it (the line through it crosses the target only after its images)."""
    target = 6.0
    curve = [(100, target + 1.2e-8), (200, target + 5e-9)]
    assert compare.images_to_reach(curve, target) == 200.0
    assert compare.images_to_reach([(100, 9.0), (200, 6.0)], target) == 200.0


def test_a_baseline_rose_at_its_end_only_by_more_than_rounding():
    """The table's note on a baseline whose last FD lies above its lowest: not for a rise within the rounding
    tolerance (relative to the value, or absolute under 1), nor for a single evaluation."""
    from ahpa.compare_data import rose_at_end

    assert rose_at_end([(100, 8.0), (200, 7.5), (300, 7.6)])
    assert not rose_at_end([(100, 8.0), (200, 7.5), (300, 7.5 + 5e-9)])  # under 1e-9 of 7.5
    assert not rose_at_end([(100, 0.5), (200, 0.2), (300, 0.2 + 5e-10)])  # under 1e-9 absolute
    assert rose_at_end([(100, 0.5), (200, 0.2), (300, 0.2 + 2e-9)])
    assert not rose_at_end([(100, 7.0)]) and not rose_at_end([(100, 8.0), (200, 7.0)])


def test_without_a_vanilla_run_the_baseline_is_the_first_with_evaluations(tmp_path):
    """Two alignment runs, the first never evaluated: speed-ups are read against the first one that has evaluations,
    not against a run with no curve (which would give no speed-up for any run)."""
    noeval = compare.read_run(_evaluated(tmp_path, "ahpa-noeval", [None, None], "align.method=ahpa"))
    evaluated = compare.read_run(_evaluated(tmp_path, "ahpa", [9.0, 7.0], "align.method=ahpa"))
    assert compare.pick_baseline([noeval, evaluated], None) is evaluated
    assert compare.pick_baseline([noeval], None) is noeval  # nothing evaluated: the first


def test_four_runs_are_grouped_and_a_group_of_three_is_named():
    """Past three runs the values are grouped by value; the largest group becomes "the others" only when it holds
    more than three runs, so a group of three is still named run by run."""
    runs = [compare.Run(n, None, {}) for n in "abcde"]
    assert compare.summarise_values(runs[:4], [1, 2, 1, 1]) == "1: a, c, d; 2: b"
    assert compare.summarise_values(runs, [1, 1, 1, 2, 2]) == "1: a, b, c; 2: d, e"


def test_the_default_metric_is_the_baselines_and_every_plot_draws_the_baseline_highlighted(tmp_path, capsys,
                                                                                          monkeypatch):
    """A run given first that logged another metric (FD-r32) does not choose what the table ranks by: the baseline's
    first metric does, since speed-ups are read from the baseline's curve. Each plot, the flow loss's too, is told
    which line is the baseline (drawn in black, on top)."""
    from ahpa.train import plots

    other = _evaluated(tmp_path, "r32", [9.0, 7.0], "align.method=ahpa", metric="FD-r32")
    base = _evaluated(tmp_path, "none", [10.0, 8.0, 6.0], "align.method=none")
    drawn = []
    monkeypatch.setattr(plots, "line_plot", lambda series, path, *a, highlight="", **k: drawn.append((path.name, highlight)))
    assert main(["compare", str(other), str(base), "--out", str(tmp_path / "cmp")]) == 0
    text = capsys.readouterr().out
    assert "| last FD-r20 |" in text and "no FD-r20 evaluations (has FD-r32)" in _rows(text)["r32"]
    assert sorted(drawn) == [("FD-r20.png", "none"), ("FD-r32.png", "none"), ("flow-loss.png", "none")]


def test_a_repa_row_names_its_encoder(tmp_path, capsys):
    """REPA with CLIP against REPA with SigLIP (or one REPA beside vanilla SiT and AHPA) was a row "repa" each: the
    encoder, what tells REPA's variants apart, is in the method column, by its kind and folder. Per FLOP counts its
    frozen encoder's forward where the run recorded it; the legend names a REPA run from before, which did not."""
    base = _evaluated(tmp_path, "sit", [10.0, 8.0, 6.0], "align.method=none")
    clip = _evaluated(tmp_path, "repa-clip", [9.0, 7.0, 5.0], "align.method=repa",
                      f"prior.external=transformers:{tmp_path / 'weights' / 'clip-vit-b16'}")
    assert main(["compare", str(base), str(clip)]) == 0
    text = capsys.readouterr().out
    rows = _rows(text)
    assert rows["repa-clip"].startswith("| repa-clip | repa (transformers:clip-vit-b16) |") and "| none |" in rows["sit (baseline)"]
    # recorded before the encoder's FLOPs were: the legend says its cost shows in img/s only
    assert "except for repa-clip, trained before it was recorded: there its cost shows in img/s only" in text
    assert main(["compare", str(base), str(_evaluated(tmp_path, "ahpa", [9.0, 7.0, 5.0]))]) == 0
    assert "REPA's frozen encoder" not in capsys.readouterr().out
    # recorded: 100 training FLOPs per image each, and 50 of the encoder's forward for REPA. REPA reaches the
    # baseline's 6.0 at 250 images of its 300: 1.20x in images, 300 x 100 / (250 x 150) = 0.80x per FLOP
    for run, frozen in ((base, 0.0), (clip, 50.0)):
        (run / "starts.jsonl").write_text(json.dumps({"step": 0, "train_flops_per_image": 100.0,
                                                      "frozen_flops_per_image": frozen}) + "\n")
    assert main(["compare", str(base), str(clip)]) == 0
    text = capsys.readouterr().out
    assert "| 1.20x | 0.80x |" in _rows(text)["repa-clip"]
    assert "REPA's frozen encoder's forward, run on every batch, too;" in text and "except for" not in text
