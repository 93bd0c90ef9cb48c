"""Methods the study runs beyond its own table (study_setup.METHODS): any alignment method registered with the library
(a package's "ahpa.plugins" module, docs/extending.md), run as `align.method=NAME` and labelled NAME; and the
checks that keep rows of other versions of the extensions apart.

A registered method's numerics are its package's code (and any router mode or loss it names, which may come from
another package), so every row records the installed extensions (`ahpa.plugins.installed_extensions`, as a run's
starts.jsonl does). They stay out of the study key: the table's methods do not read them, and a key that changed
with every installed or upgraded package would part the baselines from the very runs they are there to judge.
Instead, the rows of one registered method in one table must record the same extensions: study.py refuses to append
rows that would not, and study_report.py refuses to merge them (a seed or a step of another version of the
method would enter its mean and curve)."""

from __future__ import annotations

import re
from pathlib import Path

from ahpa.align import methods as align_methods
from ahpa.registry import unknown_hint
from study_inputs import rows_of, table_of
from study_setup import METHODS


def registered_methods() -> list[str]:
    """The alignment methods registered beyond ahpa's own (plugins imported first), in registration order. ahpa's
    own `ahpa` is run as the table's ahpa-soft / ahpa-snr / ahpa-topk, and `repa` needs an external encoder the study
    does not give, so neither is a study method under its registry name."""
    return [m for m in align_methods.METHODS if m not in align_methods.METHODS.built_in]


def is_registered(label: str) -> bool:
    """Whether a row's method label (`name`, `name[variant]`, `vae-level:stage4`) is a registered method's rather than
    one of the table's: a registered name holds neither ':' nor '[' (ahpa.registry.check_name refuses them)."""
    return re.split(r"[:\[]", label)[0] not in METHODS


def check_method_names(methods: list[str]) -> None:
    """Refuse, before anything is built, a method the study cannot run: a name neither in the table nor registered
    (with the valid names, registered ones included), a registered name that is also one of the table's labels, and a
    registered method that aligns an external encoder."""
    registered = registered_methods()
    clash = [m for m in methods if m in METHODS and m in registered]
    if clash:
        m = clash[0]
        owner = align_methods.METHODS.owners.get(m)
        by = f"package {owner!r}" if owner else "this session"
        setting = " ".join(f"{k}={v}" for k, v in METHODS[m].items())
        raise SystemExit(f"--methods {m}: {m!r} is the study's label for {setting} and also an alignment method "
                         f"registered by {by}. A label must mean one thing in every results file and published table, "
                         f"so the study runs neither under it: rename the registered method (e.g. '{owner or 'my'}-{m}'), "
                         f"or uninstall {by} for the study's jobs")
    unknown = [m for m in methods if m not in METHODS and m not in registered]
    if unknown:
        valid = [*METHODS, *(m for m in registered if m not in METHODS)]
        near, rest = unknown_hint(unknown[0], valid)
        own = [m for m in unknown if m in align_methods.METHODS.built_in]
        why = (f" ({', '.join(own)}: ahpa's own, run as the table's ahpa-soft / ahpa-snr / ahpa-topk, or not part of "
               "the protocol: repa needs an external encoder)") if own else ""
        raise SystemExit(f"unknown methods {unknown}{near}; valid: {', '.join(valid)}{why}{rest}")
    for m in methods:
        if m not in METHODS and align_methods.get_method(m).levels == "external":
            raise SystemExit(f"--methods {m}: it aligns an external encoder (prior.external), which the study does not "
                             "give: every method of a study aligns to the prior encoder's levels or none")


def check_extensions(seen: dict, row: dict, where: str) -> None:
    """The report's check, one row at a time: the rows of one registered method (its label, variants included) in
    one table must record the same extensions; `seen` keeps the first such row's (extensions, where). Rows of the
    table's methods, and rows from before the field, are not checked."""
    if "extensions" not in row or "method" not in row or not is_registered(row["method"]):
        return
    first = seen.setdefault((table_of(row), row["method"]), (row["extensions"], where))
    if first[0] != row["extensions"]:
        raise SystemExit(f"{where}: {row['method']}'s row was made with the extensions {row['extensions']!r}, and "
                         f"{first[1]} with {first[0]!r}: {row['method']} is a registered method, whose numerics are its "
                         "package's, so the report would merge two versions of it into one table. Report each apart: "
                         "move the rows of one version to a file of its own and give it its own --results and --out")


def check_append_extensions(results: Path, runs: dict[str, tuple[str, dict]], extensions: str | None) -> None:
    """Refuse, before anything trains, to append rows of a registered method (`runs`: its label -> (study key,
    settings)) to a results file whose rows of that method and table record other extensions."""
    mine = {(label, table_of({"config": common})) for label, (_, common) in runs.items() if is_registered(label)}
    if not mine:
        return
    for n, row in rows_of(results):
        if "extensions" in row and "method" in row and (row["method"], table_of(row)) in mine \
                and row["extensions"] != extensions:
            raise SystemExit(f"--results {results}, line {n}: its rows of {row['method']} were made with the extensions "
                             f"{row['extensions']!r}, and this run has {extensions!r}. Appended, the report would merge "
                             "two versions of a registered method into one table: give this run another --results file")
