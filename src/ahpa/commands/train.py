"""ahpa train --config FILE.yaml --out RUN_DIR [section.key=value ...]
ahpa train [--config FILE.yaml] [section.key=value ...] --show-config   (every setting, documented; writes nothing)

Rerunning the same command resumes. Under torchrun every process runs this command (DDP).
SIGTERM / SIGINT / SIGHUP save a checkpoint and exit cleanly (exit code 143 / 130 / 129); rerun to resume. Under
torchrun a signal that reaches one process stops them all, each with that code.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tqdm import tqdm

from ahpa.commands.examples import with_examples


def register(sub) -> None:
    p = sub.add_parser("train", help="train a SiT (rerun the same command to resume; torchrun for several GPUs)",
                       **with_examples(
        "  # seconds on a CPU, needs no files",
        "  ahpa train --config configs/tiny.yaml --out runs/tiny",
        "  # every setting with its documentation: a YAML file to edit and pass to --config",
        "  ahpa train --config configs/cifar64-s1.yaml --show-config",
        "  # your images, encoded once by `ahpa prepare` (its --vae and --resolution; a --grid that fits the patch),",
        "  # with FID against their folder every 2000 steps",
        "  ahpa train --config configs/cifar64-s1.yaml --out runs/mine data.source=cache data.path=caches/photos64 \\",
        "      prior.encoder=taef2:weights/taef2 data.resolution=64 eval.every=2000 eval.ref=photos/ \\",
        "      eval.detectors=inception:inception-2015-12-05.pt",
        "  # vanilla SiT, the baseline of `ahpa compare runs/mine-none runs/mine`: the same with align.method=none",
        "  # and --out runs/mine-none",
        "Overrides are section.key=value (--show-config lists them). More: README.md (Quickstart), docs/data.md"))
    p.add_argument("--config", help="YAML config (see configs/)")
    p.add_argument("--out", help="run directory (config, checkpoints, logs, plots); required to train")
    p.add_argument("--show-config", action="store_true",
                   help="print the resolved configuration, every key with its documentation, as YAML (a config file "
                        "to edit and pass to --config) and exit without training")
    p.add_argument("--no-space-check", action="store_true",
                   help="skip the check that train.posthoc_ema's snapshots still to write fit in the free space of "
                        "--out's disk (for a file system that misreports its free space)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.steps=1000")
    p.set_defaults(func=run)


def run(args) -> int:
    from ahpa import config
    from ahpa.commands.exit import finish
    from ahpa.train.distributed import init_from_env
    from ahpa.train.checkpoint import list_checkpoints
    from ahpa.train.loop import Trainer
    from ahpa.train.signals import StopSignals

    try:
        cfg = config.load(args.config, args.overrides, where="command line")
    except config.ConfigError as e:
        from ahpa.train.run_dir import missing_extension_fix

        # `--config RUN/config.yaml --out RUN` without the run's package: the refusal names a near built-in name,
        # or how a session's name is lost; the run's record names the package to install
        own = args.out and args.config and Path(args.config).resolve() == (Path(args.out) / "config.yaml").resolve()
        fix = missing_extension_fix(Path(args.out), str(e)) if own else None
        if fix is None:
            raise
        raise config.ConfigError(f"{e}; {fix}") from None
    if args.show_config:
        from ahpa.config_doc import documented_yaml

        if os.environ.get("RANK", "0") == "0":  # once, also under torchrun
            print(documented_yaml(cfg), end="")
        return 0
    if not args.out:
        raise ValueError("--out is required: the run directory (rerun the same command to resume)")
    # each process's GPU (cuda:LOCAL_RANK) is chosen where the run is built; config.yaml keeps the device as given,
    # so that `--config RUN/config.yaml` resumes under torchrun too
    d = init_from_env(cfg.train.device)
    # finish the step, save, exit: schedulers send SIGTERM before a kill; SIGHUP is a closed terminal or ssh session
    # (torchrun forwards it too), stopped as cleanly
    stops = StopSignals().install()
    completed, code = False, 1
    try:
        if cfg.prior.encoder:  # a misspelt kind is named now, not after the line below promises minutes of work
            from ahpa.priors.registry import parse_spec

            parse_spec(cfg.prior.encoder)
        # minutes on a CPU before the first line of the run: say what it does (a cache holds its statistics)
        if d.is_main and cfg.data.source != "cache" and not list_checkpoints(Path(args.out) / "checkpoints"):
            print(f"setting up a new run in {args.out}: measuring latent and level statistics over "
                  f"prior.stats_images={cfg.prior.stats_images} images ...", file=sys.stderr, flush=True)
        inner = []  # the reference's, a grid's or an evaluation's bar, below the training bar, gone when it ends
        # in a terminal only: a log file (a batch job's) would get their redraws as lines around the FD lines
        nested = d.is_main and sys.stderr.isatty()

        def progress(label: str, total: int | None):
            if not nested:
                return None
            desc = {"grid": "sample grid", "eval": "evaluation"}.get(label, label)

            def update(n: int) -> None:  # the bar opens with the first batch: a cached reference shows none
                if not inner or inner[-1].desc != desc:
                    inner.append(tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True, leave=False))
                inner[-1].update(n)
                if total is not None and inner[-1].n >= total:
                    inner.pop().close()

            return update

        try:
            # a run that evaluates measures eval.ref first (minutes for 50,000 images; once per machine, then cached)
            trainer = Trainer(cfg, args.out, progress=progress, space_check=not args.no_space_check)
        finally:
            while inner:
                inner.pop().close()
        if d.is_main:
            for msg in trainer.messages:
                print(msg, file=sys.stderr)
        bar = tqdm(total=cfg.train.steps, initial=trainer.step, desc="train", unit="step", dynamic_ncols=True,
                   disable=not d.is_main)

        def on_log(step: int, row: dict) -> None:
            bar.update(step - bar.n)
            # a window whose every step was skipped has no losses (ahpa.train.logger.window_means)
            post = {"flow": f"{row['loss/flow']:.4f}" if "loss/flow" in row else "—",
                    # a window of the launch's first step alone (compiling) has none (ahpa.train.schedule)
                    "img/s": f"{row['img_per_s']:.0f}" if "img_per_s" in row else "—"}
            if "loss/align" in row:
                post["align"] = f"{row['loss/align']:.4f}"
            if "mfu" in row:  # a listed GPU in bf16 or fp16 (ahpa.device.PEAK_BF16_TFLOPS)
                post["mfu"] = f"{row['mfu']:.0%}"
            if row.get("bad_steps"):
                post["skipped"] = row["bad_steps"]
            bar.set_postfix(post)

        def on_eval(step: int, fd: dict[str, float]) -> None:  # above the bar, so the run's FD curve stays on screen
            if d.is_main:
                values = ", ".join(f"{k} {v:.4f}" for k, v in fd.items())
                bar.write(f"step {step} ({step * cfg.train.batch_size:,} images): {values} "
                          f"({cfg.eval.num:,} EMA samples)", file=sys.stderr)

        try:
            result = trainer.run(on_log, should_stop=stops, on_eval=on_eval,
                                 progress=progress)
        finally:  # also on an error, which then starts a line of its own
            while inner:
                inner.pop().close()
            bar.close()
        completed = True
        if result.get("stopped"):
            if d.is_main:
                print(f"stopped by signal at step {result['step']}; checkpoint saved in {args.out}. "
                      f"Rerun the same command to resume.", file=sys.stderr)
            code = 128 + int(result["stopped"])  # the signal this process or another received
            return code
        if d.is_main:
            made = [n for n in ("model.safetensors", "samples.png", "router.png", "losses.png", "eval.png", "metrics.jsonl",
                                "tb", "wandb") if (Path(args.out) / n).exists()]
            print(f"run complete: {args.out} ({', '.join(made)})")
            if result.get("launch_skipped"):  # the steps whose loss or gradient was not finite changed no weight
                print(f"{result['launch_skipped']} of the {result['launch_steps']} steps trained now were skipped "
                      "(a non-finite loss or gradient; metrics.jsonl's bad_steps): they changed no weight",
                      file=sys.stderr)
            if "samples.png" in made:  # the grid names no class: which column holds which (ahpa sample --grid says it too)
                from ahpa.data.class_names import class_names
                from ahpa.train.plots import columns_note

                k = trainer.parts.model.cfg.num_classes
                names = class_names(cfg.data) or [f"class {i}" for i in range(k)]
                note = columns_note(names[:k])
                if note:
                    print(f"{Path(args.out) / 'samples.png'}{note}")
        code = 0
        return code
    finally:
        stops.restore()
        finish(completed, code)  # under torchrun the process ends here, the trainer still alive
