"""Shards on disk: commit records, verification on resume, and the final merge into the manifest.

See ahpa.data.manifest for the layout. A shard is done when its record `shard-NNNNN.json` exists, names
the settings digest of this cache, and every file it lists has the recorded size and sha256. Anything else
under the shard's name (temp files of an interrupted run, files without a record) is deleted and redone.
"""

from __future__ import annotations

import math
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load as load_tensors
from safetensors.numpy import save as save_tensors

from ahpa.data.manifest import (
    MANIFEST, NUMPY_DTYPE, REPORT, SHARD_DIR, atomic_write_bytes, atomic_write_json, field_file, read_json, shard_stem,
)  # fmt: skip
from ahpa.data.shard_writer import merge_sums
from ahpa.data.tokens import divisor_grids
from ahpa.priors.base import sha256_file


class CacheError(ValueError):
    """A cache on disk that is damaged, incomplete or does not match what was asked."""


def check_output_dir(out: Path) -> None:
    """Fail before any work if `out` cannot become a writable directory (nothing is created here)."""
    if out.exists() and not out.is_dir():
        raise CacheError(f"--out {out} exists and is not a directory; choose a directory path")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise CacheError(f"--out {out} cannot be created: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise CacheError(f"--out {out} is not writable ({probe} denies write access); choose a writable directory")
    if probe == out:  # os.access trusts mode bits; a read-only mount or ACL only shows on a real write
        try:
            with tempfile.NamedTemporaryFile(dir=out, prefix=".ahpa-write-probe-"):
                pass
        except OSError as e:
            raise CacheError(f"--out {out} is not writable ({e.strerror}); choose a writable directory") from None


def field_spec(settings: dict) -> dict[str, dict]:
    """Every field a shard stores: dtype and the shape of one row."""
    lat, G, dtype = settings["latent"], settings["grid"], settings["dtype"]
    spec = {"latent_mean": {"dtype": dtype, "shape": [lat["channels"], lat["side"], lat["side"]]}}
    if "logvar" in lat["moments"]:
        spec["latent_logvar"] = dict(spec["latent_mean"])
    for lvl in settings["levels"]:
        spec[f"level.{lvl['name']}"] = {"dtype": dtype, "shape": [G * G, lvl.get("stored_channels", lvl["channels"])]}
    if settings["flips"] == "stored":
        spec |= {f"flip.{k}": dict(v) for k, v in spec.items()}
    if settings.get("images"):  # the crops the encoder saw (REPA's encoder reads them); mirrored exactly when read
        R = settings["resolution"]
        spec["image"] = {"dtype": "uint8", "shape": [R, R, 3]}
    spec["labels"] = {"dtype": "int64", "shape": []}
    spec["source_index"] = {"dtype": "int64", "shape": []}
    return spec


def row_bytes(spec: dict) -> int:
    return NUMPY_DTYPE[spec["dtype"]].itemsize * math.prod(spec["shape"])


class ShardPlan:
    """Shard i holds source items [i*S, min((i+1)*S, N)); its files live in DIR/shards/."""

    def __init__(self, directory: Path, items: int, shard_size: int, digest: str):
        self.directory, self.n, self.size, self.digest = directory, items, shard_size, digest
        self.shard_dir = directory / SHARD_DIR
        self.num_shards = math.ceil(items / shard_size)

    def items(self, i: int) -> tuple[int, int]:
        return i * self.size, min((i + 1) * self.size, self.n)

    def field_file(self, i: int, name: str) -> str:
        return field_file(i, name)

    def record_path(self, i: int) -> Path:
        return self.shard_dir / f"{shard_stem(i)}.json"

    def stats_file(self, i: int) -> str:
        return f"{shard_stem(i)}.stats.safetensors"

    def commit(self, i: int, items: tuple[int, int], rows: int, files: dict, sums: dict, skipped: list, conversions: dict) -> None:
        """Write the shard's statistics, then its record (the commit point)."""
        data = save_tensors({k: np.ascontiguousarray(v, np.float64) for k, v in sums.items()})
        name = self.stats_file(i)
        atomic_write_bytes(self.shard_dir / name, data)
        files = dict(files)
        files["stats"] = {"file": name, "bytes": len(data), "sha256": _sha_bytes(data)}
        record = {"index": i, "items": list(items), "rows": rows, "settings_sha256": self.digest, "files": files,
                  "skipped": skipped, "conversions": conversions}
        atomic_write_json(self.record_path(i), record)

    def verify(self, i: int, full: bool) -> str | None:
        """None if shard i is committed and intact; else why not (sizes always; sha256 when `full`)."""
        path = self.record_path(i)
        if not path.is_file():
            return "no commit record"
        try:
            rec = read_json(path)
        except ValueError as e:
            return str(e)
        if rec.get("settings_sha256") != self.digest or rec.get("items") != list(self.items(i)):
            return "record of other settings"
        for f in rec["files"].values():
            p = self.shard_dir / f["file"]
            if not p.is_file() or p.stat().st_size != f["bytes"]:
                return f"{f['file']} missing or of the wrong size"
            if full and sha256_file(p) != f["sha256"]:
                return f"{f['file']} fails its sha256 checksum"
        return None

    def check_complete(self, manifest: dict) -> None:
        """Cheap check of a complete cache: every listed file exists with its recorded size."""
        for shard in manifest["shards"]:
            for f in shard["files"].values():
                p = self.shard_dir / f["file"]
                if not p.is_file() or p.stat().st_size != f["bytes"]:
                    raise CacheError(f"{self.directory} is marked complete but {p} is missing or of the wrong size; "
                                     f"rerun the ahpa prepare command with --repair to encode the damaged shards again")

    def total_bytes(self, manifest: dict) -> int:
        return sum(f["bytes"] for s in manifest["shards"] for f in s["files"].values())


def bytes_to_write(plan: ShardPlan, settings: dict) -> tuple[int, int, int]:
    """(bytes, items, bytes per item) that the shards without a commit record will hold at most: one row of every
    field per source item (a skipped file writes none), the statistics files aside (~0.2 MB a shard)."""
    per_item = sum(row_bytes(spec) for spec in field_spec(settings).values())
    items = sum(b - a for i in range(plan.num_shards) if not plan.record_path(i).is_file() for a, b in [plan.items(i)])
    return per_item * items, items, per_item


def _sha_bytes(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def damaged_shards(plan: ShardPlan, shards, full: bool = True) -> dict[int, str]:
    """{shard: why it is not intact} among `shards` (sizes always; every file's sha256 when `full`)."""
    shards = list(shards)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # hashing releases the GIL
        problems = list(pool.map(lambda i: plan.verify(i, full=full), shards))
    return {i: p for i, p in zip(shards, problems) if p is not None}


def delete_shards(plan: ShardPlan, shards) -> None:
    """Remove every file of these shards (record, data, statistics, temporaries): they are encoded again."""
    for i in shards:
        stem = shard_stem(i)
        for p in list(plan.shard_dir.glob(f"{stem}.*")) + list(plan.shard_dir.glob(f".{stem}.*")):
            p.unlink(missing_ok=True)


def sweep_shards(plan: ShardPlan, mine: list[int], full: bool = True) -> tuple[list[int], list[int]]:
    """Split this process's shards into (kept: verified, by checksum when `full`; todo: their leftovers deleted)."""
    damaged = damaged_shards(plan, mine, full)
    delete_shards(plan, damaged)
    return [i for i in mine if i not in damaged], [i for i in mine if i in damaged]


def finalize_cache(plan: ShardPlan, settings: dict, listing) -> tuple[dict, dict]:
    """Rank 0, after every process committed its shards: merge statistics, write report, then the manifest."""
    missing = [i for i in range(plan.num_shards) if plan.verify(i, full=False) is not None]
    if missing:
        shown = ", ".join(shard_stem(i) for i in missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise CacheError(f"{len(missing)} shard(s) of {plan.directory} are not committed ({shown}); a process may have "
                         f"failed: rerun the same command to resume")
    records = [read_json(plan.record_path(i)) for i in range(plan.num_shards)]
    sums = [load_tensors((plan.shard_dir / r["files"]["stats"]["file"]).read_bytes()) for r in records]
    count = sum(r["rows"] for r in records)
    skipped = [s for r in records for s in r["skipped"]]
    conversions: dict[str, int] = {}
    for r in records:
        for k, v in r["conversions"].items():
            conversions[k] = conversions.get(k, 0) + v
    report = {"source": settings["source"]["path"], "items": plan.n, "images": count, "skipped_count": len(skipped),
              "skipped": skipped, "conversions": dict(sorted(conversions.items())), "ignored_files": listing.ignored}
    if settings["labels"]["num_classes"] > 1:
        report["images_per_class"] = images_per_class(plan, records, settings["labels"])
    atomic_write_json(plan.directory / REPORT, report)
    if count == 0:
        raise CacheError(f"every one of the {plan.n} source items was skipped (see {plan.directory / REPORT}); nothing to cache")

    def stats_of(key: str) -> dict:
        parts = [{k: s[f"{key}.{k}"] for k in ("n", "s1", "s2")} for s in sums]
        cs = merge_sums(parts).result()
        return {"mean": cs.mean.tolist(), "std": cs.std.tolist()}

    names = ["latent", *[l["name"] for l in settings["levels"]]]
    stats = {"latent": stats_of("latent"),
             "grids": {str(g): {n: stats_of(f"g{g}.{n}") for n in names} for g in divisor_grids(settings["grid"])}}
    labels = settings["labels"]
    manifest = {
        **settings,
        "count": count,
        "num_classes": labels["num_classes"],
        "class_names": labels["class_names"],
        "fields": field_spec(settings),
        "stats_note": "per channel over every cached image (originals, not flips); latent: sampled latents at full "
                      "resolution; grids[g][level]: after pooling to g x g (the 'latent' level pooled from sampled latents)",
        "stats": stats,
        "skipped": len(skipped),
        "report": REPORT,
        "shards": [{"index": r["index"], "items": r["items"], "rows": r["rows"], "files": r["files"]} for r in records],
        "complete": True,  # last key, last write: a reader trusts nothing before this flag
    }
    atomic_write_json(plan.directory / MANIFEST, manifest)
    return manifest, report


def images_per_class(plan: ShardPlan, records: list[dict], labels: dict) -> dict[str, int]:
    """{class name (or index): rows in the cache}, from the shards' label rows (8 B each): a class whose every file was
    skipped still has its index, and the model a class that never trains."""
    rows = [np.fromfile(plan.shard_dir / r["files"]["labels"]["file"], dtype="<i8") for r in records]
    counts = np.bincount(np.concatenate(rows), minlength=labels["num_classes"]).tolist()
    names = labels["class_names"] or [str(k) for k in range(len(counts))]
    return dict(zip(names, counts))


def empty_classes(report: dict) -> list[str]:
    """The classes of a cache's report that hold no image (a report from before the count: none)."""
    return [name for name, n in report.get("images_per_class", {}).items() if n == 0]


def stats_tensor(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)
