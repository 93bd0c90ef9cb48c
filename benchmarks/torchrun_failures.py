"""How a failed launch under torchrun ends, over many launches: does it exit, print its message once, and name it in
torchrun's summary?

    python benchmarks/torchrun_failures.py --launches 100 --out benchmarks/results/torchrun_failures.json

Each launch is `ahpa train` on 2 gloo processes (a tiny config) whose run directory another process holds, so rank 0
refuses it and every process fails alike. Per launch: torchrun's exit code, the lines that print the message, the
processes torchrun's summary names with it, or `hung` when the launch is still running after --timeout seconds (it
is then killed). A failed command used to tear the process group down on its way out, which could deadlock there
(docs/reliability.md). Prints and writes one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ahpa import lock

REPO = Path(__file__).resolve().parents[1]
# the shipped CPU-sized config: rank 0 refuses the run directory before anything is built, so its size does not
# matter. (tests/conftest.py's TINY and hold_lock are the tests': this script runs without pytest and its conftest)
TINY_CONFIG = REPO / "configs" / "tiny.yaml"


def launch(work: Path, env: dict, timeout: float) -> dict:
    run = work / "run"
    run.mkdir(parents=True)
    # held by this process, which is not rank 0's: a POSIX lock belongs to its process (ahpa.lock), and the workers
    # torchrun starts do not inherit it
    lock.hold(run / lock.LOCK_FILE, "the benchmark's run directory")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ahpa.cli",
           "train", "--config", str(TINY_CONFIG), "--out", str(run)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # torchrun and its workers
        proc.communicate()
        return {"hung": True, "seconds": round(time.perf_counter() - t0, 1)}
    finally:
        lock.release(run / lock.LOCK_FILE)
    lines = err.splitlines()
    return {"hung": False, "exit": proc.returncode, "seconds": round(time.perf_counter() - t0, 1),
            "printed": sum(line.startswith("ahpa train: error:") for line in lines),
            "in_summary": sum(line.strip().startswith("traceback : ahpa train: error:") for line in lines)}


def parser() -> argparse.ArgumentParser:
    """The command line (tests/test_docs_commands.py reads its flags to check the documented commands)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--launches", type=int, default=20)
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds after which a launch counts as hung")
    ap.add_argument("--out", type=Path, help="write the JSON here too")
    return ap


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    rows = []
    with tempfile.TemporaryDirectory(prefix="torchrun-failures-") as tmp:
        for i in range(args.launches):
            rows.append(launch(Path(tmp) / str(i), env, args.timeout))
    done = [r for r in rows if not r["hung"]]
    out = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "torch": torch.__version__, "python": sys.version.split()[0], "cpus": os.cpu_count(),
        "launches": args.launches, "timeout_s": args.timeout,
        "hung": len(rows) - len(done),
        "message_not_printed": sum(r["printed"] == 0 for r in done),
        "summary_names_one_process": sum(r["printed"] == 1 and r["in_summary"] == 1 for r in done),
        "clean": sum(r["printed"] == 1 and r["in_summary"] == 2 for r in done),
        "launch_rows": rows,
    }
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return out


if __name__ == "__main__":
    main()
