"""Released DiT / SiT / REPA layouts -> our SiT, on public-layout state dicts built here from our own model.

The public backbones compute exactly what our SiT computes with t_scale=1 and the "wh" sin-cos order
(same blocks, same timm names under renaming), so a public state dict is made by renaming ours and adding
what the public files carry besides: the pos_embed parameter, learn_sigma's variance channels, REPA's
projectors and checkpoint dict. Converting back must give the same outputs, exactly.
"""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from ahpa.models import convert
from ahpa.models.convert import keep_prediction_channels, time_reversal_matrix
from ahpa.models.sit import SiT, SiTConfig, timestep_embedding

P, C, D, G = 2, 4, 32, 4  # patch, latent channels, hidden, token grid side


def load_public_checkpoint(*args, **kw) -> SiT:
    kw.setdefault("num_heads", 2)  # not readable from the shapes of a non-standard size
    return convert.load_public_checkpoint(*args, **kw)


def convert_checkpoint(*args, **kw):
    kw.setdefault("num_heads", 2)
    return convert.convert_checkpoint(*args, **kw)


def public_like(seed: int = 0, **kw) -> SiT:
    """A small SiT computing what the public code computes (t fed as is, DiT's pos-embed order), all weights random."""
    torch.manual_seed(seed)
    cfg = SiTConfig(input_size=G * P, in_channels=C, patch_size=P, hidden_size=D, depth=3, num_heads=2,
                    num_classes=10, t_scale=1.0, pos_embed_order="wh", **kw)
    model = SiT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # adaLN-Zero init would make every output 0
            p.normal_(0, 0.3)
    return model


def dit_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """DiT / MAE's fixed embedding, written from its definition: token r*G+c holds [sin, cos](c w) then [sin, cos](r w)."""
    omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim / 4))
    rows, cols = np.divmod(np.arange(grid * grid), grid)

    def axis(pos):
        a = np.outer(pos, omega)
        return np.concatenate([np.sin(a), np.cos(a)], axis=1)

    return torch.from_numpy(np.concatenate([axis(cols), axis(rows)], axis=1)).float()[None]  # [1, N, D]


def to_public(model: SiT, *, learn_sigma: bool = False, projectors: bool = False) -> dict:
    """Our state dict renamed to the DiT / SiT / REPA layout, with what those files add."""
    rename = {"x_embedder.weight": "x_embedder.proj.weight", "x_embedder.bias": "x_embedder.proj.bias",
              "y_embedder.weight": "y_embedder.embedding_table.weight"}
    sd = {rename.get(k, k): v.clone() for k, v in model.state_dict().items()}
    sd["pos_embed"] = dit_pos_embed(D, G)
    g = torch.Generator().manual_seed(1)
    if learn_sigma:
        w, b = sd["final_layer.linear.weight"], sd["final_layer.linear.bias"]  # [p*p*C, D], [p*p*C]
        sigma_w, sigma_b = torch.randn(P, P, C, D, generator=g), torch.randn(P, P, C, generator=g)
        # per pixel (p, q): C prediction channels, then C variance channels (unpatchify: channel fastest)
        sd["final_layer.linear.weight"] = torch.cat([w.reshape(P, P, C, D), sigma_w], dim=2).reshape(-1, D)
        sd["final_layer.linear.bias"] = torch.cat([b.reshape(P, P, C), sigma_b], dim=2).reshape(-1)
    if projectors:
        for i, (a, b) in enumerate([(D, 64), (64, 64), (64, 16)]):
            sd[f"projectors.0.{2 * i}.weight"] = torch.randn(b, a, generator=g)
            sd[f"projectors.0.{2 * i}.bias"] = torch.randn(b, generator=g)
    return sd


def inputs(n: int = 3, t=None):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, C, G * P, G * P, generator=g)
    t = torch.tensor([0.0, 0.37, 1.0][:n]) if t is None else t
    y = torch.tensor([0, 7, 10][:n])  # 10 = the null class
    return x, t, y


def out(model: SiT, x, t, y) -> torch.Tensor:
    with torch.no_grad():
        return model(x, t, y)[0]


def test_dit_layout_converts_exactly_with_learn_sigma():
    ref = public_like()
    sd = to_public(ref, learn_sigma=True)
    model = load_public_checkpoint(sd, "dit", convention="native", preset=None)
    assert model.cfg.t_scale == 1.0 and model.cfg.pos_embed_order == "wh" and model.cfg.num_classes == 10
    x, _, y = inputs()
    steps = torch.tensor([0.0, 17.0, 999.0])  # DiT's step indices go to the sinusoid as they are
    assert torch.equal(out(model, x, steps, y), out(ref, x, steps, y))
    with pytest.raises(ValueError, match="epsilon"):
        load_public_checkpoint(sd, "dit")  # our samplers need a velocity: refuse unless asked for 'native'


def test_prediction_channels_follow_dit_unpatchify():
    # DiT: out [N, T, p*p*2C] -> reshape [N, h, w, p, q, 2C] -> einsum nhwpqc->nchpwq -> [N, 2C, H, W]; first C kept.
    g = torch.Generator().manual_seed(3)
    tokens = torch.randn(2, G * G, D, generator=g)
    w2, b2 = torch.randn(P * P * 2 * C, D, generator=g), torch.randn(P * P * 2 * C, generator=g)

    def unpatchify(o, c):
        o = o.reshape(2, G, G, P, P, c)
        return torch.einsum("nhwpqc->nchpwq", o).reshape(2, c, G * P, G * P)

    expected = unpatchify(tokens @ w2.T + b2, 2 * C)[:, :C]
    w, b = keep_prediction_channels(w2, b2, P, C)
    assert torch.equal(unpatchify(tokens @ w.T + b, C), expected)
    naive = unpatchify(tokens @ w2[: P * P * C].T + b2[: P * P * C], C)  # "first p*p*C rows" would be wrong
    assert not torch.allclose(naive, expected)


def test_repa_checkpoint_file_auto_detected(tmp_path):
    ref, other = public_like(0), public_like(5)
    ckpt = {"model": to_public(other, projectors=True), "ema": to_public(ref, projectors=True),
            "opt": {"state": {}, "param_groups": []}, "steps": 4000,
            "args": argparse.Namespace(enc_type="dinov2-vit-b", encoder_depth=2, model="SiT-XL/2")}
    path = tmp_path / "checkpoint-0004000.pt"
    torch.save(ckpt, path)
    conv = convert_checkpoint(path)  # auto: REPA by its projectors
    assert conv.layout == "repa" and any(k.startswith("projectors.") for k in conv.dropped) and "pos_embed" in conv.dropped
    x, t, y = inputs()
    assert torch.equal(out(conv.build(), x, t, y), out(ref, x, t, y))  # EMA weights by default
    assert torch.equal(out(load_public_checkpoint(path, use="model"), x, t, y), out(other, x, t, y))


def test_repa_legacy_decoder_blocks_are_renumbered():
    ref = public_like()
    sd = to_public(ref, projectors=True)
    legacy = {}
    for k, v in sd.items():  # blocks.0 stays (alignment depth 1); blocks.1, blocks.2 were decoder_blocks.0, .1
        if k.startswith("blocks.") and int(k.split(".")[1]) >= 1:
            parts = k.split(".")
            k = ".".join(["decoder_blocks", str(int(parts[1]) - 1), *parts[2:]])
        legacy[k] = v
    x, t, y = inputs()
    assert torch.equal(out(load_public_checkpoint({"ema": legacy}, "auto"), x, t, y), out(ref, x, t, y))


def test_sit_layout_is_time_reversed_into_our_convention():
    ref = public_like()  # stands for a public SiT: t=1 data, velocity data - noise
    sd = to_public(ref, learn_sigma=True)
    x, t, y = inputs()
    native = load_public_checkpoint(sd, "sit", convention="native")
    assert torch.equal(out(native, x, t, y), out(ref, x, t, y))
    ours = load_public_checkpoint(sd, "sit")
    expected = -out(ref, x, 1 - t, y)  # v_ours(x, t) = -v_SiT(x, 1 - t)
    got = out(ours, x, t, y)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_qk_norm_checkpoint_gives_its_head_count():
    ref = public_like(qk_norm=True)
    model = convert.load_public_checkpoint(to_public(ref), "repa")  # heads from q_norm's [head_dim] shape
    assert model.cfg.qk_norm and model.cfg.num_heads == 2
    x, t, y = inputs()
    assert torch.equal(out(model, x, t, y), out(ref, x, t, y))


def test_time_reversal_matrix_maps_sinusoids():
    t = torch.tensor([0.0, 0.1, 0.5, 0.93, 1.0])
    m = time_reversal_matrix(256)
    got = timestep_embedding(t, 256).double() @ m.T
    assert torch.allclose(got, timestep_embedding(1 - t, 256).double(), atol=1e-5)
    assert torch.allclose(m @ m, torch.eye(256, dtype=torch.float64), atol=1e-12)  # a reflection


def test_mismatched_sizes_name_the_key_and_both_shapes():
    sd = to_public(public_like())
    with pytest.raises(ValueError, match=r"'x_embedder\.proj\.weight' has shape \(32, 4, 2, 2\).*\(384, 4, 2, 2\)"):
        convert.load_public_checkpoint(sd, "repa", preset="S/2")
    bad = dict(sd, **{"blocks.1.mlp.fc2.weight": torch.zeros(D, 7)})
    with pytest.raises(ValueError, match=r"'blocks\.1\.mlp\.fc2\.weight' has shape \(32, 7\).*\(32, 128\)"):
        load_public_checkpoint(bad, "repa")
    three = dict(sd, **{"final_layer.linear.weight": torch.zeros(3 * P * P * C, D)})
    with pytest.raises(ValueError, match=r"final_layer\.linear\.weight.*\(48, 32\)"):
        load_public_checkpoint(three, "repa")


def test_bad_checkpoints_fail_clearly(tmp_path):
    sd = to_public(public_like())
    with pytest.raises(ValueError, match="pos_embed.*not the fixed 2D sin-cos"):
        load_public_checkpoint(dict(sd, pos_embed=sd["pos_embed"] + 0.1), "repa")
    with pytest.raises(ValueError, match="no place.*blocks.0.extra"):
        load_public_checkpoint(dict(sd, **{"blocks.0.extra.weight": torch.zeros(1)}), "repa")
    with pytest.raises(ValueError, match="cannot tell a DiT checkpoint from a SiT"):
        load_public_checkpoint(sd, "auto")
    with pytest.raises(ValueError, match="already in ahpa's layout"):
        load_public_checkpoint(public_like().state_dict(), "auto")
    with pytest.raises(ValueError, match="unknown checkpoint layout 'ddpm'.*dit, sit, repa, auto"):
        load_public_checkpoint(sd, "ddpm")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_public_checkpoint(tmp_path / "missing.pt")
    from ahpa.train.checkpoint import save_checkpoint

    ours = save_checkpoint(tmp_path / "run", 5, {"model": sd, "ema": sd, "optimizer": {}, "ema_updates": 5}, keep=1)
    with pytest.raises(ValueError, match="training checkpoint of ahpa.*ahpa export --run RUN_DIR"):
        load_public_checkpoint(ours)
    (tmp_path / "copied.pt").write_bytes(ours.read_bytes())  # without its digest file: known by its content
    with pytest.raises(ValueError, match="training checkpoint of ahpa"):
        load_public_checkpoint(tmp_path / "copied.pt")
    # a public checkpoint with a downloaded sha256sum file beside it is not taken for one of ours
    torch.save({"ema": sd}, tmp_path / "SiT-XL-2-256.pt")
    (tmp_path / "SiT-XL-2-256.pt.sha256").write_text("0" * 64 + "  SiT-XL-2-256.pt\n")
    assert load_public_checkpoint(tmp_path / "SiT-XL-2-256.pt").cfg.depth == 3
    torch.save({"ema": sd, "extra": object.__new__(Unpicklable)}, tmp_path / "SiT-odd.pt")
    with pytest.raises(ValueError, match="allow_pickle=True"):
        load_public_checkpoint(tmp_path / "SiT-odd.pt")
    assert load_public_checkpoint(tmp_path / "SiT-odd.pt", allow_pickle=True).cfg.depth == 3  # "SiT" in the name


class Unpicklable:
    """A class weights-only loading refuses (any non-allowlisted class)."""


def test_convert_command_writes_a_sampling_export(tmp_path, capsys):
    from ahpa.commands import convert as command
    from ahpa.sample import load_export

    ref = public_like()
    src = tmp_path / "SiT-XS-2.pt"
    torch.save(to_public(ref, learn_sigma=True), src)
    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers())
    dst = tmp_path / "sit.safetensors"
    args = parser.parse_args(["convert", "--checkpoint", str(src), "--out", str(dst), "--encoder", "ahpa-vae:random",
                              "--resolution", "32", "--num-heads", "2"])
    assert args.func(args) == 0
    assert "time convention" in capsys.readouterr().out
    bundle = load_export(dst, torch.device("cpu"))
    assert torch.allclose(bundle.latent_stats.std, torch.full((C,), 1 / 0.18215)) and not bundle.latent_stats.mean.any()
    assert bundle.path.name == "linear" and bundle.model.cfg.pos_embed_order == "wh"
    x, t, y = inputs()
    expected = -out(ref, x, 1 - t, y)
    assert torch.allclose(out(bundle.model, x, t, y), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())

    dit = parser.parse_args(["convert", "--checkpoint", str(src), "--layout", "dit", "--out", str(dst), "--encoder", "taef2:x"])
    with pytest.raises(ValueError, match="noise"):
        dit.func(dit)
    no_res = parser.parse_args(["convert", "--checkpoint", str(src), "--out", str(dst), "--encoder", "taef2:x", "--num-heads", "2"])
    with pytest.raises(ValueError, match="--resolution"):
        no_res.func(no_res)
    sd_res = parser.parse_args(["convert", "--checkpoint", str(src), "--out", str(dst), "--resolution", "48", "--num-heads", "2",
                                "--encoder", "diffusers:stabilityai/sd-vae-ft-ema"])
    with pytest.raises(ValueError, match=r"--resolution 48 does not match .* = 64"):
        sd_res.func(sd_res)


def _public(**kw):
    ref = public_like(**kw)
    return ref, to_public(ref)


def test_a_checkpoint_without_pos_embed_gets_the_public_order():
    """a state dict saved without its pos_embed buffer (input_size given) computes what the public model does."""

    ref, sd = _public()
    del sd["pos_embed"]
    model = load_public_checkpoint(sd, "repa", input_size=8)
    assert model.cfg.pos_embed_order == "wh"
    x, t, y = inputs()
    assert torch.equal(out(model, x, t, y), out(ref, x, t, y))


def test_a_pos_embed_in_our_order_is_recognised_as_such():
    """a stored embedding in the "hw" order is read as "hw" (and the model computes the same)."""
    import dataclasses

    from ahpa.models.sit import sincos_pos_embed

    ours = public_like()
    ref_hw = SiT(dataclasses.replace(ours.cfg, pos_embed_order="hw")).eval()
    ref_hw.load_state_dict(ours.state_dict())
    sd = to_public(ref_hw)
    sd["pos_embed"] = sincos_pos_embed(D, G, "hw")[None]
    model = load_public_checkpoint(sd, "repa")
    assert model.cfg.pos_embed_order == "hw"
    x, t, y = inputs()
    assert torch.equal(out(model, x, t, y), out(ref_hw, x, t, y))


def test_compiled_and_ddp_prefixes_are_stripped():
    """torch.compile's _orig_mod. (and DDP's module. around it) name prefixes are removed."""

    ref, sd = _public()
    x, t, y = inputs()
    for prefix in ("_orig_mod.", "module._orig_mod.", "module."):
        model = load_public_checkpoint({prefix + k: v for k, v in sd.items()}, "repa")
        assert torch.equal(out(model, x, t, y), out(ref, x, t, y)), prefix


def test_convert_stores_a_local_vae_path_absolute_and_a_hub_id_as_given(tmp_path, monkeypatch):
    """--encoder diffusers:sdvae (relative) was stored as given, so the export decoded only from the directory
    ahpa convert ran in; it is stored absolute, as ahpa export stores it. A hub id is no path: kept as written."""
    import json

    from safetensors import safe_open

    from ahpa.cli import main

    torch.save(to_public(public_like(), learn_sigma=True), tmp_path / "SiT-XS-2.pt")
    (tmp_path / "sdvae").mkdir()
    monkeypatch.chdir(tmp_path)
    common = ["convert", "--checkpoint", "SiT-XS-2.pt", "--num-heads", "2"]
    for encoder, stored in [("diffusers:sdvae", f"diffusers:{tmp_path / 'sdvae'}"),
                            ("diffusers:stabilityai/sd-vae-ft-ema", "diffusers:stabilityai/sd-vae-ft-ema")]:
        assert main([*common, "--encoder", encoder, "--out", "m.safetensors"]) == 0
        with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
            assert json.loads(f.metadata()["ahpa"])["encoder"] == stored


def test_a_checkpoint_with_variance_channels_is_not_converted_as_repa(tmp_path):
    """REPA's heads have C output channels; a 2C (learn_sigma) head is SiT / DiT's, and converted as REPA it would
    skip SiT's time reversal and velocity negation: refused, naming the layouts to use."""
    sd = to_public(public_like(), learn_sigma=True)
    with pytest.raises(ValueError, match=r"REPA checkpoints have no variance channels .* final_layer.linear has 8 "
                                         r"\(learn_sigma\): .* --layout sit\|dit"):
        load_public_checkpoint(sd, "repa")
    assert load_public_checkpoint(sd, "sit") is not None  # the same file as what it is
