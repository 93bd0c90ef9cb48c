"""Memory of a folder listing at ImageNet's size: what each `ahpa prepare` process holds, and what a decoding
worker copies of it; JSON out.

    python benchmarks/listing_memory.py --root /tmp/listing-tree --classes 1000 --per-class 1281

Builds (or reuses) a tree of empty files named like ImageNet's (`n0xxxxxxx/n0xxxxxxx_NNNNN.JPEG`), then in a fresh
process: the resident memory the listing adds (RSS after minus before, and the peak), and the time it takes. Then two forked
children, as DataLoader workers are: one reads the path of every item once (a worker of a prepare run reads its
share), one runs a full garbage collection (which writes to every object the collector tracks); each reports the
memory it had to copy from its parent (Private_Dirty in /proc/self/smaps_rollup, after minus before): with Python
objects every reference count or collector field written dirties the page that holds it. Linux only.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path


def build_tree(root: Path, classes: int, per_class: int) -> None:
    marker = root / f".complete-{classes}x{per_class}"
    if marker.exists():
        return
    for c in range(classes):
        d = root / f"n{c:08d}"
        d.mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            os.close(os.open(d / f"n{c:08d}_{k:05d}.JPEG", os.O_CREAT | os.O_WRONLY, 0o644))
    marker.touch()


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def private_dirty_mb() -> float:
    with open("/proc/self/smaps_rollup") as f:
        return sum(int(line.split()[1]) for line in f if line.startswith("Private_Dirty:")) / 1024


def measure(root: Path) -> dict:
    from ahpa.data.listing import list_source

    before = rss_mb()
    t0 = time.perf_counter()
    listing = list_source(root)
    seconds = time.perf_counter() - t0
    held = rss_mb() - before
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before

    def reads_every_path() -> None:
        sum(len(listing.paths[i].name) for i in range(len(listing)))

    return {"items": len(listing), "classes": listing.num_classes, "list_s": round(seconds, 2),
            "held_mb": round(held, 1), "peak_mb": round(peak, 1),
            "worker_copied_mb": in_forked_child(reads_every_path),
            # CPython's full collection writes to every object it tracks, read or not
            "worker_gc_copied_mb": in_forked_child(gc.collect)}


def in_forked_child(work) -> float:
    """MB of the parent's memory a forked child copies while doing `work` (a DataLoader worker is such a child)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        dirty0 = private_dirty_mb()
        work()
        os.write(write, str(private_dirty_mb() - dirty0).encode())
        os._exit(0)
    os.close(write)
    copied = float(os.read(read, 1 << 10))
    os.waitpid(pid, 0)
    return round(copied, 1)


def parser() -> argparse.ArgumentParser:
    """The command line (tests/test_docs_commands.py reads its flags to check the documented commands)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=Path("/tmp/listing-tree"))
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--per-class", type=int, default=1281)
    ap.add_argument("--out", type=Path, help="write the JSON here too")
    return ap


def main() -> None:
    args = parser().parse_args()
    t0 = time.perf_counter()
    build_tree(args.root, args.classes, args.per_class)
    result = {"command": "python " + " ".join(sys.argv), "python": platform.python_version(),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "tree_build_s": round(time.perf_counter() - t0, 1),
              **measure(args.root)}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
