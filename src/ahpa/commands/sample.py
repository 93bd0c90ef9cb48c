"""ahpa sample (--run RUN_DIR | --model FILE) --num N --out FILE.npz [sampler options]

Ctrl-C, SIGTERM and SIGHUP keep the chunks written (exit 130 / 143 / 129); rerun the same command to resume."""

from __future__ import annotations

import argparse
import sys

from tqdm import tqdm

from ahpa.commands.examples import with_examples
from ahpa.commands.stopping import run_stoppable


# sampler options that default to the run's `sample` section (with --run), or with --model to the export's recorded
# settings (its run's: ahpa.sample.SAMPLER_MATH) and SampleCfg's defaults for the rest
SAMPLER_OPTIONS = ("solver", "steps", "cfg_scale", "guidance_low", "guidance_high", "micro_batch", "compile")


def register(sub) -> None:
    p = sub.add_parser("sample", help="generate images into an ADM-format .npz (arr_0 uint8 NHWC, arr_1 labels)",
                       **with_examples(
        "  ahpa sample --run runs/mine --num 10000 --out samples.npz --grid grid.png",
        "  # only the classes named (a class folder's name, or its index)",
        "  ahpa sample --run runs/mine --num 64 --out cats.npz --class cats",
        "  ahpa sample --model sit.safetensors --num 50000 --out samples.npz --cfg-scale 1.8 --guidance-high 0.7",
        "More: README.md (Quickstart), docs/imagenet.md (step 3)"),
                       description="Sampler options left out take the run's `sample` settings with --run (those of "
                                   "its config.yaml, as its sample grids used); with --model, those its run "
                                   "recorded in the export (solver, steps, cfg-scale, guidance interval), else the "
                                   "defaults shown.")
    src = p.add_mutually_exclusive_group(required=True)
    # --run-dir: the same; under torchrun `--run` is an ambiguous abbreviation of its --run-path
    src.add_argument("--run", "--run-dir", dest="run", help="run directory (uses the EMA weights of its latest "
                     "checkpoint, or of --step's)")
    src.add_argument("--model", help="exported model file (.safetensors, from `ahpa export` or a run's model.safetensors)")
    # --num-samples: the same; under torchrun `--num` collides with its own --numa-binding option
    p.add_argument("--num", "--num-samples", dest="num", type=int, required=True,
                   help="number of images; more than a finished --out holds, all else equal, extends it (10K -> 50K)")
    p.add_argument("--out", required=True, help="output .npz (written once complete; a rerun resumes from OUT.parts/)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise (default 0); labels are class-balanced, "
                                                       "sample i has class i mod C (see --class)")
    p.add_argument("--class", dest="classes", action="append", metavar="K",
                   help="sample only class K, an index or a name the training data gave it (a class folder's name; "
                   "repeatable, or a comma list K1,K2): sample i has the (i mod n)-th class given; part of the file's "
                   "identity (default: every class, round-robin). A name that holds a comma is given whole, as one "
                   "--class (--class 'a,b' is the class named a,b where there is one, else classes a and b)")
    p.add_argument("--grid", metavar="PNG", help="also draw the file's first samples (up to 64) as one PNG grid, a "
                   "class per column when there are at most 16 (sample i has the (i mod n)-th class); also for a "
                   "file already complete")
    p.add_argument("--batch", type=int, default=None,
                   help="samples per iteration and per resumable chunk (default: the micro-batch, so that no network "
                        "call is padded; the file does not depend on it; a resume keeps the first attempt's)")
    p.add_argument("--solver", choices=("euler", "heun", "euler-maruyama"), help="ODE solvers euler, heun; SDE solver euler-maruyama (euler)")
    p.add_argument("--steps", type=int, help="solver steps (50)")
    p.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale; 1 = no guidance (1.0)")
    p.add_argument("--guidance-low", type=float, help="guide only for t >= this (0.0; t = 1 is noise)")
    p.add_argument("--guidance-high", type=float, help="guide only for t <= this (1.0; REPA uses 0.7)")
    p.add_argument("--micro-batch", type=int, help="fixed network batch, part of the file's identity (64)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the network (faster on a GPU; numerics differ from eager at rounding level; "
                   "default: the run's sample.compile, off for an export)")
    p.add_argument("--encoder", help="the VAE that decodes (KIND:PATH), when the one the run's config or the export "
                                     "names is not at its recorded path on this machine (a run's: the same weights)")
    p.add_argument("--step", type=int, default=None, help="with --run: the checkpoint of this training step instead of "
                   "the newest (FD against training steps; one of those the run kept)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default auto)")
    p.set_defaults(func=run)


def run(args) -> int:
    return run_stoppable(_run, args)


def _run(args) -> int:
    from pathlib import Path

    from ahpa import config as config_mod
    from ahpa.data.class_names import class_indices
    from ahpa.sample import load_export, unguidable
    from ahpa.sample_writer import check_finished, record_path, write_samples
    from ahpa.device import resolve_device
    from ahpa.train.build import autocast_dtype
    from ahpa.commands.exit import finish
    from ahpa.train.distributed import device_for, init_from_env

    # everything that can be checked without loading a model is checked first
    if args.num <= 0:
        raise ValueError("--num must be positive")
    if args.batch is not None and args.batch <= 0:  # before OUT.parts is made: its settings.json would keep the bad chunk size for every rerun
        raise ValueError("--batch must be positive")
    if Path(args.out).suffix != ".npz":
        raise ValueError(f"--out {args.out!r} must end in .npz (the ADM sample format)")
    if args.grid is not None and Path(args.grid).suffix.lower() != ".png":
        raise ValueError(f"--grid {args.grid!r} must end in .png")
    if args.run and Path(args.run).is_file():
        raise FileNotFoundError(f"--run {args.run!r} is a file, not a run directory: an export is sampled with --model")
    if args.run and not Path(args.run).is_dir():
        raise FileNotFoundError(f"run directory {args.run!r} does not exist")
    if args.step is not None and not args.run:
        raise ValueError("--step chooses a checkpoint of a run: give it with --run (an export holds one model)")
    if args.model and Path(args.model).is_dir():
        raise ValueError(f"--model {args.model!r} is a directory; a run directory is sampled with --run")
    classes = parse_classes(args.classes)  # names are resolved once the model says its classes
    named = classes is not None and any(isinstance(k, str) for k in classes)
    given = {k: getattr(args, k) for k in SAMPLER_OPTIONS if getattr(args, k) is not None}
    # ranges: e.g. --steps 0 fails here. The CLI prefixes "ahpa sample: error:" itself
    config_mod.from_dict({"sample": given}, where="command line")
    # a finished file with other settings is refused before a model loads (the options given; the run's sampler
    # settings and the model's identity are compared by write_samples); one with the same settings is complete
    finished = check_finished(args.out, {"num": args.num, "seed": args.seed, **given,
                                         **({} if named else {"classes": classes})})
    d = init_from_env(args.device)
    completed = False
    try:
        device = resolve_device(device_for(args.device, d), "--device")
        if args.run:
            from ahpa.train.checkpoint import checkpoint_path, recorded_digest
            from ahpa.train.resume import run_sampler

            bundle, step, run_cfg = run_sampler(args.run, device, encoder=args.encoder, step=args.step)
            # the weights, not the path: the same run named another way resumes; a run trained on since does not
            ckpt = checkpoint_path(Path(args.run) / "checkpoints", step)
            identity, base = {"step": step, "checkpoint_sha256": recorded_digest(ckpt)}, run_cfg.sample
        else:
            from ahpa.priors.registry import load_encoder

            encoder = load_encoder(args.encoder, device) if args.encoder else None
            bundle = load_export(args.model, device, encoder=encoder)
            bundle.autocast_dtype = autocast_dtype("auto", device)
            from ahpa.priors.base import sha256_file

            # the file's content, not its name: an export written over with another model is another model.
            # Only the main process compares settings (write_samples), so only it reads the file through the hash
            identity = {"model_sha256": sha256_file(args.model) if d.is_main else None}
            # the export's run's sampler settings, as --run takes the run's (an older export or a conversion: none)
            base = config_mod.SampleCfg(**(bundle.sample_settings or {}))
        where = (f"{Path(args.run) / 'config.yaml'}'s sample section with the command line" if args.run else
                 f"{args.model}'s sampler settings with the command line" if bundle.sample_settings else "command line")
        cfg = config_mod.from_dict({"sample": {**base.__dict__, **given}}, where=where).sample
        dropout = run_cfg.train.label_dropout if args.run else bundle.label_dropout
        # every network and decoder call runs micro_batch rows, padded: a batch of 64 under the study config's 250
        # computed 250 rows for 64 images (3.9x the work at cfg 1), hence the micro-batch as the default
        batch = cfg.micro_batch if args.batch is None else args.batch
        why = unguidable(bundle.num_classes, dropout) if cfg.cfg_scale != 1 else None
        if classes is not None:  # parsed again with the names: a whole --class that is a class's name is that class
            classes = class_indices(parse_classes(args.classes, bundle.class_names), bundle.class_names, bundle.num_classes,
                                    f"run {args.run}" if args.run else f"model {args.model}")

        there = [0]  # where the bar starts: the samples a finished file's extension keeps, or a resume finds
        chunks = [batch]  # the chunk size sampled: a resume keeps the first attempt's, an extension the file's

        unused = "" if args.batch is None else f"; --batch {args.batch} is not used"

        def on_extend(had: int, kept: int, chunk: int) -> None:
            kept_chunks = f" (the file's{unused})" if chunk != batch else ""
            if kept == 0:  # the file was one short chunk: a fresh run samples it within its first full chunk
                tqdm.write(f"extending {args.out} from {had} to {args.num} samples: none of its {had} is kept (one "
                           "short chunk, sampled again as part of a full chunk, as a fresh run samples them); all "
                           f"sampled in chunks of {chunk}{kept_chunks}", file=sys.stderr)
            else:
                redone = (f"; its last {had - kept} (a short chunk) {'is' if had - kept == 1 else 'are'} sampled "
                          "again as part of a full chunk, as a fresh run samples them" if kept < had else "")
                tqdm.write(f"extending {args.out} from {had} to {args.num} samples: its first {kept} are kept, the "
                           f"rest sampled in chunks of {chunk}{kept_chunks}{redone}", file=sys.stderr)
            there[0], chunks[0] = kept, chunk

        def on_resume(done: int, chunk: int) -> None:
            kept = f" (the first attempt's{unused})" if chunk != batch else ""
            tqdm.write(f"resuming {args.out}.parts: {done} of {args.num} images are there; chunks of {chunk}{kept}",
                       file=sys.stderr)
            there[0], chunks[0] = done, chunk

        bars = []  # opened once write_samples has accepted the settings: a refusal draws no empty bar first

        def on_start() -> None:  # when sampling begins: a refused or already complete file needs no warning
            if why and d.is_main:
                print(f"ahpa sample: warning: cfg-scale {cfg.cfg_scale}: {why}", file=sys.stderr)
            # about the --batch sampled with only: a kept chunk size is not the command's to change (said above)
            if chunks[0] == batch and batch % cfg.micro_batch and args.num > batch and d.is_main:
                calls = -(-batch // cfg.micro_batch)
                print(f"ahpa sample: note: --batch {batch} fills the {calls * cfg.micro_batch} rows of its network "
                      f"and decoder calls (--micro-batch {cfg.micro_batch}) with {batch} images, the rest padding that "
                      f"is computed and dropped: --batch {calls * cfg.micro_batch} (or leaving it out) writes the same "
                      f"file with up to {calls * cfg.micro_batch / batch:.1f}x less work", file=sys.stderr)
            bars.append(tqdm(total=args.num, initial=there[0], desc="sample", unit="img", dynamic_ncols=True,
                             disable=not d.is_main))

        def on_progress(n: int) -> None:  # the main process counts its batches for every process: the last round may be short
            bars[0].update(min(n * d.world, bars[0].total - bars[0].n))

        try:
            path = write_samples(bundle, args.out, args.num, args.seed, batch, cfg, identity,
                                 on_progress=on_progress, on_resume=on_resume, on_start=on_start, classes=classes,
                                 on_extend=on_extend)
            if bars:  # complete: a resume may have left the other processes more chunks than the main one
                bars[0].update(bars[0].total - bars[0].n)
        finally:
            for bar in bars:
                bar.close()
        completed = True
        if d.is_main and finished:
            print(f"{path} is already complete: {args.num} samples with these settings ({record_path(path).name}); "
                  "nothing to do")
        elif d.is_main:
            guided = f" for t in [{cfg.guidance_low}, {cfg.guidance_high}]" if cfg.cfg_scale != 1 else ""
            names = bundle.class_names  # the class's name beside its index, where the training data gave names
            only = (", classes " + ", ".join(f"{k} ({names[k]!r})" if names else str(k) for k in classes)) if classes else ""
            print(f"wrote {args.num} samples to {path} ({cfg.solver}, {cfg.steps} steps, cfg-scale {cfg.cfg_scale}"
                  f"{guided}{only})")
        if d.is_main and args.grid is not None:
            from ahpa.train.plots import columns_note

            shown = draw_grid(path, args.grid, len(classes) if classes else bundle.num_classes)
            drawn = classes if classes else range(bundle.num_classes)
            names = [bundle.class_names[k] if bundle.class_names else f"class {k}" for k in drawn]
            print(f"grid of its first {shown} samples: {args.grid}{columns_note(names)}")
        return 0
    finally:
        finish(completed, 0)  # under torchrun the process ends here


def draw_grid(samples, png, classes: int, most: int = 64) -> int:
    """The first samples of an .npz (read from its start, not whole: 50K at 256 are ~10 GB) as one PNG; sample i has
    the (i mod classes)-th class, so rows of a multiple of `classes` put a class in each column where they fit
    (plots.class_columns). Returns how many it drew."""
    import numpy as np

    from ahpa.metrics.images import iter_image_batches
    from ahpa.train.plots import class_columns, save_grid

    nrow = class_columns(classes) or 8
    images = np.concatenate(list(iter_image_batches(samples, most, max_images=most // nrow * nrow or most)))
    save_grid(images, png, nrow=min(nrow, len(images)))
    return len(images)


def parse_classes(items: list[str] | None, names: list[str] | None = None) -> list[int | str] | None:
    """--class values (each an index, a name, or a comma list of them) as one list in the order given, indices as
    integers; None when absent. A value that is exactly one of the model's class `names` is that class, though it
    holds a comma (a class folder named "a,b"); indices alone stay indices, as a class named "3" is class 3.
    Without `names` (before a model loads) such a value comes back split: names, resolved once the model loads."""
    if items is None:
        return None
    classes: list[int | str] = []
    for item in items:
        parts = [part.strip() for part in item.split(",")]
        indices = all(part.lstrip("-").isdigit() for part in parts)
        if names is not None and item in names and not indices:
            classes.append(item)
            continue
        for part in parts:
            if not part:
                raise ValueError(f"--class {item!r}: an empty class; give indices or names, e.g. --class 3 or --class 1,5")
            classes.append(int(part) if part.lstrip("-").isdigit() else part)
    return classes
