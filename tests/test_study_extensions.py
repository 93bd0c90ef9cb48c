"""The convergence study runs a method registered with the library (an installed package's "ahpa.plugins" module) as
align.method=NAME under its own name, records the installed extensions in every row, and keeps rows of another
version of that method out of its table (benchmarks/study_extensions.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import FakeEntryPoint, run_script

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def plugin(monkeypatch, packages, *specs, package="studypkg", version="1.0"):
    """An installed package `package` of `version` whose module registers each MethodSpec of `specs`; its entry
    point (to change its version later). Registrations' owners are restored after the test with the entries."""
    from ahpa.align.methods import METHODS, MethodSpec, register_method

    monkeypatch.setattr(METHODS, "owners", {})
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    ep = FakeEntryPoint(package, lambda: [register_method(MethodSpec(*s)) for s in specs])
    ep.dist.version = version
    packages(ep)
    return ep


def run(study, results: Path, cache: Path, *flags: str) -> None:
    study.main(["--size", "smoke", "--steps", "2", "--eval-every", "2", "--eval-num", "20", "--eval-batch", "10",
                "--grid-images", "0", "--cache", str(cache), "--results", str(results), *flags])


@pytest.mark.skipif(not (SHARED / "data/cifar10/train16k.npz").is_file(), reason="needs ../shared (CIFAR-10, TAEF2, detectors)")
def test_study_runs_a_registered_method_beside_the_tables_and_reports_it(tmp_path, monkeypatch, packages):
    ep = plugin(monkeypatch, packages, ("plug-levels", "all", "uniform", "cosine", "every level, 1/K, a plugin's"))
    import study

    results, cache = tmp_path / "r.jsonl", tmp_path / "cache"
    run(study, results, cache, "--methods", "none,plug-levels")
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [(r["method"], r["step"]) for r in evals] == [("none", 2), ("plug-levels", 2)]
    assert len({r["study"] for r in rows}) == 1  # keyed with the table's methods: one table
    assert evals[1]["levels"] == ["stage1", "stage2", "stage3", "stage4", "latent"]  # its MethodSpec's "all"
    assert evals[0]["levels"] == [] and evals[1]["router"]["mode"] == "uniform"
    assert all(r["extensions"] == "studypkg 1.0" for r in rows)  # as starts.jsonl records them
    # --variant: a switch the method reads names the run; one it does not read is refused, as for the table's methods
    out = tmp_path / "check.jsonl"
    run(study, out, cache, "--methods", "plug-levels", "--variant", "align.levels=[latent,stage4]", "--check")
    with pytest.raises(SystemExit, match=r"align.router_tau=0.5: plug-levels does not read it"):
        run(study, out, cache, "--methods", "plug-levels", "--variant", "align.router_tau=0.5", "--check")
    # another version of the package: its rows would join the old version's table, refused before training
    ep.dist.version = "1.1"
    with pytest.raises(SystemExit, match=r"line \d+: its rows of plug-levels were made with the extensions "
                                         r"'studypkg 1.0', and this run has 'studypkg 1.1'"):
        run(study, results, cache, "--methods", "plug-levels", "--seed", "1")
    assert len(results.read_text().splitlines()) == len(rows)  # nothing appended
    # the report needs no package: it lists the method after the table's, in every table that pairs runs
    run_script(["benchmarks/study_report.py", "--results", str(results), "--out", str(tmp_path / "report")])
    text = (tmp_path / "report" / "README.md").read_text()
    assert text.index("| none | 0 |") < text.index("| plug-levels | 0 |")
    assert "| plug-levels | 2 | 0 |" in text  # paired with vanilla SiT of the same seed


def test_a_registered_name_that_is_a_table_label_is_refused(monkeypatch, packages):
    """A package may register "ahpa-soft" (not one of ahpa's own names), which is the study's label for ahpa with the
    soft router: the study runs neither under it, naming the package and the fix; other methods run as before."""
    plugin(monkeypatch, packages, ("ahpa-soft", "all", "uniform", "cosine", "a plugin's"), package="clashpkg")
    import study

    with pytest.raises(SystemExit, match=r"--methods ahpa-soft: 'ahpa-soft' is the study's label for align.method=ahpa "
                                         r"align.router=soft and also an alignment method registered by package "
                                         r"'clashpkg'.* rename the registered method \(e.g. 'clashpkg-ahpa-soft'\)"):
        study.main(["--methods", "none,ahpa-soft", "--check", "--cache", "/nonexistent", "--results", "unused.jsonl"])
    from study_extensions import check_method_names

    check_method_names(["none", "ahpa-snr"])  # the table's other labels are unambiguous


def test_an_unknown_method_is_refused_with_the_registered_names_among_the_valid(monkeypatch, packages):
    plugin(monkeypatch, packages, ("plug-levels", "all", "uniform", "cosine", ""), ("plug-ext", "external", "uniform",
                                                                                  "cosine", ""))
    import study

    with pytest.raises(SystemExit, match=r"unknown methods \['plug-level'\] \(did you mean 'plug-levels'\?\); valid: "
                                         r"none, vae-latent, vae-level, multi-uniform, ahpa-soft, ahpa-snr, ahpa-topk, "
                                         r"plug-levels, plug-ext$"):
        study.main(["--methods", "none,plug-level", "--results", "unused.jsonl"])
    with pytest.raises(SystemExit, match=r"unknown methods \['ahpa'\].*\(ahpa: ahpa's own, run as the table's "
                                         r"ahpa-soft / ahpa-snr / ahpa-topk"):
        study.main(["--methods", "ahpa", "--results", "unused.jsonl"])
    with pytest.raises(SystemExit, match=r"--methods plug-ext: it aligns an external encoder \(prior.external\)"):
        study.main(["--methods", "plug-ext", "--results", "unused.jsonl"])


def test_report_refuses_to_merge_two_versions_of_a_registered_method(tmp_path, monkeypatch):
    """Rows of one registered method in one table must record the same extensions (a seed of another version would
    enter its mean); the table's methods do not read them, so their rows merge whatever was installed."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from study_report import load_rows

    def row(method, seed, extensions, lr=1e-3, study="k"):
        return json.dumps({"kind": "eval", "study": study, "method": method, "seed": seed, "step": 1000,
                           "fd": {"FD-r20": 1.0}, "config": {"train.lr": lr}, "extensions": extensions}) + "\n"
    (tmp_path / "a.jsonl").write_text(row("none", 0, "studypkg 1.0") + row("none", 1, "studypkg 1.1")
                                      + row("plug[weight=1.5]", 0, "studypkg 1.0"))
    _, evals, _ = load_rows([tmp_path / "a.jsonl"])
    assert len(evals) == 3
    # the table's methods with a variant or a level are the table's too; another table's rows of the method are
    # another table's; a row from before the field (no "extensions") is not checked
    old = json.loads(row("plug", 2, None))
    del old["extensions"]
    table = [row(m, s, f"studypkg 1.{s}") for m in ("ahpa-soft[weight=1.5]", "vae-level:stage4") for s in (0, 1)]
    (tmp_path / "c.jsonl").write_text("".join(table) + row("plug[weight=1.5]", 1, "studypkg 1.1", lr=2e-3, study="k2")
                                      + json.dumps(old) + "\n")
    _, evals, _ = load_rows([tmp_path / "a.jsonl", tmp_path / "c.jsonl"])
    assert len(evals) == 9
    (tmp_path / "b.jsonl").write_text(row("plug[weight=1.5]", 1, "studypkg 1.1"))
    with pytest.raises(SystemExit, match=r"b.jsonl, line 1: plug\[weight=1.5\]'s row was made with the extensions "
                                         r"'studypkg 1.1', and .*a.jsonl, line 3 with 'studypkg 1.0'"):
        load_rows([tmp_path])


def test_ahpa_against_baselines_keeps_to_the_tables_methods(monkeypatch):
    """A registered method is neither an AHPA run nor one of its baselines, whatever its name (it is paired with
    `none` as every method is)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from study_tables import ahpa_against_baselines

    def rows(fds):
        return [{"step": 1000 * (i + 1), "fd": {"FD-r20": f}} for i, f in enumerate(fds)]

    series = {(m, 0): rows([9.0, 8.0]) for m in ("none", "multi-uniform", "ahpa-soft", "ahpa-plug", "my-method")}
    table = "\n".join(ahpa_against_baselines(series, "FD-r20", list(dict.fromkeys(m for m, _ in series))))
    assert "| ahpa-soft | multi-uniform | 0 |" in table
    assert "ahpa-plug" not in table and "my-method" not in table


def test_appending_checks_the_rows_of_its_registered_methods_in_its_table_only(tmp_path, monkeypatch):
    """study.py's check before training (check_append_extensions): the rows of a registered method in the run's table,
    gzipped or not; not the table's methods' rows, nor the method's rows in another table."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gzip

    from study_extensions import check_append_extensions

    def row(method, extensions, lr=1e-3):
        return json.dumps({"kind": "eval", "study": "k", "method": method, "seed": 0, "step": 1000,
                           "config": {"train.lr": lr}, "extensions": extensions}) + "\n"
    runs = {m: ("k", {"train.lr": 1e-3}) for m in ("none", "plug")}
    results = tmp_path / "r.jsonl"
    results.write_text(row("none", "studypkg 1.0") + row("plug", "studypkg 1.0", lr=2e-3))
    check_append_extensions(results, runs, "studypkg 1.1")
    check_append_extensions(tmp_path / "absent.jsonl", runs, "studypkg 1.1")  # a new results file
    packed = tmp_path / "r.jsonl.gz"
    packed.write_bytes(gzip.compress((row("none", None) + row("plug", "studypkg 1.0")).encode()))
    check_append_extensions(packed, runs, "studypkg 1.0")
    with pytest.raises(SystemExit, match=r"r.jsonl.gz, line 2: its rows of plug were made with the extensions "
                                         r"'studypkg 1.0', and this run has 'studypkg 1.1'"):
        check_append_extensions(packed, runs, "studypkg 1.1")
