"""ahpa prepare --images SRC --vae SPEC --resolution R --out CACHE_DIR: a sharded cache of latents and priors.

Rerun the same command to resume an interrupted run (Ctrl-C, SIGTERM and SIGHUP keep the shards written and exit 130 /
143 / 129); on a complete cache it returns at once, or with --repair
checks every file's sha256 and encodes the damaged shards again. Under
torchrun (`torchrun --nproc-per-node N -m ahpa.cli prepare ...`) each process encodes every N-th shard
and rank 0 writes the manifest.
"""

from __future__ import annotations

import os
import sys

from ahpa.commands.examples import with_examples
from ahpa.commands.stopping import run_stoppable


def register(sub) -> None:
    p = sub.add_parser("prepare", help="encode images once into a sharded cache of latents and prior levels", **with_examples(
        "  # a folder of your images, one sub-folder per class (or all at its top level: no labels), through TAEF2 at",
        "  # 64x64; --grid 8 serves a patch-1 SiT (the default grid, latent side / 2, serves patch 2)",
        "  ahpa prepare --images photos/ --vae taef2:weights/taef2 --resolution 64 --grid 8 --out caches/photos64",
        "  # ImageNet through SD-VAE at 256 (saved with diffusers' save_pretrained)",
        "  ahpa prepare --images imagenet/train --vae diffusers:weights/sd-vae-ft-ema --resolution 256 \\",
        "      --out caches/in256",
        "The labels it inferred and the files it skipped or converted are printed, and listed in OUT/report.json;",
        "rerun the same command to resume. Then: ahpa train ... data.source=cache data.path=OUT. More: docs/data.md"))
    p.add_argument("--images", required=True, help="image folder (class sub-folders give labels), .npz (images, labels) or .txt file list")
    p.add_argument("--vae", required=True, help="encoder spec: taef2:DIR | diffusers:DIR_OR_HUB_ID | ahpa-vae:DIR | "
                   "ahpa-vae:random (an untrained small VAE, for smoke tests)")
    p.add_argument("--resolution", type=int, required=True, help="image side R after the ADM centre crop")
    p.add_argument("--out", required=True, help="cache directory")
    p.add_argument("--levels", default="", help="comma-separated levels to store (default: all; the latent is always kept)")
    p.add_argument("--grid", type=int, default=0, help="token grid of the stored levels (default: latent side / 2, i.e. patch 2)")
    p.add_argument("--dtype", default="fp16", help="fp16 | bf16 (storage of moments and levels; default fp16)")
    p.add_argument("--flips", default="stored", help="stored (encode a mirrored copy too; the default) | generated (mirror at read time) | none")
    p.add_argument("--batch", type=int, default=64, help="images per encoder call (default 64)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader processes decoding images (default: the CPUs, at most 8)")
    p.add_argument("--strict", action="store_true", help="fail on the first bad file instead of skipping and reporting it")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default auto)")
    p.add_argument("--precision", default="fp32", help="encoder arithmetic: fp32 | bf16 (part of the cache's identity; default fp32)")
    p.add_argument("--shard-size", type=int, default=4096, help="source items per shard (the unit of resume; default 4096)")
    p.add_argument("--labels", default="auto", help="auto | folders | none (how a folder gives labels)")
    p.add_argument("--limit", type=int, default=0, help="only the first N source items (a folder's: its first classes)")
    p.add_argument("--per-class", type=int, default=0,
                   help="only the first N items of each class, e.g. 100 of each of ImageNet's 1,000 (before --limit)")
    p.add_argument("--reduce", type=int, default=0,
                   help="store levels wider than N channels as N PCA coefficients (basis fitted and kept with the cache)")
    p.add_argument("--reduce-images", type=int, default=1024, help="first source items the PCA bases are fitted on (default 1024)")
    p.add_argument("--store-images", action="store_true",
                   help="keep the uint8 crops as well (R*R*3 bytes per image: ~196 KB at 256), so that REPA's external "
                        "encoder can train from the cache (align.method=repa)")
    p.add_argument("--repair", action="store_true",
                   help="check every finished shard's files against their sha256 (reads them whole; a plain rerun "
                   "checks sizes) and encode the damaged shards again, keeping the rest; not while a run reads the cache")
    p.add_argument("--no-space-check", action="store_true",
                   help="skip the check that the shards still to write fit in the free space of --out's disk (for a "
                   "file system that misreports its free space)")
    p.set_defaults(func=run)


def _distributed():
    """(rank, world, barrier) from torchrun's environment; a gloo group serves as the barrier on any device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, None
    import datetime

    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        # gloo: only barriers are needed, and a long shard imbalance must not time out
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=24))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), world, dist.barrier


def run(args) -> int:
    return run_stoppable(_run, args)


def _run(args) -> int:
    from tqdm import tqdm

    from ahpa.data.listing import default_workers
    from ahpa.data.prepare import PrepareOptions, prepare

    rank, world, barrier = _distributed()
    levels = [s.strip() for s in args.levels.split(",") if s.strip()] or None
    opts = PrepareOptions(
        images=args.images, vae=args.vae, resolution=args.resolution, out=args.out, levels=levels, grid=args.grid,
        dtype=args.dtype, flips=args.flips, batch=args.batch, strict=args.strict,
        workers=default_workers() if args.workers is None else args.workers,
        device=args.device, precision=args.precision, shard_size=args.shard_size, labels=args.labels,
        limit=args.limit, per_class=args.per_class, reduce=args.reduce, reduce_images=args.reduce_images, store_images=args.store_images,
        repair=args.repair, space_check=not args.no_space_check, rank=rank,
        world=world,
    )
    bar = None

    def on_progress(p) -> None:
        nonlocal bar
        if bar is None:
            # one bar, rank 0's: one per rank interleaves their cursor codes in a job's log. Shards go round the
            # ranks, so rank 0's share of the work stands for the whole. The first report is before any encoding: it
            # starts at the shards a resume kept, so that the rate is of the images encoded now
            bar = tqdm(total=p.items_total, initial=p.items_done, unit="img", dynamic_ncols=True, smoothing=0.05,
                       desc=f"prepare{f' [rank 0 of {world}]' if world > 1 else ''}", disable=rank != 0)
        bar.set_postfix(shards=f"{p.shards_done}/{p.shards_total}", skipped=p.skipped, refresh=False)
        bar.update(p.items_done - bar.n)  # redraws (rate-limited by tqdm) with the new postfix

    if rank == 0 and os.path.isdir(args.images):  # the bar comes once every file is listed: 2-4 s for 1.28M files here
        print(f"listing the images under {args.images} ...", file=sys.stderr, flush=True)
    try:
        result = prepare(opts, on_progress, barrier)
    finally:  # an error leaves the process group as it is (ahpa.commands.exit.finish)
        if bar is not None:
            bar.close()
    if rank == 0:
        _report(result, world, args.limit)
    if world > 1:  # torchrun: the process ends here
        from ahpa.commands.exit import finish

        finish(True, 0)
    return 0


def _report(result, world: int = 1, limit: int = 0) -> None:
    from ahpa.disk_space import size_text

    if result.label_doubt:  # said first and on stderr: a class-conditional run may be about to train without labels
        print(f"warning: labels: {result.labels}; {result.label_doubt}", file=sys.stderr)
    if result.empty_classes:  # on stderr, with the doubt: a class-balanced grid of two classes would be half noise
        shown = ", ".join(result.empty_classes[:5]) + (", ..." if len(result.empty_classes) > 5 else "")
        why, fix = "every file of theirs was skipped, or the source names none", "fix or remove those files"
        if limit and result.items == limit:  # the limit cut the listing: its order puts a folder's classes one by one
            why = (f"--limit {limit} keeps the first {limit} source items in the source's order, a folder's sorted one "
                   "class folder after another, so the classes after them get none; or their files were skipped")
            fix = "for a few images of every class, give --per-class N instead of --limit"
        print(f"warning: {len(result.empty_classes)} class(es) hold no image in the cache ({why}): {shown}. The model "
              "still has a class for each, which never trains, and class-balanced samples and evaluations draw it: "
              f"{fix}, then prepare into a new --out (counts per class: {result.path / 'report.json'})", file=sys.stderr)
    if result.noop:
        checked = "every file matches its sha256" if result.checked else "nothing to do"
        print(f"{result.path}: already complete ({result.images:,} images, {size_text(result.bytes)}); {checked}")
        return
    for shard, why in result.repaired.items():
        print(f"repaired {shard}: {why}")
    print(f"{result.path}: {result.images:,} images from {result.items:,} source items, {size_text(result.bytes)} "
          f"({result.bytes / max(result.images, 1) / 1e3:.1f} kB per image); "
          + ("" if world == 1 else f"process 0 of {world}: ")  # each process counts its own shards
          + f"shards written {result.shards_written}, kept {result.shards_reused}")
    if result.labels and not result.label_doubt:
        print(f"labels: {result.labels}")
    if result.conversions:
        print("converted: " + ", ".join(f"{k} x{v}" for k, v in result.conversions.items()))
    if result.ignored:  # not images by their extension: said here too, in case images are among them
        shown = ", ".join(result.ignored[:3]) + (", ..." if len(result.ignored) > 3 else "")
        print(f"ignored {len(result.ignored)} file(s) without an image extension ({shown}; listed in "
              f"{result.path / 'report.json'})", file=sys.stderr)
    if result.skipped:
        print(f"skipped {len(result.skipped)} file(s) (listed in {result.path / 'report.json'}):", file=sys.stderr)
        for name, reason in result.skipped[:20]:
            print(f"  {name}: {reason}", file=sys.stderr)
        if len(result.skipped) > 20:
            print(f"  ... and {len(result.skipped) - 20} more", file=sys.stderr)
