"""sFID's features: the spatial Inception-v3 features of ADM's evaluator, from the same network FID uses.

sFID (Nash et al. 2021) is the Fréchet distance of an intermediate, unpooled Inception activation, so that it sees
where things are as well as what they are. ADM's evaluator (openai/guided-diffusion, `evaluations/evaluator.py`),
whose sFID the DiT, SiT and REPA tables quote, reads TensorFlow's tensor `mixed_6/conv:0` (the 1x1 branch of the
third 17x17 block: [N, 17, 17, 192]), keeps the first 7 channels and flattens them in TensorFlow's
(height, width, channel) order: 7 * 17 * 17 = 2023 features. Its reference batches store their statistics as
`mu_s` and `sigma_s`, so our order must be that order for a figure against them to mean anything.

NVIDIA's TorchScript translation of that graph (`inception-2015-12-05.pt`) keeps TensorFlow's names, so
`layers.mixed_6.conv` is the same tensor. Its `forward` gives pool_3 only; `pool_and_spatial` therefore repeats what
that forward does before its layers (the resize to 299x299 and the scaling) and runs the layers itself, once for
both features. `check_split` proves on a probe batch that the layers so run give back the file's own pool_3
features, so a file whose forward differs is refused instead of giving a silently different sFID.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SPATIAL_BLOCK = "mixed_6"  # TensorFlow's name of the block whose 1x1 branch (`conv`) is mixed_6/conv
SPATIAL_CHANNELS = 7
SPATIAL_DIM = SPATIAL_CHANNELS * 17 * 17  # 2023 at the 299x299 input


def inception_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> float32 [N, 3, 299, 299] in [-1, 1) as the TorchScript forward feeds its layers: a
    bilinear resize whose grid is shifted by half a pixel of each size (TensorFlow 1's ResizeBilinear, which samples
    at corners rather than centres), borders clamped, then (x - 128) / 128."""
    n, c, h, w = images.shape
    x = images.to(torch.float32)
    theta = torch.eye(2, 3, device=x.device)
    theta[0, 2] += theta[0, 0] / w - theta[0, 0] / 299
    theta[1, 2] += theta[1, 1] / h - theta[1, 1] / 299
    grid = F.affine_grid(theta.unsqueeze(0).repeat(n, 1, 1), [n, c, 299, 299], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return (x - 128) / 128


def split_layers(module) -> tuple[list, torch.nn.Module, list]:
    """(the layers before mixed_6, mixed_6, mixed_6 and the layers after it) of the TorchScript Inception's
    `layers`; a ValueError naming what is missing when the network is not laid out as NVIDIA's translation."""
    layers = getattr(module, "layers", None)
    children = list(layers.named_children()) if layers is not None else []
    names = [name for name, _ in children]
    if SPATIAL_BLOCK not in names or not hasattr(dict(children)[SPATIAL_BLOCK], "conv"):
        raise ValueError("sFID reads the layer layers.mixed_6.conv of NVIDIA's TorchScript Inception-v3 "
                         "(inception-2015-12-05.pt), which this network lacks (its layers: "
                         f"{', '.join(names) or 'none'})")
    i = names.index(SPATIAL_BLOCK)
    modules = [m for _, m in children]
    return modules[:i], modules[i], modules[i:]


def pool_and_spatial(module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pool_3 features [N, 2048], sFID features [N, 2023]) of uint8 images, in one pass through the network."""
    trunk, block, rest = split_layers(module)
    x = inception_input(images)
    for layer in trunk:
        x = layer(x)
    # mixed_6.conv runs again inside `rest`: a loaded TorchScript module takes no forward hooks, and slicing the
    # block's output instead would assume that it concatenates its 1x1 branch first. The repeat is 43M of
    # Inception-v3's 5.7G multiply-adds per image (0.75%)
    spatial = block.conv(x)[:, :SPATIAL_CHANNELS]  # [N, 7, 17, 17]
    spatial = spatial.permute(0, 2, 3, 1).flatten(1)  # [N, 17 * 17 * 7] in TensorFlow's NHWC order, as ADM's mu_s
    for layer in rest:
        x = layer(x)
    return x.flatten(1).float(), spatial.float()  # pool_3: [N, 2048, 1, 1] -> [N, 2048]


def check_split(module, device: torch.device, spec: str) -> int:
    """The number of spatial features (SPATIAL_DIM for the real network); a ValueError unless running the layers as
    `pool_and_spatial` does gives back the network's own pool_3 features (`forward(img, return_features=True)`) on a
    probe batch: then its spatial features are those of the same computation, and sFID means what ADM's evaluator
    means by it."""
    g = torch.Generator().manual_seed(0)
    probe = torch.randint(0, 256, (2, 3, 64, 48), generator=g, dtype=torch.uint8).to(device)
    # full fp32 and one convolution algorithm per shape: the same computation then agrees to rounding, while a forward
    # that scales by 127.5 instead of 128 (pytorch-fid's) moves the features by ~1e-3 of their size
    with torch.inference_mode(), torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, benchmark=False,
                                                            deterministic=True, allow_tf32=False):
        own = module(probe, return_features=True).float()
        mine, spatial = pool_and_spatial(module, probe)
    gap = ((own - mine).norm() / own.norm().clamp_min(1e-12)).item() if own.shape == mine.shape else None
    if gap is None or gap > 1e-5:
        said = f"relative difference {gap:.1e}" if gap is not None else f"shapes {tuple(own.shape)} and {tuple(mine.shape)}"
        raise ValueError(f"detector {spec!r}: sFID runs this network's layers after the resize and scaling of NVIDIA's "
                         f"inception-2015-12-05.pt, but they do not give back the network's own pool_3 features ({said}), "
                         "so its forward is not that file's; evaluate fd, is and pr with it, and sFID with "
                         "inception-2015-12-05.pt")
    return int(spatial.shape[1])
