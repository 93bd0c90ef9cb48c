"""Bytes on disk as a person reads them, and the free space where a command is about to write: what `ahpa prepare`
(the cache's shards) and `ahpa train` (train.posthoc_ema's snapshots) check before hours of work would fill a disk."""

from __future__ import annotations

import shutil
from pathlib import Path


def size_text(n: float) -> str:
    """Bytes as a person reads them: 3.99 MB, 10.24 TB (a test cache is not "0.00 GB")."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n / 1e3:.1f} kB"


def free_space(path: Path) -> tuple[Path, int]:
    """(the folder measured, its disk's free bytes) for a path that may not exist yet: its nearest existing folder,
    which is on the disk the path's files will go to unless a folder still to be made is a mount point."""
    disk = Path(path)
    while not disk.exists():
        disk = disk.parent
    return disk, shutil.disk_usage(disk).free
