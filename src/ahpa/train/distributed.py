"""torch.distributed set-up from torchrun's environment, the few collectives training needs, and DTensor access.

Launch with `torchrun --nproc_per_node N -m ahpa.cli train ...` (or the `ahpa` script). NCCL on
CUDA, gloo on CPU. A single process without torchrun runs with world size 1 and no process group.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

try:  # public from torch 2.5; torch 2.4 has it under _tensor; absent where torch lacks distributed
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    try:
        from torch.distributed._tensor import DTensor
    except ImportError:
        DTensor = None


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# how long a process waits in a collective for the others. NCCL's own default (10 min) is shorter than what rank 0
# may do alone while the others wait: write an XL/2 checkpoint (~11 GB) to slow shared storage, measure the
# evaluation's reference images when the run is built. AHPA_DIST_TIMEOUT_MIN sets it (minutes).
TIMEOUT_MIN = 30


def timeout() -> datetime.timedelta:
    value = os.environ.get("AHPA_DIST_TIMEOUT_MIN", str(TIMEOUT_MIN))
    try:
        minutes = float(value)
    except ValueError:
        minutes = -1.0
    if minutes <= 0:
        raise ValueError(f"AHPA_DIST_TIMEOUT_MIN={value!r}: expected a positive number of minutes")
    return datetime.timedelta(minutes=minutes)


def init_from_env(device_kind: str = "auto") -> Dist:
    """Joins the process group when torchrun set WORLD_SIZE > 1; returns this process's place."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device_kind.startswith("cuda:"):  # every process would take that one GPU, over gloo
        raise ValueError(f"device {device_kind!r} under torchrun: each process takes its own GPU (cuda:LOCAL_RANK); "
                         "use cuda or auto, and CUDA_VISIBLE_DEVICES to choose the GPUs")
    use_cuda = torch.cuda.is_available() and device_kind in ("auto", "cuda")
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout())
    return Dist(rank, world, local)


def current() -> Dist:
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return Dist()


def device_for(spec: str, d: Dist) -> str:
    """Under torchrun each process takes its own GPU (cuda:LOCAL_RANK)."""
    if d.enabled and spec in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{d.local_rank}"
    return spec


def all_reduce_mean_(t: torch.Tensor) -> torch.Tensor:
    """In place mean over processes (no-op in a single process). Asynchronous on GPU: no host sync."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(dist.get_world_size())
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """The mean over processes in a new tensor; `t` itself in a single process (nothing to reduce: no copy)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return all_reduce_mean_(t.clone())
    return t


def agreed_max(value: float, device: torch.device) -> float:
    """The largest of every process's `value`: itself in a single process, without touching the device. With several
    processes a host sync (a device tensor read back after the collective): not for every step."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return float(value)
    t = torch.tensor(float(value), device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


class LateMax:
    """The largest of every process's value, read one vote late. Each call starts a max over processes of the value
    given now and returns the one the previous call started (0 at the first call). `agreed_max` reads its result at
    once, and on a GPU that read waits for all the work queued before it: the GPU's queue runs dry while the host
    catches up. Read a vote later, the collective has long finished, so the read waits for nothing still queued.
    Every process makes the same calls, so every one gets the same answer at the same call."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self._host: torch.Tensor | None = None  # the last vote's result, copied to the host (pinned on CUDA)
        self._copied = None  # the CUDA event recorded after that copy; None off CUDA, where the copy is done

    def __call__(self, value: float) -> float:
        previous = 0.0
        if self._host is not None:
            if self._copied is not None:
                self._copied.synchronize()
            previous = float(self._host)
        t = torch.full((), float(value), device=self.device)  # a fill: no blocking copy from the host
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if t.is_cuda:
            if self._host is None:
                self._host = torch.empty((), pin_memory=True)
            self._host.copy_(t, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()
        else:
            self._host = t
        return previous


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a DTensor (FSDP2's sharded parameters), a view: in-place updates reach
    the parameter. A plain tensor as is."""
    return t.to_local() if DTensor is not None and isinstance(t, DTensor) else t


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value as a plain tensor (free when replicated, as FSDP's gradient norm is); a
    plain tensor as is."""
    return t.full_tensor() if DTensor is not None and isinstance(t, DTensor) else t


def ddp_without_buffer_sync() -> dict:
    """DDP's keyword for no broadcast of rank 0's buffers before every forward: `forward_sync_buffers=False` where
    torch has it (it deprecates `broadcast_buffers` with a warning per process; the buffers are still synced once,
    when DDP is built), `broadcast_buffers=False` on the torch versions before it."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def from_main(obj):
    """Rank 0's `obj` on every process (the object itself in a single process). Picklable objects only."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def raise_from_main(error: BaseException | None) -> None:
    """Raises rank 0's verdict (None: none) on every process, rather than the others failing alone later, waiting in
    their next collective."""
    error = from_main(error)
    if error is not None:
        raise error


def all_true(ok: bool, device: torch.device) -> bool:
    """Whether `ok` holds on every process: each raises the same way, instead of one failing alone while the
    others wait in their next collective. A host sync: for set-up, not the step."""
    return agreed_max(0.0 if ok else 1.0, device) == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
