"""A diffusers `AutoencoderKL` (SD-VAE and relatives) as a prior encoder.

Levels are the outputs of `encoder.down_blocks[i]` and `encoder.mid_block`, captured by forward hooks
that live only for the duration of one `_encode` call, in the same encoder forward that produces the
posterior moments: one pass gives the latent and every requested level.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from ahpa.priors.base import LATENT, EncoderOutput, Level, PriorEncoder, frozen, sha256_file

WEIGHTS_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def autoencoder_kl() -> type:
    """diffusers' AutoencoderKL class, or an error that names the diffusers release to install beside this torch.

    Recent diffusers releases call torch APIs that older torch lacks and fail at import (seen: diffusers 0.37.1
    to 0.42.1 beside torch 2.4.1, which imports 0.36.0).
    """
    try:
        with warnings.catch_warnings():
            # diffusers 0.36 (the release for torch 2.4) decorates a Kandinsky-5 method with
            # torch.autocast("cuda") at import, which warns on a machine without CUDA
            warnings.filterwarnings("ignore", message=r".*CUDA is not available.*Disabling", category=UserWarning)
            from diffusers import AutoencoderKL
    except (AttributeError, RuntimeError, TypeError) as e:
        from importlib.metadata import version

        cause = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ImportError(f"diffusers {version('diffusers')} does not import beside torch {torch.__version__} ({cause}). "
                          "Install a diffusers release made for this torch (torch 2.4: pip install 'diffusers<0.37'), "
                          "or a newer torch") from e
    return AutoencoderKL


def levels_from_config(block_out_channels: list[int] | tuple[int, ...], latent_channels: int) -> tuple[Level, ...]:
    """Level names, channels and strides implied by an AutoencoderKL config.

    The downsampler sits at the end of every down block but the last, so down_blocks[i] already
    outputs at stride 2**(i+1) (down0 of SD-VAE is 1/2 of the image side, not 1/1); the last block
    and the mid block stay at the latent stride.
    """
    n = len(block_out_channels)
    factor = 2 ** (n - 1)
    levels = [Level(f"down{i}", c, 2 ** min(i + 1, n - 1)) for i, c in enumerate(block_out_channels)]
    levels.append(Level("mid", block_out_channels[-1], factor))
    levels.append(Level(LATENT, latent_channels, factor))
    return tuple(levels)


def _have_accelerate() -> bool:
    # diffusers loads with low_cpu_mem_usage through accelerate; without it, it says so in six lines on every load
    import importlib.util

    return importlib.util.find_spec("accelerate") is not None


def _config_class(path: Path) -> str | None:
    """The model class a config.json describes: diffusers writes `_class_name`, transformers `architectures`."""
    import json

    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(cfg, dict):
        return None
    return cfg.get("_class_name") or next(iter(cfg.get("architectures") or []), None) or cfg.get("model_type")


def _hub_weights_sha256(repo_id: str) -> str | None:
    """The sha256 of the weights a hub id just loaded, found in the local Hugging Face cache it was loaded into (no
    network): a cache or run made with the hub id then recognises a local copy of the same VAE, and the other way."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for name in WEIGHTS_FILES:  # diffusers' order of preference
        path = try_to_load_from_cache(repo_id, name)
        if isinstance(path, str):  # else None (not cached) or a marker that the hub has no such file
            return sha256_file(path)
    return None


class DiffusersVAE(PriorEncoder):
    """Frozen diffusers AutoencoderKL with levels down0..down{N-1}, mid, latent. Images in [-1, 1]."""

    def __init__(self, vae: nn.Module, spec: str = "diffusers", memory_format: torch.memory_format = torch.contiguous_format):
        super().__init__()
        self.vae = vae
        self.spec = spec
        self.weights_sha256: str | None = None
        cfg = vae.config
        self.latent_channels = int(cfg.latent_channels)
        self.factor = 2 ** (len(cfg.block_out_channels) - 1)
        self.levels = levels_from_config(cfg.block_out_channels, self.latent_channels)
        self._taps: dict[str, nn.Module] = {f"down{i}": b for i, b in enumerate(vae.encoder.down_blocks)}
        self._taps["mid"] = vae.encoder.mid_block
        self.use_memory_format(memory_format)  # channels_last: faster convolutions on recent GPUs
        frozen(self)

    @classmethod
    def from_pretrained(cls, where: str | Path, memory_format: torch.memory_format = torch.contiguous_format) -> "DiffusersVAE":
        """Load from a local directory (never touches the network) or a hub id (may download)."""
        AutoencoderKL = autoencoder_kl()

        local = Path(where).expanduser()
        if local.exists():
            # A full pipeline directory keeps its VAE in vae/; accept both layouts.
            if not (local / "config.json").is_file() and (local / "vae" / "config.json").is_file():
                local = local / "vae"
            not_vae = (f"VAE 'diffusers:{where}': {str(local)!r} is not a diffusers AutoencoderKL folder (config.json "
                       "and its weights, or a pipeline folder with vae/)")
            if not (local / "config.json").is_file():  # refused before diffusers logs its own guesses about the folder
                raise ValueError(f"{not_vae}: no config.json in it")
            kind = _config_class(local / "config.json")
            if kind not in (None, "AutoencoderKL"):  # a config naming no class is for diffusers to judge
                raise ValueError(f"{not_vae}: its config.json describes a {kind}")
            try:
                vae = AutoencoderKL.from_pretrained(str(local), local_files_only=True, low_cpu_mem_usage=_have_accelerate())
            except (OSError, ValueError) as e:  # diffusers' own "no file named ... in directory ..."
                raise ValueError(f"{not_vae}: {str(e).strip().splitlines()[0]}") from None
            enc = cls(vae, spec=f"diffusers:{where}", memory_format=memory_format)
            weights = next((local / f for f in WEIGHTS_FILES if (local / f).is_file()), None)
            enc.weights_sha256 = sha256_file(weights) if weights is not None else None
            return enc
        try:
            vae = AutoencoderKL.from_pretrained(str(where), low_cpu_mem_usage=_have_accelerate())
        except OSError as e:  # offline, diffusers says the repository lacks config.json, which misleads
            raise OSError(f"VAE {where!r} is not a local directory, and loading it as a Hugging Face hub id failed "
                          f"({str(e).splitlines()[0]}). Offline, name a local copy (diffusers:/path/to/sd-vae-ft-ema, "
                          "a folder with config.json and the weights)") from None
        enc = cls(vae, spec=f"diffusers:{where}", memory_format=memory_format)
        enc.weights_sha256 = _hub_weights_sha256(str(where))
        return enc

    @classmethod
    def from_config(cls, config: dict, memory_format: torch.memory_format = torch.contiguous_format) -> "DiffusersVAE":
        """Randomly initialised weights from an AutoencoderKL config dict (keys starting with '_' are ignored).

        Seed torch beforehand for reproducible weights.
        """
        AutoencoderKL = autoencoder_kl()

        kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
        return cls(AutoencoderKL(**kwargs), spec="diffusers:<config>", memory_format=memory_format)

    @contextmanager
    def _capture(self, names: tuple[str, ...]) -> Iterator[dict[str, torch.Tensor]]:
        """Hooks on the requested stages for the duration of the with-block; removed even on error."""
        captured: dict[str, torch.Tensor] = {}
        handles = []
        try:
            for name in names:
                def hook(_module, _inputs, output, name=name):
                    captured[name] = output
                handles.append(self._taps[name].register_forward_hook(hook))
            yield captured
        finally:
            for h in handles:
                h.remove()

    def _encode(self, x: torch.Tensor, levels: tuple[str, ...]) -> EncoderOutput:
        vae = self.vae
        x = x.to(dtype=next(vae.parameters()).dtype, memory_format=self.memory_format)
        with self._capture(levels) as features:
            # vae.encoder + quant_conv directly rather than vae.encode: tiling or slicing (if a user
            # enabled them) would run the stages once per tile and the hooks would keep only the last.
            moments = vae.encoder(x)  # [B, 2*C_lat, H/f, W/f]
            quant_conv = getattr(vae, "quant_conv", None)  # None when the config sets use_quant_conv=False
            if quant_conv is not None:
                moments = quant_conv(moments)
        mean, logvar = torch.chunk(moments, 2, dim=1)  # [B, 2C, h, w] -> 2 x [B, C, h, w]
        logvar = logvar.clamp(-30.0, 20.0)  # as diffusers' DiagonalGaussianDistribution
        return EncoderOutput(mean=mean, logvar=logvar, features=dict(features))

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        z = z.to(dtype=next(self.vae.parameters()).dtype, memory_format=self.memory_format)
        return self.vae.decode(z).sample
