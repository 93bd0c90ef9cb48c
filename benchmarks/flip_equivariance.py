"""How wrong are generated flips? Compare mirror(encode(x)) with encode(mirror(x)) for a VAE; JSON out.

    python benchmarks/flip_equivariance.py --images ../shared/data/cifar10/test.npz \
        --vae taef2:../shared/weights/taef2 --resolution 64 --grid 8 --num 64

`--flips generated` mirrors the cached latent and token maps at read time; that equals the encoding of the
mirrored image only if the encoder is equivariant to horizontal flips. Reported per level: the relative
L2 error and the mean cosine similarity of the per-channel standardised token maps (what the loss sees).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def parser() -> argparse.ArgumentParser:
    """The command line (tests/test_docs_commands.py reads its flags to check the documented commands)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", default=str(SHARED / "data" / "cifar10" / "test.npz"))
    p.add_argument("--vae", default=f"taef2:{SHARED / 'weights' / 'taef2'}")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--grid", type=int, default=8)
    p.add_argument("--num", type=int, default=64)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)

    from ahpa.data.listing import ItemDataset, assemble, list_source
    from ahpa.data.tokens import flip_tokens
    from ahpa.priors.registry import load_encoder
    from ahpa.priors.targets import pool_to_grid

    enc = load_encoder(args.vae)
    items = ItemDataset(list_source(args.images, limit=args.num), args.resolution)
    x = assemble([it for it in (items[i] for i in range(len(items))) if it.image is not None], args.resolution, torch.device("cpu"))
    levels = [n for n in enc.level_names if n != "latent"]
    a, b = enc.encode(x, levels), enc.encode(x.flip(-1), levels)
    every = torch.ones(len(x), dtype=torch.bool)
    result = {"encoder": args.vae, "resolution": args.resolution, "grid": args.grid, "images": len(x), "levels": {}}
    maps_a = {n: pool_to_grid(a.features[n], args.grid) for n in levels} | {"latent": pool_to_grid(a.mean, args.grid)}
    maps_b = {n: pool_to_grid(b.features[n], args.grid) for n in levels} | {"latent": pool_to_grid(b.mean, args.grid)}
    for name in [*levels, "latent"]:
        gen, true = flip_tokens(maps_a[name], every), maps_b[name]  # generated flip vs the encoding of the flip
        mean, std = true.mean((0, 1)), true.std((0, 1))
        gs, ts = (gen - mean) / std, (true - mean) / std
        result["levels"][name] = {
            "relative_l2": round(float((gen - true).norm() / true.norm()), 4),
            "cosine_standardised": round(float(F.cosine_similarity(gs, ts, dim=-1).mean()), 4),
        }
    full = a.mean.flip(-1)
    result["latent_full_resolution_relative_l2"] = round(float((full - b.mean).norm() / b.mean.norm()), 4)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
