"""ahpa export --run RUN_DIR --out FILE.safetensors: the EMA backbone alone (a plain SiT); with --posthoc-sigma, the
EMA of that length reconstructed from the run's post-hoc EMA snapshots (train.posthoc_ema; ahpa.train.posthoc_export)."""

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
                   "(one of those the run kept); with --posthoc-sigma, the step the EMA is reconstructed at (from the "
                   "snapshots up to it; default the newest snapshot's)")
    p.add_argument("--posthoc-sigma", type=float, default=None, metavar="SIGMA_REL",
                   help="reconstruct the power-function EMA of this relative std (EDM2's sigma_rel, e.g. 0.07) from the "
                        "run's snapshots in RUN/posthoc (a run trained with train.posthoc_ema), instead of exporting "
                        "its EMA; the fit's residual is printed and recorded in the export")
    p.add_argument("--max-residual", type=float, default=None, help="with --posthoc-sigma: the largest relative "
                   "residual of the averaging profile's fit accepted (default 0.1); a target the snapshots match worse "
                   "is refused")
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
    if args.max_residual is not None and args.posthoc_sigma is None:
        raise ValueError("--max-residual is read with --posthoc-sigma only (the fit of a reconstructed EMA)")
    rec = None
    if args.posthoc_sigma is not None:  # planned first: a target the snapshots cannot represent fails before any load
        from ahpa.train.posthoc_export import MAX_RESIDUAL, combine, plan

        limit = MAX_RESIDUAL if args.max_residual is None else args.max_residual
        rec = plan(args.run, args.posthoc_sigma, args.step, limit)
    # the run's newest checkpoint gives the VAE, the latent statistics and the SiT's shape (the same at every step)
    bundle, step, cfg = run_sampler(args.run, torch.device("cpu"), encoder=args.encoder,
                                    step=args.step if rec is None else None)
    if rec is not None:
        bundle.model.load_state_dict(combine(rec.paths, [w for _, _, w in rec.sources]))
        step = rec.step
    existed = Path(args.out).is_file()
    before = _metadata(args.out) if existed else None
    path = export(args.out, bundle.model, bundle.latent_stats, bundle.encoder, cfg,  # as a run exports itself
                  rec.metadata() if rec is not None else None)
    why = unguidable(bundle.num_classes, cfg.train.label_dropout)
    if why:
        print(f"ahpa export: warning: {why}; sample it without --cfg-scale", file=sys.stderr)
    if existed and _same_run(before) != _same_run(_metadata(path)):  # another run's (other statistics, VAE or shape)
        print(f"ahpa export: note: replaced {path}, which held a different export (another run or model)",
              file=sys.stderr)
    what = f": {rec.describe()}" if rec is not None else ""
    print(f"exported {bundle.model.num_params():,} parameters (step {step}) to {path}{what}")
    return 0


def _metadata(path) -> dict | None:
    """An export's metadata, None for a file that is not one: read from the header alone (comparing the tensors
    would load a second XL/2 model, ~2.7 GB, to print a note)."""
    from ahpa.sample import export_metadata

    try:
        return export_metadata(path)
    except (ValueError, OSError):  # any other file: what it held is not an export
        return None


def _same_run(meta: dict | None) -> dict | None:
    """What tells a run's exports from another run's: the metadata less what tells one EMA of the run from another
    (a reconstruction's sigma_rel and step)."""
    return None if meta is None else {k: v for k, v in meta.items() if k != "posthoc_ema"}
