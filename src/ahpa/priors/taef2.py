"""TAEF2: the tiny autoencoder of the FLUX.2 latent space, written from shared/weights/taef2/ARCHITECTURE.md.

Both networks are plain `nn.Sequential`s so that the published state dicts (keys are Sequential
indices) load with strict key and shape matching. The encoder's alignment levels are outputs of
fixed Sequential indices, captured while iterating the modules of the one forward that also
produces the latent (no hooks to leak).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ahpa.priors.base import LATENT, EncoderOutput, Level, PriorEncoder, frozen, sha256_file

ENCODER_FILE = "taef2_encoder.pth"
DECODER_FILE = "taef2_decoder.pth"
WIDTH = 64
LATENT_CHANNELS = 32

# level name -> index of the encoder module whose output it is; ordered fine to coarse, latent last.
LEVEL_INDEX = {"stage1": 1, "stage2": 5, "stage3": 9, "stage4": 13}
LEVELS = (
    Level("stage1", WIDTH, 1),
    Level("stage2", WIDTH, 2),
    Level("stage3", WIDTH, 4),
    Level("stage4", WIDTH, 8),
    Level(LATENT, LATENT_CHANNELS, 8),
)


def _conv(c_in: int, c_out: int, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=bias)


class Block(nn.Module):
    """Residual block: ReLU(conv(x') + x'), with x' = x + pool(x) when the block has a pool branch.

    Attribute names (`conv`, `pool`) and their inner Sequential indices are fixed by the state dict.
    """

    def __init__(self, c: int, pool: bool = False):
        super().__init__()
        self.conv = nn.Sequential(_conv(c, c), nn.ReLU(), _conv(c, c), nn.ReLU(), _conv(c, c))
        # The pool branch is a per-pixel MLP with a GroupNorm, i.e. a cheap global-statistics mix
        # used only in the deepest (1/8) blocks.
        self.pool = (
            nn.Sequential(
                nn.Conv2d(c, 4 * c, 1, bias=False),
                nn.GroupNorm(4, 4 * c),
                nn.ReLU(),
                nn.Conv2d(4 * c, c, 1, bias=False),
            )
            if pool
            else None
        )
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return self.fuse(self.conv(x) + x)  # the skip is identity: channels never change inside a block


class SoftClamp(nn.Module):
    """x -> 3 tanh(x / 3): keeps out-of-distribution latents (e.g. from a sampler) in the decoder's range."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


def build_encoder() -> nn.Sequential:
    c = WIDTH
    return nn.Sequential(
        _conv(3, c), Block(c),  # 0-1: full resolution
        _conv(c, c, stride=2, bias=False), Block(c), Block(c), Block(c),  # 2-5: 1/2
        _conv(c, c, stride=2, bias=False), Block(c), Block(c), Block(c),  # 6-9: 1/4
        _conv(c, c, stride=2, bias=False), Block(c, True), Block(c, True), Block(c, True),  # 10-13: 1/8
        _conv(c, LATENT_CHANNELS),  # 14: latent
    )  # fmt: skip


def build_decoder() -> nn.Sequential:
    c = WIDTH
    return nn.Sequential(
        SoftClamp(), _conv(LATENT_CHANNELS, c), nn.ReLU(),  # 0-2
        Block(c, True), Block(c, True), Block(c, True),  # 3-5: 1/8
        nn.Upsample(scale_factor=2), _conv(c, c, bias=False), Block(c), Block(c), Block(c),  # 6-10: 1/4
        nn.Upsample(scale_factor=2), _conv(c, c, bias=False), Block(c), Block(c), Block(c),  # 11-15: 1/2
        nn.Upsample(scale_factor=2), _conv(c, c, bias=False), Block(c),  # 16-18: full resolution
        _conv(c, 3),  # 19: RGB in about [0, 1]
    )  # fmt: skip


def load_strict(module: nn.Module, path: Path) -> None:
    """Load a state-dict file into `module`, failing with every missing/unexpected key and shape mismatch named."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a pickled model, a truncated file, ...: say which file and what it should be
        raise ValueError(f"{path} is not a readable PyTorch state dict ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, expected a state dict of the TAEF2 Sequential")
    expected = module.state_dict()
    problems = [f"missing key {k!r}" for k in expected if k not in state]
    problems += [f"unexpected key {k!r}" for k in state if k not in expected]
    problems += [
        f"{k!r} has shape {tuple(state[k].shape)}, expected {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; ... and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise ValueError(f"{path} does not match the TAEF2 architecture: {shown}")
    # The files hold fp16 tensors; copying into the fp32 modules upcasts them (exactly).
    module.load_state_dict(state, strict=True)


class TAEF2Encoder(PriorEncoder):
    """Frozen TAEF2 encoder (levels stage1..stage4 + latent) and its decoder. Images in [0, 1]."""

    levels = LEVELS
    latent_channels = LATENT_CHANNELS
    factor = 8
    stochastic = False  # a deterministic latent: no posterior noise is drawn for it

    def __init__(self, spec: str = "taef2"):
        super().__init__()
        self.spec = spec
        self.weights_sha256: str | None = None
        self.encoder = build_encoder()
        self.decoder = build_decoder()

    @classmethod
    def from_dir(cls, path: str | Path) -> "TAEF2Encoder":
        path = Path(path)
        files = {name: path / name for name in (ENCODER_FILE, DECODER_FILE)}
        for f in files.values():
            if not f.is_file():
                raise FileNotFoundError(
                    f"TAEF2 weights file {str(f)!r} not found (a TAEF2 directory holds {ENCODER_FILE} and {DECODER_FILE})"
                )
        enc = cls(spec=f"taef2:{path}")
        load_strict(enc.encoder, files[ENCODER_FILE])
        load_strict(enc.decoder, files[DECODER_FILE])
        enc.weights_sha256 = sha256_file(files[ENCODER_FILE])
        return frozen(enc)

    def to_input_range(self, images: torch.Tensor) -> torch.Tensor:
        return images  # TAE was trained on [0, 1] images

    def from_output_range(self, images: torch.Tensor) -> torch.Tensor:
        return images.clamp(0, 1)

    def _encode(self, x: torch.Tensor, levels: tuple[str, ...]) -> EncoderOutput:
        wanted = {LEVEL_INDEX[name]: name for name in levels}
        x = x.to(next(self.encoder.parameters()).dtype)  # follow the module if it was cast to half
        features: dict[str, torch.Tensor] = {}
        for i, module in enumerate(self.encoder):
            x = module(x)
            if i in wanted:
                features[wanted[i]] = x
        return EncoderOutput(mean=x, logvar=None, features=features)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z.to(next(self.decoder.parameters()).dtype))
