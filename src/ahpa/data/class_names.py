"""The names of a run's classes, where its data records them, so that `ahpa sample --class NAME` and an export can
name classes: a prepared cache's manifest (the sub-folder names of an image folder), an .npz's `class_names` array
(the demo's, CIFAR-10's), the procedural shapes' own names. Class k is the k-th name.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

from ahpa.config import DataCfg
from ahpa.spelling import did_you_mean


def class_names(data: DataCfg) -> list[str] | None:
    """The names of the classes of `data`, or None where it records none (a list of files, a cache of an .npz or of
    unlabelled images) or is not on this machine (a run sampled elsewhere: its classes are then given by index)."""
    from ahpa.data.procedural import CLASS_NAMES

    if data.source == "procedural":
        return list(CLASS_NAMES)
    path = Path(data.path).expanduser() if data.path else None
    try:
        if data.source == "cache" and path is not None:
            from ahpa.data.manifest import MANIFEST

            names = json.loads((path / MANIFEST).read_text()).get("class_names")
        elif data.source == "npz" and path is not None:
            with np.load(path) as f:  # reads the one array: the images stay on disk
                names = f["class_names"].tolist() if "class_names" in f.files else None
        else:
            return None
    except (OSError, ValueError, zipfile.BadZipFile):
        return None  # moved, or not readable: the run's own errors say so where it matters
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        return None
    return names


def class_indices(given: list[int | str], names: list[str] | None, num_classes: int, what: str) -> list[int]:
    """`--class` values (indices, or names of `names`) -> class indices, each checked against the model's classes;
    `what` names the model in errors."""
    out = []
    for k in given:
        if isinstance(k, str):
            if names is None:
                raise ValueError(f"--class {k!r}: {what} records no class names (its data named none, or is not on "
                                 f"this machine); give class indices 0..{num_classes - 1}")
            if k not in names:
                commas = any("," in n for n in names)  # listed as written: "a, a,b, c" would not say which is which
                shown = ", ".join(map(repr if commas else str, names[:12])) + (", ..." if len(names) > 12 else "")
                whole = (f"; a name that holds a comma is given whole, as its own --class (--class "
                         f"{next(n for n in names if ',' in n)!r})") if commas else ""
                raise ValueError(f"--class {k!r} is no class of {what}{did_you_mean(k, names)}; its classes: {shown}{whole}")
            k = names.index(k)
        if not 0 <= k < num_classes:
            raise ValueError(f"--class {k}: {what} has classes 0..{num_classes - 1}")
        out.append(k)
    return out
