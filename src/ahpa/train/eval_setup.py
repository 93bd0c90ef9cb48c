"""What an evaluation's numbers depend on besides the weights and the detector, as one string recorded in each
evaluation's metrics row (`eval_setup`): eval.* and sample.* may change on a resume, and a curve measured two ways,
or two runs measured differently, must not be read as one comparison (the trainer's note on resume, eval.png's
broken line, `ahpa compare`)."""

from __future__ import annotations

import re

from ahpa.config import Config


def describe(cfg: Config) -> str:
    """"eval.num=10000 eval.ref=... eval.seed=0 sampler=euler-50 cfg-scale=1.0 guidance=[0.0, 1.0]" (the recorded
    format: runs compare these strings, so it does not change)."""
    e, s = cfg.eval, cfg.sample
    return (f"eval.num={e.num} eval.ref={e.ref} eval.seed={e.seed} sampler={s.solver}-{s.steps} "
            f"cfg-scale={s.cfg_scale} guidance=[{s.guidance_low}, {s.guidance_high}]")


def items(setup: str) -> list[str]:
    """A setup's KEY=VALUE items (a bracketed value holds a space)."""
    return re.findall(r"\S+=\[[^\]]*\]|\S+", setup)


def changed(setup: str, since: str) -> str:
    """The items of `setup` that `since` lacks, e.g. "eval.num=100"."""
    before = items(since)
    return " ".join(item for item in items(setup) if item not in before)
