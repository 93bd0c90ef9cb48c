"""diffusers autoencoders as prior encoders: `AutoencoderKL` (SD-VAE and relatives) and `AutoencoderKLFlux2` (FLUX.2's
VAE: the same encoder) here, `AutoencoderDC` (DC-AE) in diffusers_dcae.py on the loading and hooks of this file.

Levels are outputs of encoder modules (`encoder.down_blocks[i]`, `encoder.mid_block`), captured by forward hooks
that live only for the duration of one `_encode` call, in the same encoder forward that produces the
latent: one pass gives the latent and every requested level.
"""

from __future__ import annotations

import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from ahpa.priors.base import LATENT, EncoderOutput, Level, PriorEncoder, frozen, sha256_file

WEIGHTS_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
# the diffusers classes `diffusers:` loads (a config.json's `_class_name`); other autoencoders have encoders of other
# shapes (video VAEs, a diffusion decoder, ...) whose levels nobody has mapped here
SUPPORTED = ("AutoencoderKL", "AutoencoderKLFlux2", "AutoencoderDC")


def diffusers_class(name: str = "AutoencoderKL") -> type:
    """diffusers' class `name`, or an error that names the diffusers release to install beside this torch (or one that
    has the class).

    Recent diffusers releases call torch APIs that older torch lacks and fail at import (seen: diffusers 0.37.1
    to 0.42.1 beside torch 2.4.1, which imports 0.36.0).
    """
    from importlib.metadata import version

    try:
        with warnings.catch_warnings():
            # diffusers 0.36 (the release for torch 2.4) decorates a Kandinsky-5 method with
            # torch.autocast("cuda") at import, which warns on a machine without CUDA
            warnings.filterwarnings("ignore", message=r".*CUDA is not available.*Disabling", category=UserWarning)
            import diffusers

            return getattr(diffusers, name)
    except (AttributeError, RuntimeError, TypeError) as e:
        module = sys.modules.get("diffusers")  # None when `import diffusers` itself failed
        if isinstance(e, AttributeError) and module is not None and name not in dir(module):  # an older release
            raise ImportError(f"diffusers {version('diffusers')} has no {name}: install a release that has it "
                              "(diffusers 0.36.0, the release for torch 2.4, has AutoencoderKLFlux2 and AutoencoderDC)") from None
        cause = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ImportError(f"diffusers {version('diffusers')} does not import beside torch {torch.__version__} ({cause}). "
                          "Install a diffusers release made for this torch (torch 2.4: pip install 'diffusers<0.37'), "
                          "or a newer torch") from e


def diffusers_kind(vae: nn.Module) -> str:
    """The supported diffusers class `vae` is (or derives from), or an error naming the supported ones."""
    for klass in type(vae).__mro__:
        if klass.__name__ in SUPPORTED:
            return klass.__name__
    raise ValueError(f"a {type(vae).__name__} is not an autoencoder `diffusers:` loads; it loads {', '.join(SUPPORTED)}")


def _not_supported(kind: str) -> str:
    return f"its config.json describes a {kind}, which `diffusers:` does not load; it loads {', '.join(SUPPORTED)}"


def levels_from_config(block_out_channels: list[int] | tuple[int, ...], latent_channels: int) -> tuple[Level, ...]:
    """Level names, channels and strides implied by an AutoencoderKL (or AutoencoderKLFlux2) config.

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


def load_local(where: str | Path) -> tuple[nn.Module, str | None]:
    """The diffusers autoencoder in a local folder (or its vae/, a pipeline's layout) and its weights' sha256.
    Never touches the network."""
    local = Path(where).expanduser()
    if not (local / "config.json").is_file() and (local / "vae" / "config.json").is_file():
        local = local / "vae"
    not_vae = (f"VAE 'diffusers:{where}': {str(local)!r} is not a diffusers autoencoder folder (config.json and its "
               "weights, or a pipeline folder with vae/)")
    if not (local / "config.json").is_file():  # refused before diffusers logs its own guesses about the folder
        raise ValueError(f"{not_vae}: no config.json in it")
    kind = _config_class(local / "config.json") or "AutoencoderKL"  # a config naming no class is for diffusers to judge
    if kind not in SUPPORTED:
        raise ValueError(f"{not_vae}: {_not_supported(kind)}")
    try:
        vae = diffusers_class(kind).from_pretrained(str(local), local_files_only=True, low_cpu_mem_usage=_have_accelerate())
    except (OSError, ValueError) as e:  # diffusers' own "no file named ... in directory ..."
        raise ValueError(f"{not_vae}: {str(e).strip().splitlines()[0]}") from None
    weights = next((local / f for f in WEIGHTS_FILES if (local / f).is_file()), None)
    return vae, sha256_file(weights) if weights is not None else None


def load_hub(repo_id: str) -> tuple[nn.Module, str | None]:
    """The diffusers autoencoder of a Hugging Face hub id (may download) and the sha256 of the weights it loaded. Its
    config.json comes first: the class it names decides what loads, and an unsupported one downloads no weights."""
    def offline(e: OSError) -> OSError:  # offline, diffusers says the repository lacks config.json, which misleads
        return OSError(f"VAE {repo_id!r} is not a local directory, and loading it as a Hugging Face hub id failed "
                       f"({str(e).splitlines()[0]}). Offline, name a local copy (diffusers:/path/to/sd-vae-ft-ema, "
                       "a folder with config.json and the weights)")

    with warnings.catch_warnings():
        # diffusers (0.36 to 0.42.1) passes huggingface_hub a keyword that newer huggingface_hub ignores and warns
        # about on every load by hub id (2.4.0 does, 0.36.2 does not): a UserWarning the user can do nothing about
        warnings.filterwarnings("ignore", message=r"The `local_dir_use_symlinks` argument is deprecated", category=UserWarning)
        try:
            config = diffusers_class().load_config(repo_id)
        except OSError as e:
            raise offline(e) from None
        kind = (config.get("_class_name") if isinstance(config, dict) else None) or "AutoencoderKL"
        if kind not in SUPPORTED:
            raise ValueError(f"VAE 'diffusers:{repo_id}': {_not_supported(kind)}")
        try:
            vae = diffusers_class(kind).from_pretrained(repo_id, low_cpu_mem_usage=_have_accelerate())
        except OSError as e:
            raise offline(e) from None
    return vae, _hub_weights_sha256(repo_id)


def wrap(vae: nn.Module, spec: str = "diffusers", memory_format: torch.memory_format = torch.contiguous_format) -> "DiffusersVAE":
    """The prior encoder around a loaded diffusers autoencoder: its class decides which."""
    if diffusers_kind(vae) == "AutoencoderDC":
        from ahpa.priors.diffusers_dcae import DiffusersDCAE  # imports this module: imported when needed

        return DiffusersDCAE(vae, spec, memory_format)
    return DiffusersVAE(vae, spec, memory_format)


class DiffusersVAE(PriorEncoder):
    """Frozen diffusers AutoencoderKL or AutoencoderKLFlux2 with levels down0..down{N-1}, mid, latent. Images in [-1, 1].

    Subclasses for other encoder shapes set `classes` and override `_hierarchy` (levels and the modules whose outputs
    they are) and `_encode`; loading, identity, hooks and decoding are shared."""

    classes: tuple[str, ...] = ("AutoencoderKL", "AutoencoderKLFlux2")

    def __init__(self, vae: nn.Module, spec: str = "diffusers", memory_format: torch.memory_format = torch.contiguous_format):
        super().__init__()
        kind = diffusers_kind(vae)
        if kind not in self.classes:
            raise ValueError(f"{type(self).__name__} wraps {', '.join(self.classes)}, not a {kind}: "
                             "ahpa.priors.diffusers_vae.wrap(vae) picks the wrapper of its class")
        self.vae = vae
        self.spec = spec
        self.weights_sha256: str | None = None
        self.levels, self._taps = self._hierarchy(vae)
        self.latent_channels, self.factor = self.levels[-1].channels, self.levels[-1].stride
        self.use_memory_format(memory_format)  # channels_last: faster convolutions on recent GPUs
        frozen(self)

    def _hierarchy(self, vae: nn.Module) -> tuple[tuple[Level, ...], dict[str, nn.Module]]:
        """The levels, fine to coarse with the latent last, and the module whose output each (but the latent) is."""
        cfg = vae.config
        taps: dict[str, nn.Module] = {f"down{i}": b for i, b in enumerate(vae.encoder.down_blocks)}
        taps["mid"] = vae.encoder.mid_block
        return levels_from_config(cfg.block_out_channels, int(cfg.latent_channels)), taps

    @classmethod
    def from_pretrained(cls, where: str | Path, memory_format: torch.memory_format = torch.contiguous_format) -> "DiffusersVAE":
        """Load from a local directory (never touches the network) or a hub id (may download); the class its
        config.json names decides the wrapper (an AutoencoderDC's is a DiffusersDCAE)."""
        vae, sha = load_local(where) if Path(where).expanduser().exists() else load_hub(str(where))
        enc = wrap(vae, spec=f"diffusers:{where}", memory_format=memory_format)
        enc.weights_sha256 = sha
        return enc

    @classmethod
    def from_config(cls, config: dict, memory_format: torch.memory_format = torch.contiguous_format) -> "DiffusersVAE":
        """Randomly initialised weights from a config dict of a supported class (its `_class_name`, AutoencoderKL when
        it names none; other keys starting with '_' are ignored).

        Seed torch beforehand for reproducible weights.
        """
        kind = config.get("_class_name") or "AutoencoderKL"
        if kind not in SUPPORTED:
            raise ValueError(f"config _class_name {kind!r} is not an autoencoder `diffusers:` loads; it loads "
                             f"{', '.join(SUPPORTED)}")
        kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
        return wrap(diffusers_class(kind)(**kwargs), spec="diffusers:<config>", memory_format=memory_format)

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

    def _in_vae_dtype(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(dtype=next(self.vae.parameters()).dtype, memory_format=self.memory_format)

    def _encode(self, x: torch.Tensor, levels: tuple[str, ...]) -> EncoderOutput:
        vae = self.vae
        with self._capture(levels) as features:
            # vae.encoder + quant_conv directly rather than vae.encode: tiling or slicing (if a user
            # enabled them) would run the stages once per tile and the hooks would keep only the last.
            moments = vae.encoder(self._in_vae_dtype(x))  # [B, 2*C_lat, H/f, W/f]
            quant_conv = getattr(vae, "quant_conv", None)  # None when the config sets use_quant_conv=False
            if quant_conv is not None:
                moments = quant_conv(moments)
        mean, logvar = torch.chunk(moments, 2, dim=1)  # [B, 2C, h, w] -> 2 x [B, C, h, w]
        logvar = logvar.clamp(-30.0, 20.0)  # as diffusers' DiagonalGaussianDistribution
        return EncoderOutput(mean=mean, logvar=logvar, features=dict(features))

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        # vae.decode, not the decoder alone: FLUX.2's and SD-VAE's apply post_quant_conv first (DC-AE has none)
        return self.vae.decode(self._in_vae_dtype(z)).sample
