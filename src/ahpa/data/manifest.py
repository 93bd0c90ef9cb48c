"""The on-disk format of a prepared cache: file names, the manifest, atomic writes, settings comparison.

A cache directory:
    manifest.json                 settings (+ "complete": false) while preparing; rewritten last, atomically,
                                  with counts, statistics, checksums and "complete": true
    report.json                   skipped files with reasons, conversion counts
    reduce.safetensors            with --reduce: PCA mean/projection/rebuild per level (ahpa.data.reduce)
    shards/shard-00007.json       commit record of shard 7 (written after its data files are renamed in place)
    shards/shard-00007.<field>.bin   raw little-endian rows of one field, shape and dtype in the manifest (with
                                  --store-images, field `image`: the crops as uint8 [R, R, 3], never flipped)
    shards/shard-00007.stats.safetensors   float64 moment sums of shard 7 (merged in shard order at the end)

Shard i holds source items [i*S, (i+1)*S) minus skipped files; under torchrun it is written by rank i % world,
so the layout does not depend on the number of processes and a resume may use another number.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ahpa.atomic import atomic_write_bytes
from ahpa.config import absolute_spec

FORMAT = "ahpa-cache/1"
MANIFEST = "manifest.json"
REPORT = "report.json"
SHARD_DIR = "shards"
DTYPES = ("fp16", "bf16")
FLIPS = ("none", "stored", "generated")
# numpy has no bfloat16: bf16 rows are stored as their raw 16 bits and viewed as torch.bfloat16 when read
NUMPY_DTYPE = {"fp16": np.dtype("<f2"), "bf16": np.dtype("<u2"), "int64": np.dtype("<i8"), "uint8": np.dtype("u1")}

# settings fields that identify a cache; everything else in the manifest is a result of preparing it
IDENTITY_KEYS = (
    "format", "encoder.kind", "encoder.weights_sha256", "encoder.spec_if_unhashed", "resolution", "grid",
    "dtype", "flips", "levels", "latent", "source.kind", "source.count", "source.fingerprint", "labels",
    "shard_size", "seed", "crop", "precision", "reduce", "images",
)  # fmt: skip


def shard_stem(index: int) -> str:
    return f"shard-{index:05d}"


def field_file(index: int, name: str) -> str:
    """File name (inside shards/) of one field of one shard, e.g. 'shard-00003.level.stage1.bin'."""
    return f"{shard_stem(index)}.{name}.bin"


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (dumps(obj) + "\n").encode())


def dumps(obj: Any, indent: int = 0) -> str:
    """JSON with one key per line but lists of numbers/strings on one line (per-channel statistics stay readable)."""
    pad, inner = " " * indent, " " * (indent + 1)
    if isinstance(obj, dict) and obj:
        items = [f"{inner}{json.dumps(str(k))}: {dumps(v, indent + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        return "[\n" + ",\n".join(f"{inner}{dumps(v, indent + 1)}" for v in obj) + f"\n{pad}]"
    return json.dumps(obj)




def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); delete the cache directory and prepare it again") from None


def identity_view(settings: dict) -> dict[str, Any]:
    """The identifying fields of a settings/manifest dict, flattened to dotted keys."""
    enc = settings["encoder"]
    flat = {
        "format": settings["format"],
        "encoder.kind": enc["spec"].partition(":")[0],
        "encoder.weights_sha256": enc["weights_sha256"],
        # a moved weights directory keeps its hash and its cache; without a hash the spec is all we have (made
        # absolute: older manifests kept a path as typed, newer ones record it absolute)
        "encoder.spec_if_unhashed": None if enc["weights_sha256"] else absolute_spec(enc["spec"]),
        "source.kind": settings["source"]["kind"],
        "source.count": settings["source"]["count"],
        "source.fingerprint": settings["source"]["fingerprint"],
    }
    reduce = settings.get("reduce")
    # the basis (and its checksum) is fitted from these two settings; only they identify the cache
    flat["reduce"] = {"dim": reduce["dim"], "images": reduce["images"]} if reduce else None
    for key in IDENTITY_KEYS:
        if key not in flat:
            flat[key] = settings.get(key)
    return flat


def settings_differences(saved: dict, wanted: dict) -> list[str]:
    """'field: cache has X, this command gives Y' for every identifying field that differs."""
    a, b = identity_view(saved), identity_view(wanted)
    return [f"{k}: cache has {_short(a[k])}, this command gives {_short(b[k])}" for k in IDENTITY_KEYS if a[k] != b[k]]


def _short(v: Any) -> str:
    s = json.dumps(v)
    return s if len(s) <= 160 else s[:157] + "..."
