"""The small KL autoencoder `ahpa vae-train` trains (ahpa.priors.kl_vae)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ahpa.priors.kl_vae import KLVAEConfig, train_vae


@pytest.mark.parametrize("steps", [1, 2, 10, 11])
def test_a_few_training_steps_run_at_any_count(steps):
    """"A few steps" is what a first try asks for: 10 made torch's one-cycle schedule divide by zero (a warm-up of
    exactly one step)."""
    torch.set_num_threads(1)
    images = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    seen = []
    vae = train_vae(images, KLVAEConfig(channels=[8, 8], latent_channels=4, groups=4), steps=steps, batch_size=2,
                    on_step=lambda step, mse: seen.append(mse))
    assert len(seen) == steps and all(np.isfinite(seen))
    assert not any(p.requires_grad for p in vae.parameters())  # returned frozen


def test_kl_vae_levels_are_the_stage_outputs_before_downsampling():
    """stageK is the output of residual block K, at the stride its Level states."""
    from ahpa.priors.kl_vae import KLVAE

    vae = KLVAE.random()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    out = vae.encode(x, vae.level_names)
    for lvl in vae.levels[:-1]:  # the stages (the latent is out.mean)
        assert out.features[lvl.name].shape == (2, lvl.channels, 16 // lvl.stride, 16 // lvl.stride), lvl
    with torch.no_grad():
        assert torch.equal(out.features["stage1"], vae.stages[0](vae.conv_in(x * 2 - 1)))


def test_reconstruction_psnr_rises_as_the_vae_trains_and_vae_train_reports_it(tmp_path, capsys):
    """`ahpa vae-train` said only "saved": whether the VAE is good enough to train a SiT on was for the user to find
    out. It ends with the PSNR of its reconstructions; more training gives a higher one, and the figure is the
    decoded posterior mean of each image, batched or not."""
    from ahpa.cli import main
    from ahpa.priors.reconstruction import psnr, reconstruct

    torch.set_num_threads(1)
    x = np.linspace(0, 1, 16)
    ramps = (np.stack(np.meshgrid(x, x), -1).sum(-1) * 127).astype(np.uint8)  # smooth images a small VAE can learn
    images = np.stack([np.stack([np.roll(ramps, k, 0), np.roll(ramps, k, 1), ramps], -1) for k in range(16)])
    cfg = KLVAEConfig(channels=[8, 8], latent_channels=4, groups=4)
    short, long = (train_vae(images, cfg, steps=n, batch_size=8) for n in (2, 150))
    assert psnr(images, reconstruct(long, images)) > psnr(images, reconstruct(short, images)) + 3
    np.testing.assert_array_equal(reconstruct(long, images, batch_size=5), reconstruct(long, images))
    assert psnr(images, images) == float("inf")
    with pytest.raises(ValueError, match="shapes"):
        psnr(images, images[:3])
    with pytest.raises(ValueError, match="shapes"):
        psnr(images, images[:, :1])  # one that numpy would broadcast
    # the usual figure: 10 log10(255^2 / MSE), an MSE of 1 gives 48.13 dB
    assert psnr(np.zeros((2, 4, 4, 3), np.uint8), np.ones((2, 4, 4, 3), np.uint8)) == pytest.approx(48.1308, abs=1e-4)
    # each pixel is the decoded mean rounded to the nearest value, as a saved image's, not truncated
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        decoded = (short.decode(short.encode(x).mean) * 255).permute(0, 2, 3, 1).numpy()
    assert np.abs(reconstruct(short, images) - decoded.clip(0, 255)).max() <= 0.5 + 1e-3
    np.savez(tmp_path / "ramps.npz", images=images)
    assert main(["vae-train", "--images", str(tmp_path / "ramps.npz"), "--out", str(tmp_path / "vae"), "--steps", "3",
                 "--batch", "4", "--channels", "8,8", "--latent-channels", "4"]) == 0
    out = capsys.readouterr().out
    assert "reconstruction PSNR " in out and " dB on its first 16 training images" in out
    from ahpa.priors.kl_vae import KLVAE

    said = float(out.split("reconstruction PSNR ")[1].split(" dB")[0])  # the saved VAE's, on those images
    assert said == pytest.approx(psnr(images, reconstruct(KLVAE.from_dir(tmp_path / "vae"), images)), abs=0.01)
