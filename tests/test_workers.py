"""The image-decoding worker processes (ahpa.data.workers): started by every start method Python has (fork, a fork
server, spawn), sent their arrays through shared memory, and ended with the process reading their results."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ahpa.data.listing import ItemDataset, list_source
from tests.conftest import run_script

LINUX = sys.platform.startswith("linux")
SRC = str(Path(__file__).resolve().parents[1] / "src")


def _sources(tmp_path: Path) -> tuple[Path, Path]:
    """A folder of two classes (10 PNGs) and an .npz of 12 images."""
    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    np.savez(tmp_path / "arr.npz", images=rng.integers(0, 256, (12, 12, 12, 3), dtype=np.uint8), labels=np.arange(12) % 3)
    return root, tmp_path / "arr.npz"


DECODE = """
import multiprocessing, sys, threading, warnings
from ahpa.data.listing import list_source, make_loader

if __name__ == "__main__":
    if sys.argv[1] != "default":
        multiprocessing.set_start_method(sys.argv[1], force=True)
    threading.Thread(target=threading.Event().wait, daemon=True).start()  # a thread, as prepare's shard writer
    for src in sys.argv[2:]:
        batches = [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
        loader = make_loader(list_source(src), 8, batches, 2)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")  # Python 3.12+ warns when it forks a process that has threads
            got = [[(it.index, it.image.tobytes()) for it in items] for items in loader]
        want = [[(it.index, it.image.tobytes()) for it in items] for items in make_loader(list_source(src), 8, batches, 0)]
        assert got == want and len(got) == 4, "the workers decoded other items"
        forks = [str(w.message) for w in seen if "fork()" in str(w.message)]
        assert not forks, forks
    used = loader.multiprocessing_context or multiprocessing.get_context()
    print("ok", used.get_start_method())
"""


@pytest.mark.parametrize("method, expected", [
    ("spawn", "spawn"),  # macOS's and Windows' default
    ("forkserver", "forkserver"),  # Linux's default from Python 3.14
    ("default", "forkserver" if LINUX else "spawn"),  # the program fixed none: ours
    ("fork", "forkserver" if LINUX else "fork"),  # what multiprocessing fixes itself once it started another way
])
def test_decoding_workers_start_under_every_start_method(tmp_path, method, expected):
    """A worker that does not fork unpickles the dataset, the collate and worker-init functions: a lambda or closure
    among them works under fork and fails there. A folder and an .npz are decoded by two workers into the batches one
    process decodes, by the start method the program fixed, else (or if that is fork) from a fork server on Linux:
    the parent has a thread, and Python 3.12+ warns that forking it may deadlock the child. Two loaders in turn: the
    first fixed the process's method to fork as a side effect of multiprocessing's, and the second forked."""
    folder, npz = _sources(tmp_path)
    out = run_script(["-c", DECODE, method, str(folder), str(npz)], timeout=300)
    assert out.split() == ["ok", expected]


def test_workers_are_sent_the_large_arrays_through_shared_memory(tmp_path):
    """A fork server's or spawned worker gets its dataset pickled: an .npz source's images and a path table went
    whole into each one (8 workers held 8 copies besides the parent's). Now they go once into shared memory, the
    pickle holds a handle, and the listing reads that copy (the same values), so the parent keeps no second."""
    from multiprocessing.reduction import ForkingPickler

    import torch
    import torch.multiprocessing  # noqa: F401  (registers torch's reductions with ForkingPickler, as DataLoader does)

    folder, npz = _sources(tmp_path)
    big = np.random.default_rng(1).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)  # 196 kB
    np.savez(npz, images=big, labels=np.zeros(64, np.int64))
    names = tmp_path / "many.txt"  # 3,000 paths of 45 characters: 138 kB of names
    names.write_text("".join(f"/data/train/class_{k % 7}/image_{k:06d}_some_name.png\n" for k in range(3000)))
    for src in (npz, names, folder):
        listing = list_source(src)
        want = [(listing.name(i), ItemDataset(list_source(src), 8)[i]) for i in range(0, len(listing), 97)]
        dataset = ItemDataset(listing, 8)
        sent = ForkingPickler.dumps(dataset)
        assert len(sent) < 5000, (src.name, len(sent))
        shared = [t for t in dataset._sent.values() if isinstance(t, torch.Tensor)]
        assert shared and all(t.is_shared() for t in shared)
        # the parent's listing and dataset read the shared copies: no second copy of their own is kept
        own = [[obj.array] if obj.array is not None else [obj.paths._bytes, obj.paths._ends] for obj in (listing, dataset)]
        assert all(len(o) == len(shared) and all(np.shares_memory(a, t.numpy()) for a, t in zip(o, shared)) for o in own)
        ForkingPickler.dumps(dataset)  # the next worker's: the same shared copy, not another
        again = [t for t in dataset._sent.values() if isinstance(t, torch.Tensor)]
        assert len(again) == len(shared) and all(a is b for a, b in zip(again, shared))
        worker = ForkingPickler.loads(sent)
        got = [worker.array] if worker.array is not None else [worker.paths._bytes, worker.paths._ends]
        assert all(np.shares_memory(a, t.numpy()) for a, t in zip(got, shared))  # the worker's too
        assert worker.listing is None and len(worker) == len(dataset) == len(listing)
        for (name, item), i in zip(want, range(0, len(listing), 97)):  # worker and parent read what was listed
            assert listing.name(i) == name
            for got in (worker[i], dataset[i]):
                assert (got.index, got.reason) == (item.index, item.reason)
                assert (got.image is None and item.image is None) or np.array_equal(got.image, item.image)
    assert listing.fingerprint() == list_source(folder).fingerprint()


def test_without_room_in_shared_memory_each_worker_gets_a_copy(tmp_path, monkeypatch):
    """Docker gives a container 64 MB of /dev/shm by default, and writing past a full one kills the process
    (SIGBUS) rather than raising: an ImageNet path table (~65 MB) or a large .npz would have. When shared memory
    lacks room for the arrays (and some to spare), they are pickled into each worker as they are, and the listing
    keeps its own."""
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401
    from ahpa.data import workers

    assert workers.room_in_shared_memory(1, str(tmp_path / "none"))  # no such file system (macOS): nothing to check
    _, npz = _sources(tmp_path)
    listing = list_source(npz)
    own = listing.array
    free = os.statvfs("/dev/shm") if os.path.isdir("/dev/shm") else None
    if free is None:
        pytest.skip("no /dev/shm here: nothing to measure room in")
    monkeypatch.setattr(workers, "SHM_SPARE", free.f_bavail * free.f_frsize)  # one byte more than there is
    dataset = ItemDataset(listing, 8)
    sent = ForkingPickler.dumps(dataset)
    assert len(sent) > own.nbytes and listing.array is own
    worker = ForkingPickler.loads(sent)
    for i in range(len(listing)):
        np.testing.assert_array_equal(worker[i].image, dataset[i].image)


@pytest.mark.skipif(not LINUX, reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.parametrize("call", ["die_with_parent()", "start_worker(os.getppid(), 0)"])
def test_a_decoding_worker_dies_with_its_killed_parent(call):
    """A DataLoader worker blocked on a full result pipe outlived a SIGKILLed ImageNet prepare for good (786 MB
    each). Here the worker is a child that sleeps: it must be gone soon after its parent is killed. Also by way of
    start_worker, the first call of a worker whose parent reads it (spawned, or forked): no reader watch then."""
    code = f"""
import os, sys, time
from ahpa.data.workers import die_with_parent, start_worker
pid = os.fork()
if pid == 0:
    {call}
    time.sleep(60)
    os._exit(0)
print(pid, flush=True)
time.sleep(60)
"""
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": SRC})
    child = int(parent.stdout.readline())
    time.sleep(0.5)  # the child has made its call
    parent.kill()
    parent.wait()
    assert _gone([child])


@pytest.mark.skipif(not LINUX, reason="the kernel's notice of a parent's death (PR_SET_PDEATHSIG) is Linux's")
def test_a_fork_servers_workers_die_with_the_killed_process_reading_them(tmp_path):
    """A fork server's workers are its children, not the reader's: when the reader was SIGKILLed, they waited for
    it, their parent (the server) waited for them, and all three lived on (seen for minutes, then killed by hand).
    The workers and the server must be gone soon after the reader is killed."""
    folder, _ = _sources(tmp_path)
    code = """
import sys, time
from ahpa.data.listing import list_source, make_loader

if __name__ == "__main__":
    batches = [[i] for i in range(10)]
    it = iter(make_loader(list_source(sys.argv[1]), 8, batches, 2))
    next(it)
    print(*(w.pid for w in it._workers), flush=True)
    time.sleep(120)
"""
    # (its stderr kept: once it is killed, multiprocessing's resource tracker names the queues' semaphores it frees)
    reader = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": SRC})
    line = reader.stdout.readline()
    assert line, reader.communicate()[1][-2000:]
    workers = [int(p) for p in line.split()]
    server = {_parent(w) for w in workers}
    assert len(workers) == 2 and server != {reader.pid}, "the workers were not started by a fork server"
    reader.kill()
    reader.wait()
    assert _gone(workers + list(server))


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _gone(pids: list[int], within: float = 10.0) -> bool:
    """Whether every process of `pids` ended within `within` seconds (killed here if not, so that none lingers)."""

    def alive(pid: int) -> bool:  # a zombie (no init to reap it in a container) is dead
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    deadline = time.time() + within
    while any(map(alive, pids)) and time.time() < deadline:
        time.sleep(0.05)
    left = [p for p in pids if alive(p)]
    for p in left:
        os.kill(p, 9)
    return not left


@pytest.mark.skipif(not LINUX, reason="the reader watch runs on Linux")
def test_without_pidfd_the_reader_watch_asks_until_the_reader_has_ended():
    """Linux before 5.3 has no pidfd_open: the watch of a fork server's worker asks every second whether the reader
    lives. It must wait while the reader lives, and end the worker once the reader is gone."""
    code = """
import os, subprocess, sys, threading, time
from ahpa.data import workers

def no_pidfd(pid):
    raise OSError("no pidfd_open before Linux 5.3")

os.pidfd_open = no_pidfd
reader = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
threading.Thread(target=workers._exit_when_ended, args=(reader.pid,), daemon=True).start()
time.sleep(1.5)
print("waited", flush=True)
reader.kill()
reader.wait()
time.sleep(5)
print("outlived", flush=True)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": SRC})
    assert (done.returncode, done.stdout.split()) == (1, ["waited"]), done.stderr[-2000:]
