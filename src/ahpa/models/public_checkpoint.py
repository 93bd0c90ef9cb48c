"""Reading a released DiT / SiT / REPA checkpoint file into a flat {name: tensor} state dict.

A .pt/.pth file is loaded weights-only (no arbitrary pickled objects) unless the caller trusts it; a
training checkpoint dict is unwrapped to its EMA or model weights, and DDP / torch.compile name prefixes
are stripped. Mapping the names onto ahpa's SiT is ahpa.models.convert. (ahpa's own training checkpoints
are read by ahpa.train.checkpoint.)
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import torch

ENTRIES = ("ema", "model")  # which weights of a training checkpoint dict to take
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile prefixes


def read_checkpoint(path: str | Path, *, use: str = "ema", allow_pickle: bool = False) -> tuple[dict, dict]:
    """(state dict, info) from a .pt/.pth/.safetensors file; info holds `entry` and the dict's `args`.

    Training checkpoints (REPA: {"model", "ema", "opt", "args", "steps"}) are unwrapped to `use`
    ("ema" falls back to "model" when there is no EMA). Loads with weights_only=True (argparse.Namespace
    allowed, for REPA's `args`); `allow_pickle=True` lifts that for files you trust.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path)), {"entry": None, "args": None}
    from ahpa.train.checkpoint import has_earlier_layout, is_training_state

    training = ValueError(f"{str(path)!r} is a training checkpoint of ahpa, not a public one: `ahpa export --run RUN_DIR "
                          "--out FILE.safetensors` writes its run's EMA model (or sample it with `ahpa sample --run RUN_DIR`)")
    if has_earlier_layout(path):
        raise training
    obj = _torch_load(path, allow_pickle)
    if is_training_state(obj):
        raise training
    return unwrap(obj, use=use, where=str(path))


def _torch_load(path: Path, allow_pickle: bool):
    if allow_pickle:
        return torch.load(path, map_location="cpu", weights_only=False)
    safe = getattr(torch.serialization, "safe_globals", None)  # a context manager from torch 2.5
    try:
        if safe is not None:
            with safe([argparse.Namespace]):
                return torch.load(path, map_location="cpu", weights_only=True)
        torch.serialization.add_safe_globals([argparse.Namespace])  # torch 2.4
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # the file holds Python objects beyond tensors and containers
        raise ValueError(
            f"{str(path)!r} could not be loaded weights-only: it holds Python objects beyond tensors, or is not a torch "
            f"checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}); if it is a checkpoint "
            "you trust, pass allow_pickle=True "
            "(`ahpa convert --trust-pickle`)"
        ) from e
    except RuntimeError as e:  # torch's zip reader on a truncated or foreign file
        raise ValueError(f"{str(path)!r} is not a readable torch checkpoint ({str(e).splitlines()[0]})") from e


def unwrap(obj, *, use: str = "ema", where: str = "checkpoint") -> tuple[dict, dict]:
    """A flat {name: tensor} dict out of a loaded checkpoint object, and {entry, args}."""
    if use not in ENTRIES:
        raise ValueError(f"unknown checkpoint entry {use!r}; valid entries: {', '.join(ENTRIES)}")
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a state dict or a dict of them, got {type(obj).__name__}")
    info = {"entry": None, "args": obj.get("args")}
    if not _is_state(obj):
        order = [use, "model"] if use == "ema" else [use]
        entry = next((k for k in [*order, "state_dict"] if isinstance(obj.get(k), dict)), None)
        if entry is None:
            raise ValueError(f"{where}: no {' / '.join(repr(k) for k in order)} weights in it (top-level keys: {sorted(map(str, obj))[:12]})")
        info["entry"], obj = entry, obj[entry]
        if not _is_state(obj):
            raise ValueError(f"{where}: entry {entry!r} is not a {{name: tensor}} state dict")
    return strip_wrappers(obj), info


def _is_state(d: dict) -> bool:
    return bool(d) and all(isinstance(v, torch.Tensor) for v in d.values())


def strip_wrappers(state: dict) -> dict:
    for prefix in _WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state
