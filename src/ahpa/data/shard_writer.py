"""Writing one shard's fields as raw rows, off the encoding thread, with checksums computed on the way.

The encoder thread hands over device tensors already copied (non-blocking) to host memory plus a CUDA
event; the writer thread waits for the event, appends the bytes to `<file>.tmp` and updates a sha256.
`finish()` fsyncs and renames the temp files into place and returns their checksums: a shard's data
files appear under their final names only when complete, and the shard counts as done only once its
commit record (written by the caller afterwards) exists.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from pathlib import Path

import numpy as np
import torch

from ahpa.priors.targets import StatsAccumulator


def to_numpy_rows(t: torch.Tensor) -> np.ndarray:
    """A host tensor -> numpy with the same bytes (bfloat16 as its raw 16 bits: numpy has no bf16)."""
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.contiguous().numpy()


class AsyncShardWriter:
    """Appends rows to the temp files of one shard at a time, in a background thread."""

    def __init__(self, directory: Path, max_pending: int = 4):
        self.directory = directory
        self._jobs: queue.Queue = queue.Queue(maxsize=max_pending)  # bounds host memory held by pending batches
        self._error: BaseException | None = None
        self._files: dict[str, tuple] = {}
        self._thread = threading.Thread(target=self._loop, name="ahpa-shard-writer", daemon=True)
        self._thread.start()

    # ---- called from the encoding thread ----
    def open(self, names: dict[str, str]) -> None:
        """Start a shard: field -> final file name (inside the directory)."""
        self._put(("open", names))

    def append(self, rows: dict[str, torch.Tensor], ready: torch.cuda.Event | None) -> None:
        """Queue host tensors (field -> [n, ...]); `ready` is recorded after their device-to-host copies."""
        self._put(("rows", rows, ready))

    def finish(self) -> dict[str, dict]:
        """Wait for the shard's rows, fsync, rename into place; field -> {file, bytes, sha256}."""
        done: queue.Queue = queue.Queue()
        self._put(("finish", done))
        result = done.get()
        self._raise()
        return result

    def close(self) -> None:
        """Stop the thread; temp files of an unfinished shard stay (the next run deletes them)."""
        if self._thread.is_alive():
            self._jobs.put(("stop",))
            self._thread.join()
        for f, _, _, _ in self._files.values():
            f.close()
        self._files = {}

    def _put(self, job: tuple) -> None:
        self._raise()
        self._jobs.put(job)

    def _raise(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"writing shard files in {self.directory} failed: {self._error}") from self._error

    # ---- the writer thread ----
    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job[0] == "stop":
                return
            if self._error is not None:  # drain after a failure; the caller sees the error on its next call
                if job[0] == "finish":
                    job[1].put({})
                continue
            try:
                self._run(job)
            except BaseException as e:  # surfaced in the encoding thread by _raise
                self._error = e
                if job[0] == "finish":
                    job[1].put({})

    def _run(self, job: tuple) -> None:
        kind = job[0]
        if kind == "open":
            for field, name in job[1].items():
                tmp = self.directory / (name + ".tmp")
                self._files[field] = (open(tmp, "wb"), hashlib.sha256(), tmp, self.directory / name)
        elif kind == "rows":
            _, rows, ready = job
            if ready is not None:
                ready.synchronize()  # the non-blocking copies into host memory have landed
            for field, t in rows.items():
                f, h, _, _ = self._files[field]
                data = memoryview(to_numpy_rows(t)).cast("B")
                f.write(data)
                h.update(data)
        elif kind == "finish":
            out = {}
            for field, (f, h, tmp, final) in self._files.items():
                f.flush()
                os.fsync(f.fileno())
                f.close()
                os.replace(tmp, final)
                out[field] = {"file": final.name, "bytes": final.stat().st_size, "sha256": h.hexdigest()}
            self._files = {}
            job[1].put(out)


def sum_arrays(acc: StatsAccumulator, channels: int) -> dict[str, np.ndarray]:
    """A shard's (n, s1, s2) as float64 numpy (zeros for a shard without rows)."""
    zero = np.zeros(channels, np.float64)
    return {
        "n": np.array([acc.n], np.float64),
        "s1": zero if acc.s1 is None else acc.s1.cpu().numpy(),
        "s2": zero if acc.s2 is None else acc.s2.cpu().numpy(),
    }


def merge_sums(parts: list[dict[str, np.ndarray]]) -> StatsAccumulator:
    """Sum per-shard (n, s1, s2) in the given order: the order is fixed, so the result is reproducible."""
    acc = StatsAccumulator()
    for p in parts:
        if p["n"][0] == 0:
            continue
        s1, s2 = torch.from_numpy(p["s1"].copy()), torch.from_numpy(p["s2"].copy())
        acc.s1 = s1 if acc.s1 is None else acc.s1 + s1
        acc.s2 = s2 if acc.s2 is None else acc.s2 + s2
        acc.n += int(p["n"][0])
    return acc
