"""External frozen encoders for REPA: any module that maps images to patch tokens.

`ExternalEncoder` resizes images to the encoder's input size, normalises them and pools the
tokens [B, N, C] (square grid) to the DiT token grid. `load_external` builds one from a
`prior.external` spec, KIND:WHERE (ahpa.external_kinds; the built-in kinds, `dinov2:DIR` and
`transformers:DIR`, load through `transformers`, an optional dependency: ahpa.priors.transformers_vit).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ahpa.external_kinds import EXTERNALS, LOADER_CONTRACT, parse_external
from ahpa.plugins import check_call
from ahpa.priors.base import frozen

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ExternalEncoder(nn.Module):
    def __init__(self, module: nn.Module, channels: int, input_size: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.module = frozen(module)
        self.channels = channels
        self.input_size = input_size
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def wrap(cls, module: nn.Module, input_size: int = 224) -> "ExternalEncoder":
        """A module that maps normalised images [B, 3, S, S] (S = input_size, ImageNet's mean and std) to tokens
        [B, N, C], its channels C read from one forward of a blank batch."""
        if not isinstance(module, nn.Module):
            raise ValueError(f"the external encoder is a {type(module).__name__}; give an nn.Module that maps images "
                             "[B, 3, S, S] to tokens [B, N, C], or an ExternalEncoder")
        frozen(module)
        with torch.no_grad():
            param = next(module.parameters(), None)
            blank = torch.zeros(1, 3, input_size, input_size, device=param.device if param is not None else "cpu")
            tokens = module(blank)
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3:
            got = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"the external encoder returned {got} for images [1, 3, {input_size}, {input_size}]; it "
                             "returns tokens [B, N, C] (patch tokens only: drop a CLS token). For another input size "
                             "or normalisation, pass ExternalEncoder(module, channels, input_size, mean, std)")
        return cls(module, int(tokens.shape[-1]), input_size)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, grid: int) -> torch.Tensor:
        """images [B, 3, H, W] in [0, 1] -> tokens [B, grid*grid, C]."""
        x = F.interpolate(images.float(), size=self.input_size, mode="bicubic", align_corners=False)
        tokens = self.module((x - self.mean) / self.std)  # [B, N, C]
        b, n, c = tokens.shape
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"external encoder returned {n} tokens, not a square grid")
        maps = tokens.transpose(1, 2).reshape(b, c, side, side)  # [B, C, s, s]
        return F.adaptive_avg_pool2d(maps.float(), grid).flatten(2).transpose(1, 2)  # [B, grid*grid, C]


def load_external(spec: str) -> ExternalEncoder:
    """REPA's frozen encoder from a `prior.external` spec, KIND:WHERE, by the loader of its kind (ahpa.external_kinds:
    built in, register_external, or a package's entry point). A loader's module is wrapped (ExternalEncoder.wrap)."""
    kind, where = parse_external(spec)
    loader = EXTERNALS[kind]
    what = f"the loader of external encoder kind {kind!r}"
    check_call(loader, (where,), what, LOADER_CONTRACT)  # an entry point's, loaded just now
    try:
        external = loader(where)
    except (ValueError, OSError, ImportError):  # say what is wrong already (a folder that moved, a model refused)
        raise
    except Exception as e:  # any other error of the user's loader: named, not a traceback from inside ahpa
        raise ValueError(f"{what} failed on {spec!r}: {type(e).__name__}: {e}") from e
    if isinstance(external, ExternalEncoder):
        return frozen(external)
    try:
        return ExternalEncoder.wrap(external)
    except ValueError as e:
        raise ValueError(f"{what} returned, for {spec!r}, what REPA cannot align to: {e}") from None
