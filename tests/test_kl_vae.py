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
