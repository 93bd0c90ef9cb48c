"""ahpa vae-train --images FILE.npz --out DIR: train the small KL-VAE (`ahpa-vae:DIR`) on your images."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("vae-train", help="train the small KL-VAE of ahpa on a uint8 image .npz")
    p.add_argument("--images", required=True, help=".npz of uint8 [N, H, W, 3] images under `images` or `arr_0` "
                                                   "(np.savez(path, images=x)); one image size")
    p.add_argument("--out", required=True, help="output directory; use it as prior.encoder=ahpa-vae:DIR")
    p.add_argument("--channels", default="32,64,64", help="channels per stage; factor = 2^(stages-1)")
    p.add_argument("--latent-channels", type=int, default=4, help="channels of the latent (default 4)")
    p.add_argument("--steps", type=int, default=2000, help="optimiser steps (default 2000)")
    p.add_argument("--batch", type=int, default=32, help="images per step (default 32)")
    p.add_argument("--lr", type=float, default=2e-3, help="Adam's learning rate (default 2e-3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and batches (default 0)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default auto)")
    p.set_defaults(func=run)


def run(args) -> int:
    from tqdm import tqdm

    from ahpa.data.sources import load_npz_images
    from ahpa.priors.kl_vae import KLVAEConfig, train_vae
    from ahpa.train.build import resolve_device

    images, _ = load_npz_images(args.images)
    channels = [int(c) for c in args.channels.split(",")]
    bar = tqdm(total=args.steps, desc="vae", dynamic_ncols=True)
    vae = train_vae(images, KLVAEConfig(channels=channels, latent_channels=args.latent_channels), steps=args.steps,
                    batch_size=args.batch, lr=args.lr, seed=args.seed, device=resolve_device(args.device),
                    on_step=lambda s, mse: (bar.update(1), bar.set_postfix({"mse": f"{mse:.4f}"}) if s % 20 == 0 else None))
    bar.close()
    vae.cpu().save(args.out)
    print(f"saved ahpa-vae:{args.out}")
    return 0
