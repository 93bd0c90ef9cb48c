"""The compact path table behind a folder or file-list listing: it must name, find and fingerprint every file
exactly as the Path lists it replaced did, or every prepared cache would read as made from another source."""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from ahpa.data.listing import list_source
from ahpa.data.path_table import PathTable

ODD = os.fsdecode(b"caf\xe9 \xff.png")  # not UTF-8: a Latin-1 name as old cameras and archives write them


def _old_folder_names(root: Path) -> list[str]:
    """How the listing named a folder's images before the table: a sorted os.walk, Path objects made relative."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files += [Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".") and f.endswith((".png", ".JPEG"))]
    return [str(p.relative_to(root)) for p in files]


def _fingerprint(kind: str, names: list[str], paths: list[Path], labels: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(f"{kind}:{len(names)}".encode())
    h.update(labels.tobytes())
    for name, p in zip(names, paths):
        h.update(f"{name}\0{p.stat().st_size}\n".encode(errors="surrogateescape"))
    return h.hexdigest()


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "imgs"
    for rel in ["b/x 1.png", "b/sub/deep.JPEG", "a/z.png", "a/y.png", f"a/{ODD}", "b/.hidden.png", "a/notes.txt"]:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x" * len(rel))
    return root


def test_folder_listing_names_and_fingerprint_as_before(tree):
    listing = list_source(tree)
    names = _old_folder_names(tree)
    assert [listing.name(i) for i in range(len(listing))] == names == ["a/" + ODD, "a/y.png", "a/z.png", "b/x 1.png", "b/sub/deep.JPEG"]
    assert list(listing.paths) == [tree / n for n in names] and all(p.is_file() for p in listing.paths)
    assert listing.class_names == ["a", "b"] and listing.labels.tolist() == [0, 0, 0, 1, 1]
    assert listing.ignored == ["a/notes.txt"]
    assert listing.fingerprint() == _fingerprint("folder", names, [tree / n for n in names], listing.labels)


def test_file_list_names_as_the_list_resolves_them(tree, tmp_path):
    lst = tmp_path / "files.txt"
    lst.write_text(f"imgs/a/y.png\t1\n./imgs//b/x 1.png\t0\n{tree}/a/z.png\t2\n")
    listing = list_source(lst)
    want = [tmp_path / "imgs/a/y.png", tmp_path / "imgs/b/x 1.png", tree / "a/z.png"]
    assert [listing.name(i) for i in range(3)] == [str(p) for p in want] and list(listing.paths) == want
    assert listing.fingerprint() == _fingerprint("list", [str(p) for p in want], want, listing.labels)
    # a list naming a file whose name is not UTF-8, in the file system's bytes: found, not a decoding error
    lst2 = tmp_path / "latin1.txt"
    lst2.write_bytes(b"imgs/a/" + os.fsencode(ODD) + b"\t5\n")
    odd = list_source(lst2)
    assert list(odd.paths) == [tree / "a" / ODD] and odd.paths[0].is_file() and odd.labels.tolist() == [5]
    short = list_source(lst, limit=2)
    assert list(short.paths) == want[:2] and short.labels.tolist() == [1, 0]


def test_table_indexing_slicing_and_errors():
    names = ["a/1.png", ODD, "", "d/ü.png"]
    table = PathTable(names, Path("/r"))
    assert len(table) == 4 and [table.name(i) for i in range(4)] == names and table.name(-1) == "d/ü.png"
    assert table[1] == Path("/r") / ODD and PathTable(names)[3] == Path("d/ü.png")
    for sl in [slice(0, 2), slice(1, 4), slice(2, 2), slice(3, 1), slice(None, 10)]:
        part = table[sl]
        assert [part.name(i) for i in range(len(part))] == names[sl] and part.root == Path("/r")
    with pytest.raises(IndexError):
        table.name(4)
    with pytest.raises(ValueError, match="step 1"):
        table[::2]
    with pytest.raises(ValueError, match="NUL"):
        PathTable(["ok.png", "bad\0.png"])
    assert list(table.names(chunk=3)) == names and list(table[1:].names(chunk=1)) == names[1:]
    assert list(table.files()) == [os.path.join("/r", n) for n in names] and list(PathTable(names).files()) == names
    assert len(PathTable([])) == 0 and list(PathTable([])) == []
    back = pickle.loads(pickle.dumps(table[1:]))  # DataLoader workers started by spawn get the listing pickled
    assert [back.name(i) for i in range(3)] == names[1:]


def test_a_reference_folders_identity_is_every_files_total_size_and_newest_time(tree):
    """The reference cache's key of a folder (count, total size, newest modification) read through the table: a
    file rewritten anywhere in the listing, not only the last one, must change it."""
    from ahpa.metrics.images import image_files
    from ahpa.metrics.reference import _files_identity

    names = _old_folder_names(tree)
    first = tree / names[0]  # the newest file is not the last one listed
    st = first.stat()
    os.utime(first, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    stats = [(tree / n).stat() for n in names]
    assert len({s.st_size for s in stats}) > 1 and stats[0].st_mtime_ns > stats[-1].st_mtime_ns
    assert _files_identity(image_files(tree)) == {"files": len(names), "size": sum(s.st_size for s in stats),
                                                  "mtime_ns": max(s.st_mtime_ns for s in stats)}
