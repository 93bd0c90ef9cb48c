"""Start-up time of the image-decoding workers (`ahpa prepare`, `eval`, a run's reference folder) by start method:
fork (ahpa before), a fork server (ahpa's on Linux), spawn (macOS's and Windows'); JSON out.

    python benchmarks/worker_start.py --workers 2 --repeats 5 --out benchmarks/results/worker_start_cpu.json

Writes a folder of small PNGs, then for each repeat runs each method in a fresh interpreter, side by side: the
process starts a thread (as prepare's shard writer) and decodes the folder three times through `make_loader`, each
a new loader; a start is the time from `iter(loader)` to its first batch. The first start of a fork server includes
starting the server (its torch import); later loaders of the process reuse it. Linux (fork and the fork server).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

METHODS = ("fork", "forkserver", "spawn")


def child(method: str, folder: str, workers: int) -> dict:
    """Three loaders in turn by `method` in this process: seconds to each one's first batch."""
    import ahpa.data.listing as listing_module
    from ahpa.data.listing import list_source, make_loader

    if method != "forkserver":  # ahpa's own choice otherwise; fork is how ahpa started its workers before
        listing_module.worker_context = lambda: multiprocessing.get_context(method)
    threading.Thread(target=threading.Event().wait, daemon=True).start()
    listing = list_source(folder)
    batches = [list(range(s, min(s + 8, len(listing)))) for s in range(0, len(listing), 8)]
    starts = []
    for _ in range(3):
        loader = make_loader(listing, 32, batches, workers)
        t0 = time.perf_counter()
        it = iter(loader)
        next(it)
        starts.append(time.perf_counter() - t0)
        for _ in it:
            pass
        del it, loader
    return {"first_s": starts[0], "later_s": starts[1:]}


def parser() -> argparse.ArgumentParser:
    """The command line (tests/test_docs_commands.py reads its flags to check the documented commands)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", type=Path, help="write the JSON here too")
    ap.add_argument("--child", nargs=2, metavar=("METHOD", "FOLDER"), help=argparse.SUPPRESS)
    return ap


def main() -> None:
    args = parser().parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.workers)))
        return
    import numpy as np
    from PIL import Image

    methods = args.methods.split(",")
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        for k in range(32):
            (Path(tmp) / f"c{k % 2}").mkdir(exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(Path(tmp) / f"c{k % 2}" / f"{k}.png")
        for _ in range(args.repeats):
            for m in methods:
                out = subprocess.run([sys.executable, __file__, "--workers", str(args.workers), "--child", m, tmp],
                                     capture_output=True, text=True, env={**os.environ}, check=True)
                runs[m].append(json.loads(out.stdout.splitlines()[-1]))
    result = {
        "command": "python " + " ".join(sys.argv), "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "workers": args.workers, "repeats": args.repeats,
        "median_first_start_s": {m: round(statistics.median(r["first_s"] for r in rs), 3) for m, rs in runs.items()},
        "median_later_start_s": {m: round(statistics.median(s for r in rs for s in r["later_s"]), 3)
                                 for m, rs in runs.items()},
        "runs": runs,
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
