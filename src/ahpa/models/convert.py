"""Released DiT / SiT / REPA checkpoints -> our SiT: a documented key mapping and time convention.

The three public code bases (facebookresearch/DiT `models.py`, willisma/SiT `models.py`, sihyun-yu/REPA
`models/sit.py`) share one backbone; ours computes the same function once the names are mapped:

    public key                                   ahpa key
    x_embedder.proj.{weight,bias}                x_embedder.{weight,bias}       timm PatchEmbed wraps the conv
    y_embedder.embedding_table.weight            y_embedder.weight              row num_classes = null class in both
    t_embedder.mlp.{0,2}.{weight,bias}           same
    blocks.N.attn.{qkv,proj,q_norm,k_norm}.*     same                           timm Attention, same head split
    blocks.N.mlp.{fc1,fc2}.*                     same                           timm Mlp, tanh GELU
    blocks.N.adaLN_modulation.1.*                same                           shift, scale, gate (msa), (mlp)
    final_layer.adaLN_modulation.1.*             same
    final_layer.linear.{weight,bias}             same; with learn_sigma the first C of 2C channels (see below)
    pos_embed                                    dropped: checked equal to sincos_pos_embed(order "wh")
    projectors.*                 (REPA)          dropped: training-only alignment heads
    decoder_blocks.M             (REPA legacy)   blocks.(M + number of blocks.*), as REPA's --legacy does

learn_sigma (DiT, SiT-XL/2): the final linear writes p*p*2C values per token, ordered (p, q, channel) with
the channel fastest (unpatchify reshapes to [N, h, w, p, q, 2C]); channels [0, C) are the prediction, [C, 2C)
the variance. So the rows kept are those with channel < C in every (p, q) position, not the first p*p*C rows.

Time and sign (our convention: t=0 data, t=1 noise, x_t = (1-t) x + t eps, v = dx_t/dt = eps - x):
- REPA: the same convention, t in [0, 1] fed to the sinusoid as is -> t_scale = 1, nothing else.
- SiT: t=0 noise, t=1 data (ICPlan: x_t = t x1 + (1-t) x0, x1 data), target x1 - x0, t fed as is. So
  v_ours(x, t) = -v_SiT(x, 1 - t). Both are folded into the weights (convention "ahpa", the default): the
  sign into final_layer.linear, the reversal into t_embedder.mlp.0 (the sinusoid of 1 - t is a fixed linear
  map of the sinusoid of t). Exact in real arithmetic; ~1e-6 relative in fp32. SiT's GVP path reversed is our
  "cosine" path; its VP path has no counterpart here.
- DiT: predicts noise (epsilon) on a discrete 1000-step VP schedule, t = integer step index (0 = least
  noise). No weight change makes that a velocity field on our path, so DiT converts with convention
  "native" only: forward(x, t=step index, y) returns DiT's epsilon (first C channels), t_scale = 1.
  Our samplers integrate velocities and would sample such a model wrongly.

Reading the file (weights-only loading, unwrapping training dicts) is ahpa.models.public_checkpoint;
the entry points load_public_checkpoint and convert_checkpoint here take a path or a state dict.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ahpa.models.public_checkpoint import read_checkpoint, strip_wrappers, unwrap
from ahpa.models.sit import SIZES, SiT, SiTConfig, sincos_pos_embed

LAYOUTS = ("dit", "sit", "repa", "auto")
CONVENTIONS = ("ahpa", "native")
_RENAMES = {
    "x_embedder.proj.weight": "x_embedder.weight",
    "x_embedder.proj.bias": "x_embedder.bias",
    "y_embedder.embedding_table.weight": "y_embedder.weight",
}
_DROPPED_PREFIXES = ("projectors.",)


@dataclass
class Conversion:
    """A public state dict mapped onto our SiT: config, our state dict, and what was done to get there."""

    layout: str
    convention: str
    config: SiTConfig
    state: dict[str, torch.Tensor]
    dropped: list[str] = field(default_factory=list)  # public keys not carried over
    notes: list[str] = field(default_factory=list)  # human-readable record of every transformation

    def build(self) -> SiT:
        model = SiT(self.config)
        model.load_state_dict(self.state, strict=True)
        return model.eval()


# ---- layout detection and config inference ----

def detect_layout(state: dict, hint: str = "", args=None) -> str:
    """'repa' when REPA's heads (or legacy decoder blocks, or its training args) are there; otherwise
    the file name must say DiT or SiT, since those two layouts have identical keys."""
    if "x_embedder.weight" in state and "y_embedder.weight" in state:
        raise ValueError("this state dict is already in ahpa's layout: load it with SiT.load_state_dict (or `ahpa sample --model`)")
    if "x_embedder.proj.weight" not in state:
        raise ValueError("not a DiT / SiT / REPA state dict: no 'x_embedder.proj.weight' key "
                         f"(first keys: {sorted(state)[:6]})")
    if any(k.startswith(("projectors.", "decoder_blocks.")) for k in state) or hasattr(args, "enc_type"):
        return "repa"
    name = Path(hint).name.lower()
    if re.search(r"(^|[^a-z])dit", name):
        return "dit"
    if re.search(r"(^|[^a-z])sit", name):
        return "sit"
    raise ValueError(
        "cannot tell a DiT checkpoint from a SiT one (same keys, different time and prediction conventions): "
        "name the layout, layout='dit' or 'sit' (`ahpa convert --layout dit|sit`)"
    )


def _renumber_legacy(state: dict) -> tuple[dict, list[str]]:
    # REPA's early checkpoints split the stack into blocks.0..d-1 and decoder_blocks.0..; its --legacy
    # flag renames decoder_blocks.M to blocks.(M + d), d = the alignment depth = the number of blocks.*.
    if not any(k.startswith("decoder_blocks.") for k in state):
        return state, []
    depth = len({int(k.split(".")[1]) for k in state if k.startswith("blocks.")})
    out = {}
    for k, v in state.items():
        if k.startswith("decoder_blocks."):
            parts = k.split(".")
            k = ".".join(["blocks", str(int(parts[1]) + depth), *parts[2:]])
        out[k] = v
    return out, [f"legacy REPA layout: decoder_blocks.M renamed blocks.(M + {depth})"]


def _need(state: dict, key: str, ndim: int) -> torch.Tensor:
    if key not in state:
        raise ValueError(f"checkpoint has no {key!r}, which every DiT / SiT / REPA state dict holds")
    v = state[key]
    if v.ndim != ndim:
        raise ValueError(f"checkpoint key {key!r} has shape {tuple(v.shape)}; expected {ndim} dimensions")
    return v


def infer_config(state: dict, *, preset: str | None = None, input_size: int | None = None,
                 num_heads: int | None = None) -> SiTConfig:
    """The SiTConfig a public state dict was built with (sizes from shapes; heads from `preset`,
    `num_heads`, the qk-norm shape, or the standard size table)."""
    hidden, in_ch, p, _ = _need(state, "x_embedder.proj.weight", 4).shape  # [D, C, p, p]
    depth = len({int(k.split(".")[1]) for k in state if k.startswith("blocks.")})
    rows = _need(state, "y_embedder.embedding_table.weight", 2).shape[0]
    mlp_hidden = _need(state, "blocks.0.mlp.fc1.weight", 2).shape[0]
    qk = "blocks.0.attn.q_norm.weight" in state
    if input_size is None:
        if "pos_embed" not in state:
            raise ValueError("checkpoint has no 'pos_embed' to read the token grid from: pass input_size (latent side)")
        tokens = state["pos_embed"].shape[-2]
        grid = math.isqrt(tokens)
        if grid * grid != tokens:
            raise ValueError(f"checkpoint key 'pos_embed' has {tokens} tokens, not a square grid")
        input_size = grid * p
    heads = num_heads
    if qk:
        head_dim = state["blocks.0.attn.q_norm.weight"].shape[0]
        heads = heads or hidden // head_dim
    if preset is not None:
        cfg = SiTConfig.preset(preset, input_size=input_size, in_channels=in_ch, num_classes=rows - 1, qk_norm=qk)
        cfg.mlp_ratio = mlp_hidden / cfg.hidden_size
        if heads is not None and cfg.num_heads != heads:
            raise ValueError(f"preset {preset} has {cfg.num_heads} heads, but the checkpoint's qk-norm (or num_heads) says {heads}")
        return cfg  # sizes that disagree with the checkpoint are reported key by key by the shape check
    if heads is None:
        by_size = {(h, d): n for h, d, n in SIZES.values()}
        if (hidden, depth) not in by_size:
            raise ValueError(f"hidden size {hidden} and depth {depth} match no standard size; pass preset or num_heads")
        heads = by_size[(hidden, depth)]
    return SiTConfig(input_size=input_size, in_channels=in_ch, patch_size=p, hidden_size=hidden, depth=depth,
                     num_heads=heads, mlp_ratio=mlp_hidden / hidden, num_classes=rows - 1, qk_norm=qk)


# ---- the transformations ----

def keep_prediction_channels(weight: torch.Tensor, bias: torch.Tensor, patch: int, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """final_layer.linear of a learn_sigma model [p*p*2C, D] -> [p*p*C, D]: the prediction half of every pixel."""
    d = weight.shape[1]
    w = weight.reshape(patch, patch, 2 * channels, d)[:, :, :channels]  # [p, q, C, D]: channel is fastest
    b = bias.reshape(patch, patch, 2 * channels)[:, :, :channels]  # [p, q, C]
    return w.reshape(patch * patch * channels, d), b.reshape(-1)


def time_reversal_matrix(freq_dim: int, t_scale: float = 1.0) -> torch.Tensor:
    """M [freq_dim, freq_dim], float64, with sinusoid(t_scale * (1 - t)) = M @ sinusoid(t_scale * t).

    With u = t_scale t, a = t_scale f: cos(a - f u) = cos a cos(f u) + sin a sin(f u) and
    sin(a - f u) = sin a cos(f u) - cos a sin(f u). M is a reflection (M @ M = I), so the same matrix maps back.
    """
    if freq_dim % 2:
        raise ValueError(f"time_reversal_matrix needs an even frequency dimension, got {freq_dim}")
    half = freq_dim // 2
    # the model's frequencies are computed in float32: use exactly those values
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half).double()
    c, s = torch.cos(t_scale * freqs), torch.sin(t_scale * freqs)
    top = torch.cat([torch.diag(c), torch.diag(s)], dim=1)  # rows: cos(f (1 - t))
    bottom = torch.cat([torch.diag(s), -torch.diag(c)], dim=1)  # rows: sin(f (1 - t))
    return torch.cat([top, bottom], dim=0)


def reverse_time(state: dict, t_scale: float = 1.0) -> dict:
    """Our state dict S computing v(x, t) -> one computing -v(x, 1 - t) (SiT's convention <-> ours)."""
    out = dict(state)
    w0 = state["t_embedder.mlp.0.weight"]  # [D, freq_dim]
    m = time_reversal_matrix(w0.shape[1], t_scale)
    out["t_embedder.mlp.0.weight"] = (w0.double() @ m).to(w0.dtype)
    out["final_layer.linear.weight"] = -state["final_layer.linear.weight"]
    out["final_layer.linear.bias"] = -state["final_layer.linear.bias"]
    return out


def _check_pos_embed(value: torch.Tensor, cfg: SiTConfig) -> str:
    """Which sin-cos order a stored pos_embed [1, N, D] is; an error when it is neither."""
    expected_shape = (1, cfg.num_tokens, cfg.hidden_size)
    if tuple(value.shape) != expected_shape and tuple(value.shape) != expected_shape[1:]:
        raise ValueError(f"checkpoint key 'pos_embed' has shape {tuple(value.shape)} but the model expects {expected_shape} "
                         "(tokens from input_size / patch size, hidden size)")
    tol = max(1e-5, 8 * torch.finfo(value.dtype).eps)  # the stored dtype's rounding (bf16 / fp16 files)
    value = value.float().reshape(expected_shape[1:])
    errors = {}
    for order in ("wh", "hw"):
        errors[order] = float((value - sincos_pos_embed(cfg.hidden_size, cfg.grid, order)).abs().max())
        if errors[order] <= tol:
            return order
    raise ValueError(
        f"checkpoint key 'pos_embed' is not the fixed 2D sin-cos embedding (max deviation {errors['wh']:.3g} from "
        f"the DiT order, {errors['hw']:.3g} from ours): this model learned its position embedding, which ahpa's SiT cannot hold"
    )


def convert_state_dict(state: dict, layout: str, *, convention: str = "ahpa", preset: str | None = None,
                       input_size: int | None = None, num_heads: int | None = None, hint: str = "",
                       args=None) -> Conversion:
    """Map a public state dict (already unwrapped) onto our SiT; see the module doc for the rules."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown checkpoint layout {layout!r}; valid layouts: {', '.join(LAYOUTS)}")
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown convention {convention!r}; valid conventions: {', '.join(CONVENTIONS)}")
    state = strip_wrappers(state)
    if layout == "auto":
        layout = detect_layout(state, hint, args)
    if layout == "dit" and convention == "ahpa":
        raise ValueError(
            "DiT predicts noise (epsilon) at discrete step indices 0..999 of a VP schedule, not a velocity on the "
            "linear path: no weight mapping makes it sample with ahpa's samplers. Pass convention='native' to load "
            "the weights as DiT uses them (forward(x, step index, y) -> epsilon)"
        )
    state, notes = _renumber_legacy(state)
    cfg = infer_config(state, preset=preset, input_size=input_size, num_heads=num_heads)
    cfg.t_scale = 1.0  # all three feed t (SiT / REPA: [0, 1]; DiT: the step index) to the sinusoid as is
    dropped = sorted(k for k in state if k.startswith(_DROPPED_PREFIXES))
    if dropped:
        notes.append(f"dropped {len(dropped)} REPA projector tensors (training-only)")

    ours: dict[str, torch.Tensor] = {}
    pos_embed = None
    for k, v in state.items():
        if k.startswith(_DROPPED_PREFIXES):
            continue
        if k == "pos_embed":
            pos_embed = v
            dropped.append(k)
            continue
        ours[_RENAMES.get(k, k)] = v.detach().float()  # fp32, whatever the file stored (bf16 / fp16 exports)

    p, c = cfg.patch_size, cfg.in_channels
    w, b = ours.get("final_layer.linear.weight"), ours.get("final_layer.linear.bias")
    if w is not None and b is not None and w.shape[0] == 2 * p * p * c:
        if layout == "repa":  # converted as REPA, a SiT file would skip the time reversal and sample wrongly
            raise ValueError(f"REPA checkpoints have no variance channels (C = {c} output channels), but "
                             f"final_layer.linear has {2 * c} (learn_sigma): this looks like a SiT or DiT checkpoint; "
                             "convert it with --layout sit|dit (layout='sit' or 'dit')")
        ours["final_layer.linear.weight"], ours["final_layer.linear.bias"] = keep_prediction_channels(w, b, p, c)
        notes.append(f"learn_sigma: kept prediction channels 0..{c - 1} of {2 * c} in final_layer.linear")
    elif w is not None and w.shape[0] != p * p * c:
        raise ValueError(f"checkpoint key 'final_layer.linear.weight' has shape {tuple(w.shape)}; expected "
                         f"({p * p * c}, {w.shape[1]}) or, with learn_sigma, ({2 * p * p * c}, {w.shape[1]})")
    _check_against(ours, cfg)  # sizes first: a wrong preset is reported on the first weight it breaks
    if pos_embed is not None:
        cfg.pos_embed_order = _check_pos_embed(pos_embed, cfg)
        notes.append(f"pos_embed: fixed sin-cos, order {cfg.pos_embed_order!r}; recomputed, not stored")
    else:
        cfg.pos_embed_order = "wh"  # what all three code bases compute
        notes.append("no pos_embed in the checkpoint: assumed the public sin-cos order 'wh'")

    if layout == "sit" and convention == "ahpa":
        ours = reverse_time(ours)
        notes.append("SiT time convention (t=1 data) reversed and velocity negated, folded into "
                     "t_embedder.mlp.0 and final_layer.linear")
    return Conversion(layout, convention, cfg, ours, dropped, notes)


def _check_against(ours: dict, cfg: SiTConfig) -> None:
    """Every key present, none extra, every shape as SiT(cfg) expects; errors name the public key too."""
    expected = _expected_shapes(cfg)
    public = {v: k for k, v in _RENAMES.items()}
    for k, shape in expected.items():
        if k not in ours:
            raise ValueError(f"checkpoint has no {public.get(k, k)!r} (ahpa key {k!r}, shape {shape}) for a model of {_describe(cfg)}")
        got = tuple(ours[k].shape)
        if got != shape:
            raise ValueError(f"checkpoint key {public.get(k, k)!r} has shape {got}, but ahpa's SiT ({_describe(cfg)}) "
                             f"expects {shape} for {k!r}: wrong preset, input size or layout?")
    extra = sorted(set(ours) - set(expected))
    if extra:
        raise ValueError(f"checkpoint keys with no place in ahpa's SiT ({len(extra)}): {', '.join(extra[:6])}"
                         + (" ..." if len(extra) > 6 else "") + " (a different architecture?)")


def _expected_shapes(cfg: SiTConfig) -> dict[str, tuple[int, ...]]:
    # Built on the meta device: an XL/2 is 675M parameters, and only the shapes are needed here.
    with torch.device("meta"):
        model = SiT(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _describe(cfg: SiTConfig) -> str:
    return (f"hidden {cfg.hidden_size}, depth {cfg.depth}, patch {cfg.patch_size}, latent {cfg.in_channels}x"
            f"{cfg.input_size}x{cfg.input_size}, {cfg.num_classes} classes")


def load_public_checkpoint(path_or_state, layout: str = "auto", *, convention: str = "ahpa",
                           preset: str | None = None, input_size: int | None = None, num_heads: int | None = None,
                           use: str = "ema", allow_pickle: bool = False) -> SiT:
    """Our SiT (eval mode, CPU, fp32) from a released DiT / SiT / REPA checkpoint file or state dict.

    With convention "ahpa" (default) the model follows our time convention and samples with ahpa's samplers
    (SiT and REPA layouts); "native" keeps the public model's own t and output (needed for DiT). `preset`
    ('XL/2') checks the sizes; without it they are read from the shapes.
    """
    return convert_checkpoint(path_or_state, layout, convention=convention, preset=preset, input_size=input_size,
                              num_heads=num_heads, use=use, allow_pickle=allow_pickle).build()


def convert_checkpoint(path_or_state, layout: str = "auto", *, convention: str = "ahpa", preset: str | None = None,
                       input_size: int | None = None, num_heads: int | None = None, use: str = "ema",
                       allow_pickle: bool = False) -> Conversion:
    """As load_public_checkpoint, but returns the Conversion (config, state dict, notes) without building."""
    if isinstance(path_or_state, (str, Path)):
        state, info = read_checkpoint(path_or_state, use=use, allow_pickle=allow_pickle)
        hint = str(path_or_state)
    else:
        state, info = unwrap(path_or_state, use=use, where="state dict")
        hint = ""
    conv = convert_state_dict(state, layout, convention=convention, preset=preset, input_size=input_size,
                              num_heads=num_heads, hint=hint, args=info["args"])
    if info["entry"] is not None:
        conv.notes.insert(0, f"weights taken from the checkpoint's {info['entry']!r} entry")
    return conv
