"""One launch at a time on a run directory or a sample file: an advisory lock on a file inside it.

Two launches on the same `--out` (a job requeued while the first still runs, a command typed twice) would resume
the same checkpoint and write the same files: metrics rows doubled, checkpoints of both mixed, chunks of a sample
file deleted under the other. The main process of a launch takes the lock; the kernel releases it when that
process ends, however it ends, so a killed run leaves nothing stale behind. The file holds who took it, for the
message.

A POSIX record lock (fcntl.lockf), not flock: it belongs to the process, so the data loader's forked workers do not
keep holding it after the run gave it back, and NFS implements it. A file system without locks gives none, and then
nothing is refused.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no locks
    fcntl = None

LOCK_FILE = ".lock"
_held: dict[str, int] = {}  # lock file -> its one open descriptor (closing any descriptor of it drops the lock)
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class InUseError(OSError):
    """Another process holds the lock."""


def hold(path: Path, what: str) -> None:
    """Take the lock file `path` for this process (again: nothing happens), or refuse naming its holder."""
    key = os.path.abspath(path)
    if fcntl is None or key in _held:
        return
    fd = os.open(key, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        busy = e.errno in (errno.EAGAIN, errno.EACCES)  # another process holds it
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() if busy else ""
        os.close(fd)
        if e.errno in _UNSUPPORTED:
            return
        if not busy:
            raise
        raise InUseError(f"{what} is in use by another launch ({holder or 'a process that holds ' + key}): two at "
                         "once would write the same files. Wait for it to end or stop it, or choose another --out") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
    _held[key] = fd


def check_free(path: Path, what: str) -> None:
    """Refuse, as hold() does, while another process holds the lock; hold nothing (a check before the work that
    takes it: a Trainer built but refused, or never run, keeps no one out). A lock file that is not there is held by
    no one and is not made: a Trainer refused after the check leaves none behind."""
    if os.path.abspath(path) in _held or not os.path.exists(path):
        return
    hold(path, what)
    release(path)


def release(path: Path) -> None:
    """Give the lock back (a no-op where this process does not hold it)."""
    fd = _held.pop(os.path.abspath(path), None)
    if fd is not None:
        os.close(fd)
