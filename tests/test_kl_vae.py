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
