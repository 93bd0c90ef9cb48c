"""diffusers autoencoders beyond AutoencoderKL: FLUX.2's AutoencoderKLFlux2 and DC-AE's AutoencoderDC (tiny random
configs built offline): their levels, one encoder pass, loading from folders, refusing other classes, a short train."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ahpa.priors import load_encoder
from ahpa.priors.base import sha256_file
from ahpa.priors.diffusers_vae import SUPPORTED, DiffusersVAE, diffusers_class

FLUX2 = {"_class_name": "AutoencoderKLFlux2", "block_out_channels": [16, 32], "down_block_types": ["DownEncoderBlock2D"] * 2,
         "up_block_types": ["UpDecoderBlock2D"] * 2, "layers_per_block": 1, "norm_num_groups": 8, "latent_channels": 8}
# three blocks, the last with (linear) attention as DC-AE's deep blocks; factor 4
DCAE = {"_class_name": "AutoencoderDC", "latent_channels": 4, "attention_head_dim": 8,
        "encoder_block_out_channels": [8, 16, 32], "decoder_block_out_channels": [8, 16, 32],
        "encoder_layers_per_block": [1, 1, 1], "decoder_layers_per_block": [1, 1, 1],
        "encoder_block_types": ["ResBlock", "ResBlock", "EfficientViTBlock"],
        "decoder_block_types": ["ResBlock", "ResBlock", "EfficientViTBlock"],
        "encoder_qkv_multiscales": [[], [], [5]], "decoder_qkv_multiscales": [[], [], [5]]}
# the first block without layers: conv_in downsamples into the second width, down0 is empty (no level)
DCAE_NO_FIRST = {**DCAE, "encoder_layers_per_block": [0, 1, 1], "downsample_block_type": "Conv"}


def _hook_count(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in module.modules())


def _build(config: dict) -> DiffusersVAE:
    torch.manual_seed(0)
    enc = DiffusersVAE.from_config(config)
    assert type(enc.vae).__name__ == config["_class_name"]  # the class the config names, not an AutoencoderKL of its keys
    return enc


def _x(n: int = 2, side: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind,levels", [
    ("AutoencoderKLFlux2", [("down0", 128, 2), ("down1", 256, 4), ("down2", 512, 8), ("down3", 512, 8), ("mid", 512, 8),
                            ("latent", 32, 8)]),
    ("AutoencoderDC", [("down0", 256, 2), ("down1", 512, 4), ("down2", 512, 8), ("down3", 1024, 16), ("down4", 1024, 32),
                       ("down5", 1024, 32), ("latent", 32, 32)]),
])  # fmt: skip
def test_the_default_configs_have_the_documented_levels(kind, levels):
    """diffusers' default configs (docs/method.md's table), run on the meta device at 256: shapes without arithmetic,
    and encode checks every map against its Level (a 32x DC-AE at 256 gives an 8x8 latent)."""
    with torch.device("meta"):
        enc = DiffusersVAE.from_config({"_class_name": kind})
    assert type(enc.vae) is diffusers_class(kind)
    assert [(l.name, l.channels, l.stride) for l in enc.levels] == levels
    out = enc.encode(torch.zeros(1, 3, 256, 256, device="meta"), enc.level_names)
    assert out.mean.shape == (1, levels[-1][1], 256 // levels[-1][2], 256 // levels[-1][2])


def test_flux2_levels_come_from_one_pass_with_its_posterior():
    enc = _build(FLUX2)
    assert [(l.name, l.channels, l.stride) for l in enc.levels] == [
        ("down0", 16, 2), ("down1", 32, 2), ("mid", 32, 2), ("latent", 8, 2)]  # fmt: skip
    assert enc.stochastic and (enc.factor, enc.latent_channels) == (2, 8)
    x = _x()
    out = enc.encode(x, enc.level_names)
    assert _hook_count(enc) == 0
    e = enc.vae.encoder
    with torch.no_grad():  # the same stages run one by one
        h = e.conv_in(x * 2 - 1)
        for i, block in enumerate(e.down_blocks):
            h = block(h)
            assert torch.equal(out.features[f"down{i}"], h), i
        assert torch.equal(out.features["mid"], e.mid_block(h))
        posterior = enc.vae.encode(x * 2 - 1).latent_dist  # diffusers' own path
        assert torch.equal(out.mean, posterior.mean) and torch.equal(out.logvar, posterior.logvar)
        assert torch.equal(enc.decode(out.mean), ((enc.vae.decode(out.mean.contiguous()).sample + 1) / 2).clamp(0, 1))
    assert torch.equal(out.features["latent"], out.mean)
    only = enc.encode(x, ("down1",))  # fewer levels: the same latent, only those captured
    assert set(only.features) == {"down1"} and torch.equal(only.mean, out.mean)


@pytest.mark.parametrize("config,levels", [
    (DCAE, [("down0", 16, 2), ("down1", 32, 4), ("down2", 32, 4), ("latent", 4, 4)]),
    (DCAE_NO_FIRST, [("down1", 32, 4), ("down2", 32, 4), ("latent", 4, 4)]),
], ids=["dcae", "dcae-empty-first-block"])  # fmt: skip
def test_dcae_levels_come_from_one_pass_without_a_posterior(config, levels):
    """down{i} is the output of encoder.down_blocks[i], which ends in the downsampler to the next width; the latent is
    deterministic (no logvar: training draws no noise for it)."""
    enc = _build(config)
    assert type(enc).__name__ == "DiffusersDCAE" and not enc.stochastic
    assert [(l.name, l.channels, l.stride) for l in enc.levels] == levels
    x = _x()
    out = enc.encode(x, enc.level_names)
    assert out.logvar is None and _hook_count(enc) == 0
    e = enc.vae.encoder
    with torch.no_grad():
        h = e.conv_in(x * 2 - 1)
        for i, block in enumerate(e.down_blocks):
            h = block(h)
            if f"down{i}" in out.features:
                assert torch.equal(out.features[f"down{i}"], h), i
        assert torch.equal(out.mean, enc.vae.encode(x * 2 - 1).latent)
        assert torch.equal(enc.decode(out.mean), ((enc.vae.decode(out.mean.contiguous()).sample + 1) / 2).clamp(0, 1))
    assert out.sample(torch.ones_like(out.mean)).equal(out.mean.float())  # noise or not: the latent itself

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    e.down_blocks[-1].forward = broken  # a block that raises mid-forward still leaves no hook behind
    with pytest.raises(RuntimeError, match="boom"):
        enc.encode(x, enc.level_names)
    assert _hook_count(enc) == 0


def test_local_folders_load_either_class(tmp_path):
    x = _x(1)
    for name, config in (("flux2", FLUX2), ("dcae", DCAE)):
        built = _build(config)
        built.vae.save_pretrained(tmp_path / name / "vae")  # a pipeline layout: the VAE in vae/
        for where in (tmp_path / name / "vae", tmp_path / name):
            enc = load_encoder(f"diffusers:{where}")
            assert type(enc) is type(built) and enc.spec == f"diffusers:{where}" and enc.levels == built.levels
            assert enc.weights_sha256 == sha256_file(tmp_path / name / "vae" / "diffusion_pytorch_model.safetensors")
            assert torch.equal(enc.encode(x).mean, built.encode(x).mean)


def test_other_classes_are_refused_with_the_supported_ones(tmp_path):
    listed = "it loads AutoencoderKL, AutoencoderKLFlux2, AutoencoderDC"
    assert SUPPORTED == ("AutoencoderKL", "AutoencoderKLFlux2", "AutoencoderDC")
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AsymmetricAutoencoderKL", "latent_channels": 4}))
    with pytest.raises(ValueError, match=rf"describes a AsymmetricAutoencoderKL, which `diffusers:` does not load; {listed}"):
        load_encoder(f"diffusers:{tmp_path}")
    with pytest.raises(ValueError, match=rf"'AutoencoderTiny' is not an autoencoder `diffusers:` loads; {listed}"):
        DiffusersVAE.from_config({"_class_name": "AutoencoderTiny"})
    with pytest.raises(ValueError, match=r"DiffusersVAE wraps AutoencoderKL, AutoencoderKLFlux2, not a AutoencoderDC.*wrap"):
        DiffusersVAE(_build(DCAE).vae)


def test_a_diffusers_without_the_class_says_so(monkeypatch):
    """A release older than the class is named as such, not as a diffusers that fails to import beside this torch."""
    import types

    older = types.ModuleType("diffusers")
    older.AutoencoderKL = object
    monkeypatch.setitem(sys.modules, "diffusers", older)
    assert diffusers_class() is object
    with pytest.raises(ImportError, match=r"diffusers \S+ has no AutoencoderKLFlux2: install a release that has it"):
        diffusers_class("AutoencoderKLFlux2")


def test_a_hub_id_reads_its_class_before_its_weights(tmp_path):
    """A hub id's config.json decides the class (a DC-AE loads as one, identified by its weights' sha256), and a class
    not supported is refused before any weights are fetched (this hub cache holds none for it). Offline: a hub cache
    laid out as huggingface_hub writes it, HF_HUB_OFFLINE=1."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    dcae = _build(DCAE)
    for name in ("dcae", "tiny"):
        repo = tmp_path / "hub" / f"models--test-org--{name}"
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(revision)
    dcae.vae.save_pretrained(tmp_path / "hub" / "models--test-org--dcae" / "snapshots" / revision)
    snapshot = tmp_path / "hub" / "models--test-org--tiny" / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"_class_name": "AutoencoderTiny"}))
    code = ("from ahpa.priors import load_encoder\n"
            "enc = load_encoder('diffusers:test-org/dcae'); print(type(enc).__name__, enc.weights_sha256)\n"
            "try:\n    load_encoder('diffusers:test-org/tiny')\nexcept ValueError as e:\n    print(e)")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    weights = tmp_path / "hub" / "models--test-org--dcae" / "snapshots" / revision / "diffusion_pytorch_model.safetensors"
    first, second = out.stdout.strip().splitlines()
    assert first == f"DiffusersDCAE {sha256_file(weights)}"
    assert second.startswith("VAE 'diffusers:test-org/tiny': its config.json describes a AutoencoderTiny") and \
        second.endswith("it loads AutoencoderKL, AutoencoderKLFlux2, AutoencoderDC")


def test_a_coarse_latent_names_the_patch_that_fits():
    """A 32x VAE (DC-AE) at 256 gives an 8x8 latent: patch 1 makes an 8x8 token grid, patch 2 a 4x4 one; at 32 px the
    latent is one cell and a patch-2 model is refused, naming the resolution and the preset that would fit."""
    from ahpa import config
    from ahpa.train.build import sit_config

    dcae = SimpleNamespace(factor=32, latent_channels=32, spec="diffusers:dc-ae-f32c32")
    for preset, res, grid in (("S/1", 256, 8), ("S/2", 256, 4)):
        assert sit_config(config.load(None, [f"model.preset={preset}", f"data.resolution={res}"]), dcae, 10).grid == grid
    with pytest.raises(ValueError, match=r"model.preset=S/2: latent side 1 \(data.resolution=32 / VAE factor 32 of "
                                         r"'diffusers:dc-ae-f32c32'\) is not divisible by patch size 2: use a resolution "
                                         r"that is a multiple of 64, or model.preset=S/1$"):
        sit_config(config.load(None, ["model.preset=S/2", "data.resolution=32"]), dcae, 10)


@pytest.mark.parametrize("config", [FLUX2, DCAE], ids=["flux2", "dcae"])
def test_prepare_then_train_cached_and_on_the_fly(config, tmp_path):
    """`ahpa prepare` through the class (its identity in the manifest), then two steps from the cache and two encoding
    in the step, each ending in a sample grid decoded through it."""
    from ahpa import config as config_mod
    from ahpa.data.cache import read_manifest
    from ahpa.data.prepare import PrepareOptions, prepare
    from ahpa.train.loop import Trainer

    built = _build(config)
    built.vae.save_pretrained(tmp_path / "vae")
    images = np.random.default_rng(0).integers(0, 256, (16, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "set.npz", images=images, labels=np.arange(16) % 2)
    spec = f"diffusers:{tmp_path / 'vae'}"
    res = prepare(PrepareOptions(images=str(tmp_path / "set.npz"), vae=spec, resolution=16, out=str(tmp_path / "cache"),
                                 grid=16 // built.factor, workers=0, shard_size=16, flips="stored"))
    assert res.complete and res.images == 16
    manifest = read_manifest(tmp_path / "cache")
    assert manifest["encoder"] == {"spec": spec, "weights_sha256": sha256_file(tmp_path / "vae" / "diffusion_pytorch_model.safetensors")}
    assert [l["name"] for l in manifest["levels"]] == [n for n in built.level_names if n != "latent"]
    common = {"model": {"preset": "S/1", "hidden_size": 32, "depth": 2, "num_heads": 2}, "prior": {"encoder": spec},
              "align": {"method": "multi-uniform", "depth": 1, "projector_dim": 32},
              "train": {"steps": 2, "batch_size": 8, "log_every": 1, "ckpt_every": 2, "sample_every": 2, "device": "cpu"},
              "sample": {"steps": 2, "grid_images": 4, "micro_batch": 4}}  # a grid at the end: decoded through the VAE
    for name, data in (("cached", {"source": "cache", "path": str(tmp_path / "cache"), "resolution": 16}),
                       ("on-the-fly", {"source": "procedural", "resolution": 16, "procedural_size": 16})):
        cfg = config_mod.from_dict({**common, "data": data, "prior": {"encoder": spec, "stats_images": 16}})
        trainer = Trainer(cfg, tmp_path / name)
        assert trainer.parts.levels == built.level_names, name
        last = trainer.run()
        assert trainer.step == 2 and np.isfinite(last["loss/flow"]) and np.isfinite(last["loss/align"]), name
        assert (tmp_path / name / "samples.png").is_file(), name
