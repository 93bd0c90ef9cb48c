"""Writing many samples to one ADM `.npz`: resumable after a kill, split across processes.

Batch b (samples [b*B, (b+1)*B)) goes to process b mod world and is stored as its own chunk in
`OUT.parts/` (written atomically). When every chunk exists, the main process concatenates them in
index order into OUT (atomically) and removes the parts. A rerun skips the chunks already there,
so a killed job loses at most one batch, and OUT never exists unless it is complete.

A finished OUT keeps its settings beside it in OUT.json (e.g. s.npz.json, next to where s.npz.parts was), not
inside the archive: ADM's evaluator and other readers take the .npz as arr_0 / arr_1 alone. A rerun with the same
settings finds the file complete and returns it; one with other settings is refused, naming the differences.

A larger num, all else equal, extends a finished file (10K for a quick FID, then 50K): sample i depends on (seed, i)
and its chunk alone, not on num, so the finished file's full chunks are the new file's first ones, bitwise. The
chunk size stays the file's, and its last chunk, when a short one, is sampled again as the full chunk a fresh run
of the larger num computes (guidance pairs rows across the chunk, so a short chunk may round otherwise). Only the
new chunks go to OUT.parts; OUT stays complete in place until the larger file replaces it atomically.
"""

from __future__ import annotations

import itertools
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
from ahpa.metrics.images import iter_image_batches, npy_header, npz_image_count
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


def _other_than_num(saved: dict, settings: dict) -> list[str]:
    """How `settings` differ from a finished file's record `saved`, its num and chunk size apart: a larger num extends
    the file, and no sample depends on the chunk size."""
    return _differences(saved, {k: v for k, v in settings.items() if k not in (*_NOT_IDENTITY, "num")}, "the file")


_FIX = "choose another --out, or delete it to sample again"


def _read_record(out: Path) -> dict:
    """A finished file's recorded settings; one without (from before OUT.json, or the record deleted or torn) is
    refused: writing over it could silently replace 50K samples of another model or sampler."""
    record = record_path(out)
    try:
        return json.loads(record.read_text())
    except (OSError, ValueError):
        raise FileExistsError(f"sample output {str(out)!r} exists without a readable record of its settings "
                              f"({record.name}); a finished sample file is not written over: {_FIX}") from None


def _record_or_none(out: Path) -> dict | None:
    try:
        return _read_record(out)
    except FileExistsError:
        return None


def finished_record(out: str | Path, settings: dict) -> dict | None:
    """The record of the finished sample file `out` when `settings` (any subset of write_samples' settings: the CLI
    compares the options it was given before it loads a model) either match it or ask for more samples with all else
    equal (an extension); None when there is no finished file (none, or a partial one with OUT.parts, which is
    resumed; parts merely left over beside the file do not count). Other settings are refused, naming the
    differences, and so is a smaller num."""
    out = Path(out)
    parts = out.with_name(out.name + ".parts")
    if not out.exists() or (parts.exists() and not _leftover_parts(out, parts, settings)):
        return None
    saved, name = _read_record(out), record_path(out).name
    same = {k: v for k, v in settings.items() if k not in _NOT_IDENTITY}
    had, num = saved.get("num"), same.get("num", saved.get("num"))
    if not isinstance(had, int) or _other_than_num(saved, settings):
        diff = _differences(saved, same, "the file")
        raise SampleSettingsError(f"sample output {str(out)!r} is finished with other settings ({'; '.join(diff)}); "
                                  f"a finished sample file is not written over: {_FIX} (and {name})")
    if num < had:  # cutting it short would lose samples; its first `num` are an evaluation's --num away
        raise SampleSettingsError(f"sample output {str(out)!r} is finished with {had} samples, more than the {num} "
                                  f"asked for; a finished sample file is not cut short: evaluate its first {num} "
                                  f"(`ahpa eval {out} --num {num}`), or choose another --out")
    batch = saved.get("batch")
    if num > had and not (isinstance(batch, int) and batch >= 1):
        raise SampleSettingsError(f"sample output {str(out)!r} ({had} samples) records no valid chunk size (batch: "
                                  f"{batch!r} in {name}), so its chunks cannot be continued bitwise: {_FIX}")
    return saved


def check_finished(out: str | Path, settings: dict) -> bool:
    """Whether `out` is a finished sample file made with `settings` (as finished_record compares them). False when
    there is none, or when `settings` extend it (a larger num, all else equal)."""
    saved = finished_record(out, settings)
    return saved is not None and saved["num"] == settings.get("num", saved["num"])


def _leftover_parts(out: Path, parts: Path, settings: dict) -> bool:
    """Whether OUT.parts beside a finished OUT are left over from it, with `settings` its own or extending it (a
    larger num, all else equal): a kill while the run that finished OUT removed them, or a launch refused because
    another finished OUT meanwhile, leaves them behind, and every rerun and extension would be refused as a clash
    with the finished file. The parts of an extension of OUT (another num) are not; a command refused for the file
    (other settings, a smaller num) leaves them as they are."""
    if not (out.is_file() and parts.is_dir()):
        return False
    saved = _record_or_none(out) or {}
    had = saved.get("num")
    if not isinstance(had, int) or settings.get("num", had) < had or _other_than_num(saved, settings):
        return False
    try:
        partial = json.loads((parts / "settings.json").read_text())
    except FileNotFoundError:
        partial = {}  # removed first, or never written
    except (OSError, ValueError):
        return False
    return partial.get("extends") is None and partial.get("num", had) == had


def _drop_leftover_parts(out: Path, parts: Path, settings: dict) -> None:
    """Remove OUT.parts where they are left over (`_leftover_parts`), unless another launch holds them."""
    if not _leftover_parts(out, parts, settings):
        return
    try:
        lock.hold(parts / lock.LOCK_FILE, f"sample output {str(out)!r}")
    except OSError:  # held: a live launch is finishing them
        return
    try:
        shutil.rmtree(parts, ignore_errors=True)
    finally:
        lock.release(parts / lock.LOCK_FILE)


def extension_start(had: int, batch: int) -> int:
    """The samples an extension keeps of a finished file of `had`: its full chunks. A short last chunk is sampled
    again, within the full chunk a fresh run of the larger num computes."""
    return had // batch * batch


def _finished_meanwhile(out: Path, parts: Path) -> FileExistsError:
    """OUT finished beside parts that are not this command's: another launch's work, or a killed run's leftovers
    that this command's settings (another num, other options) do not let it remove."""
    return FileExistsError(f"sample output {str(out)!r} was finished by another launch meanwhile, or {parts.name} is "
                           "left over beside it from a killed run: rerun with the file's settings (which removes it) or "
                           f"delete {parts}, then run this command again")


def _open_parts(out: Path, parts: Path, settings: dict, num: int,
                base: dict | None) -> tuple[Exception | None, int | None, int | None]:
    """The main process's side of a start: OUT.parts made and locked, a partial attempt's settings compared (its
    chunk size replaces settings["batch"]) or this one's written; `base` is the record of the finished OUT this start
    extends, seen before the lock. Returns (the error every process raises, or None; the images a partial attempt
    already holds, None on a fresh start; the samples of the finished OUT extended, None when not extending)."""
    try:
        parts.mkdir(parents=True, exist_ok=True)
        lock.hold(parts / lock.LOCK_FILE, f"sample output {str(out)!r}")  # released when done, or when the process ends
    except lock.InUseError as e:  # another launch writes it
        return e, 0, None
    except OSError as e:
        return OSError(e.errno, f"cannot write the sample output's parts {str(parts)!r} ({e.strerror}); choose "
                                "another --out"), 0, None
    saved_file = parts / "settings.json"
    if not saved_file.exists():
        # the launch that held the lock until now may have finished OUT, or extended the file `base` described
        if out.exists() and (base is None or _record_or_none(out) != base):
            return _finished_meanwhile(out, parts), 0, None
        if base is not None and not out.exists():
            return FileNotFoundError(f"sample output {str(out)!r} was removed meanwhile; rerun to sample it"), 0, None
        extends = None if base is None else base["num"]
        atomic_write_text(saved_file, json.dumps({**settings, "extends": extends}, indent=1))
        return None, None, extends
    saved = json.loads(saved_file.read_text())
    extends = saved.pop("extends", None)  # a partial run of before extensions has none
    if out.exists() and extends is None:  # finished by the launch that held the lock until now
        return _finished_meanwhile(out, parts), 0, None
    kept = saved.get("batch", settings["batch"])
    if not (isinstance(kept, int) and kept >= 1):
        # a chunk size no chunk can have been written with (an attempt from before --batch was checked): keeping it
        # would fail every rerun; this command's size replaces it, and the settings are compared as for any resume
        saved["batch"] = kept = settings["batch"]
        atomic_write_text(saved_file, json.dumps(saved, indent=1))
    batch = settings["batch"] = kept  # the chunks already written set the chunk size
    # a partial run written before a sampler setting existed ran with that setting's default
    diff = _differences(saved, settings, "partial")
    if diff and extends is not None:
        return SampleSettingsError(f"{parts} holds a partial extension of {out} ({extends} samples) to "
                                   f"{saved.get('num')} with other settings ({'; '.join(diff)}); rerun that command "
                                   f"to finish it, or delete {parts} to keep {out} as it is"), 0, None
    if diff:
        return SampleSettingsError(f"{parts} holds a partial sampling run with other settings ({'; '.join(diff)}); "
                                   "delete it or rerun with the same settings"), 0, None
    start = 0
    if extends is not None:
        start = extension_start(extends, batch)
        error = _check_extended(out, parts, settings, start)
        if error is not None:
            return error, 0, None
    sizes = [(lo, min(batch, num - lo)) for lo in range(start, num, batch)]
    return None, start + sum(n for lo, n in sizes if _chunk_ok(_chunk_path(parts, lo), n)), extends


def _check_extended(out: Path, parts: Path, settings: dict, start: int) -> Exception | None:
    """Why a partial extension cannot take the first `start` samples of OUT (gone, or replaced by another file), or
    None. OUT holds the old num until the extension replaces it, and the new one after (a kill before its record)."""
    saved = _record_or_none(out) if out.exists() else None
    try:
        count = npz_image_count(out) or 0
    except ValueError:  # not a zip archive
        count = 0
    if not out.exists():
        why = "is gone"
    elif saved is None:
        why = f"has no readable record of its settings ({record_path(out).name})"
    elif diff := _other_than_num(saved, settings):
        why = f"holds other samples now ({'; '.join(diff)})"
    elif count < start:
        why = f"holds {count} samples now"
    else:
        return None
    return FileNotFoundError(f"{parts} extends the finished {out} past its first {start} samples, but {out} {why}: "
                             f"put it back, or delete {parts} to sample anew")


def write_samples(
    bundle: SamplerBundle, out: str | Path, num: int, seed: int, batch: int, cfg: SampleCfg,
    identity: dict, on_progress: Callable[[int], None] | None = None,
    on_resume: Callable[[int, int], None] | None = None, on_start: Callable[[], None] | None = None,
    classes: list[int] | None = None, on_extend: Callable[[int, int, int], None] | None = None,
) -> Path | None:
    """Generate samples [0, num) into `out`. Returns the path on the main process (None elsewhere).

    `identity` names what produced the samples (the model's or checkpoint's sha256); with the sampler
    settings it must match a previous partial attempt, else the error names the differing field. `batch` is the
    chunk size: a resume keeps the partial attempt's, an extension of a finished file the file's (the samples do not
    depend on it). On the main process, `on_extend(samples of the finished file, those kept, the chunk size)` is
    called when a finished file with fewer samples and otherwise these settings is extended (the module's doc),
    `on_resume(images already there, the chunk size kept)` when a partial attempt is resumed, then
    `on_start()` on every process once the settings are accepted, before the first chunk (a progress bar opened there
    is not drawn before a refusal); `on_progress(n)` after each chunk of n images it samples (not those a resume finds
    there). `classes`: sample i gets the
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
    finished, error, done, extends = False, None, None, None
    if d.is_main:  # only the main process may know the identity (the CLI hashes the model there alone)
        _drop_leftover_parts(out, parts, settings)
        try:
            base = finished_record(out, settings)
        except (FileExistsError, SampleSettingsError) as e:
            base, error = None, e
        finished = base is not None and base["num"] == num
        if base is not None and not finished:
            settings["batch"] = base["batch"]  # the file's chunks are continued
        if not finished and error is None:
            error, done, extends = _open_parts(out, parts, settings, num, base)
    # every process raises rank 0's verdict, rather than the others failing in the next collective without a word
    error, batch, finished, extends = from_main((error, settings["batch"], finished, extends))
    try:
        if error is not None:
            raise error
        if finished:  # complete already, with these settings
            return out if d.is_main else None
        start = None if extends is None else extension_start(extends, batch)
        if start is not None and d.is_main and on_extend is not None:
            on_extend(extends, start, batch)
        if done is not None and on_resume is not None:  # a partial attempt, also one killed before its first chunk
            on_resume(done, batch)
        if on_start is not None:
            on_start()
        labels = None if classes is None else round_robin_labels(torch.arange(num), classes)
        return _sample_chunks(bundle, out, parts, num, seed, batch, cfg, on_progress, settings, labels, start)
    finally:
        if d.is_main:  # also on an error: a notebook that goes on holds no one out
            lock.release(parts / lock.LOCK_FILE)


def _sample_chunks(bundle: SamplerBundle, out: Path, parts: Path, num: int, seed: int, batch: int, cfg: SampleCfg,
                   on_progress: Callable[[int], None] | None, settings: dict,
                   labels: torch.Tensor | None, start: int | None) -> Path | None:
    """This process's chunks of [start, num), then, on the main process, OUT from the first `start` samples of the
    finished OUT it extends (start None: no OUT, start 0) and all the chunks (OUT.parts removed) and its settings
    beside it (OUT.json)."""
    d = current()
    starts = list(range(start or 0, num, batch))  # start: a multiple of batch, so chunk b is [b * batch, ...) as ever
    mine = [lo for lo in starts if lo // batch % d.world == d.rank]
    for lo in mine:
        n = min(batch, num - lo)
        path = _chunk_path(parts, lo)
        if _chunk_ok(path, n):  # a resume's: on_resume counted it, and a bar's rate is of the samples drawn now
            continue
        for _, images, ys in iter_samples(bundle, lo, lo + n, seed, n, cfg, labels):
            _save_chunk(path, images.numpy(), ys.numpy())
        if on_progress is not None:
            on_progress(n)
    barrier()
    if not d.is_main:
        return None
    chunk_labels = []  # small (8 bytes a sample); the images are copied a chunk at a time
    if start:
        with np.load(out) as f:
            chunk_labels.append(f["arr_1"][:start])
    for lo in starts:
        with np.load(_chunk_path(parts, lo)) as f:
            chunk_labels.append(f["labels"])
    shape = (num, *_chunk_shapes(_chunk_path(parts, starts[0]))[0][1:])
    images = _chunk_images(parts, starts)
    if start is None:
        # the record first: a kill between the two leaves OUT.parts, and the rerun writes both again
        atomic_write_text(record_path(out), json.dumps(settings, indent=1))
        path = write_npz(out, images, np.concatenate(chunk_labels), shape)
    else:
        # OUT first: until it is replaced it is the old file, complete with its old record. A kill after leaves the
        # new OUT with the old record (the rerun rewrites both, taking the same first samples from the new OUT), never
        # a record of more samples than OUT holds
        kept = iter_image_batches(out, batch, max_images=start)
        path = write_npz(out, itertools.chain(kept, images), np.concatenate(chunk_labels), shape)
        atomic_write_text(record_path(out), json.dumps(settings, indent=1))
    shutil.rmtree(parts)
    return path
