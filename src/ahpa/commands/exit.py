"""How a command run under torchrun ends after it completed: a barrier, then os._exit.

Tearing the process group down is where multi-process runs on gloo were seen to fail after all their work was
done: a gloo worker thread that still holds its last finished work wants the GIL to free it, while
~ProcessGroupGloo (run when the DDP reducer, or destroy_process_group, drops the last reference) joins that
thread holding the GIL: a deadlock (a DDP rank of torch 2.4.1, stack in ~ProcessGroupGloo -> thread::join, the
worker in gil_scoped_acquire); during interpreter finalisation the same thread is unwound instead and the process
aborts ("terminate called without an active exception", exit -6; torch 2.13, 2-process FSDP, twice in CI runs).
After the barrier every collective of this process has finished and every file is written and closed, so the
process ends without destroying anything: os._exit, with the command's exit code.
"""

from __future__ import annotations

import os
import sys

import torch.distributed as dist


def leave(code: int) -> None:
    """Barrier with the other processes, flush the standard streams, end this process with `code`."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
