"""What produced a run's steps: the software's versions, the ahpa checkout's commit and the hardware.

A run appends one record per start (`starts.jsonl`: the step it started or resumed from, and this environment),
so that steps trained by other code, another torch or other GPUs can be told apart, and `ahpa compare` can say
when runs' speeds were measured on different machines.
"""

from __future__ import annotations

import datetime
import json
import platform
import subprocess
from pathlib import Path

import torch

from ahpa.atomic import atomic_write_text
from ahpa.jsonl import read_rows

STARTS = "starts.jsonl"


def source_revision() -> str | None:
    """The git commit of the checkout ahpa runs from, with "+dirty" when its files differ from it; None for an
    installed package (no checkout of its own) or without git."""
    package = Path(__file__).resolve().parent
    root = package.parents[1]  # src/ahpa -> the repository
    if package != root / "src" / "ahpa" or not (root / ".git").exists():
        return None  # site-packages, or a folder inside someone else's repository: its commit is not ahpa's
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def environment(device: torch.device | None = None, processes: int = 1) -> dict:
    """Versions, commit, the installed packages that extend ahpa (None: none), device and process count: the facts a
    numerics or speed difference may come from."""
    from ahpa import __version__
    from ahpa.plugins import installed_extensions

    return {"ahpa": __version__, "source": source_revision(), "extensions": installed_extensions(),
            "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "device": device_name(device or torch.device("cpu")), "processes": processes, "host": platform.node()}


def device_name(device: torch.device) -> str:
    """The GPU's model (NVIDIA H200), or the CPU's architecture."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.processor() or platform.machine()})"


def record_start(run_dir: Path, step: int, env: dict) -> None:
    """Append this start to the run's starts.jsonl (rewritten whole: a row torn by a kill is dropped, not kept in
    the middle of the file)."""
    path = run_dir / STARTS
    rows = read_rows(path) if path.is_file() else []
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    rows.append({"step": step, "time": now, **env})
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def starts(run_dir: Path) -> list[dict]:
    """A run's start records, oldest first; none for a run from before starts.jsonl."""
    path = Path(run_dir) / STARTS
    return read_rows(path) if path.is_file() else []


def last_start(run_dir: Path) -> dict | None:
    """The newest start record of a run, or None for a run without one (written before starts.jsonl)."""
    rows = starts(run_dir)
    return rows[-1] if rows else None


# what computes a run's steps: a resume under other values may train on with other numerics (a package's new
# loss, another torch's kernels); the device and process count are `ahpa compare`'s, which names them for speeds
SOFTWARE = ("ahpa", "source", "extensions", "torch")


def software_changes(last: dict | None, now: dict) -> list[str]:
    """What of SOFTWARE differs between a run's last start record and this environment, as "KEY OLD -> NEW"; none
    for a run without a record (written before starts.jsonl) or a key the record lacks (an older ahpa's)."""
    if not last:
        return []
    return [f"{key} {last[key] or 'none'} -> {now.get(key) or 'none'}" for key in SOFTWARE
            if key in last and last[key] != now.get(key)]


def resumed_software_note(run_dir: Path, step: int) -> list[str]:
    """The note of a run resumed at `step` by other software than its last start: said once, when it resumes, and
    not refused (a bug-fix release is a reason to resume); starts.jsonl keeps both starts."""
    changes = software_changes(last_start(run_dir), environment())
    if not changes:
        return []
    return [f"resuming at step {step} with other software than the run's last start: {'; '.join(changes)}; the "
            "steps before and after may differ in numerics (the run's starts.jsonl records each start)"]
