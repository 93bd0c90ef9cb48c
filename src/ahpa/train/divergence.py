"""When a run has diverged: the rule that stops it after non-finite steps (`Trainer.run`, benchmarks/study.py).

The fused AdamW skips a step whose loss or gradient is not finite, and the EMA skips it too, so a run can go on
after a blow-up without harm, as long as the blow-up passes. Two signs that it did not: `max_bad_steps` skipped
in a row, or more than half of the steps skipped over a stretch of at least `max_bad_steps` steps. The second
catches a run that stays finite on a few batches: a GPU study run at lr 1.6e-3 skipped 1,827 of 2,000 steps
without ever 20 in a row at a check (docs/study.md, GPU job 2).
"""

from __future__ import annotations

from dataclasses import dataclass


class TooManyBadSteps(FloatingPointError):
    pass


def bad_steps_verdict(skipped: int, steps: int, in_a_row: int, max_bad_steps: int) -> str | None:
    """Why a run should stop, or None: `in_a_row` >= `max_bad_steps`, or more than half of `steps` (at least
    `max_bad_steps` of them) skipped."""
    if in_a_row >= max_bad_steps:
        return f"{in_a_row} steps in a row had a non-finite loss or gradient"
    if steps >= max_bad_steps and 2 * skipped > steps:
        return f"{skipped} of the last {steps} steps had a non-finite loss or gradient"
    return None


@dataclass
class DivergenceWatch:
    """Applies `bad_steps_verdict` to windows of any length: windows shorter than `max_bad_steps` (a short
    train.log_every, the window cut at a resume or at align.stop_step) are pooled until the stretch is long
    enough to judge, so the half-skipped rule holds whatever the logging cadence."""

    max_bad_steps: int
    steps: int = 0
    skipped: int = 0
    launch_steps: int = 0  # this launch's steps and skipped steps, never reset: the completion line reports them
    launch_skipped: int = 0

    def update(self, steps: int, skipped: int, in_a_row: int, last: bool = False) -> str | None:
        """The verdict on the stretch so far, with this window of `steps` (`skipped` of them) added. `last`: the
        launch's last window. A launch shorter than `max_bad_steps` whose every step was skipped is stopped too: it
        trained nothing, and a short trial of a new loss or encoder is where that happens (it used to say "run
        complete" and exit 0)."""
        self.steps += steps
        self.skipped += skipped
        self.launch_steps += steps
        self.launch_skipped += skipped
        verdict = bad_steps_verdict(self.skipped, self.steps, in_a_row, self.max_bad_steps)
        if verdict is None and last and self.launch_steps and self.launch_skipped == self.launch_steps:
            verdict = f"every one of the {self.launch_steps} steps trained had a non-finite loss or gradient"
        if self.steps >= self.max_bad_steps:  # judged: the next stretch starts afresh
            self.steps = self.skipped = 0
        return verdict
