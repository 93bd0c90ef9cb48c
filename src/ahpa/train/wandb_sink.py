"""The optional Weights & Biases copy of a run's metrics (`train.wandb`): on rank 0, what TensorBoard gets (the same
scalar names, evaluation rows, sample grids and router plots as images) goes to one W&B run per run directory, which a
resume continues: its id is kept in RUN/wandb_id, and W&B's own files go to RUN/wandb/.

W&B's steps are the training steps. W&B keeps a step once it has it: a step below its newest is refused ("Steps must
be monotonically increasing"), and rewinding a run's history (`wandb.init(resume_from=...)`) is a private preview of
W&B's service. So the steps a resume redoes, those after the checkpoint it resumes from, keep in W&B the values the
first attempt logged (the same training: a resume redoes the same random draws; img/s and the resumed window's means
differ), and they are not sent again, which would print W&B's warning for each; metrics.jsonl and TensorBoard hold the
redone ones. An evaluation redone at the step resumed from (a run stopped between that step's checkpoint and its
evaluation) is logged at W&B's next step with its own step in `eval/step`, the x-axis of the eval/* charts.
Offline (WANDB_MODE=offline) W&B knows no earlier step: each launch writes a RUN/wandb/offline-run-*-ID directory of
its own, and `wandb sync` uploads one id's directories in the order they started.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

from ahpa.atomic import atomic_write_text
from ahpa.config_rules import wandb_project
from ahpa.train.distributed import raise_from_main
from ahpa.train.run_dir import RunConfigError

ID_FILE = "wandb_id"
INSTALL = "pip install wandb (or the extra: pip install 'ahpa[wandb]')"


def missing_wandb(project: str) -> str | None:
    """Why `train.wandb=project` cannot log (wandb cannot be imported), or None: asked before any set-up, so that a
    run is refused at once instead of failing when its logging starts."""
    try:
        import wandb  # noqa: F401
    except Exception as e:  # not installed (ImportError), or an install that fails at import
        return (f"train.wandb={project!r} logs to Weights & Biases, but wandb cannot be imported ({type(e).__name__}: "
                f"{e}): {INSTALL}; or drop train.wandb (metrics.jsonl and TensorBoard are written either way)")
    return None


def stored_id(run_dir: Path) -> str:
    """The run's W&B id, from RUN/wandb_id, made and written there on the first start: every launch of the run (a
    resume is the same command again) logs to the same W&B run."""
    path = run_dir / ID_FILE
    if path.exists():
        run_id = path.read_text().strip()
        if not re.fullmatch(r"[a-z0-9]+", run_id):
            raise RunConfigError(f"{path} holds {run_id[:40]!r}, not a W&B run id (lowercase letters and digits): "
                                 "delete the file to log this run to a new W&B run")
        return run_id
    run_id = secrets.token_hex(6)
    atomic_write_text(path, run_id + "\n")
    return run_id


def wandb_step(step: int, floor: int, evaluation: bool) -> int | None:
    """The W&B step a row of training step `step` goes to, where `floor` is the first step W&B still takes (a resumed
    W&B run's next step; 0 for a new run, or offline): its own step; a step W&B has passed is not sent (W&B keeps
    the first attempt's row), except an evaluation, which goes to the floor (its own step in eval/step)."""
    if step >= floor:
        return step
    return floor if evaluation else None


def start(cfg, run_dir: Path, main: bool, skip: bool) -> WandbRun | None:
    """`train.wandb`'s run, on rank 0 (None elsewhere, without train.wandb, or when `skip`: a complete run rerun
    logs nothing). W&B failing to start (not logged in, its server unreachable) is raised on every process, before
    the first step; every process calls this when train.wandb is set."""
    if not cfg.train.wandb:
        return None
    run, error = None, None
    if main and not skip:
        try:
            run = WandbRun.start(cfg, run_dir)
        except RunConfigError as e:
            error = e
        except Exception as e:  # W&B's own errors (UsageError, CommError, ...), named with the ways out
            error = RunConfigError(
                f"train.wandb={cfg.train.wandb!r}: W&B could not start the run's W&B run ({type(e).__name__}: {e}). "
                f"Log in (`wandb login`, or WANDB_API_KEY), or set WANDB_MODE=offline to keep it in {run_dir}/wandb "
                "and upload it later with `wandb sync`; or drop train.wandb")
            error.__cause__ = e
    raise_from_main(error)
    return run


class WandbRun:
    """The W&B run of a run directory, started by `start`; rank 0's only."""

    def __init__(self, run, floor: int):
        self.run, self.floor = run, floor

    @classmethod
    def start(cls, cfg, run_dir: Path) -> WandbRun:
        """Starts (or, with the id of RUN/wandb_id, continues) the run's W&B run. W&B does not take over the
        console (its capture would swallow the progress bars); it prints its own few lines when it starts (where
        its files go, or the run's address online), above the bars, and no summary when it ends."""
        import wandb
        from tqdm import tqdm

        entity, project = wandb_project(cfg.train.wandb)
        run_dir = Path(os.path.abspath(run_dir))
        with tqdm.external_write_mode():  # W&B's lines above a progress bar, not through it
            run = wandb.init(project=project, entity=entity, name=cfg.train.wandb_name or run_dir.name,
                             dir=str(run_dir), id=stored_id(run_dir), resume="allow", config=cfg.to_dict(),
                             allow_val_change=True,  # run length and cadences may change on resume
                             settings=wandb.Settings(console="off", quiet=True))
        run.define_metric("eval/step")
        run.define_metric("eval/*", step_metric="eval/step")
        return cls(run, int(getattr(run, "starting_step", 0) or 0))

    def log(self, step: int, scalars: dict[str, float]) -> None:
        """A row's scalars, as TensorBoard gets them; an evaluation's row also carries its step (eval/step)."""
        evaluation = any(k.startswith("eval/") for k in scalars)
        at = wandb_step(step, self.floor, evaluation)
        if at is not None and scalars:
            self.run.log({**scalars, "eval/step": step} if evaluation else scalars, step=at)

    def image(self, tag: str, png: Path, step: int) -> None:
        import wandb

        at = wandb_step(step, self.floor, False)
        if at is not None:
            self.run.log({tag: wandb.Image(str(png))}, step=at)

    def close(self, failed: bool = False) -> None:
        """Finishes the W&B run: marked failed when the training raised (a diverged run), else finished."""
        self.run.finish(exit_code=1 if failed else 0)
