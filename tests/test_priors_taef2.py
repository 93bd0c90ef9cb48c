"""TAEF2: strict loading of the shared weights, level shapes, reconstruction quality, clear load errors."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ahpa.priors import load_encoder
from ahpa.priors.taef2 import DECODER_FILE, ENCODER_FILE, TAEF2Encoder, build_decoder, build_encoder

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
WEIGHTS = SHARED / "weights" / "taef2"
CIFAR_TEST = SHARED / "data" / "cifar10" / "test.npz"

# Mean per-image PSNR of the first 32 CIFAR-10 test images, bicubic-upsampled to 64x64, through
# encode -> decode. Measured: 30.27 dB on these 32 (30.60 +- 1.96 dB over the first 1024; every
# batch of 32 among them averages 30.1-31.3 dB); a randomly initialised decoder gives 6.5 dB.
# The bound sits ~2 dB under the measurement: loose enough for BLAS/platform differences, far
# above anything a wrong layer order, a missing skip or an unscaled input could reach.
PSNR_BOUND_64 = 28.0


@pytest.fixture(scope="module")
def taef2() -> TAEF2Encoder:
    if not (WEIGHTS / ENCODER_FILE).is_file():
        pytest.skip(f"TAEF2 weights not found at {WEIGHTS} (the shared/ directory beside the repository)")
    return load_encoder(f"taef2:{WEIGHTS}")


def test_loads_strictly_frozen_and_identified(taef2):
    assert taef2.weights_sha256.startswith("10a4e102") and taef2.weights_sha256.endswith("47b6")
    assert taef2.identity() == {"spec": f"taef2:{WEIGHTS}", "weights_sha256": taef2.weights_sha256}
    assert not taef2.training
    assert all(not p.requires_grad and p.dtype == torch.float32 for p in taef2.parameters())


def test_level_shapes_at_64(taef2):
    assert taef2.level_names == ["stage1", "stage2", "stage3", "stage4", "latent"]
    assert (taef2.latent_channels, taef2.factor) == (32, 8)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    out = taef2.encode(x, taef2.level_names)
    for lvl in taef2.levels:
        assert out.features[lvl.name].shape == (2, lvl.channels, 64 // lvl.stride, 64 // lvl.stride), lvl
    assert out.logvar is None and out.sample() is out.mean
    assert torch.equal(out.features["latent"], out.mean)
    # Only the requested levels come back, from the same forward (the latent is identical).
    sub = taef2.encode(x, ("stage3",))
    assert set(sub.features) == {"stage3"}
    assert torch.equal(sub.features["stage3"], out.features["stage3"]) and torch.equal(sub.mean, out.mean)


def test_reconstructs_cifar_at_64(taef2):
    if not CIFAR_TEST.is_file():
        pytest.skip(f"CIFAR-10 test set not found at {CIFAR_TEST}")
    images = np.load(CIFAR_TEST)["images"][:32]  # uint8 [32, 32, 32, 3] NHWC
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255  # -> [32, 3, 32, 32] in [0, 1]
    x = F.interpolate(x, size=(64, 64), mode="bicubic", antialias=False).clamp(0, 1)
    rec = taef2.decode(taef2.encode(x).mean)
    assert rec.shape == x.shape and rec.min() >= 0 and rec.max() <= 1
    psnr = 10 * torch.log10(1 / (rec - x).pow(2).flatten(1).mean(1))
    assert psnr.mean() > PSNR_BOUND_64, f"mean PSNR {psnr.mean():.2f} dB <= {PSNR_BOUND_64} dB"


def _save_half(module: torch.nn.Module, path: Path) -> None:
    torch.save({k: v.half() for k, v in module.state_dict().items()}, path)


def test_foreign_or_mismatched_weights_fail_clearly(tmp_path):
    torch.manual_seed(0)
    enc, dec = build_encoder(), build_decoder()
    _save_half(dec, tmp_path / ENCODER_FILE)  # the decoder's weights where the encoder's belong
    _save_half(dec, tmp_path / DECODER_FILE)
    with pytest.raises(ValueError, match=rf"{ENCODER_FILE} does not match the TAEF2 architecture: missing key '0.weight'"):
        TAEF2Encoder.from_dir(tmp_path)

    state = {k: v.half() for k, v in enc.state_dict().items()}
    state["14.weight"] = state["14.weight"][:16]  # a 16-channel latent head
    torch.save(state, tmp_path / ENCODER_FILE)
    with pytest.raises(ValueError, match=r"'14.weight' has shape \(16, 64, 3, 3\), expected \(32, 64, 3, 3\)"):
        TAEF2Encoder.from_dir(tmp_path)

    # Self-made files with the right layout load, and fp16 is upcast into the fp32 modules exactly.
    _save_half(enc, tmp_path / ENCODER_FILE)
    loaded = TAEF2Encoder.from_dir(tmp_path)
    assert torch.equal(loaded.encoder[14].weight, enc[14].weight.half().float())


def test_missing_paths_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="/nonexistent"):
        load_encoder("taef2:/nonexistent")
    _save_half(build_encoder(), tmp_path / ENCODER_FILE)
    with pytest.raises(FileNotFoundError, match=DECODER_FILE):
        TAEF2Encoder.from_dir(tmp_path)


def test_taef2_levels_are_the_documented_module_outputs():
    """ARCHITECTURE.md: the levels are the outputs of encoder modules 1, 5, 9, 13 and the latent that of 14
    (random weights: the wiring, not the file, is under test; shapes alone cannot tell 4 from 5)."""
    from ahpa.priors.taef2 import TAEF2Encoder

    torch.manual_seed(0)
    enc = TAEF2Encoder().eval()
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    out = enc.encode(x, enc.level_names)
    with torch.no_grad():
        for name, last in (("stage1", 1), ("stage2", 5), ("stage3", 9), ("stage4", 13), ("latent", 14)):
            assert torch.equal(out.features[name], enc.encoder[: last + 1](x)), name
