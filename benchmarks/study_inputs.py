"""What a study row records of the files it was made from, and the checks that keep rows of other files apart.

The study key (study_setup.study_key) names the training data file by its name only and holds the TAEF2 encoder's
sha256 but not the decoder's, which turns every evaluated sample into an image. Two runs with another train16k.npz
or another decoder would share a key, and the report would merge their rows into one table. The key cannot take
them in without changing every recorded row's key, so each row carries them beside it instead:
    "inputs": {"data": sha256 of --data, "decoder": sha256 of the decoder's weights}
study.py refuses to append to a results file whose rows of the same study hold other values, and study_report.py
refuses to merge such rows. Rows written before the field existed carry no inputs: unknown, and merged as before.
"""

from __future__ import annotations

import functools
import gzip
import json
from pathlib import Path

from ahpa.priors.base import sha256_file
from ahpa.priors.registry import parse_spec
from ahpa.priors.taef2 import DECODER_FILE
from study_setup import encoder_sha256, settings_but_cadence

FIELDS = {"data": "the training data file, --data", "decoder": "the decoder's weights, from --encoder"}


def decoder_sha256(spec: str) -> str | None:
    """The sha256 of the weights that decode the samples. TAEF2 keeps its decoder in a file of its own, beside the
    encoder's; the other built-in kinds (diffusers, ahpa-vae) keep both halves in the one weights file the library
    hashes when it loads them, so that sha256 is the decoder's too."""
    kind, where = parse_spec(spec)
    if kind == "taef2":
        return sha256_file(Path(where).expanduser() / DECODER_FILE)
    return encoder_sha256(spec)


@functools.lru_cache(maxsize=None)
def input_hashes(data: Path, encoder: str) -> dict[str, str | None]:
    """This run's inputs, hashed once per process. A --data that is no single file (a folder of images) has no
    sha256 here: its rows record it as unknown, as rows from before the field are."""
    return {"data": sha256_file(data) if data.is_file() else None, "decoder": decoder_sha256(encoder)}


def conflict(recorded: dict | None, now: dict | None) -> tuple[str, str, str] | None:
    """(field, recorded sha256, other sha256) of the first input both record and differ in; None when they agree
    or either does not know it."""
    for field in FIELDS:
        a, b = (recorded or {}).get(field), (now or {}).get(field)
        if a and b and a != b:
            return field, a, b
    return None


def table_of(row: dict) -> tuple[str, str]:
    """The group of rows the report puts in one table: those of the same settings but the evaluation cadence
    (study_report.merge_cadences), or of the same key for a row without settings."""
    return ("settings", settings_but_cadence(row["config"])) if "config" in row else ("study", str(row.get("study")))


def rows_of(results: Path) -> list[tuple[int, dict]]:
    """(line number, row) of a results file (gzipped or not; none for a file not there yet); a line that is not a row
    is left to the report, which names it when it reads it."""
    if not results.is_file():
        return []
    raw = results.read_bytes()
    text = (gzip.decompress(raw) if results.suffix == ".gz" else raw).decode()
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            out.append((n, row))
    return out


def check_append(results: Path, runs: list[tuple[str, dict]], inputs: dict) -> None:
    """Refuse, before anything trains, to append this run's rows (`runs`: its (study key, settings) pairs) to a
    results file whose rows of the same table were made from other inputs."""
    keys, tables = {key for key, _ in runs}, {table_of({"config": common}) for _, common in runs}
    for n, row in rows_of(results):
        if not row.get("inputs"):
            continue
        if row.get("study") not in keys and table_of(row) not in tables:
            continue
        clash = conflict(row["inputs"], inputs)
        if clash:
            field, there, here = clash
            raise SystemExit(f"--results {results}, line {n}: its rows of study {row.get('study')} were made from other "
                             f"inputs: field inputs.{field} ({FIELDS[field]}) is sha256 {there} there and {here} in this "
                             f"run. Appended, this run's rows would be merged with them in one table: give this run "
                             f"another --results file")


def check_mixed(seen: dict, row: dict, where: str) -> None:
    """The report's check, one row at a time: `seen` keeps the first row that records inputs of each table (its
    inputs and `where`, "FILE, line N"); a later row of the table with other inputs is refused."""
    first = seen.setdefault(table_of(row), (row["inputs"], row.get("study"), where))
    clash = conflict(first[0], row["inputs"])
    if clash:
        field, there, here = clash
        raise SystemExit(f"{where}: study {row.get('study')}'s row was made from other inputs than {first[2]} (study "
                         f"{first[1]}): field inputs.{field} ({FIELDS[field]}) is sha256 {here} here and {there} there, "
                         f"and the report would merge them into one table. Report each set apart: move the rows of one "
                         f"to a file of its own and give it its own --results and --out")
