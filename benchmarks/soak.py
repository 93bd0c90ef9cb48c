"""Soak test: many SIGKILL/resume cycles of a training run, then a bitwise comparison.

  python benchmarks/soak.py --steps 200 --kills 20 --out /tmp/soak --json soak.json

Each cycle starts `ahpa train`, waits a random time (after the process is up) and kills it with
SIGKILL; the last cycle runs to the end. The final exported weights must equal those of one
uninterrupted run bit for bit (CPU, same machine). Prints and writes one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

TINY = [
    "model.preset=S/1", "model.hidden_size=32", "model.depth=3", "model.num_heads=2",
    "data.source=procedural", "data.resolution=16", "data.procedural_size=256",
    "prior.encoder=ahpa-vae:random", "prior.stats_images=64", "align.depth=2", "align.projector_dim=32",
    "train.batch_size=16", "train.lr=0.001", "train.log_every=5", "train.ckpt_every=3", "train.sample_every=0",
]


def parser() -> argparse.ArgumentParser:
    """The command line (tests/test_docs_commands.py reads its flags to check the documented commands)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="/tmp/ahpa-soak")
    ap.add_argument("--json")
    return ap


def main() -> None:
    args = parser().parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "ahpa.cli", "train", *TINY, f"train.steps={args.steps}"]
    t0 = time.time()
    subprocess.run([*base, "--out", str(out / "straight")], env=env, check=True, capture_output=True)
    straight_s = time.time() - t0
    rng = random.Random(args.seed)
    run = [*base, "--out", str(out / "killed")]
    kills = 0
    t0 = time.time()
    while kills < args.kills and not (out / "killed" / "DONE").exists():
        proc = subprocess.Popen(run, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(2.5, 2.5 + straight_s / 10))  # ~2.5 s is start-up; then a random slice of the run
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    subprocess.run(run, env=env, check=True, capture_output=True)
    killed_s = time.time() - t0
    a = load_file(str(out / "straight" / "model.safetensors"))
    b = load_file(str(out / "killed" / "model.safetensors"))
    result = {
        "steps": args.steps, "kills": kills, "bitwise_equal": all(torch.equal(a[k], b[k]) for k in a),
        "straight_s": round(straight_s, 1), "with_kills_s": round(killed_s, 1),
        "torch": torch.__version__, "device": "cpu", "command": " ".join(sys.argv),
    }
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
