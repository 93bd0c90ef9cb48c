"""The per-process shard encoding loop of `prepare`: decoded batches -> encoder -> stored rows, statistics, commits.

ShardEncoder runs over the shards one process still has to do: batches (never across a shard boundary)
come from DataLoader workers, are encoded on the device, pooled to the token grid, rounded to the cache
dtype and handed to an AsyncShardWriter; the statistics are measured on the rounded values exactly as the
reader will rebuild them, and a shard is committed only when whole. Options, planning and the manifest
are ahpa.data.prepare. PrepareError (raised here for --strict and for non-finite rows) lives here, not in
prepare, so that prepare can import this module without a cycle (as CacheError lives in ahpa.data.shard_store).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from ahpa.data.listing import Item, assemble, make_loader, to_uint8_hwc
from ahpa.data.reduce import load_bases, project, reconstruct
from ahpa.data.shard_writer import AsyncShardWriter, sum_arrays
from ahpa.data.tokens import divisor_grids, pool_tokens
from ahpa.device import autocast
from ahpa.priors.base import posterior_sample
from ahpa.priors.targets import StatsAccumulator, pool_to_grid

TORCH_DTYPE = {"fp16": torch.float16, "bf16": torch.bfloat16}


class PrepareError(ValueError):
    """A user-facing problem with the inputs, the output directory or an existing cache."""


@dataclass
class Progress:
    items_done: int  # source items handled, this run and resumed shards together
    items_total: int  # source items of this process's shards
    images_written: int
    skipped: int
    shards_done: int
    shards_total: int


class ShardEncoder:
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
        images = ["image"] if self.settings.get("images") else []
        return names + [f"flip.{n}" for n in names] * (self.o.flips == "stored") + images + ["labels", "source_index"]

    def _open(self, index: int, writer: AsyncShardWriter) -> "_Shard":
        lo, hi = self.plan.items(index)
        writer.open({f: self.plan.field_file(index, f) for f in self.fields()})
        noise = None
        if self.logvar:
            from ahpa.train.rng import NOISE_STREAM, generator

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
        # exact for crops of images at least R wide; upsampled smaller ones are rounded to 8 bits here
        image = to_uint8_hwc(x) if self.settings.get("images") else None  # [n, R, R, 3]
        if self.o.flips == "stored":
            x = torch.cat([x, x.flip(-1)])  # [2n, 3, R, R]: originals, then their mirror images
        with autocast(self.device, torch.bfloat16 if self.o.precision == "bf16" else None):
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
        if image is not None:
            rows["image"] = image
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
