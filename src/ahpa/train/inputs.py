"""What a run records to recognise its input files again after they move.

A run's config names its prepared cache (data.path) and its VAE (prior.encoder) by path. Clusters stage a cache
to node-local scratch, and a VAE may live under another home directory on the next machine: the same files
under a new path. The run directory's inputs.json holds, next to each path, a content identity:
    data.path       sha256 of the cache's manifest.json (rewritten last, with counts, statistics and checksums,
                    when the cache is complete), or of the whole file for an .npz
    prior.encoder   sha256 of the VAE's weights, as the encoder computed it when it loaded
A resume whose only differences are these paths goes on when the identities match, and is refused otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path

from ahpa.data.manifest import MANIFEST, atomic_write_json
from ahpa.priors.base import sha256_file

FILE = "inputs.json"
MOVABLE = ("data.path", "prior.encoder")


def data_identity(path: str) -> str | None:
    if not path:  # procedural data: nothing on disk
        return None
    p = Path(path).expanduser()
    if p.is_file():
        return "sha256:" + sha256_file(p)
    if (p / MANIFEST).is_file():
        return "manifest-sha256:" + sha256_file(p / MANIFEST)
    return None


def encoder_identity(encoder) -> str | None:
    sha = encoder.identity()["weights_sha256"]
    return f"weights-sha256:{sha}" if sha else None


def current(cfg, encoder) -> dict[str, dict]:
    """The record for this run's inputs as they are now: {key: {"value": path or spec, "identity": str | None}}."""
    return {
        "data.path": {"value": cfg.data.path, "identity": data_identity(cfg.data.path)},
        "prior.encoder": {"value": cfg.prior.encoder, "identity": encoder_identity(encoder)},
    }


def read(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / FILE).read_text())
    except (OSError, ValueError):
        return None  # an older run, or a damaged record: nothing to recognise moved files by


def write(run_dir: Path, record: dict) -> None:
    atomic_write_json(run_dir / FILE, record)


def moved_mismatches(recorded: dict | None, now: dict, moved: dict[str, tuple]) -> list[str]:
    """For each moved key {key: (old value, new value)}, why the new path cannot stand in for the old one;
    empty when every moved input has the recorded content."""
    out = []
    for key, (old, new) in moved.items():
        was = (recorded or {}).get(key, {})
        have = now[key]["identity"]
        if was.get("value") != old or not was.get("identity"):
            out.append(f"{key}: the run has no record of {old!r}'s content (started before runs kept {FILE}), "
                       f"so {new!r} cannot be checked against it")
        elif have != was["identity"]:
            out.append(f"{key}: {new!r} is not the run's input: identity {have or 'none'} differs from "
                       f"{was['identity']} recorded for {old!r}")
    return out
