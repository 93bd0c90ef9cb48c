"""`prepare`: images -> a sharded cache of latent moments and multi-level priors (see ahpa.data.manifest).

The library function behind `ahpa prepare`: it never prints; progress goes to a callback. This module is
the orchestration: options and their checks, the cache's settings, the PCA bases, resume, and the final
merge. Images are decoded and ADM-cropped in DataLoader workers, encoded in batches on the device, pooled
to the token grid, rounded to fp16/bf16 and appended to the current shard's files by a writer thread
(that loop is ahpa.data.shard_encoder). A shard is committed (data renamed into place, then its record
written) only when whole, and the manifest says "complete": true only after every shard of every process
is committed: an interrupted run leaves a cache that readers refuse and that rerunning the same command
resumes. PrepareError and Progress are defined in ahpa.data.shard_encoder and importable from here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ahpa.config import absolute_spec
from ahpa.data.listing import Listing, list_source, make_loader
from ahpa.data.manifest import (
    DTYPES, FLIPS, FORMAT, MANIFEST, REPORT, SHARD_DIR, atomic_write_bytes, atomic_write_json, identity_view, read_json,
    settings_differences, shard_stem,
)  # fmt: skip
from ahpa.data.reduce import REDUCE_FILE, fit_bases
from ahpa.data.shard_encoder import PrepareError, Progress, ShardEncoder
from ahpa.data.shard_store import (
    ShardPlan, bytes_to_write, check_output_dir, damaged_shards, delete_shards, empty_classes, finalize_cache,
    sweep_shards,
)  # fmt: skip
from ahpa.data.tokens import divisor_grids
from ahpa.disk_space import free_space, size_text
from ahpa.priors.base import PriorEncoder
from ahpa.priors.targets import uneven_pooling

PRECISIONS = ("fp32", "bf16")


@dataclass
class PrepareOptions:
    images: str  # folder | .npz | .txt/.lst file list
    vae: str  # encoder spec: taef2:DIR | diffusers:DIR_OR_HUB_ID | ahpa-vae:DIR
    resolution: int
    out: str
    levels: list[str] | None = None  # levels to store; None = every level ('latent' is always derivable)
    grid: int = 0  # token grid the levels are pooled to; 0 = latent side // 2 (a patch-2 model)
    dtype: str = "fp16"
    flips: str = "stored"  # stored: a flipped copy encoded too | generated: mirrored at read time | none
    batch: int = 64
    workers: int = 4
    strict: bool = False  # a bad file fails the run instead of being skipped and reported
    device: str = "auto"
    precision: str = "fp32"  # encoder arithmetic: fp32 | bf16 (autocast)
    shard_size: int = 4096  # source items per shard: the unit of resume
    labels: str = "auto"  # auto | folders | none
    limit: int = 0  # only the first N source items (0 = all)
    per_class: int = 0  # only the first N items of each class, in the source's order (0 = all); before limit
    reduce: int = 0  # store levels with more channels as this many PCA coefficients (0 = store every channel)
    reduce_images: int = 1024  # first source items the PCA bases are fitted on
    store_images: bool = False  # keep the uint8 crops too: REPA's external encoder reads them (R*R*3 bytes each)
    seed: int = 0  # posterior draws for the statistics
    repair: bool = False  # a complete cache: check every file's sha256 and encode the damaged shards again
    space_check: bool = True  # refuse, before any work, shards that need more bytes than the disk has free
    rank: int = 0
    world: int = 1


@dataclass
class PrepareResult:
    path: Path
    noop: bool  # the cache was already complete with these settings
    complete: bool
    images: int  # images in the complete cache (or written by this process when not rank 0)
    items: int  # source items
    skipped: list[list[str]] = field(default_factory=list)  # [name, reason]
    conversions: dict[str, int] = field(default_factory=dict)
    shards_written: int = 0
    shards_reused: int = 0
    bytes: int = 0
    repaired: dict[str, str] = field(default_factory=dict)  # --repair: {shard: what was wrong}, found by rank 0
    checked: bool = False  # --repair found a complete cache intact, every file hashed
    ignored: list[str] = field(default_factory=list)  # files of a folder without an image extension (not read)
    labels: str = ""  # where the labels come from (Listing.labels_text)
    label_doubt: str = ""  # what to do when they are likely not what was meant (Listing.label_doubt)
    empty_classes: list[str] = field(default_factory=list)  # classes left without an image (their files skipped)


CACHE_ENTRIES = (MANIFEST, REPORT, SHARD_DIR, REDUCE_FILE)  # what a cache directory holds


def _check_not_foreign(out: Path, listing: Listing) -> None:
    """Refuse an --out that would put the cache's files among other files: a folder of the source images, or a
    non-empty directory that is not a cache (a run directory, a photo folder). A cache's own files, even without its
    manifest (a first attempt that stopped early), are a cache to resume."""
    if listing.kind == "folder" and out.resolve().is_relative_to(listing.location.resolve()):
        raise PrepareError(f"--out {out} lies inside the image folder --images {listing.location}: the cache's files "
                           "would sit among the images. Choose a directory outside it")
    if out.is_dir() and not (out / MANIFEST).exists():
        foreign = sorted(e.name for e in out.iterdir() if e.name not in CACHE_ENTRIES and not e.name.startswith("."))
        if foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise PrepareError(f"--out {out} holds other files ({shown}) and no cache of `ahpa prepare` (no "
                               f"{MANIFEST}); a cache writes {', '.join(CACHE_ENTRIES[:3])} there. Choose a new or "
                               "empty directory")


def _check_options(o: PrepareOptions) -> None:
    checks = [
        (o.resolution > 0, f"--resolution must be positive, got {o.resolution}"),
        (o.dtype in DTYPES, f"--dtype {o.dtype!r} is not valid; valid: {', '.join(DTYPES)}"),
        (o.flips in FLIPS, f"--flips {o.flips!r} is not valid; valid: {', '.join(FLIPS)}"),
        (o.precision in PRECISIONS, f"--precision {o.precision!r} is not valid; valid: {', '.join(PRECISIONS)}"),
        (o.batch >= 1, f"--batch must be >= 1, got {o.batch}"),
        (o.workers >= 0, f"--workers must be >= 0, got {o.workers}"),
        (o.shard_size >= 1, f"--shard-size must be >= 1, got {o.shard_size}"),
        (o.grid >= 0, f"--grid must be >= 1 (or 0 for the default), got {o.grid}"),
        (o.limit >= 0, f"--limit must be >= 0, got {o.limit}"),
        (o.per_class >= 0, f"--per-class must be >= 0, got {o.per_class}"),
        (o.reduce >= 0, f"--reduce must be >= 0 (0 = no reduction), got {o.reduce}"),
        (o.reduce_images >= 1, f"--reduce-images must be >= 1, got {o.reduce_images}"),
        (0 <= o.rank < o.world, f"rank {o.rank} is outside [0, world={o.world})"),
    ]
    for ok, msg in checks:
        if not ok:
            raise PrepareError(msg)


def plan_settings(o: PrepareOptions, encoder: PriorEncoder, listing: Listing) -> dict:
    """The cache's identifying settings (manifest fields), after checking them against the encoder."""
    R, f = o.resolution, encoder.factor
    if R % f:
        raise PrepareError(f"--resolution {R} is not divisible by the VAE factor {f} of {encoder.spec!r}")
    side = R // f
    grid = o.grid or (side // 2 if side % 2 == 0 else side)
    if side % grid:
        raise PrepareError(f"--grid {grid} does not divide the latent side {side} (resolution {R} / factor {f}); "
                           f"valid grids: {', '.join(map(str, divisor_grids(side)))}")
    names = encoder.level_names if o.levels is None else list(o.levels)
    for n in names:
        if n not in encoder.level_names:
            raise PrepareError(f"--levels names {n!r}, which {encoder.spec!r} does not have; its levels are {encoder.level_names}")
    stored = [encoder.level(n) for n in encoder.level_names if n in names and n != "latent"]  # encoder order
    for lvl in stored:
        if why := uneven_pooling(lvl, R, grid):
            fits = [str(g) for g in divisor_grids(side) if not uneven_pooling(lvl, R, g)]
            fix = (f"choose --grid {' or '.join(fits)}, or leave the level out of --levels" if fits else
                   "leave the level out of --levels (no grid of the latent fits it)")
            raise PrepareError(f"--grid {grid}: {why}; {fix}")
    # one blank image at the real size: a smaller one can fail in the encoder (a GroupNorm over a 1x1 map)
    has_logvar = encoder.encode(torch.zeros(1, 3, R, R, device=_device_of(encoder))).logvar is not None
    return {
        "format": FORMAT,
        # a local path as typed (--vae ahpa-vae:vae) would mean another folder, or none, to a run started elsewhere
        # and to the messages that name it; a hub id stays as written. Matched by sha256 where there is one
        "encoder": {**encoder.identity(), "spec": absolute_spec(encoder.spec)},
        "resolution": R,
        "grid": grid,
        "dtype": o.dtype,
        "flips": o.flips,
        "precision": o.precision,
        "levels": [{"name": l.name, "channels": l.channels, "stride": l.stride,
                    "stored_channels": min(l.channels, o.reduce) if o.reduce else l.channels} for l in stored],
        "latent": {"channels": encoder.latent_channels, "factor": f, "side": side,
                   "moments": ["mean", "logvar"] if has_logvar else ["mean"]},
        "source": {"kind": listing.kind, "path": str(listing.location.resolve()), "count": len(listing),
                   "fingerprint": listing.fingerprint()},
        "labels": {"mode": o.labels, "num_classes": listing.num_classes, "class_names": listing.class_names},
        "shard_size": o.shard_size,
        "seed": o.seed,
        "crop": "adm-center (BOX halving, BICUBIC, centre crop); smaller than R: torch bicubic upsample, centre crop",
        "reduce": {"dim": o.reduce, "images": min(o.reduce_images, len(listing))}
        if o.reduce and any(l.channels > o.reduce for l in stored) else None,
        "images": True if o.store_images else None,  # None, not False: caches from before the option compare equal
    }


def check_space(out: Path, settings: dict, items: int, shard_size: int) -> None:
    """Refuse a cache whose shards still to write need more bytes than the disk holding `out` has free: found before
    any work, it is a choice of options; found when the disk fills, days of encoding under settings that cannot
    change without starting again (at 512, every level with stored flips is 10 TB for ImageNet). What is still to
    encode: all of a new cache, the shards a resume lacks; a complete one is a no-op (or --repair's few shards), and
    one of other settings is refused by prepare, naming them."""
    saved = read_json(out / MANIFEST) if (out / MANIFEST).is_file() else None
    if saved is not None and (saved.get("complete") or settings_differences(saved, settings)):
        return
    need, todo, per_item = bytes_to_write(ShardPlan(out, items, shard_size, ""), settings)
    disk, free = free_space(out)
    if need > free:
        raise PrepareError(
            f"--out {out}: the cache needs up to {size_text(need)} more ({per_item:,} B per image x {todo:,} images to "
            f"encode) and {disk} has {size_text(free)} free. Free space, choose another --out, or store less per image "
            "(docs/data.md, 'Storage'): --flips generated or none halves it, --reduce N or --levels stores fewer "
            "bytes. If the file system misreports its free space, add --no-space-check")


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def prepare(
    o: PrepareOptions,
    on_progress: Callable[[Progress], None] | None = None,
    barrier: Callable[[], None] | None = None,
    encoder: PriorEncoder | None = None,
) -> PrepareResult:
    """Prepare (or resume, or confirm) the cache `o.out`. `barrier` synchronises the processes of a torchrun."""
    _check_options(o)
    listing = list_source(o.images, o.labels, o.limit, o.per_class)  # missing path / empty folder: fail before any work
    out = Path(o.out).expanduser()
    check_output_dir(out)
    _check_not_foreign(out, listing)
    from ahpa.priors.registry import load_encoder
    from ahpa.device import resolve_device

    device = resolve_device(o.device, "--device")
    if o.device == "auto" and device.type == "cuda" and o.world > 1:
        device = torch.device("cuda", torch.cuda.current_device())
    encoder = encoder if encoder is not None else load_encoder(o.vae, device)
    device = _device_of(encoder)
    settings = plan_settings(o, encoder, listing)
    if o.rank == 0 and o.space_check:  # what is still to encode must fit
        check_space(out, settings, len(listing), o.shard_size)
    try:
        (out / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PrepareError(f"cannot create the cache directory {out}: {e}; choose a writable --out") from None
    if o.rank == 0 and not (out / MANIFEST).exists():
        if settings["reduce"]:  # the bases come first: every shard is written in their coordinates
            settings["reduce"] |= fit_reduction(o, listing, encoder, settings, device, out)
        atomic_write_json(out / MANIFEST, {**settings, "complete": False})
    if barrier is not None:
        barrier()
    saved = read_json(out / MANIFEST)
    diffs = settings_differences(saved, settings)
    if diffs:
        raise PrepareError(f"{out} holds a cache prepared with other settings:\n  " + "\n  ".join(diffs)
                           + "\nUse another --out, or delete the directory to prepare it again.")
    settings["reduce"] = saved.get("reduce")  # with the checksum of the basis file fitted by the first run
    plan = ShardPlan(out, len(listing), o.shard_size, _digest(settings))
    repaired: dict[str, str] = {}
    hashed = saved.get("complete") and o.repair
    if hashed:
        # rank 0 checks every file; damaged shards are deleted and the cache reopened, so that the resume below
        # encodes just them (its own check can then be by size: the rest were hashed a moment ago)
        if o.rank == 0:
            damaged = damaged_shards(plan, range(plan.num_shards))
            repaired = {shard_stem(i): why for i, why in damaged.items()}
            if damaged:
                delete_shards(plan, damaged)
                atomic_write_json(out / MANIFEST, {**settings, "complete": False})
        if barrier is not None:
            barrier()
        saved = read_json(out / MANIFEST)
    if saved.get("complete"):
        plan.check_complete(saved)
        report = read_json(out / REPORT) if (out / REPORT).is_file() else {}
        return PrepareResult(out, True, True, saved["count"], len(listing), bytes=plan.total_bytes(saved),
                             checked=bool(hashed), labels=listing.labels_text(), label_doubt=listing.label_doubt,
                             empty_classes=empty_classes(report))

    mine = [i for i in range(plan.num_shards) if i % o.world == o.rank]
    # a record is written after its shard's files are fsynced and renamed into place: a plain resume checks sizes
    # (hashing 1.3 TB of finished ImageNet shards: ~20 min per requeue, estimated from 1.1 GB/s hashed here); --repair hashes them
    reused, todo = sweep_shards(plan, mine, full=bool(o.repair and not hashed))
    state = ShardEncoder(o, listing, encoder, settings, plan, device, on_progress)
    state.items_done = sum(plan.items(i)[1] - plan.items(i)[0] for i in reused)
    state.items_total = sum(plan.items(i)[1] - plan.items(i)[0] for i in mine)
    state.shards_done, state.shards_total = len(reused), len(mine)
    state.report()
    state.encode_shards(todo)
    if barrier is not None:
        barrier()
    if o.rank != 0:
        if barrier is not None:
            barrier()
        return PrepareResult(out, False, False, state.images, len(listing), state.skipped, dict(state.conversions),
                             len(todo), len(reused))
    manifest, report = finalize_cache(plan, settings, listing)
    if barrier is not None:
        barrier()
    return PrepareResult(out, False, True, manifest["count"], len(listing), report["skipped"], report["conversions"],
                         len(todo), len(reused), plan.total_bytes(manifest), repaired, ignored=list(listing.ignored),
                         labels=listing.labels_text(), label_doubt=listing.label_doubt,
                         empty_classes=empty_classes(report))


def _digest(settings: dict) -> str:
    import hashlib

    ident = identity_view(settings) | {"reduce_sha256": (settings.get("reduce") or {}).get("sha256")}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def fit_reduction(o: PrepareOptions, listing: Listing, encoder: PriorEncoder, settings: dict, device: torch.device,
                  out: Path) -> dict:
    """Fit the PCA bases (levels wider than --reduce, first --reduce-images items) and write the basis file.

    Returns the manifest entries {sha256, file, variance_kept}.
    """
    wide = [l["name"] for l in settings["levels"] if l["stored_channels"] < l["channels"]]
    n = settings["reduce"]["images"]
    batches = [list(range(s, min(s + o.batch, n))) for s in range(0, n, o.batch)]
    loader = make_loader(listing, o.resolution, batches, o.workers)
    data, sha, kept = fit_bases(encoder, loader, wide, settings["grid"], o.resolution, o.reduce, o.precision, device)
    atomic_write_bytes(out / REDUCE_FILE, data)
    return {"sha256": sha, "file": REDUCE_FILE, "variance_kept": {k: round(v, 6) for k, v in kept.items()}}
