"""One grammar names every prior encoder: `taef2:DIR`, `diffusers:DIR_OR_HUB_ID`, `ahpa-vae:DIR`, and any kind
added with `register_encoder` or a package's entry point (docs/extending.md).

`ahpa-vae:random` builds an untrained small VAE (seeded): it lets smoke runs and tests need no files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ahpa.config import shown
from ahpa.device import as_device
from ahpa.plugins import call_loader, check_call
from ahpa.priors.base import PriorEncoder, frozen
from ahpa.registry import Registry

ENTRY_POINT_GROUP = "ahpa.encoders"
LOADER_CONTRACT = "loader(where: str, spec: str) -> PriorEncoder"


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
# object = the loader), loaded when its kind is first used
ENCODERS = Registry("encoder kind", "kinds", "prior.encoder=KIND:WHERE",
                    {"taef2": _taef2, "diffusers": _diffusers, "ahpa-vae": _ahpa_vae}, group=ENTRY_POINT_GROUP)


def register_encoder(kind: str, loader: Callable[[str, str], PriorEncoder]) -> None:
    """Make `KIND:WHERE` specs load with `loader(where, spec)`: in configs, `ahpa prepare --vae`, exports."""
    if not callable(loader):
        raise ValueError(f"register_encoder({kind!r}, ...) needs a function loader(where, spec) -> PriorEncoder; "
                         f"got {type(loader).__name__}")
    check_call(loader, (None, None), f"the loader of encoder kind {kind!r}", LOADER_CONTRACT)
    ENCODERS.register(kind, loader)


def kinds() -> list[str]:
    """Every encoder kind: the built-in ones, those registered (also by an "ahpa.plugins" module, imported here as
    for a method's name), and those of installed packages' "ahpa.encoders" entry points."""
    return list(ENCODERS)


def parse_spec(spec: str) -> tuple[str, str]:
    kind, sep, where = spec.partition(":")
    if not sep or not where:
        raise ValueError(f"encoder spec {spec!r} is not KIND:PATH; valid kinds: {', '.join(kinds())} "
                         "(e.g. taef2:weights/taef2)")
    ENCODERS.check(kind, f" in {spec!r}")
    return kind, where


def load_encoder(spec: str, device: torch.device | str = "cpu") -> PriorEncoder:
    """Build a frozen encoder from its spec. Only `diffusers:` with a hub id may download."""
    device = as_device(device)  # a device this machine lacks is named before anything loads
    kind, where = parse_spec(spec)
    enc = call_loader(ENCODERS[kind], (where, spec), f"the loader of encoder kind {kind!r}", spec, LOADER_CONTRACT)
    if not isinstance(enc, PriorEncoder):
        raise ValueError(f"the loader of encoder kind {kind!r} returned {type(enc).__name__}, not a PriorEncoder")
    enc.spec = spec
    return frozen(enc.to(device))  # eval mode, no gradients: whatever the loader left


def _existing(path: Path, spec: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"VAE path {shown(path)} (from {spec!r}) does not exist")
    return path


def _looks_like_hub_id(where: str) -> bool:
    parts = where.split("/")
    return len(parts) == 2 and all(parts) and not where.startswith((".", "/", "~"))
