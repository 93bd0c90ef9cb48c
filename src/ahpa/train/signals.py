"""Stop signals as a run's `should_stop`: Ctrl-C (SIGINT), a scheduler's SIGTERM and a closed terminal's SIGHUP,
caught while a run trains so that it finishes its step, saves a checkpoint and returns (`Trainer.run`'s "stopped")
instead of dying with the steps since its last checkpoint. `ahpa train` trains inside one; a notebook opts in:

    with ahpa.StopSignals() as stop:          # the kernel's interrupt now stops the run with a checkpoint
        trainer.run(should_stop=stop)

The library installs no handler of its own accord: outside the block the signals act as they did before it.
"""

from __future__ import annotations

import signal


def default_signals() -> tuple[int, ...]:
    """SIGINT, SIGTERM and, where the platform has it (not Windows), SIGHUP."""
    return (signal.SIGINT, signal.SIGTERM, *((signal.SIGHUP,) if hasattr(signal, "SIGHUP") else ()))


class StopSignals:
    """While installed (a `with` block, or install() ... restore()), each of `signums` is recorded instead of acting;
    calling the object returns the first one received (0 before any): a `should_stop` for `Trainer.run`, which
    stops after the step in progress (an evaluation in progress is given up between two batches of samples).
    Signal handlers can only be set from the main thread (Python's rule): elsewhere install() raises ValueError."""

    def __init__(self, signums: tuple[int, ...] | None = None):
        self.signums = tuple(signums) if signums is not None else default_signals()
        self.received: list[int] = []
        self._previous: dict[int, object] = {}

    def _on_signal(self, signum, _frame) -> None:
        self.received.append(signum)

    def install(self) -> "StopSignals":
        for s in self.signums:
            self._previous[s] = signal.signal(s, self._on_signal)
        return self

    def restore(self) -> None:
        """The handlers in place before install(), back (also after a signal arrived)."""
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def __enter__(self) -> "StopSignals":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()

    def __call__(self) -> int:
        return self.received[0] if self.received else 0
