"""Checkpoints written atomically (temporary file, fsync, rename) with a checksum; keep the last N.

Loading picks the newest checkpoint that reads back whole and reports the ones it skipped. An XL/2 state
(model, EMA, Adam moments) is about 11 GB and every rank of a run reads it, so neither way holds a serialised
copy in memory: saving streams through the hash into the file, and reading memory-maps the file (copy-on-write),
so the ranks of a node share one copy in the page cache instead of holding one each.

Layout: `step_N.pt` is a plain torch.save file (the zip at offset 0, which mapping needs) and `step_N.pt.sha256`
beside it holds its digest in `sha256sum` format (`sha256sum -c step_N.pt.sha256` checks it). Checkpoints of
the earlier layout, the digest as a 65-byte header before the payload, still read back (streamed, not mapped).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from pathlib import Path

import torch
import torch.distributed as dist

from ahpa.atomic import atomic_path, atomic_write_bytes
from ahpa.train.distributed import all_true, from_main

PATTERN = re.compile(r"step_(\d{9})\.pt$")
# the earlier layout: 64 hex chars of the sha256 of the payload, newline, torch.save payload
HEADER = 65
CHUNK = 1 << 24


def checkpoint_path(directory: Path, step: int) -> Path:
    return directory / f"step_{step:09d}.pt"


def digest_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


class _HashingWriter(io.RawIOBase):
    """The file torch.save writes to: the payload goes to `f` and through the hash on its way."""

    def __init__(self, f):
        self.f, self.sha = f, hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.sha.update(b)
        return self.f.write(b)


class _Payload(io.RawIOBase):
    """A read-only view of the payload after the header: torch's zip reader seeks to absolute offsets."""

    def __init__(self, f):
        self.f = f

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        return self.f.seek(pos + HEADER if whence == io.SEEK_SET else pos, whence) - HEADER

    def tell(self) -> int:
        return self.f.tell() - HEADER

    def readinto(self, b) -> int:
        return self.f.readinto(b)


def save_checkpoint(directory: Path, step: int, state: dict, keep: int) -> Path:
    path = checkpoint_path(directory, step)
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                writer = _HashingWriter(f)
                torch.save(state, writer)
                f.flush()
                os.fsync(f.fileno())  # on disk before its digest is published (a full disk fails here, not after)
            # the digest is published first, the checkpoint by the rename after it: a crash in between leaves a
            # digest without its file (removed below by the next save), or, where this step was saved before, the
            # old file with the new digest, which is then skipped as broken
            atomic_write_bytes(digest_path(path), f"{writer.sha.hexdigest()}  {path.name}\n".encode())
    except OSError as e:  # the temporary file is gone; the previous checkpoint is untouched
        raise OSError(e.errno, f"could not write {path} ({e.strerror}); the previous checkpoint is intact. "
                               f"Free disk space or fix permissions, then rerun to resume") from e
    for old in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
        digest_path(old).unlink(missing_ok=True)
    for digest in directory.glob("step_*.pt.sha256"):  # of a save that crashed before its rename
        if not digest.with_suffix("").exists():
            digest.unlink(missing_ok=True)
    return path


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint file holds, from its name (step_000001000.pt -> 1000)."""
    return int(PATTERN.search(path.name).group(1))


def list_checkpoints(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if PATTERN.search(p.name))


class CheckpointError(ValueError):
    pass


def _is_digest(b: bytes) -> bool:
    return len(b) == 64 and all(c in b"0123456789abcdef" for c in b)


def has_earlier_layout(path: Path) -> bool:
    """Whether `path` is a training checkpoint of the earlier layout (its header: torch.load cannot read it). Those
    of the current layout are plain torch files, told by what they hold (`is_training_state`), not by a digest file
    beside them: public checkpoints come with `sha256sum` files too."""
    with open(path, "rb") as f:
        head = f.read(HEADER)
    return len(head) == HEADER and head[-1:] == b"\n" and _is_digest(head[:64])


def recorded_digest(path: Path) -> str:
    """The sha256 a checkpoint was saved with (its digest file, or the earlier layout's header), unverified: what
    identifies the weights a partial sampling run came from, read without hashing the file again."""
    digest = digest_path(path)
    if digest.is_file():
        return digest.read_bytes()[:64].decode()
    with open(path, "rb") as f:
        return f.read(HEADER)[:64].decode()


def is_training_state(obj) -> bool:
    """Whether a loaded object is a training checkpoint's state (for tools that meet one where they expect others)."""
    return isinstance(obj, dict) and {"optimizer", "ema_updates"} <= obj.keys()


def _sha256(f, start: int) -> bytes:
    f.seek(start)
    sha = hashlib.sha256()
    while chunk := f.read(CHUNK):
        sha.update(chunk)
    return sha.hexdigest().encode()


def read_checkpoint(path: Path) -> dict:
    """The checkpoint's state, its tensors on the CPU; mapped from the file where the layout allows."""
    digest = digest_path(path)
    if not digest.is_file():
        if has_earlier_layout(path):
            return _read_with_header(path)
        raise CheckpointError(f"{path}: its checksum file {digest.name} is missing (copy it beside the checkpoint), "
                              "or this is a foreign file")
    expected = digest.read_bytes()[:64]
    if not _is_digest(expected):
        raise CheckpointError(f"{digest}: not a sha256 digest")
    with open(path, "rb") as f:
        if _sha256(f, 0) != expected:
            raise CheckpointError(f"{path}: checksum mismatch (truncated or corrupted)")
    # mapped privately: pages are read when touched and shared by every process mapping the file; a write
    # (e.g. to Adam's moments when training on the CPU) copies the page and never reaches the file
    return torch.load(path, mmap=True, map_location="cpu", weights_only=False)


def owned(obj):
    """`obj` with every tensor copied into memory of its own: what is kept for the whole run from a mapped checkpoint
    (its statistics; the optimiser's state on the CPU, where loading moves nothing) would otherwise keep the file
    mapped, and its disk space in use once it is deleted. Not a deepcopy, which would copy the whole mapping."""
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: owned(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(owned(v) for v in obj)
    return obj


def _read_with_header(path: Path) -> dict:
    with open(path, "rb") as f:
        expected = f.read(HEADER)[:64]
        if _sha256(f, HEADER) != expected:
            raise CheckpointError(f"{path}: checksum mismatch (truncated or corrupted)")
        f.seek(HEADER)
        return torch.load(io.BufferedReader(_Payload(f), CHUNK), map_location="cpu", weights_only=False)


def load_latest(directory: Path) -> tuple[dict | None, Path | None, list[str]]:
    """(newest valid checkpoint's state or None, its path, messages about skipped broken ones)."""
    skipped = []
    for path in reversed(list_checkpoints(directory)):
        try:
            return read_checkpoint(path), path, skipped
        except (CheckpointError, EOFError, RuntimeError, OSError) as e:
            skipped.append(f"skipped broken checkpoint {path.name}: {e}")
    return None, None, skipped


def load_latest_everywhere(directory: Path, device: torch.device) -> tuple[dict | None, Path | None, list[str]]:
    """load_latest, the same checkpoint on every process: rank 0 chooses, the others read the file it chose.
    Each choosing for itself, a process could take an older one (a transient read error, or a save landing
    between them while a running run is sampled) and train or sample from other weights. A process that cannot
    read the chosen file fails, and every process with it."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return load_latest(directory)
    state, path, skipped, failed = None, None, [], None
    if dist.get_rank() == 0:
        try:
            state, path, skipped = load_latest(directory)
        except Exception as e:  # whatever it is, the others hear of it instead of waiting for rank 0's choice
            failed = e
    path, skipped, reason = from_main((path, skipped, f"{type(failed).__name__}: {failed}" if failed else None))
    if failed is not None:
        raise failed
    if reason is not None:
        raise CheckpointError(f"rank 0 could not load a checkpoint from {directory} ({reason})")
    error = None
    if dist.get_rank() != 0 and path is not None:
        try:
            state = read_checkpoint(path)
        except (CheckpointError, EOFError, RuntimeError, OSError) as e:
            error = e
    if not all_true(error is None, device):
        raise CheckpointError(f"{path}: rank 0 read this checkpoint and another process could not"
                              + (f" ({error})" if error else "") + "; is the run directory on storage every node sees?")
    return state, path, skipped
