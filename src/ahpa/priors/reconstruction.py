"""How well an autoencoder gives its images back: what `ahpa vae-train` reports when it ends, and the demo's check
reads (a VAE whose reconstructions lose the class would cap what any SiT trained on its latents can draw)."""

from __future__ import annotations

import math

import numpy as np
import torch

from ahpa.priors.base import PriorEncoder


@torch.no_grad()
def reconstruct(encoder: PriorEncoder, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """uint8 [N, H, W, 3] -> the encoder's decoded posterior means, uint8 [N, H, W, 3] (rounded as saved images are)."""
    device = next(encoder.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(images[i:i + batch_size]).to(device).permute(0, 3, 1, 2).float() / 255  # NHWC -> NCHW
        rec = encoder.decode(encoder.encode(x).mean)
        out.append((rec.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out) if out else images[:0].copy()


def psnr(images: np.ndarray, reconstructed: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two uint8 image arrays of one shape, over all their pixels (inf when equal)."""
    if images.shape != reconstructed.shape:
        raise ValueError(f"psnr of arrays of shapes {images.shape} and {reconstructed.shape}")
    mse = float(np.mean((images.astype(np.float64) - reconstructed.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)
