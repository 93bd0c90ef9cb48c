"""ahpa sample (--run RUN_DIR | --model FILE) --num N --out FILE.npz [sampler options]"""

from __future__ import annotations

from tqdm import tqdm


def register(sub) -> None:
    p = sub.add_parser("sample", help="generate images into an ADM-format .npz (arr_0 uint8 NHWC, arr_1 labels)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run directory (uses the EMA weights of its latest checkpoint)")
    src.add_argument("--model", help="exported model file (.safetensors)")
    # --num-samples: the same; under torchrun `--num` collides with its own --numa-binding option
    p.add_argument("--num", "--num-samples", dest="num", type=int, required=True)
    p.add_argument("--out", required=True, help="output .npz")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=64, help="samples per iteration (the file does not depend on it)")
    p.add_argument("--solver", default="euler", help="euler | heun | euler-maruyama")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--guidance-low", type=float, default=0.0)
    p.add_argument("--guidance-high", type=float, default=1.0)
    p.add_argument("--micro-batch", type=int, default=64, help="fixed network batch (part of the file's identity)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the network (faster on a GPU; numerics differ from eager at rounding level)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=run)


def run(args) -> int:
    from ahpa.config import SampleCfg
    from ahpa.sample import load_export
    from ahpa.sample_writer import write_samples
    from ahpa.train.build import autocast_dtype, resolve_device
    from ahpa.commands.exit import finish
    from ahpa.train.distributed import device_for, init_from_env

    if args.num <= 0:
        raise ValueError("--num must be positive")
    d = init_from_env(args.device)
    completed = False
    try:
        device = resolve_device(device_for(args.device, d))
        if args.run:
            from ahpa.train.resume import trainer_from_run

            trainer = trainer_from_run(args.run, device=str(device))
            bundle, identity = trainer.sampler_bundle(), {"run": str(args.run), "step": trainer.step}
        else:
            bundle = load_export(args.model, device)
            bundle.autocast_dtype = autocast_dtype("auto", device)
            identity = {"model": str(args.model)}
        cfg = SampleCfg(solver=args.solver, steps=args.steps, cfg_scale=args.cfg_scale, guidance_low=args.guidance_low,
                        guidance_high=args.guidance_high, micro_batch=args.micro_batch, compile=args.compile)
        with tqdm(total=args.num, desc="sample", unit="img", dynamic_ncols=True, disable=not d.is_main) as bar:
            path = write_samples(bundle, args.out, args.num, args.seed, args.batch, cfg, identity,
                                 on_progress=lambda n: bar.update(n * d.world))
        completed = True
        if d.is_main:
            print(f"wrote {args.num} samples to {path}")
        return 0
    finally:
        finish(completed, 0)  # under torchrun the process ends here
