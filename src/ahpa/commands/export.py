"""ahpa export --run RUN_DIR --out FILE.safetensors: the EMA backbone alone (a plain SiT)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("export", help="export the EMA backbone of a run's latest checkpoint")
    p.add_argument("--run", required=True, help="run directory (its newest readable checkpoint's EMA weights)")
    p.add_argument("--out", required=True, help="output .safetensors: the SiT's weights, with what sampling needs "
                                                "(VAE spec, latent statistics, path) in its metadata")
    p.set_defaults(func=run)


def run(args) -> int:
    from ahpa.train.resume import trainer_from_run

    trainer = trainer_from_run(args.run, device="cpu")
    path = trainer.export(args.out)
    print(f"exported {trainer.parts.ema.num_params():,} parameters (step {trainer.step}) to {path}")
    return 0
