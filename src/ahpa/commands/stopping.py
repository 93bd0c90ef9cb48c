"""SIGTERM (a scheduler's preemption) and SIGHUP (a closed terminal or ssh session) for the commands that keep their
finished work, `ahpa sample` (its chunks) and `ahpa prepare` (its shards): raised where Ctrl-C's KeyboardInterrupt
would be, so that the same clean-up runs (temporary files removed, locks given back), and reported as Ctrl-C is, once
per launch, with the signal's exit code. `ahpa train` handles them itself: it saves a checkpoint first."""

from __future__ import annotations

import os
import signal
import sys
from typing import Callable

from ahpa.train.signals import StopSignals, default_signals


class Stopped(KeyboardInterrupt):
    """A stop signal, raised as Ctrl-C's KeyboardInterrupt is."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class RaisingSignals(StopSignals):
    """StopSignals that raise `Stopped` where the signal arrives instead of recording it: these commands have no step
    to finish first, and their clean-up already runs on Ctrl-C's KeyboardInterrupt."""

    def _on_signal(self, signum, _frame) -> None:
        raise Stopped(signum)


def run_stoppable(command: Callable[[object], int], args) -> int:
    """`command(args)`, stopped by SIGTERM or SIGHUP as by Ctrl-C; exits 128 + the signal, as a process it killed."""
    # SIGINT is left alone: Python already raises KeyboardInterrupt for it, which the CLI reports
    with RaisingSignals(tuple(s for s in default_signals() if s != signal.SIGINT)):
        try:
            return command(args)
        except Stopped as e:
            if int(os.environ.get("RANK", "0")) == 0:  # once per launch, as the CLI reports Ctrl-C
                print("interrupted; rerun the same command to resume", file=sys.stderr)
            return 128 + e.signum
