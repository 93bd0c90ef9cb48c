"""One grammar names every prior encoder: `taef2:DIR`, `diffusers:DIR_OR_HUB_ID`, `ahpa-vae:DIR`, and any kind
added with `register_encoder` or a package's entry point (docs/extending.md).

`ahpa-vae:random` builds an untrained small VAE (seeded): it lets smoke runs and tests need no files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ahpa.config import shown
from ahpa.priors.base import PriorEncoder

ENTRY_POINT_GROUP = "ahpa.encoders"


def _taef2(where: str, spec: str) -> PriorEncoder:
    from ahpa.priors.taef2 import TAEF2Encoder

    return TAEF2Encoder.from_dir(_existing(Path(where).expanduser(), spec))


def _ahpa_vae(where: str, spec: str) -> PriorEncoder:
    from ahpa.priors.kl_vae import KLVAE

    # `ahpa-vae:random` is an untrained small VAE with fixed seed: for smoke runs and tests only
    return KLVAE.random() if where == "random" else KLVAE.from_dir(_existing(Path(where).expanduser(), spec))


def _diffusers(where: str, spec: str) -> PriorEncoder:
    from ahpa.priors.diffusers_vae import DiffusersVAE

    if not Path(where).expanduser().exists() and not _looks_like_hub_id(where):
        raise FileNotFoundError(f"VAE path {shown(where)} (from {spec!r}) does not exist and is not a hub id like 'stabilityai/sd-vae-ft-ema'")
    return DiffusersVAE.from_pretrained(where)


# kind -> loader(where, spec) -> PriorEncoder; more come from register_encoder or, for every process (the CLI,
# torchrun workers), from packages that declare an entry point in the group "ahpa.encoders" (name = kind,
# object = the loader)
_LOADERS: dict[str, Callable[[str, str], PriorEncoder]] = {"taef2": _taef2, "diffusers": _diffusers, "ahpa-vae": _ahpa_vae}


def register_encoder(kind: str, loader: Callable[[str, str], PriorEncoder]) -> None:
    """Make `KIND:WHERE` specs load with `loader(where, spec)`: in configs, `ahpa prepare --vae`, exports."""
    if not kind or ":" in kind:
        raise ValueError(f"encoder kind {kind!r} must be a non-empty name without ':'")
    _LOADERS[kind] = loader


def kinds() -> list[str]:
    """Every encoder kind: the built-in ones, those registered, and those of installed packages' entry points."""
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in _LOADERS:
            _LOADERS[ep.name] = ep.load()
    return list(_LOADERS)


def parse_spec(spec: str) -> tuple[str, str]:
    kind, sep, where = spec.partition(":")
    valid = kinds()
    if not sep or not where:
        raise ValueError(f"encoder spec {spec!r} is not KIND:PATH; valid kinds: {', '.join(valid)} (e.g. taef2:weights/taef2)")
    if kind not in valid:
        raise ValueError(f"unknown encoder kind {kind!r} in {spec!r}; valid kinds: {', '.join(valid)}")
    return kind, where


def load_encoder(spec: str, device: torch.device | str = "cpu") -> PriorEncoder:
    """Build a frozen encoder from its spec. Only `diffusers:` with a hub id may download."""
    kind, where = parse_spec(spec)
    enc = _LOADERS[kind](where, spec)
    enc.spec = spec
    return enc.to(device)


def _existing(path: Path, spec: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"VAE path {shown(path)} (from {spec!r}) does not exist")
    return path


def _looks_like_hub_id(where: str) -> bool:
    parts = where.split("/")
    return len(parts) == 2 and all(parts) and not where.startswith((".", "/", "~"))
