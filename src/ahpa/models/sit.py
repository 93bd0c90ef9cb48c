"""SiT backbone: a Diffusion Transformer with adaLN-Zero conditioning (DiT / SiT layout).

`forward(x, t, y, taps)` returns the predicted velocity and the hidden tokens after the blocks
named in `taps` (1-based block indices, as REPA counts its "encoder depth"). The alignment heads
live outside this module, so an exported SiT is exactly a vanilla SiT.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# name -> (hidden size, depth, heads)
SIZES = {
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}
PATCHES = (1, 2, 4)
POS_EMBED_ORDERS = ("hw", "wh")


@dataclass
class SiTConfig:
    input_size: int = 32  # latent side
    in_channels: int = 4  # latent channels
    patch_size: int = 2
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    num_classes: int = 1000  # class index num_classes is the null class for guidance
    qk_norm: bool = False
    # Conventions of released checkpoints (ahpa.models.convert); the defaults are ahpa's own.
    t_scale: float = 1000.0  # t in [0, 1] is multiplied by this before the sinusoid (SiT / REPA feed t as is: 1.0)
    pos_embed_order: str = "hw"  # first half of the sin-cos channels encodes the row ("hw") or the column ("wh": DiT / MAE)

    @classmethod
    def preset(cls, name: str, **kw) -> "SiTConfig":
        """'S/2', 'B/1', 'XL/2', ... (size/patch)."""
        size, _, patch = name.partition("/")
        if size not in SIZES or not patch.isdigit() or int(patch) not in PATCHES:
            valid = [f"{s}/{p}" for s in SIZES for p in PATCHES]
            raise ValueError(f"unknown SiT preset {name!r}; valid presets: {', '.join(valid)}")
        hidden, depth, heads = SIZES[size]
        return cls(hidden_size=hidden, depth=depth, num_heads=heads, patch_size=int(patch), **kw)

    def validate(self) -> None:
        if self.input_size % self.patch_size:
            raise ValueError(
                f"latent side {self.input_size} is not divisible by the patch size {self.patch_size} "
                f"(image resolution must be a multiple of VAE factor x patch)"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden size {self.hidden_size} is not divisible by {self.num_heads} heads")
        if self.pos_embed_order not in POS_EMBED_ORDERS:
            raise ValueError(f"unknown pos_embed_order {self.pos_embed_order!r}; valid orders: {', '.join(POS_EMBED_ORDERS)}")

    @property
    def grid(self) -> int:
        return self.input_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid**2

    def to_dict(self) -> dict:
        return asdict(self)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # x [B, N, D]; shift/scale [B, D] broadcast over tokens
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of t [B] -> [B, dim] (fp32)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def sincos_pos_embed(dim: int, grid: int, order: str = "hw") -> torch.Tensor:
    """Fixed 2D sin-cos position embedding [grid*grid, dim], tokens in row-major order.

    order "hw": channels [0, dim/2) encode the row, [dim/2, dim) the column (ahpa's layout); "wh": the
    column first, which is what MAE / DiT / SiT / REPA compute (their numpy meshgrid returns the column
    coordinate first).
    """
    coords = torch.arange(grid, dtype=torch.float64)
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")

    def one_axis(pos: torch.Tensor, d: int) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2.0))
        out = pos.reshape(-1)[:, None] * omega[None]  # [G*G, d/2]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    first, second = (gy, gx) if order == "hw" else (gx, gy)
    return torch.cat([one_axis(first, dim // 2), one_axis(second, dim // 2)], dim=1).float()


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, freq_dim: int = 256, t_scale: float = 1000.0):
        super().__init__()
        self.freq_dim = freq_dim
        self.t_scale = t_scale
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        # t in [0, 1]; scaled (by 1000 by default) so the sinusoid frequencies resolve it as well as DiT's
        # integer steps. Converted SiT / REPA checkpoints were trained on t as is (t_scale = 1).
        return self.mlp(timestep_embedding(t * self.t_scale, self.freq_dim).to(self.mlp[0].weight.dtype))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qk_norm: bool):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        head_dim = dim // heads
        self.q_norm = nn.LayerNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # [3, B, H, N, Dh]
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = F.scaled_dot_product_attention(q, k, v)  # [B, H, N, Dh]
        return self.proj(x.transpose(1, 2).reshape(b, n, d))  # [B, N, D]


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, qk_norm: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads, qk_norm)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)  # 6 x [B, D]
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        x = x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # 2 x [B, D]
        return self.linear(modulate(self.norm_final(x), shift, scale))  # [B, N, D] -> [B, N, p*p*C]


class SiT(nn.Module):
    def __init__(self, cfg: SiTConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        d, p = cfg.hidden_size, cfg.patch_size
        self.x_embedder = nn.Conv2d(cfg.in_channels, d, kernel_size=p, stride=p)
        self.t_embedder = TimestepEmbedder(d, t_scale=cfg.t_scale)
        # one extra row: the null class used for label dropout and classifier-free guidance
        self.y_embedder = nn.Embedding(cfg.num_classes + 1, d)
        self.register_buffer("pos_embed", sincos_pos_embed(d, cfg.grid, cfg.pos_embed_order)[None], persistent=False)
        self.blocks = nn.ModuleList(SiTBlock(d, cfg.num_heads, cfg.mlp_ratio, cfg.qk_norm) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(d, p, cfg.in_channels)
        # activation checkpointing of the first N blocks (set_activation_checkpointing): a training-time
        # memory/compute trade, not architecture, so it lives here and not in SiTConfig (exports never carry it)
        self.checkpoint_blocks = 0
        self.initialize_weights()

    @property
    def null_class(self) -> int:
        return self.cfg.num_classes

    def initialize_weights(self) -> None:
        def basic(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

        self.apply(basic)
        # patch embedding initialised like a linear layer (DiT)
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.y_embedder.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every residual branch starts as the identity
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        # zero output layer: the initial prediction is 0
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def set_activation_checkpointing(self, blocks: int) -> None:
        """Recompute the activations of the first `blocks` SiT blocks in the backward pass (-1 = all, 0 = none)."""
        if blocks < -1 or blocks > self.cfg.depth:
            raise ValueError(f"activation checkpointing of {blocks} blocks: the model has {self.cfg.depth}; "
                             f"give 0 (off), 1..{self.cfg.depth} (the first N blocks) or -1 (all)")
        self.checkpoint_blocks = self.cfg.depth if blocks == -1 else blocks

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, p*p*C] (each token's patch, channel fastest, as DiT) -> [B, C, H, W]."""
        b, p, c, g = x.shape[0], self.cfg.patch_size, self.cfg.in_channels, self.cfg.grid
        x = x.reshape(b, g, g, p, p, c)  # [B, gh, gw, ph, pw, C]
        x = torch.einsum("nhwpqc->nchpwq", x)
        # [B, C, H, W]; contiguous: with p = 1 the reshape would return a view of the permuted tokens (p > 1 copies
        # anyway), and FSDP2 warns on every step about a root module returning a view
        return x.reshape(b, c, g * p, g * p).contiguous()

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, taps: tuple[int, ...] = ()
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x [B, C, H, W] latents, t [B] in [0, 1], y [B] class ids (num_classes = null).

        Returns (velocity [B, C, H, W], [hidden tokens [B, N, D] after block d for d in taps, in block order]).
        """
        # [B, D, g, g] -> [B, N = g*g, D], row-major over the grid: the order of the alignment targets
        # (ahpa.priors.targets.pool_to_grid, the cache's token maps), so token i of both is the same patch
        h = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)  # [B, D]
        hidden = []  # [B, N, D] after each block in taps
        recompute = self.checkpoint_blocks if torch.is_grad_enabled() else 0  # nothing to save without a backward
        for i, block in zip(range(1, len(self.blocks) + 1), self.blocks):  # dynamo of torch 2.4 breaks on enumerate(start=)
            if i <= recompute:
                # non-reentrant: the variant DDP, FSDP and torch.compile support. A block draws no random numbers,
                # so the RNG state need not be saved and restored around the recomputation.
                h = checkpoint(block, h, c, use_reentrant=False, preserve_rng_state=False)
            else:
                h = block(h, c)
            if i in taps:
                hidden.append(h)
        return self.unpatchify(self.final_layer(h, c)), hidden

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_image(self) -> float:
        """Multiply-adds x 2 of one forward pass (the MFU convention: training = 3x this): the per-token layers
        (attention's projections, the MLP, the patch embedding and the final linear) and attention's two matmuls. The
        per-image conditioning (adaLN: 0.2% of XL/2's, t and y embeddings) and the elementwise work are left out."""
        cfg = self.cfg
        n, d = cfg.num_tokens, cfg.hidden_size
        per_block = 2 * n * (4 * d * d + 2 * d * int(d * cfg.mlp_ratio)) + 2 * 2 * n * n * d
        embed = 2 * n * d * cfg.in_channels * cfg.patch_size**2
        final = 2 * n * d * cfg.patch_size**2 * cfg.in_channels
        return float(cfg.depth * per_block + embed + final)
