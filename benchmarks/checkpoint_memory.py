"""Host memory of saving and reading a checkpoint: the library's way against the project's earlier ones.

Each measurement runs in a fresh process (peak RSS, `ru_maxrss`, only grows) that builds a state of --mb MB of
fp32 tensors, then saves it, or reads back a file saved before and touches every value. Ways:
- in-memory (the first layout and way): torch.save into a BytesIO, the checksum header prepended (a second
  copy); on reading, the whole file read and split (two copies) before torch.load;
- streamed (the same layout, read through the hash into torch.load): the state in the process's own memory;
- mapped (the library now: the digest in a file beside the checkpoint, saving streamed, reading by mmap).
Reports the peak above the state itself, and the process's anonymous memory after reading (RssAnon, Linux): what
each rank holds on its own. A mapped state is in the page cache instead, one copy for every rank of a node.

    python benchmarks/checkpoint_memory.py --mb 1024 --out /tmp/ckpt-memory.json
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import benchlib


def state_of(mb: int) -> dict:
    n = mb * 2**20 // 4 // 8  # eight tensors of fp32
    return {"model": {f"w{i}": torch.randn(n) for i in range(8)}, "step": 1}


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def anon_mb() -> float:
    status = Path("/proc/self/status")
    lines = status.read_text().splitlines() if status.exists() else []
    return next((int(ln.split()[1]) / 1024 for ln in lines if ln.startswith("RssAnon")), float("nan"))


def child(mode: str, how: str, path: Path, mb: int) -> dict:
    from ahpa.train.checkpoint import read_checkpoint, save_checkpoint

    torch.set_num_threads(1)
    base, base_anon = peak_mb(), anon_mb()
    if mode == "save":
        state = state_of(mb)
        held = peak_mb()
        if how == "mapped":
            save_checkpoint(path.parent, 1, state, keep=0)
        else:  # the first layout written the first way: payload in memory, header + payload concatenated
            buf = io.BytesIO()
            torch.save(state, buf)
            payload = buf.getvalue()
            path.write_bytes(hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)
        return {"mode": mode, "how": how, "state_mb": mb, "peak_over_state_mb": round(peak_mb() - held, 1)}
    if how == "in-memory":
        raw = path.read_bytes()
        digest, _, payload = raw.partition(b"\n")
        assert hashlib.sha256(payload).hexdigest().encode() == digest
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=False)
        del raw, payload
    else:  # streamed reads the header layout, mapped the digest file's
        state = read_checkpoint(path)
    for w in state["model"].values():  # every page, as load_state_dict reads them
        w.sum()
    return {"mode": mode, "how": how, "state_mb": mb, "peak_over_state_mb": round(peak_mb() - base - mb, 1),
            "anon_after_read_mb": round(anon_mb() - base_anon, 1)}


def parser() -> argparse.ArgumentParser:
    """The command line (tests/test_docs_commands.py reads its flags to check the documented commands)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=1024, help="size of the state (fp32 tensors)")
    ap.add_argument("--out", type=Path, help="JSON results")
    ap.add_argument("--child", nargs=3, metavar=("MODE", "HOW", "PATH"), help=argparse.SUPPRESS)
    return ap


def main() -> None:
    args = parser().parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], Path(args.child[2]), args.mb)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "step_000000001.pt"
        # the first layout's file is read in-memory and streamed; then the library's save and mapped read
        for mode, how in (("save", "in-memory"), ("read", "in-memory"), ("read", "streamed"), ("save", "mapped"),
                          ("read", "mapped")):
            out = subprocess.run([sys.executable, __file__, "--mb", str(args.mb), "--child", mode, how, str(path)],
                                 check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.splitlines()[-1]))
            print(rows[-1], flush=True)
    result = {**benchlib.device_info(torch.device("cpu")), "command": benchlib.command_line(), "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
