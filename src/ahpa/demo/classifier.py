"""A small CNN trained on the demo's real images: it judges whether samples match their class."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class ShapeClassifier(nn.Module):
    def __init__(self, num_classes: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(64, num_classes),
        )

    def forward(self, images_u8: torch.Tensor) -> torch.Tensor:
        """uint8 [B, H, W, 3] -> logits [B, K]."""
        return self.net(images_u8.permute(0, 3, 1, 2).float() / 127.5 - 1)

    def forward_float(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def degrade(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Blur half the batch a little and add noise: the judge must not fail on a VAE's softness."""
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    pick = torch.rand(x.shape[0], 1, 1, 1, generator=g) < 0.5
    x = torch.where(pick, blurred, x)
    return x + 0.06 * torch.randn(x.shape, generator=g)


def train_classifier(
    images: np.ndarray, labels: np.ndarray, num_classes: int, steps: int = 300, batch_size: int = 64, seed: int = 0,
    on_step: Callable[[int], None] | None = None,
) -> ShapeClassifier:
    torch.manual_seed(seed)
    model = ShapeClassifier(num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    for step in range(steps):
        idx = torch.randint(0, len(x), (batch_size,), generator=g)
        xb = x[idx].permute(0, 3, 1, 2).float() / 127.5 - 1  # [B, 3, H, W] in [-1, 1]
        loss = F.cross_entropy(model.forward_float(degrade(xb, g)), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if on_step is not None:
            on_step(step)
    return model.eval()


@torch.no_grad()
def accuracy(model: ShapeClassifier, images: np.ndarray, labels: np.ndarray) -> float:
    pred = torch.cat([model(torch.from_numpy(images[i : i + 256])).argmax(1) for i in range(0, len(images), 256)])
    return float((pred == torch.from_numpy(labels)).float().mean())
