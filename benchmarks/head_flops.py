"""FLOPs the alignment heads add to a training step, against the SiT itself (analytic, no device).

Usage: python benchmarks/head_flops.py  -> a markdown table on stdout.
Training FLOPs = 3 x forward FLOPs (forward + backward), the MFU convention; the heads run on the
tokens of one block and their backward is counted the same way.
"""

from __future__ import annotations

import argparse

import torch

from ahpa.align.projector import Projector
from ahpa.models.sit import SiT, SiTConfig

SETTINGS = {
    # name: (preset, latent side, latent channels, level channels)
    "SD-VAE @256 (down0-3, mid, latent)": (("B/2", "XL/2"), 32, 4, [128, 256, 512, 512, 512, 4]),
    "TAEF2 @64 (stage1-4, latent)": (("S/1",), 8, 32, [64, 64, 64, 64, 32]),
}


def parser() -> argparse.ArgumentParser:
    """The command line (tests/test_docs_commands.py reads its flags to check the documented commands): no options."""
    return argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)


def main() -> None:
    print("| levels | model | SiT train GFLOP/img | shared trunk + heads | % of SiT | one REPA-size MLP per level | % of SiT |")
    print("|---|---|---|---|---|---|---|")
    for name, (presets, side, c, dims) in SETTINGS.items():
        for preset in presets:
            cfg = SiTConfig.preset(preset, input_size=side, in_channels=c, num_classes=1000)
            with torch.device("meta"):
                sit = SiT(cfg)
                shared = Projector(cfg.hidden_size, dims, 2048, shared_trunk=True)
                separate = Projector(cfg.hidden_size, dims, 2048, shared_trunk=False)
            base = 3 * sit.flops_per_image() / 1e9
            sh = 3 * shared.flops_per_token() * cfg.num_tokens / 1e9
            se = 3 * separate.flops_per_token() * cfg.num_tokens / 1e9
            print(f"| {name} | {preset} | {base:.1f} | {sh:.1f} | {100 * sh / base:.1f}% | {se:.1f} | {100 * se / base:.1f}% |")


if __name__ == "__main__":
    parser().parse_args()
    main()
