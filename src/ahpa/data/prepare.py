"""`prepare`: images -> a sharded cache of latent moments and multi-level priors (see ahpa.data.manifest).

The library function behind `ahpa prepare`: it never prints; progress goes to a callback. Images are
decoded and ADM-cropped in DataLoader workers, encoded in batches on the device, pooled to the token
grid, rounded to fp16/bf16 and appended to the current shard's files by a writer thread. A shard is
committed (data renamed into place, then its record written) only when whole, and the manifest says
"complete": true only after every shard of every process is committed: an interrupted run leaves a cache
that readers refuse and that rerunning the same command resumes.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ahpa.data.listing import Item, Listing, assemble, list_source, make_loader
from ahpa.data.manifest import (
    DTYPES, FLIPS, FORMAT, MANIFEST, SHARD_DIR, atomic_write_bytes, atomic_write_json, identity_view, read_json,
    settings_differences,
)  # fmt: skip
from ahpa.data.reduce import REDUCE_FILE, fit_bases, load_bases, project, reconstruct
from ahpa.data.shard_store import ShardPlan, check_output_dir, finalize_cache, sweep_shards
from ahpa.data.shard_writer import AsyncShardWriter, sum_arrays
from ahpa.data.tokens import divisor_grids, pool_tokens
from ahpa.priors.base import PriorEncoder, posterior_sample
from ahpa.priors.targets import StatsAccumulator, pool_to_grid

PRECISIONS = ("fp32", "bf16")
TORCH_DTYPE = {"fp16": torch.float16, "bf16": torch.bfloat16}
NOISE_STREAM = 31  # posterior draws for the latent statistics: from (seed, shard), never from the batch size


class PrepareError(ValueError):
    """A user-facing problem with the inputs, the output directory or an existing cache."""


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
    reduce: int = 0  # store levels with more channels as this many PCA coefficients (0 = store every channel)
    reduce_images: int = 1024  # first source items the PCA bases are fitted on
    seed: int = 0  # posterior draws for the statistics
    rank: int = 0
    world: int = 1


@dataclass
class Progress:
    items_done: int  # source items handled, this run and resumed shards together
    items_total: int  # source items of this process's shards
    images_written: int
    skipped: int
    shards_done: int
    shards_total: int


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
        if (R // lvl.stride) % grid:
            raise PrepareError(f"level {lvl.name!r} ({R // lvl.stride}x{R // lvl.stride}) is not divisible by --grid {grid}")
    has_logvar = encoder.encode(torch.zeros(1, 3, f, f, device=_device_of(encoder))).logvar is not None
    return {
        "format": FORMAT,
        "encoder": encoder.identity(),
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
    }


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
    listing = list_source(o.images, o.labels, o.limit)  # missing path / empty folder: fail before any work
    out = Path(o.out).expanduser()
    check_output_dir(out)
    from ahpa.priors.registry import load_encoder
    from ahpa.train.build import resolve_device

    device = resolve_device(o.device)
    if o.device == "auto" and device.type == "cuda" and o.world > 1:
        device = torch.device("cuda", torch.cuda.current_device())
    encoder = encoder if encoder is not None else load_encoder(o.vae, device)
    device = _device_of(encoder)
    settings = plan_settings(o, encoder, listing)
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
    if saved.get("complete"):
        plan.check_complete(saved)
        return PrepareResult(out, True, True, saved["count"], len(listing), bytes=plan.total_bytes(saved))

    mine = [i for i in range(plan.num_shards) if i % o.world == o.rank]
    reused, todo = sweep_shards(plan, mine)
    state = _Run(o, listing, encoder, settings, plan, device, on_progress)
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
                         len(todo), len(reused), plan.total_bytes(manifest))


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


class _Run:
    """The encoding loop of one process over its shards still to do."""

    def __init__(self, o, listing, encoder, settings, plan, device, on_progress):
        self.o, self.listing, self.encoder, self.settings, self.plan = o, listing, encoder, settings, plan
        self.device, self.on_progress = device, on_progress
        self.levels = [l["name"] for l in settings["levels"]]
        self.grid = settings["grid"]
        self.grids = divisor_grids(self.grid)
        self.logvar = settings["latent"]["moments"] == ["mean", "logvar"]
        self.store = TORCH_DTYPE[o.dtype]
        reduce = settings["reduce"]
        self.bases = load_bases(plan.directory, reduce["sha256"], device) if reduce else {}
        self.items_done = self.items_total = self.images = self.shards_done = self.shards_total = 0
        self.skipped: list[list[str]] = []
        self.conversions: Counter = Counter()

    def encode_shards(self, todo: list[int]) -> None:
        if not todo:
            return
        S, B = self.o.shard_size, self.o.batch
        batches = []
        for i in todo:
            lo, hi = self.plan.items(i)
            batches += [list(range(s, min(s + B, hi))) for s in range(lo, hi, B)]  # never across a shard boundary
        loader = make_loader(self.listing, self.o.resolution, batches, self.o.workers)
        writer = AsyncShardWriter(self.plan.shard_dir)
        shard = None
        try:
            for items in loader:
                i = items[0].index // S
                if shard is None or shard.index != i:
                    if shard is not None:
                        self._commit(shard, writer)
                    shard = self._open(i, writer)
                self._batch(items, shard, writer)
                self.report()
            if shard is not None:
                self._commit(shard, writer)
                self.report()
        finally:
            writer.close()

    def report(self) -> None:
        if self.on_progress is not None:
            self.on_progress(Progress(self.items_done, self.items_total, self.images, len(self.skipped),
                                      self.shards_done, self.shards_total))

    def fields(self) -> list[str]:
        names = ["latent_mean"] + (["latent_logvar"] if self.logvar else []) + [f"level.{n}" for n in self.levels]
        return names + [f"flip.{n}" for n in names] * (self.o.flips == "stored") + ["labels", "source_index"]

    def _open(self, index: int, writer: AsyncShardWriter) -> "_Shard":
        lo, hi = self.plan.items(index)
        writer.open({f: self.plan.field_file(index, f) for f in self.fields()})
        noise = None
        if self.logvar:
            from ahpa.train.rng import generator

            lat = self.settings["latent"]
            g = generator(self.o.seed, index, stream=NOISE_STREAM)
            noise = torch.randn((hi - lo, lat["channels"], lat["side"], lat["side"]), generator=g)  # [items, C, h, w]
        sums = {"latent": StatsAccumulator()} | {f"g{g}": StatsAccumulator() for g in self.grids}
        return _Shard(index, lo, hi, noise, sums)

    def _fail_or_skip(self, shard: "_Shard", it: Item) -> None:
        name = self.listing.name(it.index)
        if self.o.strict:
            raise PrepareError(f"{name}: {it.reason} (--strict turns bad files into errors; without it they are "
                               f"skipped and listed in report.json)")
        shard.skipped.append([name, it.reason])
        self.skipped.append([name, it.reason])

    @torch.no_grad()
    def _batch(self, items: list[Item], shard: "_Shard", writer: AsyncShardWriter) -> None:
        good = []
        for it in items:
            if it.image is None:
                self._fail_or_skip(shard, it)
            else:
                good.append(it)
                shard.conversions.update(it.conversions)
                self.conversions.update(it.conversions)
        self.items_done += len(items)
        if not good:
            return
        n = len(good)
        x = assemble(good, self.o.resolution, self.device)  # [n, 3, R, R] in [0, 1]
        if self.o.flips == "stored":
            x = torch.cat([x, x.flip(-1)])  # [2n, 3, R, R]: originals, then their mirror images
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.o.precision == "bf16"):
            out = self.encoder.encode(x, self.levels)
        rows = {"latent_mean": out.mean.float().to(self.store)}
        if self.logvar:
            rows["latent_logvar"] = out.logvar.float().to(self.store)
        read = {}  # level -> the float tokens the reader will rebuild from the stored rows
        for name in self.levels:
            tokens = pool_to_grid(out.features[name].float(), self.grid)  # [n or 2n, G*G, C]
            if name in self.bases:
                stored = project(tokens, *self.bases[name]).to(self.store)  # [.., G*G, r] PCA coefficients
                read[name] = reconstruct(stored, *self.bases[name])
            else:
                stored = tokens.to(self.store)
                read[name] = stored.float()
            rows[f"level.{name}"] = stored
        if self.o.flips == "stored":
            rows = {k: v[:n] for k, v in rows.items()} | {f"flip.{k}": v[n:] for k, v in rows.items()}
        self._measure(rows, {k: v[:n] for k, v in read.items()}, shard, [it.index for it in good])
        on_gpu = self.device.type == "cuda"
        host = {k: v.contiguous().to("cpu", non_blocking=on_gpu) for k, v in rows.items()}
        ready = None
        if on_gpu:
            ready = torch.cuda.Event()
            ready.record()
        idx = np.array([it.index for it in good], np.int64)
        host["labels"] = torch.from_numpy(self.listing.labels[idx])
        host["source_index"] = torch.from_numpy(idx)
        writer.append(host, ready)
        shard.rows += n
        self.images += n

    def _measure(self, rows: dict[str, torch.Tensor], read: dict[str, torch.Tensor], shard: "_Shard", index: list[int]) -> None:
        """Statistics of the stored (rounded) values exactly as the reader will see them; originals only.

        Every level (and the pooled latent) is concatenated along channels so that each grid costs a few
        large reductions instead of a few small ones per level.
        """
        noise = shard.noise[torch.tensor(index) - shard.lo].to(self.device) if self.logvar else None  # [n, C, h, w]
        latent = posterior_sample(rows["latent_mean"], rows["latent_logvar"] if self.logvar else None, noise)
        shard.sums["latent"].update(latent, channel_dim=1)
        parts = [pool_to_grid(latent, self.grid)] + [read[n] for n in self.levels]
        tokens = torch.cat(parts, dim=2)  # [n, G*G, C_latent + sum C_k]
        for g in self.grids:
            shard.sums[f"g{g}"].update(pool_tokens(tokens, self.grid // g), channel_dim=2)

    def _commit(self, shard: "_Shard", writer: AsyncShardWriter) -> None:
        files = writer.finish()
        names = ["latent", *self.levels]
        widths = [self.settings["latent"]["channels"]] + [self._channels(n) for n in self.levels]
        bounds = np.cumsum([0, *widths])
        sums = {f"latent.{k}": v for k, v in sum_arrays(shard.sums["latent"], widths[0]).items()}
        for g in self.grids:
            arrays = sum_arrays(shard.sums[f"g{g}"], int(bounds[-1]))
            for name, a, b in zip(names, bounds[:-1], bounds[1:]):  # split the concatenated channels per level
                sums[f"g{g}.{name}.n"] = arrays["n"]
                sums[f"g{g}.{name}.s1"], sums[f"g{g}.{name}.s2"] = arrays["s1"][a:b], arrays["s2"][a:b]
        for key, arr in sums.items():
            if not np.isfinite(arr).all():
                raise PrepareError(f"{key.rsplit('.', 1)[0]} of shard {shard.index} has values outside the {self.o.dtype} "
                                   f"range (non-finite after rounding); prepare with --dtype bf16")
        self.plan.commit(shard.index, (shard.lo, shard.hi), shard.rows, files, sums, shard.skipped,
                         dict(sorted(shard.conversions.items())))
        self.shards_done += 1

    def _channels(self, name: str) -> int:
        return next(l["channels"] for l in self.settings["levels"] if l["name"] == name)


@dataclass
class _Shard:
    index: int
    lo: int
    hi: int
    noise: torch.Tensor | None
    sums: dict[str, StatsAccumulator]
    rows: int = 0
    skipped: list[list[str]] = field(default_factory=list)
    conversions: Counter = field(default_factory=Counter)
