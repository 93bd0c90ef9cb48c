"""ahpa train --config FILE.yaml --out RUN_DIR [section.key=value ...]"""

from __future__ import annotations

import sys

from tqdm import tqdm


def register(sub) -> None:
    p = sub.add_parser("train", help="train a SiT (rerun the same command to resume)")
    p.add_argument("--config", help="YAML config (see configs/)")
    p.add_argument("--out", required=True, help="run directory (config, checkpoints, logs, plots)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.steps=1000")
    p.set_defaults(func=run)


def run(args) -> int:
    from ahpa import config
    from ahpa.train.loop import Trainer

    cfg = config.load(args.config, args.overrides)
    trainer = Trainer(cfg, args.out)
    for msg in trainer.messages:
        print(msg, file=sys.stderr)
    bar = tqdm(total=cfg.train.steps, initial=trainer.step, desc="train", unit="step", dynamic_ncols=True)

    def on_log(step: int, row: dict) -> None:
        bar.update(step - bar.n)
        post = {"flow": f"{row['loss/flow']:.4f}", "img/s": f"{row['img_per_s']:.0f}"}
        if "loss/align" in row:
            post["align"] = f"{row['loss/align']:.4f}"
        bar.set_postfix(post)

    trainer.run(on_log)
    bar.close()
    print(f"run complete: {args.out} (model.safetensors, samples.png, router.png, losses.png, metrics.jsonl, tb/)")
    return 0
