"""External frozen encoders for REPA: any module that maps images to patch tokens.

`ExternalEncoder` resizes images to the encoder's input size, normalises them and pools the
tokens [B, N, C] (square grid) to the DiT token grid. The encoder's token side must be a multiple of the SiT's grid
side G (whole windows of encoder tokens average to each SiT token's patch, as AHPA's own levels must pool:
ahpa.priors.targets.uneven_pooling); an encoder that takes any multiple of its patch as input side runs at the one
whose token side is the multiple of G nearest its own (G where its own is coarser: REPA feeds DINOv2 448x448 images
at 512), and one of a fixed input side whose tokens do not tile the grid is refused. `load_external` builds one from a
`prior.external` spec, KIND:WHERE (ahpa.external_kinds; the built-in kinds, `dinov2:DIR` and
`transformers:DIR`, load through `transformers`, an optional dependency: ahpa.priors.transformers_vit).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ahpa.external_kinds import EXTERNALS, LOADER_CONTRACT, parse_external
from ahpa.plugins import call_loader
from ahpa.priors.base import frozen

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def tiling_side(side: int, grid: int) -> int:
    """The token side an encoder of `side` patch tokens a side runs at for a SiT of grid x grid tokens: its own when a
    multiple of grid, else the multiple of grid nearest it (the smaller on a tie: less arithmetic), grid at least."""
    if side % grid == 0:
        return side
    return max(1, (2 * side + grid - 1) // (2 * grid)) * grid  # round(side / grid), halves down


class ExternalEncoder(nn.Module):
    def __init__(self, module: nn.Module, channels: int, input_size: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 patch_size: int | None = None, origin: str = ""):
        """`patch_size`: the module's patch side in pixels when it takes any input side that is a multiple of it (a
        ViT that interpolates its position embeddings), to run at the side whose tokens tile the SiT's grid; None: it
        takes `input_size` only. `origin`: where input_size, mean and std come from, for the run's set-up message."""
        super().__init__()
        self.module = frozen(module)
        self.channels = channels
        self.input_size = input_size
        self.patch_size = patch_size
        self.origin = origin
        self.spec = ""  # the prior.external it was loaded by (load_external), to name it in messages
        self.flops_per_image = 0.0  # its forward's FLOPs (2 x multiply-adds) per image, counted by setup()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def wrap(cls, module: nn.Module, input_size: int = 224, patch_size: int | None = None) -> "ExternalEncoder":
        """A module that maps normalised images [B, 3, S, S] (S = input_size, ImageNet's mean and std) to tokens
        [B, N, C], its channels C read from one forward of a blank batch; `patch_size` as ExternalEncoder's."""
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
        return cls(module, int(tokens.shape[-1]), input_size, patch_size=patch_size, origin="ImageNet's, ExternalEncoder.wrap's")

    def input_side(self, grid: int) -> int:
        """The input side it runs at for a SiT of grid x grid tokens (tiling_side): its own unless it takes others."""
        if self.patch_size is None:
            return self.input_size
        side = self.input_size // self.patch_size
        return self.input_size if side % grid == 0 else tiling_side(side, grid) * self.patch_size

    @torch.no_grad()
    def forward(self, images: torch.Tensor, grid: int) -> torch.Tensor:
        """images [B, 3, H, W] in [0, 1] -> tokens [B, grid*grid, C]."""
        size = self.input_side(grid)
        maps = self._token_maps(images, size)  # [B, C, s, s]
        if maps.shape[-1] % grid:  # adaptive pooling would copy a token onto several, or average unequal windows
            raise ValueError(self._untiled(size, maps.shape[-1], grid))
        return F.adaptive_avg_pool2d(maps.float(), grid).flatten(2).transpose(1, 2)  # [B, grid*grid, C]

    def _token_maps(self, images: torch.Tensor, size: int) -> torch.Tensor:
        x = F.interpolate(images.float(), size=size, mode="bicubic", align_corners=False)
        tokens = self.module((x - self.mean) / self.std)  # [B, N, C]
        b, n, c = tokens.shape
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"external encoder returned {n} tokens, not a square grid")
        return tokens.transpose(1, 2).reshape(b, c, side, side)  # [B, N, C] -> [B, C, s, s]

    @torch.no_grad()
    def setup(self, grid: int) -> str:
        """Checks, by one forward of a blank image, that the tokens tile a SiT of grid x grid tokens, and says in one
        line what the encoder runs at; where they do not, refuses naming the encoder, the sides and the fix."""
        from torch.utils.flop_counter import FlopCounterMode

        size = self.input_side(grid)
        try:
            # the probe's arithmetic is the encoder's per training image: `ahpa compare` counts it per FLOP
            with FlopCounterMode(display=False) as counter:
                side = self._token_maps(torch.zeros(1, 3, size, size, device=self.mean.device), size).shape[-1]
            self.flops_per_image = float(counter.get_total_flops())
        except Exception as e:  # the model's own error at a side it was not made for: said with what asked it
            if size == self.input_size:
                raise
            raise ValueError(f"{self._name()} does not run at {size}x{size} inputs, the side at which its patch tokens "
                             f"tile the SiT's {grid}x{grid} ({type(e).__name__}: {e}); {self._fix(suggest_patch=False)}") from e
        if self.patch_size is not None and side != size // self.patch_size:
            raise ValueError(f"{self._name()} gives {side}x{side} tokens for {size}x{size} inputs, not one per "
                             f"patch_size={self.patch_size}: give its patch side in pixels, or patch_size=None for a "
                             "module of one input side")
        if side % grid:
            raise ValueError(self._untiled(size, side, grid))
        scaled = f" (its {self.input_size}x{self.input_size} scaled to tile the SiT's grid)" if size != self.input_size else ""
        k = side // grid
        pooled = "the SiT's grid" if k == 1 else f"averaged in {k}x{k} windows to the SiT's {grid}x{grid}"
        mean, std = (tuple(round(v, 4) for v in t.flatten().tolist()) for t in (self.mean, self.std))
        return (f"REPA's encoder {self._name()}: {size}x{size} inputs{scaled}, {side}x{side} patch tokens ({pooled}), "
                f"normalised with mean {mean} std {std} ({self.origin or 'as given'})")

    def _name(self) -> str:
        return self.spec or f"the {type(self.module).__name__} given from Python"

    def _fix(self, suggest_patch: bool) -> str:
        fix = "take a model.preset of larger patch (a coarser grid), or an encoder that takes larger inputs"
        if suggest_patch:
            return fix + (" (a module that takes any multiple of its patch P as input side: ExternalEncoder(module, "
                          "channels, input_size, mean, std, patch_size=P), which runs it at the side that tiles the grid)")
        return fix

    def _untiled(self, size: int, side: int, grid: int) -> str:
        how = (f"fewer than the SiT's {grid}x{grid} tokens: each target would be copied onto several tokens"
               if side < grid else f"not a multiple of the SiT's {grid}x{grid} tokens: targets would be averages over "
               "windows of unequal size")
        return (f"{self._name()} gives {side}x{side} patch tokens for {size}x{size} inputs, {how}, not the tokens' "
                f"patches; {self._fix(suggest_patch=self.patch_size is None)}")


def load_external(spec: str) -> ExternalEncoder:
    """REPA's frozen encoder from a `prior.external` spec, KIND:WHERE, by the loader of its kind (ahpa.external_kinds:
    built in, register_external, or a package's entry point). A loader's module is wrapped (ExternalEncoder.wrap)."""
    kind, where = parse_external(spec)
    what = f"the loader of external encoder kind {kind!r}"
    external = call_loader(EXTERNALS[kind], (where,), what, spec, LOADER_CONTRACT)
    if not isinstance(external, ExternalEncoder):
        try:
            external = ExternalEncoder.wrap(external)
        except ValueError as e:
            raise ValueError(f"{what} returned, for {spec!r}, what REPA cannot align to: {e}") from None
    external.spec = spec
    return frozen(external)
