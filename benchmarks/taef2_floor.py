"""The study's floor: CIFAR-10 test images at 64x64, encoded and decoded by TAEF2, as an ADM sample file.

A generator whose samples are decoded by TAEF2 can at best reproduce TAEF2's reconstructions of real
images, so the Fréchet distance of these reconstructions to the training set is the floor every
TAEF2-decoded sample file sits above. This script only writes the reconstructions (arr_0 uint8 NHWC,
arr_1 labels); the distance is measured by the project's own command, as for any sample file:

    .venv/bin/python benchmarks/taef2_floor.py --out /tmp/taef2_recon_test64.npz
    .venv/bin/ahpa eval /tmp/taef2_recon_test64.npz --ref ../shared/data/cifar10/train.npz \
        --detector torchscript:../shared/detectors/cifar10-resnet20.pt \
        --detector torchscript:../shared/detectors/cifar10-resnet32.pt

Images are resized to the resolution exactly as training resizes them (ahpa.data.batches.prepare_images:
bicubic, clamped), the latent is the encoder's output (TAEF2 is deterministic), and the decode is turned
into uint8 with the sampler's own rounding (ahpa.sample.to_uint8), so the file differs from a perfect
generator's samples only by what TAEF2 loses. fp32 throughout: bf16 autocast changes pixels by up to ~6/255.
Prints one JSON line with the timing.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from ahpa.data.batches import prepare_images
from ahpa.priors.registry import load_encoder
from ahpa.sample import to_uint8, write_npz


def parser() -> argparse.ArgumentParser:
    """The command line (tests/test_docs_commands.py reads its flags to check the documented commands)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data/cifar10/test.npz"), help="npz with `images` uint8 NHWC and `labels`")
    ap.add_argument("--encoder", default="taef2:../shared/weights/taef2")
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path("/tmp/taef2_recon_test64.npz"))
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--num", type=int, help="first N images only (smoke runs)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return ap


def main() -> None:
    args = parser().parse_args()

    with np.load(args.data) as f:
        images, labels = f["images"], f["labels"]
    if args.num is not None:
        images, labels = images[: args.num], labels[: args.num]
    device = torch.device(args.device)
    enc = load_encoder(args.encoder, device)

    out = np.empty((len(images), args.resolution, args.resolution, 3), np.uint8)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for lo in range(0, len(images), args.batch_size):
            batch = torch.from_numpy(images[lo : lo + args.batch_size]).to(device)
            x = prepare_images(batch, args.resolution)  # [B, 3, R, R] in [0, 1]
            recon = enc.decode(enc.encode(x).mean)  # [B, 3, R, R] in [0, 1]
            out[lo : lo + len(batch)] = to_uint8(recon).cpu().numpy()  # [B, R, R, 3]
    seconds = time.perf_counter() - t0
    write_npz(args.out, out, labels)
    print(json.dumps({
        "out": str(args.out), "num": len(out), "resolution": args.resolution, "encoder": args.encoder,
        "seconds": round(seconds, 1), "img_per_s": round(len(out) / seconds, 2),
        "env": {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
                "cpu": platform.processor() or platform.machine()},
    }))


if __name__ == "__main__":
    main()
