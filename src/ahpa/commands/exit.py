"""How a command run under torchrun ends: after it completed, a barrier and os._exit; never by tearing gloo down.

Tearing the process group down is where multi-process runs on gloo were seen to fail after all their work was
done: a gloo worker thread that still holds its last finished work wants the GIL to free it, while
~ProcessGroupGloo (run when the DDP reducer, or destroy_process_group, drops the last reference) joins that
thread holding the GIL: a deadlock (a DDP rank of torch 2.4.1, stack in ~ProcessGroupGloo -> thread::join, the
worker in gil_scoped_acquire); during interpreter finalisation the same thread is unwound instead and the process
aborts ("terminate called without an active exception", exit -6; torch 2.13, 2-process FSDP, twice in CI runs).
After the barrier every collective of this process has finished and every file is written and closed, so the
process ends without destroying anything, with the command's exit code.

A failed command does not tear the group down either: the same deadlock was seen there (torch 2.4.1, two gloo
processes whose rank 0 had refused a run directory in use, both stuck in destroy_process_group for minutes, until
a scheduler would kill them: gdb showed the main thread joining a gloo worker that waited for the GIL). Its process
ends in ahpa.cli.run, after the message, with os._exit, and the operating system closes its sockets.
"""

from __future__ import annotations

import os
import sys

import torch.distributed as dist


def end_process(code: int) -> None:
    """Flush the standard streams and end this process with `code`, skipping interpreter finalisation."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def finish(completed: bool, code: int) -> None:
    """The end of a command (call it last, where its objects are still alive). With a process group and a
    completed command: a barrier, then end_process(code), before the trainer and its DDP reducer are freed.
    Otherwise nothing: no process group, or an error on its way to the caller, which reports it and ends the
    process (ahpa.cli.run) with the group as it is: no barrier, which the other processes may never reach, and no
    teardown (above)."""
    if completed and dist.is_available() and dist.is_initialized():
        dist.barrier()
        end_process(code)
