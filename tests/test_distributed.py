"""DDP and FSDP2 on CPU with gloo, through torchrun: 2 processes x b equal 1 process x 2b, and
checkpoints move between FSDP, DDP and one process.

Tolerance: the gradient all-reduce sums in another order than one process does, so weights agree
to float32 rounding (measured max |diff| ~3e-8 after 4 steps), not bitwise; we assert 1e-5.

The runs use the learned (soft) router, whose running loss means are the global batch's: one update
per step from every process's micro-batches (Aligner.update_running).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ahpa import config
from ahpa.train.checkpoint import list_checkpoints, read_checkpoint
from ahpa.train.loop import Trainer
from tests.conftest import TINY, hold_lock

TINY = [*TINY, "align.router=soft"]

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
# FSDP2 of torch 2.4/2.5 creates CUDA streams on any device (seen with 2.4.1); the run refuses with the fix instead
cpu_fsdp = pytest.mark.skipif(torch.__version__ < "2.6", reason=f"FSDP2 on the CPU needs torch >= 2.6, not {torch.__version__}")


def ahpa(nproc: int, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [*TORCHRUN, f"--nproc_per_node={nproc}", "-m", "ahpa.cli", *args] if nproc > 1 else [sys.executable, "-m", "ahpa.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def latest(run: Path) -> dict:
    return read_checkpoint(list_checkpoints(run / "checkpoints")[-1])


def max_diff(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("ddp") / "one"
    ahpa(1, "train", "--out", str(run), *TINY, "train.steps=4")
    return run


def test_two_processes_match_one(one_process_run, tmp_path):
    # which ranks record a start: two ranks rewriting starts.jsonl at once can leave one row, so the file cannot tell
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os\nimport ahpa.provenance as p\n_record = p.record_start\n"
        "def record_start(*args, **kwargs):\n"
        "    with open(os.environ['AHPA_TEST_STARTS'], 'a') as f:\n"
        "        f.write(os.environ.get('RANK', '-') + '\\n')\n"
        "    return _record(*args, **kwargs)\n"
        "p.record_start = record_start\n"
        # each process's buffers after training: DDP broadcasts none of rank 0's, so they must agree by construction
        "import torch, ahpa.train.loop as loop\n_run = loop.Trainer.run\n"
        "def run(self, *a, **k):\n"
        "    out = _run(self, *a, **k)\n"
        "    bufs = {f'{n}.{b}': t for n in ('model', 'aligner') for b, t in getattr(self.parts, n).named_buffers()}\n"
        "    torch.save(bufs, os.environ['AHPA_TEST_STARTS'] + '.buffers' + os.environ['RANK'])\n"
        "    return out\n"
        "loop.Trainer.run = run\n")
    path = os.pathsep.join(p for p in [str(hook), os.environ.get("PYTHONPATH", "")] if p)
    res = ahpa(2, "train", "--out", str(tmp_path / "two"), *TINY, "train.steps=4",
               env={"PYTHONPATH": path, "AHPA_TEST_STARTS": str(tmp_path / "recorded-by")})
    bufs = [torch.load(tmp_path / f"recorded-by.buffers{r}", weights_only=True) for r in range(2)]
    assert "aligner.running_loss" in bufs[0] and bufs[0].keys() == bufs[1].keys()
    assert all(torch.equal(bufs[0][k], bufs[1][k]) for k in bufs[0])
    assert re.search(r"training on 2 x cpu \(.*\) \(DDP\), fp32, eager: 4 steps of global batch 8 \(4 per process\)", res.stderr)
    assert "broadcast_buffers" not in res.stderr  # torch 2.13 deprecates it with a warning per process
    starts = [json.loads(line) for line in (tmp_path / "two" / "starts.jsonl").read_text().splitlines()]
    assert [(s["step"], s["processes"]) for s in starts] == [(0, 2)]
    assert (tmp_path / "recorded-by").read_text().split() == ["0"]  # rank 0 alone records the start
    a, b = latest(one_process_run), latest(tmp_path / "two")
    assert a["step"] == b["step"] == 4
    for part in ("model", "ema", "aligner"):
        assert max_diff(a[part], b[part]) < 1e-5, part


@pytest.mark.parametrize("sharding", ["DDP", pytest.param("FSDP2", marks=cpu_fsdp)])
def test_fp16_on_two_processes_with_accumulation_matches_one(tmp_path, sharding):
    """The loss scale multiplies each micro-batch's loss and is undone once, after the all-reduce: 2 processes x 2
    micro-batches train as one process in the same 4 micro-batches, and keep the same scale. Measured 2e-5 after 4
    steps: the all-reduce sums in another order, and a weight one fp32 bit apart can round to another fp16 value in
    the next forward. (Other micro-batches than one process's differ by fp16's rounding of each micro-batch's
    gradients: 5e-4, measured in one process with grad_accum 1 and 2, against 2e-7 in fp32.)"""
    fp16 = [*TINY, "train.precision=fp16", "train.steps=4"]
    ahpa(1, "train", "--out", str(tmp_path / "one"), *fp16, "train.grad_accum=4")
    res = ahpa(2, "train", "--out", str(tmp_path / "two"), *fp16, "train.grad_accum=2",
               f"train.fsdp={sharding == 'FSDP2'}")  # FSDP2: the unscaling runs on sharded gradients (DTensors)
    assert f"({sharding}), fp16 autocast with a dynamic loss scale, eager" in res.stderr
    a, b = latest(tmp_path / "one"), latest(tmp_path / "two")
    assert a["loss_scale"] == b["loss_scale"] == {"scale": 2.0 ** 16, "good_run": 4}
    for part in ("model", "ema", "aligner"):
        assert max_diff(a[part], b[part]) < 1e-4, part


def signalled_training(tmp_path: Path, patch: str, overrides: list[str]) -> tuple[subprocess.CompletedProcess, list[str]]:
    """A 2-process tiny run of 40 steps with `patch` (Python run in every process at start-up, through sitecustomize,
    with os and signal imported: it sends a signal somewhere), and the exit code each process ended with, sorted
    ("RANK CODE")."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os, signal\nimport ahpa.commands.exit as ex\n" + patch + "_end = ex.end_process\n"
        "def end_process(code):\n"
        "    with open(os.environ['AHPA_TEST_CODES'], 'a') as f:\n"
        "        f.write(os.environ['RANK'] + ' ' + str(code) + '\\n')\n"
        "    _end(code)\n"
        "ex.end_process = end_process\n")
    path = os.pathsep.join(p for p in [str(hook), os.environ.get("PYTHONPATH", "")] if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, "AHPA_TEST_CODES": str(tmp_path / "codes")}
    res = subprocess.run([*TORCHRUN, "--nproc_per_node=2", "-m", "ahpa.cli", "train", "--out", str(tmp_path / "run"),
                          *TINY, "train.steps=40", *overrides], capture_output=True, text=True, env=env, timeout=300)
    # a patch that no longer applies (a module moved) fails here, not as a run that was never signalled
    assert "Error in sitecustomize" not in res.stderr, res.stderr[:3000]
    codes = (tmp_path / "codes").read_text().split("\n")[:-1] if (tmp_path / "codes").exists() else []
    return res, sorted(codes)


def test_a_signal_that_reaches_one_process_stops_every_process_with_its_exit_code(tmp_path):
    """A scheduler's SIGTERM may reach some processes only (one node's, or late): the processes vote at the next
    multiple of 10 steps, act on that vote at the one after (schedule.stop_agreed reads it late: no host sync that
    drains the GPU's queue), save once, and every one exits 128 + that signal (the one not signalled exited 1, with
    no message, before)."""
    res, codes = signalled_training(tmp_path, "import ahpa.train.loop as loop\n"
                                    "_step = loop.Trainer.train_step\n"
                                    "def train_step(self):\n"
                                    "    out = _step(self)\n"
                                    "    if self.step == 3 and os.environ.get('RANK') == '1':\n"
                                    "        os.kill(os.getpid(), signal.SIGTERM)\n"
                                    "    return out\n"
                                    "loop.Trainer.train_step = train_step\n", [])
    assert res.returncode != 0 and codes == ["0 143", "1 143"], res.stderr[-3000:]
    assert res.stderr.count("stopped by signal at step 20; checkpoint saved") == 1
    assert latest(tmp_path / "run")["step"] == 20


def test_a_signal_during_an_evaluation_stops_every_process_between_its_batches(tmp_path):
    """SIGTERM reaching one process while the run evaluates: the processes agree between two batches of samples that
    every one has, give the evaluation up, save that step and exit 143 alike, instead of finishing 10,000 samples
    past torchrun's 30 s (which then killed them, with no checkpoint of the step)."""
    import warnings

    class Features(torch.nn.Module):
        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return images.float().mean(dim=(2, 3))  # uint8 [N, 3, H, W] -> [N, 3]

    with warnings.catch_warnings():  # torch >= 2.10 deprecates TorchScript authoring; detectors are TorchScript files
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(Features()).save(str(tmp_path / "det-resnet20.pt"))
    np.savez(tmp_path / "ref.npz", images=np.random.default_rng(0).integers(0, 256, (32, 16, 16, 3), dtype=np.uint8))
    res, codes = signalled_training(
        tmp_path, "import ahpa.train.evaluate as out\n"
                  "_call = out.Evaluator.__call__\n"
                  "def call(self, *a, **k):\n"
                  "    if os.environ.get('RANK') == '1':\n"
                  "        os.kill(os.getpid(), signal.SIGTERM)\n"
                  "    return _call(self, *a, **k)\n"
                  "out.Evaluator.__call__ = call\n",
        ["train.ckpt_every=10", "eval.every=3", "eval.num=64", "eval.batch=8",
         f"eval.detectors=[torchscript:{tmp_path / 'det-resnet20.pt'}]", f"eval.ref={tmp_path / 'ref.npz'}"])
    assert res.returncode != 0 and codes == ["0 143", "1 143"], res.stderr[-3000:]
    assert res.stderr.count("stopped by signal at step 3; checkpoint saved") == 1
    assert latest(tmp_path / "run")["step"] == 3


def test_a_late_vote_gives_every_process_the_previous_votes_max(tmp_path):
    """LateMax (the stop vote): each call returns the max over processes of the value the call before gave, the same
    on every process, 0 at the first call; a value voted by one process alone reaches the others."""
    script = tmp_path / "vote.py"
    script.write_text("""
import os, sys, torch.distributed as dist
from pathlib import Path
from ahpa.train.distributed import LateMax
dist.init_process_group("gloo")
rank = dist.get_rank()
votes = {0: [0, 0, 2, 0, 0], 1: [0, 15, 0, 0, 7]}[rank]
vote = LateMax("cpu")
got = [vote(v) for v in votes]
Path(sys.argv[1], f"rank{rank}.txt").write_text(" ".join(str(g) for g in got))
dist.barrier()
os._exit(0)  # as the CLI ends a torchrun process: tearing gloo down can abort (ahpa.commands.exit)
""")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    res = subprocess.run([*TORCHRUN, "--nproc_per_node=2", str(script), str(tmp_path)], capture_output=True,
                         text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.txt").read_text() == "0.0 0.0 15.0 2.0 0.0"


def test_an_error_under_torchrun_is_printed_once_and_named_in_torchruns_summary(one_process_run, tmp_path):
    """Every process fails alike (here: the run directory is in use by another launch, which rank 0 alone checks;
    rank 1 used to fail in its next collective with a raw gloo traceback): the message is printed once, each process
    exits 2 (unless torchrun stopped it first), and torchrun's summary of the failed processes shows the message
    instead of "To enable traceback see".
    Commands that do not share their work refuse to run under torchrun, once."""
    run = tmp_path / "run"
    run.mkdir()
    holder = hold_lock(run / ".lock")
    try:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        res = subprocess.run([*TORCHRUN, "--nproc_per_node=2", "-m", "ahpa.cli", "train", "--out", str(run), *TINY,
                              "train.steps=2"], capture_output=True, text=True, env=env, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    message = f"ahpa train: error: run directory {run} is in use by another launch (pid {holder.pid}"
    printed = [line for line in res.stderr.splitlines() if line.startswith(message)]
    # torchrun's summary lists the processes it saw fail: both, or the one that ended first where it stopped the other
    # (SIGTERM) as that one ended too (torch 2.4.1: 17 of 100 launches, 8 of 80 before the failure path's teardown
    # went; torch 2.13: 0 of 60). Each process it lists shows the message
    summary = [line.strip() for line in res.stderr.splitlines() if line.strip().startswith("traceback :")]
    assert res.returncode != 0 and len(printed) == 1 and summary, res.stderr[-3000:]
    assert all(line.startswith(f"traceback : {message}") for line in summary), res.stderr[-3000:]
    assert res.stderr.count("exitcode  : 2") == len(summary) and "gloo" not in res.stderr.lower()
    res = subprocess.run([*TORCHRUN, "--nproc_per_node=2", "-m", "ahpa.cli", "export", "--run-dir", str(one_process_run),
                          "--out", str(tmp_path / "m.safetensors")], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode != 0 and not (tmp_path / "m.safetensors").exists()
    assert [line for line in res.stderr.splitlines() if line.startswith("ahpa export: error:")] == [
        "ahpa export: error: ahpa export runs in one process: run it without torchrun (only train, sample, prepare "
        "share their work between processes)"]


def test_a_failed_command_leaves_the_process_group_to_the_process_end(tmp_path):
    """A failed command does not tear gloo down (ahpa.commands.exit.finish): destroy_process_group deadlocked there
    (torch 2.4.1, launches whose rank 0 refused a run directory in use, on a loaded machine: both processes stuck in
    it in 1 launch of 80, rank 0 alone, until torchrun killed it, in 9 more). The process ends in ahpa.cli.run with
    os._exit instead; a completed command, after a barrier, too."""
    script = f"""
import os, torch.distributed as dist
from ahpa.commands.exit import finish
dist.init_process_group("gloo", init_method="file://{tmp_path / 'store'}", rank=0, world_size=1)
finish(False, 2)
print("after a failure:", dist.is_initialized(), flush=True)
print("a completed command's last line", end="")  # not flushed: stdout to a pipe is block-buffered
finish(True, 3)
print("not reached", flush=True)
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout buffered, as it is by default
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**env, "OMP_NUM_THREADS": "1"})
    # os._exit skips the interpreter's flush at exit: end_process flushes first, or that line is lost
    assert res.stdout == "after a failure: True\na completed command's last line" and res.returncode == 3, \
        res.stdout + res.stderr[-2000:]


def test_running_means_per_bin_of_t_on_two_processes_are_those_of_the_global_batch(tmp_path):
    """Aligner.update_running under 2 processes, each with its own samples and bins of t: both keep the running means
    one process computes from the whole batch (the sums and the counts per bin are both averaged over processes, so
    their ratio is the global one), and the terms passed in are left as they were (the reduction is on copies)."""
    script = tmp_path / "bins.py"
    script.write_text("""
import os, sys, torch, torch.distributed as dist
from ahpa.align.objective import Aligner
from ahpa.config import AlignCfg
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
losses, bins = torch.rand(7, 2) + 0.5, torch.tensor([0, 0, 1, 2, 2, 2, 0])
share = {0: slice(0, 2), 1: slice(2, 7)}  # unequal shares: bin 1 is rank 1's alone, bin 3 nobody's
al = Aligner(16, ["a", "b"], [3, 4], AlignCfg(projector_dim=32, router_t_bins=4, router_momentum=0.75), "soft", "cosine")
whole = Aligner(16, ["a", "b"], [3, 4], AlignCfg(projector_dim=32, router_t_bins=4, router_momentum=0.75), "soft", "cosine")
for step in range(2):
    sums, counts = al.running_terms(losses[share[rank]] * (step + 1), bins[share[rank]])
    kept = sums.clone(), counts.clone()
    al.update_running(sums, counts)
    assert torch.equal(sums, kept[0]) and torch.equal(counts, kept[1])
    # one process with the whole batch: per-process terms are the global ones over 2 (a mean), ratios equal
    total = whole.running_terms(losses * (step + 1), bins)
    whole.update_running(total[0] / 2, total[1] / 2)
ok = torch.allclose(al.running_loss, whole.running_loss, rtol=1e-6) and torch.equal(al.bin_updates, whole.bin_updates)
with open(os.path.join(sys.argv[1], f"rank{rank}.txt"), "w") as f:
    f.write(f"{ok} {al.bin_updates.tolist()} {al.running_loss[3].tolist()}")
dist.barrier()
os._exit(0)
""")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    res = subprocess.run([*TORCHRUN, "--nproc_per_node=2", str(script), str(tmp_path)], capture_output=True,
                         text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    for rank in (0, 1):  # bin 3 saw no sample: its initial value, no update
        assert (tmp_path / f"rank{rank}.txt").read_text() == "True [2, 2, 2, 0] [1.0, 1.0]"


def test_save_on_two_resume_on_one(one_process_run, tmp_path):
    run = tmp_path / "switch"
    ahpa(2, "train", "--out", str(run), *TINY, "train.steps=2")
    res = ahpa(1, "train", "--out", str(run), *TINY, "train.steps=4")
    assert re.search(r"resumed from step 2 \(saved by 2 processes, now 1: \d+ samples per process", res.stderr)
    a, b = latest(one_process_run), latest(run)
    assert b["step"] == 4
    for part in ("model", "ema", "aligner", "optimizer"):
        if part == "optimizer":
            sa, sb = a[part]["state"], b[part]["state"]
            assert max(max_diff(sa[i], sb[i]) for i in sa) < 1e-5
        else:
            assert max_diff(a[part], b[part]) < 1e-5, part


def test_sampling_on_two_processes_writes_the_same_file(one_process_run, tmp_path):
    common = ["sample", "--model", str(one_process_run / "model.safetensors"), "--num-samples", "11", "--batch", "3",
              "--steps", "3", "--micro-batch", "4"]
    ahpa(1, *common, "--out", str(tmp_path / "one.npz"))
    ahpa(2, *common, "--out", str(tmp_path / "two.npz"))
    with np.load(tmp_path / "one.npz") as a, np.load(tmp_path / "two.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
    assert not (tmp_path / "two.npz.parts").exists()
    # from the run itself: `--run` would be an ambiguous abbreviation of torchrun's --run-path, `--run-dir` is not
    ahpa(2, "sample", "--run-dir", str(one_process_run), *common[3:], "--out", str(tmp_path / "run.npz"))
    with np.load(tmp_path / "one.npz") as a, np.load(tmp_path / "run.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"])
    # a finished file of 4 (chunks [0, 3) and [3, 4)) extended to 11 on two processes: the file of one process's 11
    ahpa(1, *common[:4], "4", *common[5:], "--out", str(tmp_path / "grown.npz"))
    res = ahpa(2, *common, "--out", str(tmp_path / "grown.npz"))
    assert "extending" in res.stderr and "from 4 to 11 samples: its first 3 are kept" in res.stderr
    with np.load(tmp_path / "one.npz") as a, np.load(tmp_path / "grown.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
    assert not (tmp_path / "grown.npz.parts").exists()


# ---- FSDP2 (train.fsdp): same tolerance and reasons as DDP above ----

FSDP = "train.fsdp=true"
SHARDED = "sharded over 2 processes (FSDP2)"


def assert_same_run(a: dict, b: dict, tol: float = 1e-5) -> None:
    """Two checkpoints of the same run at the same step: weights, EMA, aligner and optimiser state."""
    assert a["step"] == b["step"]
    for part in ("model", "ema", "aligner"):
        assert max_diff(a[part], b[part]) < tol, part
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sorted(sa) == sorted(sb)
    assert max(max_diff(sa[i], sb[i]) for i in sa) < tol


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("fsdp") / "two"
    res = ahpa(2, "train", "--out", str(run), *TINY, "train.steps=4", FSDP)
    assert SHARDED in res.stderr  # it did shard, rather than fall back to DDP or one process
    assert "(FSDP2), fp32, eager" in res.stderr
    assert "returned a view tensor" not in res.stderr  # torch >= 2.12 warns on every step of a root returning a view
    return run


@cpu_fsdp
def test_fsdp_on_two_processes_matches_one_plain_process(one_process_run, fsdp_run):
    assert_same_run(latest(one_process_run), latest(fsdp_run))


@cpu_fsdp
def test_fsdp_checkpoints_resume_without_fsdp_and_back(one_process_run, tmp_path):
    run = tmp_path / "switch"
    ahpa(2, "train", "--out", str(run), *TINY, "train.steps=2", FSDP)  # saved by FSDP
    ahpa(1, "train", "--out", str(run), *TINY, "train.steps=3")  # resumed by one plain process
    res = ahpa(2, "train", "--out", str(run), *TINY, "train.steps=4", FSDP)  # and by FSDP again
    assert "resumed from step 3" in res.stderr and SHARDED in res.stderr
    assert_same_run(latest(one_process_run), latest(run))  # the same as the run without interruptions


@cpu_fsdp
def test_fsdp_checkpoint_has_the_plain_layout_and_exports(one_process_run, fsdp_run, tmp_path):
    a, b = latest(one_process_run), latest(fsdp_run)

    def layout(sd: dict) -> dict:
        return {k: (tuple(v.shape), v.dtype) for k, v in sd.items()}

    for part in ("model", "ema", "aligner"):
        assert layout(a[part]) == layout(b[part]), part
    oa, ob = a["optimizer"], b["optimizer"]
    assert oa["param_groups"] == ob["param_groups"]  # hyper-parameters and parameter indices
    assert {i: layout(s) for i, s in oa["state"].items()} == {i: layout(s) for i, s in ob["state"].items()}
    ahpa(1, "export", "--run-dir", str(fsdp_run), "--out", str(tmp_path / "fsdp.safetensors"))  # the spelling torchrun lets through
    ahpa(1, "export", "--run", str(one_process_run), "--out", str(tmp_path / "plain.safetensors"))
    fa, fb = load_file(str(tmp_path / "fsdp.safetensors")), load_file(str(tmp_path / "plain.safetensors"))
    assert layout(fa) == layout(fb) and max_diff(fa, fb) < 1e-5


def test_fsdp_in_one_process_trains_unsharded(tmp_path):
    tr = Trainer(config.load(None, [*TINY, FSDP, "train.steps=1"]), tmp_path / "one")
    assert tr.sharded is None and any("nothing to shard" in m for m in tr.messages)
    tr.run()
    assert (tmp_path / "one" / "DONE").exists()


def test_fsdp_on_the_cpu_with_an_older_torch_names_the_fix(monkeypatch):
    from types import SimpleNamespace

    from torch.torch_version import TorchVersion

    from ahpa.train.fsdp import Sharded

    monkeypatch.setattr(torch, "__version__", TorchVersion("2.4.1"))
    with pytest.raises(ValueError, match=r"needs torch >= 2.6 \(this is 2.4.1\): set train.fsdp=false"):
        Sharded(SimpleNamespace(device=torch.device("cpu")), 2)


def test_prepare_on_two_processes_writes_the_same_cache(tmp_path):
    """`ahpa prepare` under torchrun: rank r encodes shards r, r+2, ...; the cache equals one process's, byte for
    byte."""
    rng = np.random.default_rng(0)
    images = tmp_path / "images.npz"
    np.savez(images, images=rng.integers(0, 256, (24, 16, 16, 3), dtype=np.uint8), labels=np.arange(24) % 3)
    common = ["prepare", "--images", str(images), "--vae", "ahpa-vae:random", "--resolution", "16", "--workers", "0",
              "--flips", "none", "--shard-size", "5"]
    ahpa(1, *common, "--out", str(tmp_path / "one"))
    ahpa(2, *common, "--out", str(tmp_path / "two"))
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    assert len([f for f in files if "shard" in str(f)]) >= 5  # 24 images in shards of 5: both ranks wrote some
    for f in files:
        if f.suffix != ".json":  # the manifest and report hold timings
            assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes(), f


def test_gradient_accumulation_skips_the_all_reduce_of_a_compiled_ddp_model():
    """torch.compile wraps the DDP module, which then is no DDP instance: the micro-steps before the last must
    still skip DDP's gradient all-reduce (grad_accum times the traffic otherwise). A one-process gloo group in a
    subprocess, so this test's process never holds a process group."""
    code = """
import os, types, torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from ahpa.train.loop import Trainer
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # torch 2.4 refuses tcp://...:0 ("port number missing")
ddp = DDP(torch.nn.Linear(2, 2))
fake = types.SimpleNamespace(world=2, net=torch.compile(ddp), align_net=None)
with Trainer._no_sync(fake, last=False):
    inside = ddp.require_backward_grad_sync
with Trainer._no_sync(fake, last=True):
    last = ddp.require_backward_grad_sync
print(inside, last, flush=True)
os._exit(0)  # as the CLI ends: no teardown of gloo (ahpa.commands.exit)
"""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["False", "True"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the pinned copy and its event exist only there")
def test_a_late_vote_on_cuda_reads_the_previous_vote_without_a_host_sync():
    """On a GPU, LateMax's call makes no host sync (CUDA's sync debug mode set to error): it reads the previous
    vote's pinned copy after that copy's event, and returns what the one before gave. A one-process NCCL group in a
    subprocess (gpu_job.sh fp16 and diagnose run the CUDA tests)."""
    code = """
import os, torch, torch.distributed as dist
from ahpa.train.distributed import LateMax
dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
torch.cuda.set_device(0)
vote = LateMax("cuda:0")
got = [vote(3)]  # the first call allocates the pinned buffer
torch.cuda.synchronize()
torch.cuda.set_sync_debug_mode("error")
got += [vote(0), vote(5), vote(0)]
torch.cuda.set_sync_debug_mode("default")
print(*got, flush=True)
os._exit(0)
"""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-4:] == ["0.0", "3.0", "0.0", "5.0"]


def test_every_process_loads_the_checkpoint_rank_0_chose_or_all_fail(tmp_path):
    """Rank 0 chooses the newest readable checkpoint and the others read that file, so no process resumes or
    samples from another one (a newer file appearing between them, a transient read error). A process that
    cannot read it fails, and every other with it, instead of waiting in its next collective."""
    script = tmp_path / "load.py"
    script.write_text("""
import os, sys, torch, torch.distributed as dist
from pathlib import Path
from ahpa.train import checkpoint as ckpt
dist.init_process_group("gloo")
rank, d = dist.get_rank(), Path(sys.argv[1])
if rank == 0:
    for step in (1, 2, 3):
        ckpt.save_checkpoint(d, step, {"w": torch.full((3,), float(step))}, keep=0)
dist.barrier()
if rank == 0:  # it lists the directory as it was before step 3 appeared
    listed = ckpt.list_checkpoints
    ckpt.list_checkpoints = lambda d: [p for p in listed(d) if p.name != "step_000000003.pt"]
if rank == 1 and sys.argv[2] == "fail":
    def read(path):
        raise OSError(5, "Input/output error")
    ckpt.read_checkpoint = read
if rank == 0 and sys.argv[2] == "fail0":  # an error load_latest does not take for a broken file
    def read(path):
        raise MemoryError("cannot allocate")
    ckpt.read_checkpoint = read
try:
    state, path, _ = ckpt.load_latest_everywhere(d, torch.device("cpu"))
    out, code = f"{path.name} {float(state['w'][0])}", 0
except Exception as e:
    out, code = f"{type(e).__name__}: {e}", 1
(d / f"rank{rank}.txt").write_text(out)  # not stdout or stderr: the ranks' lines mix there
if code == 0:
    dist.barrier()
os._exit(code)  # as the CLI ends a torchrun process: tearing gloo down can abort (ahpa.commands.exit)
""")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    run = lambda mode, d: subprocess.run([*TORCHRUN, "--nproc_per_node=2", str(script), str(d), mode],  # noqa: E731
                                         capture_output=True, text=True, env=env, timeout=180)
    ok = run("ok", tmp_path / "a")
    assert ok.returncode == 0, ok.stderr[-2000:]
    said = lambda d: [(d / f"rank{r}.txt").read_text() for r in (0, 1)]  # noqa: E731
    assert said(tmp_path / "a") == ["step_000000002.pt 2.0"] * 2
    assert run("fail", tmp_path / "b").returncode != 0
    rank0, rank1 = said(tmp_path / "b")
    assert "rank 0 read this checkpoint and another process could not" in rank0
    assert "rank 0 read this checkpoint and another process could not" in rank1 and "Input/output error" in rank1
    assert run("fail0", tmp_path / "c").returncode != 0  # rank 0 fails before choosing: the other hears of it
    rank0, rank1 = said(tmp_path / "c")
    assert rank0 == "MemoryError: cannot allocate" and "rank 0 could not load a checkpoint" in rank1
    assert "MemoryError: cannot allocate" in rank1


def test_the_collective_timeout_and_device_checks(monkeypatch):
    from ahpa.train import distributed

    assert distributed.timeout().total_seconds() == 30 * 60  # not NCCL's 10 minutes: rank 0 may write 11 GB alone
    monkeypatch.setenv("AHPA_DIST_TIMEOUT_MIN", "90")
    assert distributed.timeout().total_seconds() == 90 * 60
    monkeypatch.setenv("AHPA_DIST_TIMEOUT_MIN", "ten")
    with pytest.raises(ValueError, match="AHPA_DIST_TIMEOUT_MIN='ten'"):
        distributed.timeout()
    # one GPU named for every process of a torchrun job is refused before any process group forms
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="each process takes its own GPU"):
        distributed.init_from_env("cuda:1")


def test_evaluation_on_two_processes_and_the_redo_of_a_missing_last_one(tmp_path):
    """Under torchrun the reference is measured by rank 0 when the run is built (the others wait, then read it), the
    samples are shared out, and a run that lost its last evaluation (and DONE) evaluates it on every rank alike."""
    import json
    import warnings

    from tests.test_evaluate import TinyDetector

    det = tmp_path / "tiny-resnet20.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(TinyDetector().eval()).save(str(det))
    ref = tmp_path / "ref.npz"
    np.savez(ref, images=np.random.default_rng(0).integers(0, 256, (24, 16, 16, 3), dtype=np.uint8))
    run = tmp_path / "run"
    args = ["train", "--out", str(run), *TINY, "train.steps=2", "eval.every=2", f"eval.detectors=[torchscript:{det}]",
            f"eval.ref={ref}", "eval.num=16", "eval.batch=8"]

    def evals() -> list[int]:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [r["step"] for r in rows if "eval/FD-r20" in r]

    told = ahpa(2, *args).stderr
    assert evals() == [2] and (run / "DONE").exists() and any((run / "eval_ref").iterdir())
    fd = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["eval/FD-r20"]
    # the FD on the console, once (rank 0), as the CLI rounds it
    assert told.count(f"step 2 (16 images): FD-r20 {fd:.4f} (16 EMA samples)") == 1, told[-2000:]
    rows = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("".join(r + "\n" for r in rows if "eval/" not in r))
    (run / "DONE").unlink()
    ahpa(2, *args)
    assert evals() == [2] and (run / "DONE").exists()


@pytest.mark.parametrize("value", ["0", "-5", "0.0"])
def test_a_zero_or_negative_collective_timeout_is_refused(monkeypatch, value):
    """A timeout of 0 would make every collective fail at once."""
    from ahpa.train import distributed

    monkeypatch.setenv("AHPA_DIST_TIMEOUT_MIN", value)
    with pytest.raises(ValueError, match="expected a positive number of minutes"):
        distributed.timeout()
