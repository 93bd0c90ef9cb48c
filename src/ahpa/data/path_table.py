"""A long sequence of file paths, held as two numpy arrays instead of one Python object per path.

ImageNet's 1.28M files as `pathlib.Path` objects held 426 MB in every `ahpa prepare` process, and a DataLoader
worker reading each path once copied 295 MB of them from its parent: a forked worker shares the parent's pages
until it writes one, and reading an object writes its reference count (benchmarks/listing_memory.py,
docs/data.md). The names' bytes and their end offsets are two arrays that no read writes to.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np


class PathTable:
    """Paths `root / name` (or `name` as it is when root is None), numbered in the order given.

    Names are stored as the file system's bytes (`os.fsencode`), so names that are not valid UTF-8 come back as
    they were listed.
    """

    def __init__(self, names: Sequence[str], root: Path | None = None):
        # one string, encoded once: per-name bytes objects would double the listing's peak memory. NUL ends each
        # name; no file system allows it in a name.
        self.root = root
        self._bytes = np.frombuffer(os.fsencode("\0".join(names) + "\0") if names else b"", np.uint8)
        self._ends = np.flatnonzero(self._bytes == 0)  # int64 [N]: where name i's NUL is
        if len(self._ends) != len(names):
            bad = next(n for n in names if "\0" in n)
            raise ValueError(f"path {bad!r} holds a NUL character, which no file name can")

    @classmethod
    def _view(cls, root: Path | None, data: np.ndarray, ends: np.ndarray) -> PathTable:
        table = cls.__new__(cls)
        table.root, table._bytes, table._ends = root, data, ends
        return table

    def __len__(self) -> int:
        return len(self._ends)

    def name(self, i: int) -> str:
        """Path i as listed: relative to the root when there is one."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"path {i} of a table of {len(self)}")
        i %= len(self)
        start = int(self._ends[i - 1]) + 1 if i else 0
        return os.fsdecode(self._bytes[start : int(self._ends[i])].tobytes())

    def __getitem__(self, i: int | slice) -> Path | PathTable:
        if isinstance(i, slice):  # the first N paths (a listing's limit), sharing this table's arrays
            start, stop, step = i.indices(len(self))
            if step != 1:
                raise ValueError("a PathTable slices with step 1 only")
            stop = max(start, stop)
            base = int(self._ends[start - 1]) + 1 if start else 0
            end = int(self._ends[stop - 1]) + 1 if stop > start else base
            return self._view(self.root, self._bytes[base:end], self._ends[start:stop] - base)
        name = self.name(i)
        return Path(name) if self.root is None else self.root / name

    def take(self, indices: np.ndarray) -> PathTable:
        """The paths at `indices` (int [M], in the order given), as a new table."""
        return PathTable([self.name(int(i)) for i in indices], self.root)

    def names(self, chunk: int = 65536) -> Iterator[str]:
        """Every name in order, decoded `chunk` names at a time: a million files' names one by one through
        `name(i)` take seconds."""
        for lo in range(0, len(self), chunk):
            part = self[lo : lo + chunk]
            yield from os.fsdecode(part._bytes.tobytes()).split("\0")[:-1]

    def named_files(self) -> Iterator[tuple[str, str]]:
        """(name as listed, path as a string for `os.stat` and `open`) of every path in order: strings are faster
        than `Path` objects for a million of them."""
        root = os.fspath(self.root) if self.root is not None else ""
        return ((n, os.path.join(root, n)) for n in self.names())

    def files(self) -> Iterator[str]:
        """Every path as a string for `os.stat` and `open`."""
        return (file for _, file in self.named_files())

    def __iter__(self) -> Iterator[Path]:
        return map(Path, self.files())
