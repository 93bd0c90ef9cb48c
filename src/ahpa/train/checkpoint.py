"""Checkpoints written atomically (temporary file, fsync, rename) with a checksum; keep the last N.

Loading picks the newest checkpoint that reads back whole and reports the ones it skipped.
"""

from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path

import torch

from ahpa.atomic import atomic_write_bytes

PATTERN = re.compile(r"step_(\d{9})\.pt$")


def checkpoint_path(directory: Path, step: int) -> Path:
    return directory / f"step_{step:09d}.pt"


def save_checkpoint(directory: Path, step: int, state: dict, keep: int) -> Path:
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    # layout: 64 hex chars of sha256, newline, torch.save payload
    digest = hashlib.sha256(payload).hexdigest().encode()
    path = checkpoint_path(directory, step)
    try:
        atomic_write_bytes(path, digest + b"\n" + payload)
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


def read_checkpoint(path: Path) -> dict:
    raw = Path(path).read_bytes()
    digest, sep, payload = raw.partition(b"\n")
    if not sep or len(digest) != 64:
        raise CheckpointError(f"{path}: not an ahpa checkpoint (no checksum header); it may be a foreign or truncated file")
    if hashlib.sha256(payload).hexdigest().encode() != digest:
        raise CheckpointError(f"{path}: checksum mismatch (truncated or corrupted); delete it to resume from an older one")
    return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=False)


def load_latest(directory: Path) -> tuple[dict | None, list[str]]:
    """(newest valid checkpoint state or None, messages about skipped broken ones)."""
    skipped = []
    for path in reversed(list_checkpoints(directory)):
        try:
            return read_checkpoint(path), skipped
        except (CheckpointError, EOFError, RuntimeError, OSError) as e:
            skipped.append(f"skipped broken checkpoint {path.name}: {e}")
    return None, skipped
