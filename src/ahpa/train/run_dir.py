"""What a run directory binds a rerun to: once it holds a checkpoint, the settings of its config.yaml (only run
length, cadences and the like may change, config_resume.RESUMABLE_CHANGES) and the content of its input files
(inputs.json: a cache or VAE may be named under a new path if its content is the same)."""

from __future__ import annotations

import contextlib
import itertools
import os
from pathlib import Path

from ahpa import config as config_mod
from ahpa import config_resume, config_rules, lock
from ahpa.config import Config
from ahpa.train import inputs
from ahpa.train.checkpoint import list_checkpoints
from ahpa.train.distributed import raise_from_main


class RunConfigError(ValueError):
    pass


# what a run writes at the top of its directory: a directory holding any of them that is not a run would be written over
RUN_FILES = ("config.yaml", "metrics.jsonl", "router.jsonl", "inputs.json", "starts.jsonl", "checkpoints", "samples", "plots", "tb",
             "model.safetensors", "DONE", "samples.png", "router.png", "losses.png", "eval.png", "eval_ref",
             "wandb_id")


# the keys whose values may be names that a package or a session registered (docs/extending.md): read strictly
# here, since a resume builds the aligner; prior.encoder's kind is checked where the encoder loads, which names the
# kind and the same fix
REGISTERED_KEYS = config_rules.REGISTERED_KEYS


def _registered_elsewhere(run_dir: Path) -> str:
    """The fix for a run whose config names a method, loss, router mode or external encoder kind not registered in
    this process: its package (named by the run's newest start, where it recorded one) or the session's code."""
    from ahpa.provenance import last_start

    start = last_start(run_dir) or {}
    named = f" (its last start recorded the extension packages {start['extensions']})" if start.get("extensions") else ""
    return (f"this process lacks the package or session code the run trained with{named}: install or register it "
            "before resuming this run.")


def names_a_registered_value(message: str) -> bool:
    """Whether a config's refusal (its first line) is of a name a package or a session registers, or of a setting
    one declares: what a run's own config.yaml meets in a process without that package."""
    return any(f": {k}=" in message for k in REGISTERED_KEYS) or f"key '{config_rules.OPTIONS}." in message


def missing_extension_fix(run_dir: Path, message: str) -> str | None:
    """The fix for a refusal of `run_dir`'s config (given as --config to resume it) that names what a package
    registers, with the packages its last start recorded; None where the refusal is another's or no run is there."""
    if not (run_dir / "config.yaml").is_file() or not names_a_registered_value(message.splitlines()[0]):
        return None
    return _registered_elsewhere(run_dir)


def _saved_config(run_dir: Path) -> Config | None:
    """The run's config.yaml, or None where there is none. Refuses a directory that is not a run but holds files of
    the names a run writes (a run's own config.yaml written over is harmless; someone else's, or their samples/, is
    not). Other files, e.g. a scheduler's logs, may be there."""
    config_file = run_dir / "config.yaml"
    if config_file.is_file():
        try:
            return config_mod.load(config_file)
        except ValueError as e:  # ConfigError, or bytes that are not text
            first = str(e).splitlines()[0]
            raise RunConfigError(
                f"{run_dir} holds a config.yaml that cannot be read as a run's config ({first}); "
                + (_registered_elsewhere(run_dir) if names_a_registered_value(first) else
                   "a run would write over it: choose a new --out; or, for a run of an older ahpa, fix the key named.")
            ) from None
    clash = [name for name in RUN_FILES if (run_dir / name).exists()]
    if clash:
        raise RunConfigError(
            f"{run_dir} is not a run directory of ahpa (no config.yaml) but holds {', '.join(clash)}, which a run "
            "would write over. Choose a new --out, or move them away."
        )
    return None


@contextlib.contextmanager
def removed_if_refused(run_dir: Path, rank: int):
    """Around a Trainer's construction: refused, it leaves no directory it made (check_run_dir makes --out before
    the minutes of set-up, to refuse an unwritable one first). Only directories still empty go, deepest first: an
    existing directory, or one that got files meanwhile, stays as it is."""
    made = [] if rank != 0 else list(itertools.takewhile(lambda p: not p.exists(), (run_dir, *run_dir.parents)))
    try:
        yield
    except BaseException:
        for directory in made:
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise


def check_run_dir(run_dir: Path, cfg: Config, rank: int) -> dict[str, tuple]:
    """Refuses a run directory that cannot take this command: a file, unwritable, or a run with other settings.
    Returns the input paths that differ from the run's, {key: (run's, command's)}, for check_moved_inputs."""
    if run_dir.is_file():
        raise ValueError(f"run directory {run_dir} is a file; --out names a directory (new, or a run to resume)")
    saved = _saved_config(run_dir) if run_dir.is_dir() else None
    error = None
    if rank == 0:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            probe = run_dir / f".write_probe{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            error = OSError(e.errno, f"run directory {run_dir} is not writable ({e.strerror}); choose another --out")
        else:
            try:  # refused early, held by Trainer.run while it trains
                lock.check_free(run_dir / lock.LOCK_FILE, f"run directory {run_dir}")
            except OSError as e:
                error = e
    raise_from_main(error)
    saved_file = run_dir / "config.yaml"
    # a run that ended before its first checkpoint (a failed start) has nothing to resume: a new command,
    # with other settings, starts it afresh rather than being held to the settings that failed
    if saved is None or not list_checkpoints(run_dir / "checkpoints"):
        return {}
    saved = config_mod.with_absolute_paths(saved)  # runs that stored relative paths
    differences = config_resume.resume_differences(saved, cfg)
    # a cache or VAE under a new path may carry on: checked against the run's record once they are open
    moved = {k: v for k, v in differences.items() if k in inputs.MOVABLE}
    if len(differences) > len(moved):
        may_change = ", ".join(r + "*" if r.endswith(".") else r for r in config_resume.RESUMABLE_CHANGES)
        raise RunConfigError(
            f"{run_dir} holds a run with another configuration; on resume only these may change: "
            f"{may_change}. Differences:\n  " + "\n  ".join(config_resume.resume_conflicts(saved, cfg))
            + f"\nThe run's settings are in {saved_file} (`--config {saved_file}` resumes it as it was); a new --out "
            "directory starts another run."
            + (f"\n({' and '.join(moved)} may name the same files under a new path.)" if moved else "")
        )
    return moved


def check_moved_inputs(run_dir: Path, cfg: Config, encoder, moved: dict[str, tuple]) -> tuple[list[str], dict | None]:
    """Refuses moved inputs whose content is not the run's. Returns a message for each one accepted and the inputs'
    record as it is now, to be written in place of the old one (None when nothing moved)."""
    if not moved:
        return [], None
    now = inputs.current(cfg, encoder)  # hashes the files once: the same record is written when the run starts
    wrong = inputs.moved_mismatches(inputs.read(run_dir), now, moved)
    if wrong:
        raise RunConfigError(
            f"{run_dir} holds a run whose input files moved, and the new ones cannot be taken for them:\n  "
            + "\n  ".join(wrong) + f"\nName the run's own files (see {run_dir / 'config.yaml'}), or link "
            "the old path to the new one."
        )
    return [f"{key} moved: {old} -> {new}, the same content as recorded in {inputs.FILE}; config.yaml now names the "
            "new path" for key, (old, new) in moved.items()], now
