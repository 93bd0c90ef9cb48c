"""ahpa export --run RUN_DIR --out FILE.safetensors: the EMA backbone alone (a plain SiT)."""

from __future__ import annotations

import sys
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("export", help="export the EMA backbone of a run's latest checkpoint")
    # --run-dir: the same; under torchrun `--run` is an ambiguous abbreviation of its --run-path
    p.add_argument("--run", "--run-dir", dest="run", required=True, help="run directory (its newest readable checkpoint's "
                   "EMA weights, or --step's)")
    p.add_argument("--out", required=True, help="output .safetensors (replaced if it exists): the SiT's weights, with "
                                                "what sampling needs (VAE spec, latent statistics, path) in its metadata")
    p.add_argument("--step", type=int, default=None, help="the checkpoint of this training step instead of the newest "
                   "(one of those the run kept)")
    p.add_argument("--encoder", help="the run's VAE (KIND:PATH) when it is no longer where its config.yaml says (the "
                                     "same weights); the export names it")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from ahpa.sample import unguidable
    from ahpa.train.outputs import export
    from ahpa.train.resume import run_sampler

    if not args.out.endswith(".safetensors"):  # as ahpa convert: a file named .npz would be fed to ahpa eval
        raise ValueError(f"--out {args.out!r} must end in .safetensors (the ahpa export format)")
    bundle, step, cfg = run_sampler(args.run, torch.device("cpu"), encoder=args.encoder, step=args.step)
    existed = Path(args.out).is_file()
    before = _metadata(args.out) if existed else None
    path = export(args.out, bundle.model, bundle.latent_stats, bundle.encoder, cfg)  # as a run exports itself
    why = unguidable(bundle.num_classes, cfg.train.label_dropout)
    if why:
        print(f"ahpa export: warning: {why}; sample it without --cfg-scale", file=sys.stderr)
    if existed and before != _metadata(path):  # another run's (other statistics, VAE or shape)
        print(f"ahpa export: note: replaced {path}, which held a different export (another run or model)",
              file=sys.stderr)
    print(f"exported {bundle.model.num_params():,} parameters (step {step}) to {path}")
    return 0


def _metadata(path) -> dict | None:
    """An export's metadata, None for a file that is not one: read from the header alone (comparing the tensors
    would load a second XL/2 model, ~2.7 GB, to print a note)."""
    from ahpa.sample import export_metadata

    try:
        return export_metadata(path)
    except (ValueError, OSError):  # any other file: what it held is not an export
        return None
