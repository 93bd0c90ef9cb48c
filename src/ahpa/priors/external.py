"""External frozen encoders for REPA: any module that maps images to patch tokens.

`ExternalEncoder` resizes images to the encoder's input size, normalises them and pools the
tokens [B, N, C] (square grid) to the DiT token grid. `dinov2:DIR` loads DINOv2 from a local
directory through `transformers` (an optional dependency).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ahpa.config import shown
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


class _Dinov2Tokens(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).last_hidden_state[:, 1:]  # drop the CLS token -> [B, N, C]


def load_dinov2(path: str | Path, spec: str):
    """transformers' Dinov2Model from a local save_pretrained directory (never a download)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        hub = "" if path.is_absolute() or str(path).count("/") != 1 else (
            f"; a hub id is not read here (nothing downloads during training), so if {str(path)!r} is one, ")
        raise FileNotFoundError(
            f"DINOv2 directory {shown(path)} (from {spec!r}) does not exist{hub or '; '}"
            "make the folder once where the hub is reachable: python -c \"from transformers import Dinov2Model as M; "
            f"M.from_pretrained('facebook/dinov2-base').save_pretrained('{path}')\" (REPA's B/2 and XL/2 use "
            "ViT-B/14, dinov2-base)")
    try:
        from transformers import Dinov2Model
    except ImportError as e:
        raise ImportError(f"{spec!r} needs the `transformers` package: pip install transformers (the dinov2 extra: "
                          "pip install -e '.[dinov2]' in a checkout)") from e
    return Dinov2Model.from_pretrained(str(path), local_files_only=True)


def load_external(spec: str) -> ExternalEncoder:
    kind, _, where = spec.partition(":")
    if kind != "dinov2" or not where:
        raise ValueError(f"external encoder spec {spec!r} is not dinov2:DIR")
    model = load_dinov2(where, spec)
    # register tokens (DINOv2 with registers) would also need dropping; plain DINOv2 has none
    return ExternalEncoder(_Dinov2Tokens(model), model.config.hidden_size, input_size=224)
