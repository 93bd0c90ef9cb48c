"""One grammar names every prior encoder: `taef2:DIR`, `diffusers:DIR_OR_HUB_ID`, `ahpa-vae:DIR`.

`ahpa-vae:random` builds an untrained small VAE (seeded): it lets smoke runs and tests need no files.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ahpa.priors.base import PriorEncoder

KINDS = ("taef2", "diffusers", "ahpa-vae")


def parse_spec(spec: str) -> tuple[str, str]:
    kind, sep, where = spec.partition(":")
    if not sep or not where:
        raise ValueError(f"encoder spec {spec!r} is not KIND:PATH; valid kinds: {', '.join(KINDS)} (e.g. taef2:weights/taef2)")
    if kind not in KINDS:
        raise ValueError(f"unknown encoder kind {kind!r} in {spec!r}; valid kinds: {', '.join(KINDS)}")
    return kind, where


def load_encoder(spec: str, device: torch.device | str = "cpu") -> PriorEncoder:
    """Build a frozen encoder from its spec. Only `diffusers:` with a hub id may download."""
    kind, where = parse_spec(spec)
    local = Path(where).expanduser()
    if kind == "taef2":
        from ahpa.priors.taef2 import TAEF2Encoder

        enc = TAEF2Encoder.from_dir(_existing(local, spec))
    elif kind == "ahpa-vae":
        from ahpa.priors.kl_vae import KLVAE

        # `ahpa-vae:random` is an untrained small VAE with fixed seed: for smoke runs and tests only
        enc = KLVAE.random() if where == "random" else KLVAE.from_dir(_existing(local, spec))
    else:
        from ahpa.priors.diffusers_vae import DiffusersVAE

        if not local.exists() and not _looks_like_hub_id(where):
            raise FileNotFoundError(f"VAE path {where!r} (from {spec!r}) does not exist and is not a hub id like 'stabilityai/sd-vae-ft-ema'")
        enc = DiffusersVAE.from_pretrained(where)
    enc.spec = spec
    return enc.to(device)


def _existing(path: Path, spec: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"VAE path {str(path)!r} (from {spec!r}) does not exist")
    return path


def _looks_like_hub_id(where: str) -> bool:
    parts = where.split("/")
    return len(parts) == 2 and all(parts) and not where.startswith((".", "/", "~"))
