"""The image-decoding worker processes (`ahpa prepare`, `ahpa eval`, `vae-train`, a run's reference folder): how
they start, how what they read reaches them, and how they end with the process that reads their results.

Forking copies the parent with the locks its other threads held at that moment, and nobody in the child releases
them: Python 3.12+ warns about it ("... is multi-threaded, use of fork() may lead to deadlocks in the child", a
DeprecationWarning), and 3.14 no longer forks by default on Linux. Our parents do have threads when workers start
(the shard writer of `ahpa prepare`, torch's intra-op pool once the encoder or a detector ran). So on Linux the workers start from a fork server, as Python 3.14 starts them: a process started fresh
before them, with only its imports, that forks each worker while it is single-threaded. macOS and Windows spawn a
fresh interpreter per worker, their default. A program that fixed another start method itself
(`multiprocessing.set_start_method("spawn")`) is left with its choice; on Linux ours never fork.

A worker that does not fork gets its dataset pickled. The large arrays decoding reads (an ImageNet path table, an
`.npz` source's images) go as torch tensors in shared memory, copied there once, so that N workers and the parent
hold one copy, as forked workers shared the parent's pages (docs/data.md); each worker gets its own copy when
shared memory lacks room.

A worker whose reader was killed (SIGKILL: a scheduler's kill, an OOM) can block for good on a full result pipe,
which DataLoader's own check of its parent never reaches (seen holding 786 MB each, ten minutes after a killed
ImageNet prepare); a fork server's worker is not even the reader's child, so that check watches the server, which
in turn waits for its workers. On Linux each worker dies with its parent and, when that is a fork server, with
the reader too.
"""

from __future__ import annotations

import multiprocessing
import os
import select
import signal
import sys
import threading
import time
from multiprocessing.context import BaseContext
from typing import TYPE_CHECKING

import numpy as np
import torch

from ahpa.data.path_table import PathTable

if TYPE_CHECKING:
    from ahpa.data.listing import Listing

# imported once by the fork server, so that each worker it forks has torch and the decoder already (about 1 s of
# imports per worker on a CPU otherwise). Not "__main__", the server's default: a user's script without an
# `if __name__ == "__main__":` guard would run again in the server, which lives as long as the script.
PRELOAD = ["ahpa.data.listing"]


def worker_context() -> BaseContext | None:
    """The start method of decoding workers: a fork server's on Linux unless the program fixed another than fork,
    else None (the process's default: spawn on macOS and Windows)."""
    # A fixed "fork" says nothing of a choice: on Python <= 3.13 multiprocessing fixes its default, fork, itself the
    # first time it starts a process by another method (spawn.get_preparation_data), so our own first workers fix it
    if not sys.platform.startswith("linux") or multiprocessing.get_start_method(allow_none=True) not in (None, "fork"):
        return None
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # takes effect when the server starts, at the first workers of the process
    return ctx


def to_shared(a: np.ndarray) -> torch.Tensor:
    """A copy of `a` in shared memory: torch's pickler for worker processes sends a handle to it, not its bytes.
    Allocated there and filled once (no private copy on the way)."""
    t = torch.empty(a.shape, dtype=torch.from_numpy(np.empty(0, a.dtype)).dtype)
    if a.size:  # an empty array has no memory to share
        t.share_memory_()
    t.numpy()[...] = a
    return t


def room_in_shared_memory(nbytes: int, where: str = "/dev/shm") -> bool:
    """Whether Linux's shared memory (`where`, a tmpfs: 64 MB in a default Docker container) has room for `nbytes`
    more, and some to spare for others: writing past a full one kills the process (SIGBUS), it raises nothing."""
    try:
        st = os.statvfs(where)
    except OSError:  # no such file system (macOS keeps shared memory elsewhere): nothing to check
        return True
    return st.f_bavail * st.f_frsize >= nbytes + SHM_SPARE


SHM_SPARE = 64 << 20


def share_listing(listing: Listing) -> dict[str, object]:
    """What a decoding worker reads of `listing`: {"array": uint8 [N, H, W, 3]} or {"root", "names", "ends"} of its
    path table. The arrays go in shared memory when it has room: the listing's own arrays then become those copies
    (the same values), so that the parent does not keep a second one. Otherwise as numpy arrays, which each worker
    receives a copy of (as spawned workers did before)."""
    if listing.array is not None:
        sent = {"array": listing.array}
    else:
        sent = {"root": listing.paths.root, "names": listing.paths._bytes, "ends": listing.paths._ends}
    arrays = [k for k, v in sent.items() if isinstance(v, np.ndarray)]
    if not room_in_shared_memory(sum(sent[k].nbytes for k in arrays)):
        return sent
    sent |= {k: to_shared(sent[k]) for k in arrays}
    if listing.array is not None:
        listing.array = sent["array"].numpy()
    else:
        listing.paths = PathTable._view(listing.paths.root, sent["names"].numpy(), sent["ends"].numpy())
    return sent


def unshare(sent: dict[str, object]) -> tuple[PathTable | None, np.ndarray | None]:
    """`share_listing`'s result, as a worker received it -> (path table, array), one of them None."""
    arrays = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in sent.items()}
    if "array" in arrays:
        return None, arrays["array"]
    return PathTable._view(arrays["root"], arrays["names"], arrays["ends"]), None


def start_worker(reader: int, _: int) -> None:
    """A decoding worker's first call (DataLoader's worker_init_fn; `reader` the pid of the process that started the
    loader)."""
    torch.set_num_threads(1)  # decoding is per-process; intra-op threads would only fight over cores
    die_with_parent()
    if sys.platform.startswith("linux") and os.getppid() != reader:  # forked by a fork server
        threading.Thread(target=_exit_when_ended, args=(reader,), name="ahpa-reader-watch", daemon=True).start()


def die_with_parent() -> None:
    """On Linux the kernel kills this process when its parent ends."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before the call above: nobody will read this worker's results
        os._exit(1)


def _exit_when_ended(pid: int) -> None:
    """Ends this process once process `pid` has ended (run in a daemon thread)."""
    try:
        fd = os.pidfd_open(pid)  # readable once the process ends; the pid cannot be reused under it
    except OSError:  # Linux before 5.3, or `pid` already gone: ask every second
        while _alive(pid):
            time.sleep(1.0)
    else:
        select.select([fd], [], [])
    os._exit(1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):  # gone, or its number taken by another user's process
        return False
    return True
