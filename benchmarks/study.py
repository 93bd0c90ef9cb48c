"""The convergence study (../shared/STUDY.md): every method, same seed, data order and steps; FD-r20/FD-r32 curves.

    # CPU smoke (tiny SiT, 40 steps, 500 samples; a test of the plumbing, not results):
    python benchmarks/study.py --size smoke --results docs/study/smoke/results.jsonl
    # one GPU job (<= 10 minutes: pick --methods and --steps so that it fits; see docs/study.md):
    python benchmarks/study.py --size gpu --methods none,ahpa-soft --steps 10000 --results $OUT/study.jsonl

Per method it builds the library's `Trainer` over a prepared TAEF2 cache of train16k.npz (64x64, every TAEF2
level, grid 8, stored flips; prepared once by the library's `prepare` and reused), steps it with `train_step()`
and at every evaluation point measures Fréchet distances of class-balanced EMA samples (Euler ODE, 50 steps, no
guidance) in the features of each detector against reference statistics of the full CIFAR-10 training set.
The reference statistics are computed once (from --ref-images) and kept as small files in --ref-dir, which is
committed, so GPU jobs need neither train.npz nor a recomputation. Each evaluation point appends one JSON line
to --results keyed by (study key, method, seed): jobs that ran on different machines merge (study_report.py).
Every row also names its data file and decoder by sha256 (`inputs`): rows of other inputs are refused (study_inputs.py).

Nothing carries over from one job to the next: a job trains complete runs from step 0.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

import benchlib
from study_cfg import guidance_list, guided_rows
from study_extensions import check_append_extensions, check_method_names
from study_inputs import check_append, input_hashes
from study_report import file_label
from study_setup import (DEFAULT_METHODS, METHODS, REPO, SHARED, SIZES, TRACKED_SIGMAS, check_methods,  # noqa: F401
                         check_variant_values, default_cache, method_label, parse_variant, study_config, study_key)
from ahpa.config import SampleCfg
from ahpa.data.cache import read_manifest
from ahpa.data.prepare import PrepareOptions, prepare
from ahpa.metrics import FeatureStats, load_detector, reference_stats
from ahpa.plugins import installed_extensions
from ahpa.sample import SamplerBundle, iter_samples, generate
from ahpa.train import logger, plots
from ahpa.train.divergence import DivergenceWatch
from ahpa.train.build import autocast_dtype, precision_name
from ahpa.train.loop import Trainer
from ahpa.train.posthoc_export import reconstruct
from ahpa.train.posthoc_track import due

DIVERGENCE_CHECK_EVERY = 200  # steps between checks of a run's skipped (non-finite) steps


def ensure_cache(args, device: torch.device) -> dict:
    t0 = time.perf_counter()
    opts = PrepareOptions(images=str(args.data), vae=args.encoder, resolution=args.resolution, out=str(args.cache), grid=args.grid,
                          dtype="fp16", flips="stored", batch=256, workers=args.workers, device=str(device), limit=args.limit)
    res = prepare(opts)
    return {"path": str(res.path), "images": res.images, "bytes": res.bytes, "reused": res.noop,
            "seconds": round(time.perf_counter() - t0, 1)}


def reference(detector, args) -> FeatureStats:
    """Reference statistics of the full training set for `detector`, computed once and kept in --ref-dir."""
    path = args.ref_dir / f"cifar10-train-{detector.name}.npz"
    if path.is_file():
        stats = FeatureStats.load(path)
        if stats.detector == detector.name:
            return stats
    if args.ref_images is None or not args.ref_images.is_file():
        raise SystemExit(f"{path} is missing and --ref-images {args.ref_images} does not exist: compute the reference "
                         f"statistics where train.npz is (python benchmarks/study.py --refs-only)")
    t0 = time.perf_counter()
    stats = reference_stats(args.ref_images, detector, 1000)
    path.parent.mkdir(parents=True, exist_ok=True)
    stats.save(path, detector=detector.name)
    info = {"detector": detector.name, "detector_file": Path(detector.spec.partition(":")[2]).name,
            "detector_sha256": benchlib_sha(Path(detector.spec.partition(":")[2])), "images": str(args.ref_images.name),
            "images_sha256": benchlib_sha(args.ref_images), "count": stats.count, "seconds": round(time.perf_counter() - t0, 1),
            "torch": torch.__version__}
    path.with_suffix(".json").write_text(json.dumps(info, indent=1) + "\n")
    stats.detector = detector.name
    return stats


def benchlib_sha(path: Path) -> str:
    from ahpa.priors.base import sha256_file

    return sha256_file(path)


@torch.no_grad()
def evaluate(bundle, detectors, refs, num: int, batch: int, scfg: SampleCfg) -> dict[str, float]:
    """FD per detector from ONE pass of samples: `ahpa.train.evaluate.evaluate_fd` generates the samples again for
    every detector; this feeds each batch to all detectors instead (same samples, same seeds, same statistics)."""
    stats = [FeatureStats(dim=d.dim, device=d.device) for d in detectors]
    for _, images, _ in iter_samples(bundle, 0, num, 0, batch, scfg):
        x = images.permute(0, 3, 1, 2)  # uint8 NHWC -> NCHW view
        for d, s in zip(detectors, stats):
            s.update(d.features(x))
    return {d.name: s.frechet_distance(r) for d, s, r in zip(detectors, stats, refs)}


def window_means(sums: dict, count: int, seen: dict) -> dict:
    """A window's metric means; a metric that only some of its steps had (the alignment's, in the window where
    align.stop_step ends it) is averaged over those steps."""
    row, good = logger.window_means(sums)
    for k, n in seen.items():
        if 0 < n < count and k in row:  # a window of skipped steps alone has no means
            row[k] = [x * count / n for x in row[k]] if isinstance(row[k], list) else row[k] * count / n
    row["skipped_steps"] = count - round(good)
    return row


def tflop_per_step(model, aligner, batch: int, stop_step: int) -> dict:
    """Model TFLOPs of one training step (3 x the forward's, the MFU convention), with the alignment heads
    ("aligned") and without ("flow", after align.stop_step), so that a speed-up in steps can be read per FLOP:
    at SiT-S/1 the 2048-wide projector adds a quarter to the backbone's arithmetic."""
    flow = 3 * model.flops_per_image() * batch / 1e12
    heads = 3 * aligner.flops_per_image(model.cfg.num_tokens) * batch / 1e12 if aligner is not None else 0.0
    return {"aligned": round(flow + heads, 6), "flow": round(flow, 6), "stop_step": stop_step}


def ema_lengths(trainer, run_dir: Path, args, detectors, refs, scfg: SampleCfg):
    """--ema-lengths: the EMA of each listed sigma_rel at this step, reconstructed from the run's post-hoc snapshots
    (EDM2's least squares, ahpa.train.posthoc_export) and evaluated as the run's EMA is (same samples' seeds): one
    row each, of kind eval_ema, so that a reader of the run's own EMA rows ("eval") never takes one for them; a
    sigma_rel the snapshots cannot represent yields an ema_refused row naming why."""
    p = trainer.parts
    model = copy.deepcopy(p.ema).eval()  # one copy per call, loaded with each reconstruction in turn
    bundle = SamplerBundle(model, trainer.path, p.stats.latent, p.encoder, p.device, p.amp)
    for sigma in args.ema_lengths:
        try:
            state, rec = reconstruct(run_dir, sigma, trainer.step)
        except ValueError as e:
            print(f"sigma_rel {sigma:g} at step {trainer.step}: refused ({e})", flush=True)
            yield {"kind": "ema_refused", "ema_sigma": sigma, "reason": str(e)}
            continue
        model.load_state_dict(state)
        t0 = time.perf_counter()
        fd = evaluate(bundle, detectors, refs, args.eval_num, args.eval_batch, scfg)
        eval_s = time.perf_counter() - t0
        print(f"  sigma_rel {sigma:g} (residual {rec.residual:.2%}): " + ", ".join(f"{k} {v:.4f}" for k, v in fd.items())
              + f" (eval {eval_s:.1f} s)", flush=True)
        yield {"kind": "eval_ema", "ema_sigma": sigma, "ema_residual": round(rec.residual, 6),
               "ema_snapshots": len(rec.sources), "fd": fd, "eval_s": round(eval_s, 2)}


def train_one(args, size_name: str, size: dict, method: str, detectors, refs, device, env: dict, started: float) -> dict:
    cfg = study_config(args, size, method)
    # the key comes from the study's settings without this run's variants: an ablation joins its baselines' table
    key, common = study_key(study_config(args, size, method, variants=False), args, size_name)
    label = method_label(method, args)
    ident = {"study": key, "method": label, "seed": args.seed, "variant": list(args.variant)}
    scfg = SampleCfg(solver="euler", steps=50, cfg_scale=1.0, micro_batch=args.eval_batch)
    safe = file_label(label)
    run_dir = Path(tempfile.mkdtemp(prefix=f"study-{safe}-"))
    t_build = time.perf_counter()
    trainer = Trainer(cfg, run_dir)
    B = cfg.train.batch_size
    build_s = time.perf_counter() - t_build
    al = trainer.parts.aligner
    cost = tflop_per_step(trainer.parts.model, al, B, cfg.align.stop_step)
    points = sorted({*range(args.eval_every, args.steps + 1, args.eval_every), args.steps})
    train_total, windows, diverged, compiled_bundle = 0.0, [], None, None
    watch, good, checked = DivergenceWatch(cfg.train.max_bad_steps), 0, 0  # the library's rule (Trainer.run)
    for point in points:
        sums, seen, count, snap_s = {}, {}, 0, 0.0
        benchlib.sync(device)
        t0 = time.perf_counter()
        while trainer.step < point and not diverged:
            step = trainer.train_step()
            if args.ema_lengths and due(cfg.train, trainer.step):  # timed apart: a side output, not the step's cost
                t_snap = time.perf_counter()
                trainer.parts.posthoc.snapshot(None, 0, run_dir, trainer.step)
                snap_s += time.perf_counter() - t_snap
            for k, v in step.items():
                sums[k] = sums.get(k, 0) + v.detach()
                seen[k] = seen.get(k, 0) + 1
            count += 1
            # device tensors: no host read until the check; fp16's forgiven overflows are no sign (Trainer.run)
            good, checked = good + step["good_steps"] + step.get("overflow_steps", 0), checked + 1
            if trainer.step % DIVERGENCE_CHECK_EVERY == 0:  # one host read per check
                diverged = watch.update(checked, checked - round(float(good)), int(trainer.bad_run.item()))
                good, checked = 0, 0
        benchlib.sync(device)
        dt = time.perf_counter() - t0 - snap_s
        train_total += dt
        windows.append(1000 * dt / max(count, 1))
        if diverged:  # the last evaluation stands; later ones would measure an EMA frozen by skipped steps
            diverged = f"stopped at step {trainer.step}: {diverged}"
            print(f"{label} seed {args.seed} {diverged}", flush=True)
            break
        t0 = time.perf_counter()
        fd = evaluate(trainer.sampler_bundle(), detectors, refs, args.eval_num, args.eval_batch, scfg)
        eval_s = time.perf_counter() - t0
        compiled = {}
        if args.eval_compiled_too:  # the same samples (seeded per index) from the compiled network, timed apart
            t0 = time.perf_counter()
            compiled_bundle = compiled_bundle or trainer.sampler_bundle()  # one compiled network per run: the EMA module is the same object
            compiled["fd_compiled"] = evaluate(compiled_bundle, detectors, refs, args.eval_num, args.eval_batch,
                                               dataclasses.replace(scfg, compile=True))
            compiled["eval_s_compiled"] = round(time.perf_counter() - t0, 2)
        router = None
        if al is not None:
            t, w = al.router_table()
            router = {"mode": al.router.mode, "t": [round(x, 4) for x in t.tolist()],
                      "weights": [[round(x, 5) for x in row] for row in w.tolist()], "levels": al.levels}
        row = {"kind": "eval", **ident, "step": trainer.step, "images": trainer.step * B, "fd": fd,
               "ms_per_step": round(windows[-1], 3), "window_steps": count, "train_s": round(dt, 2), "eval_s": round(eval_s, 2),
               **compiled,
               "metrics": window_means(sums, count, seen), "levels": trainer.parts.levels, "router": router,
               "tflop_per_step": cost,
               "config": common, **env}
        benchlib.append_jsonl(args.results, row)
        print(f"{label} seed {args.seed} step {trainer.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in fd.items())
              + f" ({windows[-1]:.1f} ms/step, eval {eval_s:.1f} s, {time.perf_counter() - started:.0f} s in)", flush=True)
        if args.eval_cfg and point == points[-1]:
            for out in guided_rows(trainer.sampler_bundle(), evaluate, args, detectors, refs, scfg):
                benchlib.append_jsonl(args.results, {**out, **ident, "step": trainer.step, "images": trainer.step * B,
                                                     "tflop_per_step": cost, "config": common, **env})
        if args.ema_lengths and (args.ema_every_point or point == points[-1]):
            for out in ema_lengths(trainer, run_dir, args, detectors, refs, scfg):
                benchlib.append_jsonl(args.results, {**out, **ident, "step": trainer.step, "images": trainer.step * B,
                                                     "tflop_per_step": cost, "config": common, **env})
    grid = None
    if args.grid_images:
        n = args.grid_images
        labels = torch.arange(n) % trainer.parts.model.cfg.num_classes
        images = generate(trainer.sampler_bundle(), list(range(n)), labels, 0, scfg)
        grid = args.results.parent / f"samples-{key}-{safe}-seed{args.seed}-step{trainer.step}.png"
        plots.save_grid(images.numpy(), grid, nrow=10)
    steady = windows[1:] or windows  # the first window holds warm-up (and compilation)
    summary = {"kind": "run", **ident, "steps": trainer.step, "images": trainer.step * B, "complete": not diverged,
               **({"diverged": diverged} if diverged else {}),
               "train_s": round(train_total, 1), "build_s": round(build_s, 1), "ms_per_step_first_window": round(windows[0], 3),
               "ms_per_step_steady": round(statistics.median(steady), 3), "sample_grid": grid.name if grid else None,
               "config": common, **env}
    benchlib.append_jsonl(args.results, summary)
    shutil.rmtree(run_dir, ignore_errors=True)  # nothing in it is kept: the JSON lines hold the run
    return summary


def sigma_list(text: str) -> list[float]:
    """--ema-lengths' value: comma-separated sigma_rel, each in (0, 0.2887) (what a power-function EMA can be)."""
    from ahpa.train.posthoc_ema import SIGMA_MAX

    try:
        sigmas = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated numbers, e.g. 0.03,0.05,0.15") from None
    bad = [s for s in sigmas if not 0 < s < SIGMA_MAX]
    if bad:
        raise argparse.ArgumentTypeError(f"{', '.join(map(str, bad))}: a sigma_rel lies in (0, {SIGMA_MAX:.4f})")
    return sigmas


def parser() -> argparse.ArgumentParser:
    """The command line (tests/test_docs_commands.py reads its flags to check the documented commands)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=tuple(SIZES), default="smoke")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                    help=f"comma list of {', '.join(METHODS)}, or the name of an alignment method registered by an "
                         "installed package (docs/extending.md; run as align.method=NAME, labelled NAME)")
    ap.add_argument("--level", default="stage4", help="the level vae-level aligns (TAEF2: stage1..stage4, latent)")
    ap.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE",
                    help="a method's own switch for an ablation, e.g. align.router_entropy=0, align.levels=[latent,stage4] "
                         "or align.weight=1.5 (lambda; also align.depth, align.projector_dim), or a registered "
                         "method's own setting, align.options.NAME=VALUE (docs/extending.md); "
                         "it names the run (ahpa-soft[router_entropy=0]) and keeps the study key, so the ablation sits in "
                         "the same table as the baselines. Repeatable")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, help="training steps per method (default per size)")
    ap.add_argument("--eval-every", type=int, help="evaluate every N steps, and at the end (default per size)")
    ap.add_argument("--eval-num", type=int, help="samples per evaluation (default per size)")
    ap.add_argument("--eval-batch", type=int, help="samples per generator call (default per size)")
    ap.add_argument("--grid-images", type=int, help="final sample grid per method, PNG beside --results (0 = none)")
    ap.add_argument("--align-depth", type=int, help="override align.depth (default: the study config's; smoke: 2)")
    ap.add_argument("--align-weight", type=float, help="override align.weight (lambda)")
    ap.add_argument("--lr", type=float, help="override train.lr")
    ap.add_argument("--compile", choices=("on", "off"), default="off")
    ap.add_argument("--eval-compiled-too", action="store_true",
                    help="evaluate each point a second time with the sampler compiled (sample.compile), recording "
                         "fd_compiled and eval_s_compiled beside the eager protocol's fd and eval_s: the side-by-side "
                         "check before the study's evaluation may be compiled")
    ap.add_argument("--ema-lengths", type=sigma_list, default=[], metavar="S1,S2,...",
                    help="also evaluate the EMA of each of these sigma_rel (EDM2's relative EMA length; the run's own EMA, "
                         "decay 0.9999 with warm-up, is near 0.09) at the last evaluation point: the run tracks "
                         f"train.posthoc_ema={TRACKED_SIGMAS} with snapshots, and each length is reconstructed from them. "
                         "Rows of kind eval_ema; the run's own rows and the study key are unchanged")
    ap.add_argument("--ema-every-point", action="store_true",
                    help="with --ema-lengths: at every evaluation point instead of the last only (the lengths a point's "
                         "snapshots cannot represent are refused with their reason)")
    ap.add_argument("--eval-cfg", type=guidance_list, default=[], metavar="S1,S2@HIGH,...",
                    help="also evaluate the final EMA with classifier-free guidance of each scale (over the whole "
                         "trajectory, or for t <= HIGH only: 1.8@0.7 is REPA's interval): rows of kind eval_cfg; the run's "
                         "own rows and the study key are unchanged")
    ap.add_argument("--compile-mode", default="default",
                    help="train.compile_mode (e.g. reduce-overhead: CUDA graphs for the host-bound SiT-S/1 step)")
    ap.add_argument("--results", type=Path, required=True, help="JSON-lines file results are appended to")
    ap.add_argument("--data", type=Path, default=SHARED / "data/cifar10/train16k.npz")
    ap.add_argument("--encoder", default=f"taef2:{SHARED / 'weights/taef2'}")
    ap.add_argument("--detectors", default=",".join(f"torchscript:{SHARED / 'detectors' / f}" for f in
                                                    ("cifar10-resnet20.pt", "cifar10-resnet32.pt")))
    ap.add_argument("--ref-dir", type=Path, default=REPO / "benchmarks/results/study/ref",
                    help="reference statistics per detector (cifar10-train-<metric>.npz), computed once")
    ap.add_argument("--ref-images", type=Path, default=SHARED / "data/cifar10/train.npz")
    ap.add_argument("--refs-only", action="store_true", help="compute the reference statistics and stop")
    ap.add_argument("--cache", type=Path, help="TAEF2 cache directory (default: a per-size folder in the temp dir)")
    ap.add_argument("--workers", type=int, default=2, help="prepare's decoding processes")
    ap.add_argument("--budget-s", type=float, default=0, help="start no method whose projected time would pass this")
    ap.add_argument("--lanes", type=int, default=1,
                    help="how many study processes share the device (recorded with every row: ms/step is measured under "
                         "that contention; benchmarks/study_gpu_job.sh runs several)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (CPU runs only; see throughput.py --threads)")
    ap.add_argument("--check", action="store_true", help="check every method's configuration against the prepared "
                    "cache and stop (benchmarks/study_gpu_job.sh checks each lane so before any lane trains)")
    return ap


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with each size's defaults filled in and the cache path resolved."""
    args = parser().parse_args(argv)
    args.variant = parse_variant(args.variant)
    size = SIZES[args.size]
    for name in ("steps", "eval_every", "eval_num", "eval_batch", "grid_images", "limit", "resolution", "grid"):
        if getattr(args, name, None) is None:
            setattr(args, name, size[name])
    args.cache = args.cache or default_cache(args.resolution, args.limit)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    size = SIZES[args.size]
    device = benchlib.resolve_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    check_method_names(methods)
    if args.variant and "none" in methods:  # vanilla SiT reads no alignment switch: it would be a mislabelled copy
        raise SystemExit(f"--variant {' '.join(args.variant)} changes the alignment, which 'none' does not have: run "
                         f"'none' in a job of its own (its rows serve every variant of the same study key)")
    check_variant_values(args, size, methods)
    inputs = None  # (the job's first call prepares the cache with no method: it writes no row)
    # a registered method's numerics are its package's: every row names the installed extensions (study_extensions.py)
    extensions = installed_extensions()
    if methods and not args.refs_only:  # before anything trains: rows of other inputs never join the file's
        inputs = input_hashes(args.data, args.encoder)
        runs = {method_label(m, args): study_key(study_config(args, size, m, variants=False), args, args.size)
                for m in methods}
        check_append(args.results, list(runs.values()), inputs)
        check_append_extensions(args.results, runs, extensions)
    if args.check:  # the prepared cache's levels, without preparing it (the job prepared it first)
        manifest = read_manifest(args.cache)
        check_methods(args, size, methods, [lvl["name"] for lvl in manifest["levels"]] + ["latent"])
        print(f"checked: {', '.join(method_label(m, args) for m in methods) or 'no method'}", flush=True)
        return
    started = time.perf_counter()
    detectors = [load_detector(spec, device) for spec in args.detectors.split(",")]
    refs = [reference(d, args) for d in detectors]
    if args.refs_only:
        return
    env = {**benchlib.device_info(device), "command": benchlib.command_line(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
           "precision": precision_name(autocast_dtype("auto", device)), "compile": args.compile == "on",
           "lanes": args.lanes, "inputs": inputs, "extensions": extensions}
    cache = ensure_cache(args, device)
    print(f"cache: {cache}", flush=True)
    check_methods(args, size, methods, [lvl["name"] for lvl in read_manifest(args.cache)["levels"]] + ["latent"])
    last_cost = None
    for method in methods:
        elapsed = time.perf_counter() - started
        if args.budget_s and last_cost is not None and elapsed + last_cost > args.budget_s:
            print(f"{method}: skipped, {elapsed:.0f} s spent and the last method took {last_cost:.0f} s "
                  f"(budget {args.budget_s:.0f} s)", flush=True)
            # with its study key, so that the report lists it under its study: a lane's second method cut by the
            # budget is named there, not lost
            key, common = study_key(study_config(args, size, method, variants=False), args, args.size)
            benchlib.append_jsonl(args.results, {"kind": "skipped", "study": key, "method": method_label(method, args),
                                                 "seed": args.seed, "reason": "time budget", "config": common, **env})
            continue
        t0 = time.perf_counter()
        train_one(args, args.size, size, method, detectors, refs, device, env, started)
        last_cost = time.perf_counter() - t0
    print(f"study job done in {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
