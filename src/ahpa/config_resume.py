"""What a resumed run may change: its length, cadences and how it runs (device, compilation, sharding, micro-batches),
never the settings that shape its training; `ahpa train` on an existing run refuses any other difference, listing
them (ahpa.train.run_dir)."""

from __future__ import annotations

from typing import Any

from ahpa.config import Config, flatten

# keys that may change when a run is resumed (run length, cadences); everything else must match
RESUMABLE_CHANGES = (
    "train.steps",
    "train.log_every",
    "train.ckpt_every",
    "train.sample_every",
    "train.keep_checkpoints",
    "train.device",
    "train.compile",
    "train.compile_mode",
    "train.fsdp",  # checkpoints are full state dicts either way
    "train.activation_checkpointing",  # recomputation, not other math: the losses and gradients stay the same
    "train.max_bad_steps",
    "train.wandb",  # where a copy of the metrics goes, not what they are
    "train.wandb_name",
    "train.posthoc_every",  # when snapshots are written: the reconstruction takes snapshots of any steps
    "train.grad_accum",  # the same run in micro-batches (tested to 3e-8): resume on fewer GPUs at the same batch
    "data.prefetch",  # the same batches either way
    "sample.",
    "eval.",
)


def resume_differences(saved: Config, new: Config) -> dict[str, tuple[Any, Any]]:
    """{key: (run's value, command's value)} for the keys that differ, except those allowed to change."""
    a, b = flatten(saved.to_dict()), flatten(new.to_dict())
    return {
        k: (a[k], b.get(k))
        for k in a
        if a[k] != b.get(k) and not any(k == r or (r.endswith(".") and k.startswith(r)) for r in RESUMABLE_CHANGES)
    }


def resume_conflicts(saved: Config, new: Config) -> list[str]:
    """The differences of resume_differences, one line each."""
    return [f"{k}: run has {a!r}, command gives {b!r}" for k, (a, b) in resume_differences(saved, new).items()]
