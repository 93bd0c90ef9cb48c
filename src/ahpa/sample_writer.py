"""Writing many samples to one ADM `.npz`: resumable after a kill, split across processes.

Batch b (samples [b*B, (b+1)*B)) goes to process b mod world and is stored as its own chunk in
`OUT.parts/` (written atomically). When every chunk exists, the main process concatenates them in
index order into OUT (atomically) and removes the parts. A rerun skips the chunks already there,
so a killed job loses at most one batch, and OUT never exists unless it is complete.

A finished OUT keeps its settings beside it in OUT.json (e.g. s.npz.json, next to where s.npz.parts was), not
inside the archive: ADM's evaluator and other readers take the .npz as arr_0 / arr_1 alone. A rerun with the same
settings finds the file complete and returns it; one with other settings is refused, naming the differences.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ahpa import lock
from ahpa.atomic import atomic_path, atomic_write_text
from ahpa.config import SampleCfg
from ahpa.metrics.images import npy_header
from ahpa.sample import SamplerBundle, iter_samples, round_robin_labels, write_npz
from ahpa.train.distributed import barrier, current, from_main


class SampleSettingsError(ValueError):
    pass


def _chunk_path(parts: Path, lo: int) -> Path:
    return parts / f"chunk_{lo:010d}.npz"


def _save_chunk(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        np.savez(tmp, images=images, labels=labels)


def _chunk_shapes(path: Path) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(images, labels) shapes of a chunk, from the arrays' headers: a resume of 50,000 samples at 256 would otherwise
    read 9.8 GB to look at them. The archive's directory, read first, is at its end: a truncated file fails here."""
    shapes = []
    with zipfile.ZipFile(path) as z:
        for name in ("images.npy", "labels.npy"):
            with z.open(name) as f:
                header = npy_header(f)
            if header is None:
                raise ValueError(f"{path}: {name} is in an .npy format version np.savez does not write")
            shapes.append(header[0])
    return shapes[0], shapes[1]


def _chunk_ok(path: Path, n: int) -> bool:
    """Whether a chunk (written atomically) holds n images and labels."""
    try:
        images, labels = _chunk_shapes(path)
        return images[0] == n and labels[0] == n
    except Exception:  # a torn or foreign file is simply redone
        return False


def _chunk_images(parts: Path, starts: list[int]):
    """The chunks' images in index order, one chunk in memory at a time."""
    for lo in starts:
        with np.load(_chunk_path(parts, lo)) as f:
            yield f["images"]


def record_path(out: str | Path) -> Path:
    """Where a finished sample file's settings are kept: OUT.npz -> OUT.npz.json."""
    out = Path(out)
    return out.with_name(out.name + ".json")


# settings a file does not depend on: a rerun with another chunk size is the same request
_NOT_IDENTITY = ("batch",)


def _differences(saved: dict, settings: dict, holder: str) -> list[str]:
    """'key: <holder> has a, command gives b' for each key of `settings` that `saved` holds otherwise; a key missing
    from `saved` (written before that setting existed) counts as the setting's default, None outside SampleCfg."""
    defaults = vars(SampleCfg())

    def said(key: str, value) -> str:  # classes: None is every class (class-balanced), not a Python None
        return "every class" if key == "classes" and value is None else repr(value)

    return [f"{k}: {holder} has {said(k, saved.get(k, defaults.get(k)))}, command gives {said(k, v)}"
            for k, v in settings.items() if saved.get(k, defaults.get(k)) != v]


def check_finished(out: str | Path, settings: dict) -> bool:
    """Whether `out` is a finished sample file made with `settings` (any subset of write_samples' settings: the CLI
    compares the options it was given before it loads a model). False when there is no finished file (none, or a
    partial one with OUT.parts, which is resumed). A finished file with other settings, or with no record of its
    settings (from before OUT.json, or the record deleted), is refused: writing over it could silently replace 50K
    samples of another model or sampler."""
    out = Path(out)
    if not out.exists() or out.with_name(out.name + ".parts").exists():
        return False
    fix = "choose another --out, or delete it to sample again"
    record = record_path(out)
    try:
        saved = json.loads(record.read_text())
    except (OSError, ValueError):
        raise FileExistsError(f"sample output {str(out)!r} exists without a readable record of its settings "
                              f"({record.name}); a finished sample file is not written over: {fix}") from None
    diff = _differences(saved, {k: v for k, v in settings.items() if k not in _NOT_IDENTITY}, "the file")
    if diff:
        raise SampleSettingsError(f"sample output {str(out)!r} is finished with other settings ({'; '.join(diff)}); "
                                  f"a finished sample file is not written over: {fix} (and {record.name})")
    return True


def _open_parts(out: Path, parts: Path, settings: dict, num: int) -> tuple[Exception | None, int | None]:
    """The main process's side of a start: OUT.parts made and locked, a partial attempt's settings compared (its
    chunk size replaces settings["batch"]) or this one's written. Returns (the error every process raises, or None;
    the images a partial attempt already holds, None on a fresh start)."""
    try:
        parts.mkdir(parents=True, exist_ok=True)
        lock.hold(parts / lock.LOCK_FILE, f"sample output {str(out)!r}")  # released when done, or when the process ends
    except lock.InUseError as e:  # another launch writes it
        return e, 0
    except OSError as e:
        return OSError(e.errno, f"cannot write the sample output's parts {str(parts)!r} ({e.strerror}); choose "
                                "another --out"), 0
    if out.exists():  # finished by the launch that held the lock until now
        return FileExistsError(f"sample output {str(out)!r} was finished by another launch meanwhile"), 0
    saved_file = parts / "settings.json"
    if not saved_file.exists():
        atomic_write_text(saved_file, json.dumps(settings, indent=1))
        return None, None
    saved = json.loads(saved_file.read_text())
    kept = saved.get("batch", settings["batch"])
    if not (isinstance(kept, int) and kept >= 1):
        # a chunk size no chunk can have been written with (an attempt from before --batch was checked): keeping it
        # would fail every rerun; this command's size replaces it, and the settings are compared as for any resume
        saved["batch"] = kept = settings["batch"]
        atomic_write_text(saved_file, json.dumps(saved, indent=1))
    batch = settings["batch"] = kept  # the chunks already written set the chunk size
    # a partial run written before a sampler setting existed ran with that setting's default
    diff = _differences(saved, settings, "partial")
    if diff:
        return SampleSettingsError(f"{parts} holds a partial sampling run with other settings ({'; '.join(diff)}); "
                                   "delete it or rerun with the same settings"), 0
    sizes = [(lo, min(batch, num - lo)) for lo in range(0, num, batch)]
    return None, sum(n for lo, n in sizes if _chunk_ok(_chunk_path(parts, lo), n))


def write_samples(
    bundle: SamplerBundle, out: str | Path, num: int, seed: int, batch: int, cfg: SampleCfg,
    identity: dict, on_progress: Callable[[int], None] | None = None,
    on_resume: Callable[[int, int], None] | None = None, on_start: Callable[[], None] | None = None,
    classes: list[int] | None = None,
) -> Path | None:
    """Generate samples [0, num) into `out`. Returns the path on the main process (None elsewhere).

    `identity` names what produced the samples (the model's or checkpoint's sha256); with the sampler
    settings it must match a previous partial attempt, else the error names the differing field. `batch` is the
    chunk size: a resume keeps the partial attempt's (the samples do not depend on it). On the main process,
    `on_resume(images already there, the chunk size kept)` is called when a partial attempt is resumed, then
    `on_start()` on every process once the settings are accepted, before the first chunk (a progress bar opened there
    is not drawn before a refusal); `on_progress(n)` after each chunk of n images. `classes`: sample i gets the
    (i mod n)-th of these labels (round_robin_labels), part of the file's identity; None: every class, class-balanced.
    """
    d = current()
    out = Path(out)
    if out.suffix != ".npz":
        raise ValueError(f"sample output {str(out)!r} must end in .npz")
    if not (isinstance(batch, int) and batch >= 1):
        raise ValueError(f"write_samples: batch (samples per chunk) must be a positive integer, got {batch!r}")
    parts = out.with_name(out.name + ".parts")
    if classes is not None and not classes:
        raise ValueError("write_samples: classes is an empty list; give at least one class, or None for all of them")
    # classes None (every class) is also what a record from before this setting means
    settings = {"num": num, "seed": seed, "batch": batch, "classes": None if classes is None else list(classes),
                **vars(cfg), **identity}
    settings.pop("grid_images", None)
    finished, error, done = False, None, None
    if d.is_main:  # only the main process may know the identity (the CLI hashes the model there alone)
        try:
            finished = check_finished(out, settings)
        except (FileExistsError, SampleSettingsError) as e:
            error = e
        if not finished and error is None:
            error, done = _open_parts(out, parts, settings, num)
    # every process raises rank 0's verdict, rather than the others failing in the next collective without a word
    error, batch, finished = from_main((error, settings["batch"], finished))
    try:
        if error is not None:
            raise error
        if finished:  # complete already, with these settings
            return out if d.is_main else None
        if done is not None and on_resume is not None:  # a partial attempt, also one killed before its first chunk
            on_resume(done, batch)
        if on_start is not None:
            on_start()
        labels = None if classes is None else round_robin_labels(torch.arange(num), classes)
        return _sample_chunks(bundle, out, parts, num, seed, batch, cfg, on_progress, settings, labels)
    finally:
        if d.is_main:  # also on an error: a notebook that goes on holds no one out
            lock.release(parts / lock.LOCK_FILE)


def _sample_chunks(bundle: SamplerBundle, out: Path, parts: Path, num: int, seed: int, batch: int, cfg: SampleCfg,
                   on_progress: Callable[[int], None] | None, settings: dict,
                   labels: torch.Tensor | None) -> Path | None:
    """This process's chunks of [0, num), then, on the main process, OUT from all of them (OUT.parts removed) and
    its settings beside it (OUT.json)."""
    d = current()
    starts = list(range(0, num, batch))
    mine = [lo for i, lo in enumerate(starts) if i % d.world == d.rank]
    for lo in mine:
        n = min(batch, num - lo)
        path = _chunk_path(parts, lo)
        if not _chunk_ok(path, n):
            for _, images, ys in iter_samples(bundle, lo, lo + n, seed, n, cfg, labels):
                _save_chunk(path, images.numpy(), ys.numpy())
        if on_progress is not None:
            on_progress(n)
    barrier()
    if not d.is_main:
        return None
    chunk_labels = []  # small (8 bytes a sample); the images are copied a chunk at a time
    for lo in starts:
        with np.load(_chunk_path(parts, lo)) as f:
            chunk_labels.append(f["labels"])
    shape = (num, *_chunk_shapes(_chunk_path(parts, 0))[0][1:])
    # the record first: a kill between the two leaves OUT.parts, and the rerun writes both again
    atomic_write_text(record_path(out), json.dumps(settings, indent=1))
    path = write_npz(out, _chunk_images(parts, starts), np.concatenate(chunk_labels), shape)
    shutil.rmtree(parts)
    return path
