"""Reading a prepared cache in training: `open_cache(cfg, encoder, levels, grid, device) -> CacheSource`.

Shards are raw row files memory-mapped with numpy (no copy, no decode; the page cache does the rest).
`fetch` is `gather` then `finish`. `gather` (host only) groups a batch's indices by (shard, flip variant)
and gathers each group with one fancy index per field, into pinned buffers on CUDA; `finish` ships the
fp16/bf16 rows to the device, only there converts to float32, samples the posterior, mirrors (generated
flips) and pools to the model's grid. With `start_prefetch` the gathers of the coming steps run in a
background thread (ahpa.data.prefetch) while the current step computes; on CUDA that thread also starts their
copies to the device, on a stream of their own, so the transfer runs beside the step's kernels rather than
between them (on an H200, B/2's then unexplained ~6.6 ms per step matched 256 MB of priors copied on the compute
stream; a later measurement found it gone, with this change and the step's host syncs' removal both in between).

Why raw rows and not safetensors: numpy memmaps gather arbitrary row sets in one vectorised call, the
writer can append rows as they come (the row count of a shard is not known until its bad files are
counted), and dtype and row shape live in the manifest, so nothing but the manifest has to be parsed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ahpa.config import absolute_spec, shown
from ahpa.data.batches import PriorBatch
from ahpa.data.manifest import FORMAT, MANIFEST, NUMPY_DTYPE, SHARD_DIR, read_json
from ahpa.data.prefetch import Prefetcher, Request
from ahpa.data.reduce import load_bases, reconstruct
from ahpa.data.shard_store import CacheError, stats_tensor
from ahpa.data.tokens import flip_tokens, pool_tokens
from ahpa.priors.base import PriorEncoder, posterior_sample
from ahpa.priors.targets import ChannelStats, PriorStats, pool_to_grid

TORCH_DTYPE = {"fp16": torch.float16, "bf16": torch.bfloat16, "int64": torch.int64, "uint8": torch.uint8}


def read_manifest(path: str | Path) -> dict:
    """The manifest of a complete cache, or a CacheError saying what is wrong and what to do."""
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(f"cache directory {shown(directory)} does not exist: create it with `ahpa prepare ... --out "
                                "DIR`, or, if it moved, name its new place (data.path=NEW; a run resumes from a moved cache "
                                "of the same content)")
    file = directory / MANIFEST
    if not file.is_file():
        raise CacheError(f"{directory} has no {MANIFEST}: not a prepared cache; `ahpa prepare --images SRC ... --out DIR` "
                         "makes one in DIR (a folder of images is the SRC, and DIR a folder outside it), then data.path=DIR")
    manifest = read_json(file)
    if manifest.get("format") != FORMAT:
        raise CacheError(f"{file}: format {manifest.get('format')!r}, this version reads {FORMAT!r}; prepare the cache again")
    if not manifest.get("complete"):
        raise CacheError(f"{directory} is an incomplete cache (preparation was interrupted or is still running); "
                         f"rerun the same `ahpa prepare` command to finish it")
    return manifest


def check_encoder(manifest: dict, encoder: PriorEncoder, where: Path) -> None:
    got, have = encoder.identity(), manifest["encoder"]
    if got["weights_sha256"] and have["weights_sha256"]:
        if got["weights_sha256"] != have["weights_sha256"]:
            raise CacheError(f"{where}: field encoder.weights_sha256 differs: cache was encoded by {have['spec']!r} "
                             f"(sha256 {have['weights_sha256'][:12]}...), prior.encoder is {got['spec']!r} "
                             f"(sha256 {got['weights_sha256'][:12]}...); use the same VAE or prepare a new cache")
        if got["spec"].partition(":")[0] != have["spec"].partition(":")[0]:
            raise CacheError(f"{where}: field encoder.spec differs in kind: cache {have['spec']!r}, prior.encoder {got['spec']!r}")
    elif absolute_spec(got["spec"]) != absolute_spec(have["spec"]):  # an older manifest's path may be relative
        raise CacheError(f"{where}: field encoder.spec differs: cache {have['spec']!r}, prior.encoder {got['spec']!r}; "
                         f"use the same VAE or prepare a new cache")


def cache_overview(cfg, encoder: PriorEncoder, method) -> tuple[int, list[str]]:
    """(num_classes, the levels a method may choose from) of the cache named by cfg.data.path, checked early.

    With no align.levels given, a method's default is the cache's levels; levels named explicitly are
    checked by `open_cache`, which says which are missing from the cache.
    """
    if not cfg.data.path:
        raise CacheError("data.source=cache needs data.path=CACHE_DIR (made by `ahpa prepare`)")
    manifest = read_manifest(cfg.data.path)
    check_encoder(manifest, encoder, Path(cfg.data.path))
    if method.levels == "external" and not manifest.get("images"):
        raise CacheError(f"align.method={method.name} aligns to an external encoder that reads the images, and "
                         f"{cfg.data.path} holds latents and VAE levels only: prepare a cache with --store-images (the "
                         "same command, another --out), or train on an .npz of the images (data.source=npz)")
    num_classes = max(manifest["num_classes"], cfg.data.num_classes)
    if cfg.align.levels:
        return num_classes, encoder.level_names
    stored = {l["name"] for l in manifest["levels"]} | {"latent"}
    return num_classes, [n for n in encoder.level_names if n in stored]


def open_cache(cfg, encoder: PriorEncoder, levels: list[str], grid: int, device: torch.device) -> "CacheSource":
    """A CacheSource for cfg.data.path after checking it matches the config; errors name the field and both values."""
    where = Path(cfg.data.path).expanduser()
    manifest = read_manifest(where)
    check_encoder(manifest, encoder, where)
    if manifest["resolution"] != cfg.data.resolution:
        raise CacheError(f"{where}: field resolution differs: cache {manifest['resolution']}, data.resolution "
                         f"{cfg.data.resolution}; set data.resolution={manifest['resolution']} or prepare at {cfg.data.resolution}")
    stored = [l["name"] for l in manifest["levels"]]
    missing = [n for n in levels if n not in stored and n not in ("latent", "external")]
    if missing:
        raise CacheError(f"{where}: field levels: the cache stores {stored} (+ latent), the run aligns {levels}; "
                         f"missing {missing}: set align.levels or prepare with --levels {','.join(stored + missing)}")
    for lvl in manifest["levels"]:
        if lvl["name"] in levels and lvl["channels"] != encoder.level(lvl["name"]).channels:
            raise CacheError(f"{where}: level {lvl['name']!r} has {lvl['channels']} channels in the cache, the encoder "
                             f"{encoder.level(lvl['name']).channels}")
    G = manifest["grid"]
    if G % grid and any(n != "external" for n in levels):  # the grid the levels were pooled to: vanilla SiT reads none
        raise CacheError(f"{where}: field grid: the cache grid {G} is not a multiple of the model grid {grid}; "
                         f"prepare with --grid {grid} (or a multiple of it) or pick a model patch size that fits")
    if cfg.data.hflip and manifest["flips"] == "none":
        raise CacheError(f"{where}: field flips: the cache was prepared with --flips none but data.hflip=true; "
                         f"set data.hflip=false or prepare with --flips stored")
    if cfg.data.num_classes and cfg.data.num_classes < manifest["num_classes"]:
        raise CacheError(f"{where}: field num_classes: the cache has {manifest['num_classes']} classes, "
                         f"data.num_classes={cfg.data.num_classes}")
    return CacheSource(where, manifest, levels, grid, device, limit=cfg.data.limit, num_classes=cfg.data.num_classes)


@dataclass
class HostRows:
    """A batch's rows as gathered: on the host (pinned on CUDA), or already copied to the device on the copy stream
    by the prefetch thread, in which case `ready` is the event that copy recorded."""

    fields: dict[str, torch.Tensor]  # field -> [B, *row shape] in the stored dtype
    labels: torch.Tensor  # int64 [B]
    flip: torch.Tensor  # bool [B]
    ready: torch.cuda.Event | None = None


def ensure_open_files(needed: int, where: Path) -> None:
    """Each memory-mapped field of each shard holds a file descriptor (CPython's mmap keeps one): an ImageNet cache of
    ~300 shards with five levels and stored flips maps ~4,400 files, past the soft limit of 1,024 that many Linux
    machines and schedulers set. The soft limit is raised as far as needed, within the hard limit; beyond that the
    error names the fixes, rather than numpy's "Too many open files" from deep inside the first memmap."""
    try:
        import resource
    except ImportError:  # Windows: no such limit
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed + 256  # the process's other files: libraries, sockets, DataLoader pipes
    if soft == resource.RLIM_INFINITY or soft >= want:
        return
    if hard != resource.RLIM_INFINITY and hard < want:
        raise CacheError(f"{where}: reading this cache maps {needed} files (shards x fields), and this process may open "
                         f"at most {hard} (`ulimit -Hn`): raise the limit (`ulimit -n {want}` where allowed, or ask the "
                         "cluster's admins), read fewer levels (align.levels), or prepare with a larger --shard-size")
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


class CacheSource:
    """Training batches from a prepared cache: the same interface as `ahpa.data.batches.OnTheFly`."""

    def __init__(self, directory: Path, manifest: dict, levels: list[str], grid: int, device: torch.device,
                 limit: int = 0, num_classes: int = 0):
        self.directory, self.manifest, self.grid, self.device = Path(directory), manifest, grid, torch.device(device)
        self.levels = [l for l in levels if l != "external"]
        self.images = "external" in levels  # REPA's encoder reads the stored crops (ahpa prepare --store-images)
        self.num_classes = max(manifest["num_classes"], num_classes)
        self.cache_grid = manifest["grid"]
        self.pool = self.cache_grid // grid
        self.flips = manifest["flips"]
        self.has_logvar = "logvar" in manifest["latent"]["moments"]
        self.samples_posterior = self.has_logvar  # whether fetch uses posterior noise
        fields = manifest["fields"]
        wanted = self._fields(self.levels)
        variants = [""] + (["flip."] if self.flips == "stored" else [])
        self.fields = wanted
        self.specs = {f: fields[f] for f in wanted}
        shards = [s for s in manifest["shards"] if s["rows"] > 0]  # an empty file cannot be memory-mapped
        rows = np.array([s["rows"] for s in shards], np.int64)
        self.starts = np.concatenate([[0], np.cumsum(rows)])  # [S + 1] first global index of each shard
        total = int(self.starts[-1])
        self.length = min(limit, total) if limit else total
        shard_dir = self.directory / SHARD_DIR
        per_shard = len([f for f in wanted if f != "image"]) * len(variants) + self.images + 1  # + labels, briefly
        ensure_open_files(len(shards) * per_shard, self.directory)
        # maps[variant][field][shard] -> memmap [rows, *row_shape]
        self.maps: dict[str, dict[str, list[np.memmap]]] = {}
        for v in variants:
            self.maps[v] = {f: [self._map(shard_dir, s, v + f, fields[v + f]) for s in shards] for f in wanted if f != "image"}
        if self.images:  # one copy, never flipped, for either variant: mirrored exactly when read
            images = [self._map(shard_dir, s, "image", fields["image"]) for s in shards]
            for v in variants:
                self.maps[v]["image"] = images
        labels = [np.asarray(self._map(shard_dir, s, "labels", fields["labels"])) for s in shards]
        reduce = manifest.get("reduce")
        bases = load_bases(self.directory, reduce["sha256"], self.device) if reduce else {}
        self.bases = {n: b for n, b in bases.items() if n in self.levels}  # level -> (mean [C], basis [C, r])
        self.labels = torch.from_numpy(np.concatenate(labels)[: self.length].astype(np.int64))  # [N], small: in memory
        self.prefetcher: Prefetcher[HostRows] | None = None
        self.copy_stream: torch.cuda.Stream | None = None  # the prefetch thread's transfers (CUDA only)

    def _fields(self, levels: list[str]) -> list[str]:
        """The stored fields a batch with these levels (and the images, when an external encoder reads them) reads."""
        return (["latent_mean"] + (["latent_logvar"] if self.has_logvar else [])
                + [f"level.{n}" for n in levels if n != "latent"] + (["image"] if self.images else []))

    @property
    def reads_priors(self) -> bool:
        """Whether a batch reads more than the latent: levels, or the images an external encoder reads."""
        return bool(self.levels) or self.images

    def drop_levels(self) -> None:
        """From now on read and return the latent alone (align.stop_step). A batch the prefetch thread gathered
        before still holds the levels; they are ignored."""
        self.levels, self.images = [], False
        self.fields = self._fields(self.levels)  # one assignment: the prefetch thread sees the old list or the new

    @staticmethod
    def _map(shard_dir: Path, shard: dict, field: str, spec: dict) -> np.memmap:
        info = shard["files"][field]
        path = shard_dir / info["file"]
        shape = (shard["rows"], *spec["shape"])
        expected = NUMPY_DTYPE[spec["dtype"]].itemsize * int(np.prod(shape))
        if not path.is_file() or path.stat().st_size != expected:
            raise CacheError(f"{path} is missing or has the wrong size (expected {expected} bytes); the cache is damaged: "
                             f"rerun its ahpa prepare command with --repair to encode the damaged shards again")
        return np.memmap(path, dtype=NUMPY_DTYPE[spec["dtype"]], mode="r", shape=shape)

    def __len__(self) -> int:
        return self.length

    def _host_buffer(self, rows: int, field: str) -> tuple[torch.Tensor, np.ndarray]:
        """An empty [rows, *row shape] tensor in the stored dtype (pinned on CUDA) and a numpy view to fill it."""
        spec = self.specs[field]
        t = torch.empty((rows, *spec["shape"]), dtype=TORCH_DTYPE[spec["dtype"]], pin_memory=self.device.type == "cuda")
        # numpy has no bfloat16: bf16 rows are filled through a view of their raw 16 bits, as they are stored
        view = t.view(torch.int16).numpy().view(NUMPY_DTYPE["bf16"]) if spec["dtype"] == "bf16" else t.numpy()
        return t, view

    def _gather_rows(self, idx: np.ndarray, variant: np.ndarray) -> dict[str, torch.Tensor]:
        """Rows of every field for global indices `idx` (int64 [B]) from variant 0 (original) or 1 (stored flip)."""
        shard = np.searchsorted(self.starts, idx, side="right") - 1  # [B]
        local = idx - self.starts[shard]
        key = shard * 2 + variant
        order = np.lexsort((local, key))  # grouped by (shard, variant), rows ascending within a group: sequential reads
        groups = np.flatnonzero(np.diff(key[order], prepend=-1))  # start of each group in `order`
        bounds = np.append(groups, len(order))
        out, views = {}, {}
        fields = self.fields  # once: drop_levels may shorten the list while the prefetch thread is here
        for f in fields:
            out[f], views[f] = self._host_buffer(len(idx), f)
        for a, b in zip(bounds[:-1], bounds[1:]):
            sel = order[a:b]
            s, v = int(shard[sel[0]]), int(variant[sel[0]])
            maps = self.maps["flip." if v else ""]
            for f in fields:
                views[f][sel] = maps[f][s][local[sel]]
        return out

    def gather(self, idx: torch.Tensor, flip: torch.Tensor | None) -> HostRows:
        """The host half of `fetch`: checks the request and gathers its rows (thread-safe: reads only)."""
        idx_np = idx.detach().cpu().numpy().astype(np.int64)
        if idx_np.size and (idx_np.min() < 0 or idx_np.max() >= self.length):
            raise IndexError(f"cache index out of range [0, {self.length}): {idx_np.min()}..{idx_np.max()}")
        flip_np = np.zeros(len(idx_np), bool) if flip is None else flip.detach().cpu().numpy().astype(bool)
        if flip_np.any() and self.flips == "none":
            raise CacheError(f"{self.directory} was prepared with --flips none: it cannot serve flipped samples")
        stored = self.flips == "stored"
        rows = self._gather_rows(idx_np, flip_np.astype(np.int64) if stored else np.zeros(len(idx_np), np.int64))
        labels, flips = self.labels[torch.from_numpy(idx_np)], torch.from_numpy(flip_np)
        if self.device.type == "cuda":
            labels, flips = labels.pin_memory(), flips.pin_memory()
        return HostRows(rows, labels, flips)

    def gather_ahead(self, idx: torch.Tensor, flip: torch.Tensor | None) -> HostRows:
        """The prefetch thread's work: `gather`, then on CUDA start the copies on the copy stream (asynchronous:
        the thread does not wait for them; `finish` orders the step's stream after them)."""
        rows = self.gather(idx, flip)
        if self.copy_stream is None:
            return rows
        with torch.cuda.stream(self.copy_stream):
            moved = HostRows({f: t.to(self.device, non_blocking=True) for f, t in rows.fields.items()},
                             rows.labels.to(self.device, non_blocking=True), rows.flip.to(self.device, non_blocking=True),
                             torch.cuda.Event())
            moved.ready.record(self.copy_stream)
        return moved

    def start_prefetch(self, plan: Callable[[int], list[Request]], step: int) -> None:
        """Gather the requests `plan(s)` names for s = step, step + 1, ... in a background thread, one step ahead."""
        self.close()
        if self.device.type == "cuda" and self.copy_stream is None:
            self.copy_stream = torch.cuda.Stream(self.device)
        self.prefetcher = Prefetcher(self.gather_ahead, plan, step, self.device)

    def close(self) -> None:
        """Stops prefetching (waits for a gather in progress); fetch still works, synchronously."""
        if self.prefetcher is not None:
            self.prefetcher.close()
            self.prefetcher = None

    @torch.no_grad()
    def fetch(self, idx: torch.Tensor, flip: torch.Tensor | None, posterior_noise: torch.Tensor | None) -> PriorBatch:
        rows = self.prefetcher.take(idx, flip) if self.prefetcher is not None else None
        return self.finish(rows if rows is not None else self.gather(idx, flip), posterior_noise)

    @torch.no_grad()
    def finish(self, rows: HostRows, posterior_noise: torch.Tensor | None) -> PriorBatch:
        """The device half of `fetch`: transfers (asynchronous from pinned buffers) and the arithmetic."""
        if rows.ready is not None:  # copied ahead on the copy stream: this stream waits for it on the GPU, not the host
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(rows.ready)
            for t in (*rows.fields.values(), rows.labels, rows.flip):
                t.record_stream(stream)  # allocated on the copy stream, used here: not reused before this stream is done
        # 16-bit over the bus, float32 on the device (`.to` is a no-op for rows already there)
        t = {f: rows.fields[f].to(self.device, non_blocking=True) for f in self.fields}
        flip_dev = rows.flip.to(self.device, non_blocking=True)
        images = None
        if "image" in t:  # stored unflipped (both flip modes): mirrored here, exactly, in uint8
            u8 = t.pop("image")  # [B, R, R, 3]
            u8 = torch.where(flip_dev[:, None, None, None], u8.flip(2), u8)
            images = u8.permute(0, 3, 1, 2).float().div_(255.0)  # [B, 3, R, R] in [0, 1]
        t = {f: v.float() for f, v in t.items()}
        noise = posterior_noise.to(self.device) if posterior_noise is not None else None
        latent = posterior_sample(t["latent_mean"], t.get("latent_logvar") if self.has_logvar else None, noise)  # [B, C, h, w]
        if self.flips == "generated":
            latent = torch.where(flip_dev[:, None, None, None], latent.flip(-1), latent)
        maps = {}
        for name in self.levels:
            if name == "latent":
                maps[name] = pool_to_grid(latent, self.grid)  # as on the fly: the sampled latent, pooled
                continue
            tokens = t[f"level.{name}"]  # [B, G*G, C], or [B, G*G, r] PCA coefficients
            if name in self.bases:
                tokens = reconstruct(tokens, *self.bases[name])  # [B, G*G, r] -> [B, G*G, C]
            tokens = pool_tokens(tokens, self.pool)  # [B, G*G, C] -> [B, g*g, C]
            maps[name] = flip_tokens(tokens, flip_dev) if self.flips == "generated" else tokens
        return PriorBatch(latent, maps, rows.labels.to(self.device, non_blocking=True), images)

    def measure_stats(self, num_images: int, generator: torch.Generator) -> PriorStats:
        """The statistics measured at prepare time (every image, originals) at the model's grid."""
        st = self.manifest["stats"]
        per_grid = st["grids"][str(self.grid)] if self.levels else {}  # no level read: any model grid (open_cache)

        def cs(d: dict) -> ChannelStats:
            return ChannelStats(stats_tensor(d["mean"]), stats_tensor(d["std"]))

        return PriorStats(cs(st["latent"]), {n: cs(per_grid[n]) for n in self.levels})
