"""ahpa vae-train --images SRC --out DIR: train the small KL-VAE (`ahpa-vae:DIR`) on your images."""

from __future__ import annotations

import sys


def register(sub) -> None:
    p = sub.add_parser("vae-train", help="train the small KL-VAE of ahpa on your images (.npz, folder or file list)")
    p.add_argument("--images", required=True, help="a uint8 [N, H, W, 3] .npz (`images` or `arr_0`), or, with "
                   "--resolution, an image folder or .txt file list as `ahpa prepare` reads them")
    p.add_argument("--resolution", type=int, default=0, help="decode and ADM-centre-crop to R x R, as `ahpa prepare` "
                   "does (needed for folders and lists; default: an .npz as it is)")
    p.add_argument("--out", required=True, help="output directory; use it as prior.encoder=ahpa-vae:DIR")
    p.add_argument("--channels", default="32,64,64", help="channels per stage; factor = 2^(stages-1) (default 32,64,64)")
    p.add_argument("--latent-channels", type=int, default=4, help="channels of the latent (default 4)")
    p.add_argument("--steps", type=int, default=2000, help="optimiser steps (default 2000)")
    p.add_argument("--batch", type=int, default=32, help="images per step (default 32)")
    p.add_argument("--lr", type=float, default=2e-3, help="Adam's learning rate (default 2e-3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and batches (default 0)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default auto)")
    p.add_argument("--limit", type=int, default=0, help="only the first N images (default all)")
    p.add_argument("--workers", type=int, default=None, help="processes decoding images (default: the CPUs, at most 8)")
    p.set_defaults(func=run)


def _images(args):
    from pathlib import Path

    from ahpa.data.listing import decode_all, default_workers, list_source
    from ahpa.data.sources import load_npz_images

    src = Path(args.images).expanduser()
    if not args.resolution:
        if src.suffix.lower() != ".npz":
            raise ValueError(f"--images {args.images}: a folder or file list is decoded at a size: add --resolution R")
        images, _ = load_npz_images(src)
        return images[: args.limit or None]
    workers = default_workers() if args.workers is None else args.workers
    images, skipped = decode_all(list_source(src, "none", args.limit), args.resolution, workers)
    for name, reason in skipped:
        print(f"skipped {name}: {reason}", file=sys.stderr)
    return images


def run(args) -> int:
    from tqdm import tqdm

    from ahpa.priors.kl_vae import KLVAEConfig, train_vae
    from ahpa.device import resolve_device

    images = _images(args)
    channels = [int(c) for c in args.channels.split(",")]
    bar = tqdm(total=args.steps, desc="vae", dynamic_ncols=True)
    vae = train_vae(images, KLVAEConfig(channels=channels, latent_channels=args.latent_channels), steps=args.steps,
                    batch_size=args.batch, lr=args.lr, seed=args.seed, device=resolve_device(args.device, "--device"),
                    on_step=lambda s, mse: (bar.update(1), bar.set_postfix({"mse": f"{mse:.4f}"}) if s % 20 == 0 else None))
    bar.close()
    vae.cpu().save(args.out)
    print(f"saved ahpa-vae:{args.out} (trained on {len(images):,} images of {images.shape[1]}x{images.shape[2]})")
    from ahpa.priors.reconstruction import psnr, reconstruct

    seen = images[:512]  # training images: a floor of what the latents lose, not a held-out figure
    print(f"reconstruction PSNR {psnr(seen, reconstruct(vae, seen)):.2f} dB on its first {len(seen):,} training images "
          "(the latent's mean decoded to 8 bits; low, e.g. under 20 dB, means a SiT on its latents draws blurred "
          "images: train longer, --steps)")
    return 0
