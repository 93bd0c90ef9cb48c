"""DiffusersVAE: levels derived from the config, hooks that capture the same forward and never leak."""

import json
from pathlib import Path

import pytest
import torch

from ahpa.priors import load_encoder
from ahpa.priors.base import sha256_file
from ahpa.priors.diffusers_vae import DiffusersVAE

SD_CONFIG = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "sd-vae-ft-ema.config.json"

TINY = {
    "block_out_channels": [32, 64],
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "latent_channels": 4,
}


def _hook_count(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in module.modules())


@pytest.fixture(scope="module")
def sd_vae() -> DiffusersVAE:
    if not SD_CONFIG.is_file():
        pytest.skip(f"SD-VAE reference config not found at {SD_CONFIG} (the shared/ directory beside the repository)")
    torch.manual_seed(0)
    return DiffusersVAE.from_config(json.loads(SD_CONFIG.read_text()))


@pytest.fixture()
def tiny() -> DiffusersVAE:
    torch.manual_seed(0)
    return DiffusersVAE.from_config(TINY)


def test_sd_levels_match_reality_and_latent_is_posterior_mean(sd_vae):
    # The downsampler closes each down block, so down0 is already at 1/2 (at 256 input: 128@128x128,
    # 256@64x64, 512@32x32, 512@32x32, mid 512@32x32, latent 4@32x32; measured, as the config note says).
    assert [(l.name, l.channels, l.stride) for l in sd_vae.levels] == [
        ("down0", 128, 2), ("down1", 256, 4), ("down2", 512, 8), ("down3", 512, 8), ("mid", 512, 8), ("latent", 4, 8),
    ]  # fmt: skip
    assert (sd_vae.factor, sd_vae.latent_channels) == (8, 4)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    out = sd_vae.encode(x, sd_vae.level_names)
    for lvl in sd_vae.levels:
        assert out.features[lvl.name].shape == (1, lvl.channels, 64 // lvl.stride, 64 // lvl.stride), lvl
    posterior = sd_vae.vae.encode(x * 2 - 1).latent_dist  # diffusers' own path, images in [-1, 1]
    assert torch.equal(out.mean, posterior.mean) and torch.equal(out.logvar, posterior.logvar)
    assert torch.equal(out.features["latent"], out.mean)
    assert _hook_count(sd_vae) == 0


def test_hooks_do_not_leak(tiny):
    assert [(l.name, l.channels, l.stride) for l in tiny.levels] == [
        ("down0", 32, 2), ("down1", 64, 2), ("mid", 64, 2), ("latent", 4, 2),
    ]  # fmt: skip
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    first = tiny.encode(x, ("down0", "mid"))
    second = tiny.encode(x, ("down1",))
    third = tiny.encode(x, ("down0", "mid"))
    assert _hook_count(tiny) == 0
    assert set(first.features) == {"down0", "mid"} and set(second.features) == {"down1"}
    for name in first.features:
        assert torch.equal(first.features[name], third.features[name])
    assert torch.equal(first.mean, second.mean)

    # A stage that raises mid-forward still leaves no hook behind.
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    tiny.vae.encoder.mid_block.forward = broken
    with pytest.raises(RuntimeError, match="boom"):
        tiny.encode(x, ("down0", "mid"))
    assert _hook_count(tiny) == 0


def test_decode_and_no_quant_conv():
    torch.manual_seed(0)
    enc = DiffusersVAE.from_config({**TINY, "use_quant_conv": False, "use_post_quant_conv": False})
    assert enc.vae.quant_conv is None
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    out = enc.encode(x)
    assert out.mean.shape == (1, 4, 8, 8) and out.features == {}
    assert torch.equal(out.mean, enc.vae.encode(x * 2 - 1).latent_dist.mean)
    rec = enc.decode(out.mean)
    assert rec.shape == x.shape and rec.min() >= 0 and rec.max() <= 1


def test_channels_last_matches(tiny):
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    ref = tiny.encode(x, ("down0",))
    cl = DiffusersVAE(tiny.vae, memory_format=torch.channels_last)
    out = cl.encode(x, ("down0",))
    assert torch.allclose(out.mean, ref.mean, atol=1e-5)
    assert torch.allclose(out.features["down0"], ref.features["down0"], atol=1e-5)


def test_local_dir_round_trip(tiny, tmp_path):
    tiny.vae.save_pretrained(tmp_path / "vae")  # a pipeline layout: the VAE in vae/
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    for where in (tmp_path / "vae", tmp_path):
        enc = load_encoder(f"diffusers:{where}")
        assert enc.spec == f"diffusers:{where}"
        assert enc.weights_sha256 == sha256_file(tmp_path / "vae" / "diffusion_pytorch_model.safetensors")
        assert torch.equal(enc.encode(x).mean, tiny.encode(x).mean)


def test_missing_dir_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="/no/such/dir"):
        load_encoder("diffusers:/no/such/dir")
    # a folder that holds no VAE: the spec and what a VAE folder holds, not diffusers' bare message
    with pytest.raises(ValueError, match=r"VAE 'diffusers:.*' is not a diffusers autoencoder folder .*config.json"):
        load_encoder(f"diffusers:{tmp_path}")
    # another model's folder (a DINOv2 saved by transformers) is named by what it holds, before diffusers loads it
    (tmp_path / "config.json").write_text('{"architectures": ["Dinov2Model"], "model_type": "dinov2"}')
    with pytest.raises(ValueError, match=r"is not a diffusers autoencoder folder .*: its config.json describes a "
                                         r"Dinov2Model, which `diffusers:` does not load; it loads AutoencoderKL, "):
        load_encoder(f"diffusers:{tmp_path}")


def test_a_config_that_names_no_class_is_for_diffusers_to_judge(tiny, tmp_path):
    import json

    tiny.vae.save_pretrained(tmp_path / "vae")
    cfg = json.loads((tmp_path / "vae" / "config.json").read_text())
    cfg.pop("_class_name")
    (tmp_path / "vae" / "config.json").write_text(json.dumps(cfg))
    assert load_encoder(f"diffusers:{tmp_path / 'vae'}").latent_channels == tiny.latent_channels


def test_loading_says_nothing_of_its_own(tiny, tmp_path):
    """Without accelerate, diffusers printed six lines about low_cpu_mem_usage on every load of a VAE (in a fresh
    process: diffusers' log handler keeps the stream it found at import)."""
    import subprocess
    import sys

    tiny.vae.save_pretrained(tmp_path / "vae")
    code = f"from ahpa.priors.registry import load_encoder; load_encoder('diffusers:{tmp_path / 'vae'}')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout + out.stderr == "", out.stdout + out.stderr


def test_a_diffusers_that_does_not_import_beside_this_torch_names_the_fix(monkeypatch):
    """Newer diffusers fail at import beside older torch (0.37+ with torch 2.4: torch.accelerator, custom-op
    schemas); the user gets the versions and the release to install, not diffusers' internal traceback."""
    import sys
    import types

    from ahpa.priors.diffusers_vae import diffusers_class

    broken = types.ModuleType("diffusers")

    def fail(name):
        raise RuntimeError("Failed to import diffusers.models.autoencoders.autoencoder_kl because of the following error")

    broken.__getattr__ = fail
    monkeypatch.setitem(sys.modules, "diffusers", broken)
    with pytest.raises(ImportError, match=r"beside torch .*diffusers<0\.37"):
        diffusers_class()
    with pytest.raises(ImportError, match="Failed to import diffusers.models"):
        DiffusersVAE.from_config({"block_out_channels": [16, 32]})


def test_a_hub_id_that_cannot_load_says_to_name_a_local_copy(monkeypatch):
    """Offline, diffusers reports a hub id as a repository without config.json; the error says what to do instead.
    (No network: the loader is replaced by one that fails as diffusers does offline.)"""
    import ahpa.priors.diffusers_vae as module

    class Offline:
        @staticmethod
        def load_config(where, **kwargs):
            raise OSError(f"{where} does not appear to have a file named config.json.")

    monkeypatch.setattr(module, "diffusers_class", lambda name="AutoencoderKL": Offline)
    with pytest.raises(OSError, match=r"'org/some-vae' is not a local directory.*name a local copy"):
        load_encoder("diffusers:org/some-vae")


def test_a_hub_id_loaded_from_the_local_hub_cache_is_identified_by_its_weights(tiny, tmp_path):
    """A VAE named by hub id (the ImageNet configs' stabilityai/sd-vae-ft-ema) records the sha256 of the weights it
    loaded from the Hugging Face cache, so a cache prepared with the hub id trains with a local copy of the same VAE
    (an offline compute node). Offline: a hub cache laid out as huggingface_hub writes it, HF_HUB_OFFLINE=1."""
    import subprocess
    import sys

    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--test-org--tiny-vae"
    tiny.vae.save_pretrained(repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    tiny.vae.save_pretrained(tmp_path / "local")
    code = (
        "import sys; from ahpa.priors import load_encoder; from ahpa.data.cache import check_encoder\n"
        "hub, local = load_encoder('diffusers:test-org/tiny-vae'), load_encoder(sys.argv[1])\n"
        "check_encoder({'encoder': hub.identity()}, local, 'cache')\n"
        "print(hub.weights_sha256)"
    )
    env = {**__import__("os").environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    out = subprocess.run([sys.executable, "-c", code, f"diffusers:{tmp_path / 'local'}"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == sha256_file(tmp_path / "local" / "diffusion_pytorch_model.safetensors")
    # diffusers' call of huggingface_hub warned of an ignored keyword on each load by hub id (diffusers 0.42.1,
    # huggingface_hub 2.4.0); nothing the user could act on
    assert "Warning" not in out.stderr, out.stderr[-2000:]


def test_a_hub_id_is_identified_by_the_weights_file_diffusers_loaded(tiny, tmp_path):
    """The hub's sd-vae-ft-ema holds both weight files: a cache with both is identified by the safetensors (what
    diffusers loads, and what a local copy is identified by); a repository without safetensors leaves huggingface_hub's
    marker of a missing file in the cache, and the .bin it loaded instead is what identifies it."""
    import shutil
    import subprocess
    import sys

    revision = "0123456789abcdef0123456789abcdef01234567"
    tiny.vae.save_pretrained(tmp_path / "st")
    tiny.vae.save_pretrained(tmp_path / "bin", safe_serialization=False)
    safetensors, bin_file = tmp_path / "st" / "diffusion_pytorch_model.safetensors", tmp_path / "bin" / "diffusion_pytorch_model.bin"
    for name, files in (("both", [safetensors, bin_file]), ("bin-only", [bin_file])):
        repo = tmp_path / "hub" / f"models--test-org--{name}"
        snapshot = repo / "snapshots" / revision
        snapshot.mkdir(parents=True)
        shutil.copy(tmp_path / "st" / "config.json", snapshot)
        for f in files:
            shutil.copy(f, snapshot)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(revision)
    no_exist = tmp_path / "hub" / "models--test-org--bin-only" / ".no_exist" / revision
    no_exist.mkdir(parents=True)
    (no_exist / "diffusion_pytorch_model.safetensors").write_text("")  # how huggingface_hub records a 404
    code = ("from ahpa.priors import load_encoder\n"
            "for name in ('both', 'bin-only'):\n"
            "    print(load_encoder(f'diffusers:test-org/{name}').weights_sha256)")
    env = {**__import__("os").environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == [sha256_file(safetensors), sha256_file(bin_file)]


def test_diffusers_levels_are_the_down_blocks_and_the_mid_block():
    """down{i} is the output of encoder.down_blocks[i], mid that of encoder.mid_block (in the tiny config
    mid and down1 have the same shape, so shapes cannot tell them apart)."""
    from ahpa.priors.diffusers_vae import DiffusersVAE

    torch.manual_seed(0)
    enc = DiffusersVAE.from_config({"block_out_channels": [32, 64], "down_block_types": ["DownEncoderBlock2D"] * 2,
                                    "up_block_types": ["UpDecoderBlock2D"] * 2, "layers_per_block": 1,
                                    "norm_num_groups": 8, "latent_channels": 4})
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    out = enc.encode(x, ("down0", "down1", "mid"))
    e = enc.vae.encoder
    with torch.no_grad():
        h = e.conv_in(x * 2 - 1)
        for i, block in enumerate(e.down_blocks):
            h = block(h)
            assert torch.equal(out.features[f"down{i}"], h), i
        assert torch.equal(out.features["mid"], e.mid_block(h))
