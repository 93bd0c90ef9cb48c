"""Checkpoints written atomically (temporary file, fsync, rename) with a checksum; keep the last N.

Loading picks the newest checkpoint that reads back whole and reports the ones it skipped. Both ways stream
through the file: an XL/2 state (model, EMA, Adam moments) is about 11 GB, and a serialised copy of it in
memory, let alone two, would triple what saving and resuming need on every rank.
"""

from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path

import torch

from ahpa.atomic import atomic_path

PATTERN = re.compile(r"step_(\d{9})\.pt$")
# layout: 64 hex chars of the sha256 of the payload, newline, torch.save payload
HEADER = 65
CHUNK = 1 << 24


def checkpoint_path(directory: Path, step: int) -> Path:
    return directory / f"step_{step:09d}.pt"


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
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            f.write(b"0" * 64 + b"\n")  # the digest is known only at the end; the rename publishes the file
            writer = _HashingWriter(f)
            torch.save(state, writer)
            f.seek(0)
            f.write(writer.sha.hexdigest().encode())
    except OSError as e:  # the temporary file is gone; the previous checkpoint is untouched
        raise OSError(e.errno, f"could not write {path} ({e.strerror}); the previous checkpoint is intact. "
                               f"Free disk space or fix permissions, then rerun to resume") from e
    for old in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if PATTERN.search(p.name))


class CheckpointError(ValueError):
    pass


def is_ahpa_checkpoint(path: Path) -> bool:
    """Whether `path` starts with this module's checksum header (for tools that meet one where they expect others)."""
    with open(path, "rb") as f:
        head = f.read(HEADER)
    return len(head) == HEADER and head[-1:] == b"\n" and all(c in b"0123456789abcdef" for c in head[:-1])


def read_checkpoint(path: Path) -> dict:
    with open(path, "rb") as f:
        head = f.read(HEADER)
        if len(head) != HEADER or head[-1:] != b"\n":
            raise CheckpointError(f"{path}: not an ahpa checkpoint (no checksum header); it may be a foreign or "
                                  "truncated file")
        sha = hashlib.sha256()
        while chunk := f.read(CHUNK):
            sha.update(chunk)
        if sha.hexdigest().encode() != head[:64]:
            raise CheckpointError(f"{path}: checksum mismatch (truncated or corrupted)")
        f.seek(HEADER)
        return torch.load(io.BufferedReader(_Payload(f), CHUNK), map_location="cpu", weights_only=False)


def load_latest(directory: Path) -> tuple[dict | None, list[str]]:
    """(newest valid checkpoint state or None, messages about skipped broken ones)."""
    skipped = []
    for path in reversed(list_checkpoints(directory)):
        try:
            return read_checkpoint(path), skipped
        except (CheckpointError, EOFError, RuntimeError, OSError) as e:
            skipped.append(f"skipped broken checkpoint {path.name}: {e}")
    return None, skipped
