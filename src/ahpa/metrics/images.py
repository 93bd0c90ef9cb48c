"""Image sources for metrics.

A source is an `.npz` holding uint8 NHWC images under `arr_0` (ADM's sample format) or `images` (our
CIFAR files), a folder of image files (the files `ahpa prepare` lists, in its order; an `ImageFolder` to read
them at one resolution as prepare crops them), an in-memory uint8 NHWC array, or any iterable of uint8 NHWC
batches (a sampler that feeds metrics without writing files, as in EDM2). Batches come out as uint8 NHWC, the storage format; `ahpa.metrics.measurement` turns them into the
detector's NCHW on the way in.
"""

from __future__ import annotations

import warnings
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# prepare's listing and decoding, so that a folder prepare trains on is evaluated as the same images
from ahpa.data.decode import IMAGE_EXTENSIONS
from ahpa.data.listing import crop_items, list_source, make_loader, walk_folder
from ahpa.data.path_table import PathTable

NPZ_IMAGE_KEYS = ("arr_0", "images")  # ADM samples, then our datasets


def npz_names(path: str | Path) -> set[str]:
    """The names of the arrays an .npz holds; a file that is no zip archive is a ValueError saying what to give."""
    try:
        with zipfile.ZipFile(path) as z:
            return {n[:-4] for n in z.namelist() if n.endswith(".npy")}
    except zipfile.BadZipFile:
        # raised here because np.load takes such a file for a pickle and complains about allow_pickle instead
        raise ValueError(f"{str(path)!r} is not a readable .npz (zip) archive: an image .npz holds uint8 [N, H, W, 3] "
                         "images under arr_0 or images (np.savez(path, images=x)), a statistics .npz holds mu and sigma") from None


def npz_image_key(path: str | Path) -> str | None:
    """The key under which an .npz stores images, or None when it holds none."""
    names = npz_names(path)
    return next((k for k in NPZ_IMAGE_KEYS if k in names), None)


def npz_image_count(path: str | Path) -> int | None:
    """How many images an .npz holds, from its header alone; None for anything else (a folder is counted when it is
    listed)."""
    path = Path(path)
    if path.is_dir() or path.suffix != ".npz" or not path.is_file():
        return None
    key = npz_image_key(path)
    if key is None:
        return None
    with zipfile.ZipFile(path) as z, z.open(f"{key}.npy") as f:
        header = npy_header(f)
    return header[0][0] if header and header[0] else None


def npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype] | None:
    """(shape, fortran_order, dtype) of the .npy file `f` is open at the start of, from its header alone (the data
    follows); None for a format version other than 1.0 and 2.0, which np.save writes."""
    reader = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    read = reader.get(np.lib.format.read_magic(f))
    return read(f) if read is not None else None


def _check_layout(dtype, shape, where: str) -> None:
    if dtype in (np.uint8, torch.uint8) and len(shape) == 4 and shape[-1] == 3:
        return
    hints = []  # the two usual mistakes: a model's NCHW output, and its floats not yet quantised
    if len(shape) == 4 and shape[1] == 3 and shape[-1] != 3:
        hints.append("channels come first (NCHW): transpose to [N, H, W, 3]")
    if "float" in str(dtype):  # numpy float32 and torch.float32 alike
        hints.append("floats: scale to 0-255, round and cast to uint8")
    raise ValueError(f"{where}: expected uint8 RGB images [N, H, W, 3], got {dtype} {tuple(shape)}"
                     + "".join(f"; {h}" for h in hints))


def _check_batch(batch, where: str):
    _check_layout(batch.dtype, batch.shape, where)
    return batch


def batch_ranges(n: int, batch_size: int, rank: int, world_size: int) -> Iterator[tuple[int, int]]:
    """The [start, stop) of `rank`'s batches of [0, n): batch b goes to rank b % world_size, so every image is seen
    exactly once whatever the process count (measurements here, and a model's samples in ahpa.train.evaluate)."""
    for b, start in enumerate(range(0, n, batch_size)):
        if b % world_size == rank:
            yield start, min(start + batch_size, n)


def share_count(n: int, batch_size: int, rank: int = 0, world_size: int = 1) -> int:
    """How many of [0, n) `rank` reads in `batch_ranges`' batches (a progress bar's total)."""
    return sum(stop - start for start, stop in batch_ranges(n, batch_size, rank, world_size))


class ImageBatches:
    """The uint8 NHWC batches of an image source (iterated once) and `total`, how many images they hold: this rank's
    share, capped at max_images, known before the first batch is read so that a progress bar has an end and an ETA;
    None for a caller's own iterable of batches. A folder's total is its listed files: an undecodable one is skipped,
    so it may yield fewer."""

    def __init__(self, batches: Iterator, total: int | None):
        self._batches, self.total = batches, total

    def __iter__(self) -> Iterator:
        # the generator itself, not a wrapper's __next__: a folder's warnings (stacklevel=2) keep naming the caller
        return self._batches


def _read_exact(f, out: np.ndarray, path: Path) -> None:
    view = memoryview(out.reshape(-1).view(np.uint8))
    pos = 0
    while pos < len(view):
        try:
            got = f.readinto(view[pos:])
        except (zlib.error, zipfile.BadZipFile, EOFError) as e:  # damaged compressed data (CRC, stream)
            raise ValueError(f"{str(path)!r} is damaged ({e}); write it again") from None
        if not got:
            raise ValueError(f"{str(path)!r}: the array is shorter than its header says (a truncated file); write it again")
        pos += got


def _iter_npz(path: Path, key: str, batch_size: int, rank: int, world_size: int, limit: int | None) -> Iterator[np.ndarray]:
    # Stream the member out of the zip (deflated or stored alike) instead of np.load-ing it whole: an
    # ADM sample file of 50k 256x256 images is ~10 GB.
    with zipfile.ZipFile(path) as z, z.open(key + ".npy") as f:
        header = npy_header(f)
        if header is None or header[1] or header[2].hasobject or len(header[0]) != 4:
            f.close()
            with np.load(path) as data:  # unusual layout: load whole, slice below
                arr = data[key]
            yield from _iter_array(arr, batch_size, rank, world_size, limit, str(path))
            return
        shape, _, dtype = header
        _check_layout(dtype, shape, str(path))
        n = _capped(shape[0], limit)
        pos = 0
        for start, stop in batch_ranges(n, batch_size, rank, world_size):
            if start > pos:  # another rank's batches: read past them
                _read_exact(f, np.empty((start - pos, *shape[1:]), dtype), path)
            batch = np.empty((stop - start, *shape[1:]), dtype)
            _read_exact(f, batch, path)
            pos = stop
            yield batch


def _iter_array(arr, batch_size: int, rank: int, world_size: int, limit: int | None, where: str):
    _check_batch(arr, where)
    n = _capped(len(arr), limit)
    for start, stop in batch_ranges(n, batch_size, rank, world_size):
        yield arr[start:stop]


class SkippedFilesWarning(UserWarning):
    """Files of a folder that could not be decoded and were left out of a measurement (named in the message)."""


class ConvertedImagesWarning(UserWarning):
    """Images of a folder that were not RGB (grayscale, palette, alpha, CMYK, 16-bit) and were measured as their RGB
    conversion, counted by kind: a model's sample dump is RGB, so a count here is how a broken dump is caught (a
    grayscale one scores a much worse FD, for reasons that are not the model's)."""


@dataclass(frozen=True)
class ImageFolder:
    """A folder of image files as a metric source. With `resolution` R every image is read as `ahpa prepare` reads
    it for training at R (ADM centre crop, smaller images upsampled), so a folder of photos of many sizes can be
    a reference; without it images are taken as decoded, all of one size. `workers` DataLoader processes decode
    (0: this process). A plain path to a folder is `ImageFolder(path)`."""

    path: Path
    resolution: int | None = None
    workers: int = 0

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path).expanduser())
        if self.resolution is not None and self.resolution < 1:
            raise ValueError(f"resolution must be a positive number of pixels, got {self.resolution}")


def folder_source(source, resolution: int | None, workers: int = 0):
    """`source` as read at `resolution` by `workers` decoding processes: an `ImageFolder` for a folder, anything else
    as it is (.npz files hold images of one size already, which no resolution changes)."""
    if isinstance(source, (str, Path)) and Path(source).expanduser().is_dir():
        return ImageFolder(Path(source), resolution, workers)
    return source


def image_files(folder: str | Path) -> PathTable:
    """The image files of `folder` that `ahpa prepare` lists, in its order (sorted, recursive; hidden files and
    folders left out: macOS's `._x.jpg` are no images)."""
    return list_source(folder, labels="none").paths


def _iter_folder(folder: ImageFolder, listing, batch_size: int, rank: int, world_size: int, n: int):
    # Undecodable files are skipped and named in one warning at the end, as `ahpa prepare` skips and reports them:
    # failing at file 900,000 of a reference would throw away the measurement of the ones before it.
    batches = [list(range(start, stop)) for start, stop in batch_ranges(n, batch_size, rank, world_size)]
    skipped, first, decoded = [], None, 0
    converted, first_converted = Counter(), None  # kind ("L->RGB") -> images; counts, since a folder may be all grey
    # decoded (and cropped at a resolution) as `ahpa prepare` decodes training images: upright, alpha on white,
    # 16-bit rescaled; in `workers` processes, in order
    for items in make_loader(listing, folder.resolution, batches, folder.workers):
        skipped += [(listing.name(it.index), it.reason) for it in items if it.image is None]
        good = [it for it in items if it.image is not None]
        decoded += len(good)
        for it in good:
            kinds = [c.split(" (")[0] for c in it.conversions if "->RGB" in c]  # not EXIF turns or upsampling
            if kinds:
                converted[kinds[0]] += 1
                first_converted = first_converted or listing.name(it.index)
        if not good:
            continue
        if folder.resolution:
            yield crop_items(good, folder.resolution)  # uint8 [n, R, R, 3]
            continue
        for it in good:
            first = first or (listing.name(it.index), it.image.shape[:2])
            if it.image.shape[:2] != first[1]:
                raise ValueError(f"{folder.path}: {listing.name(it.index)!r} is {it.image.shape[:2]}, but {first[0]!r} is "
                                 f"{first[1]}: images of several sizes need a resolution to be read at (ahpa eval "
                                 "--resolution R, R the samples' side, as a run reads its eval.ref folder at "
                                 "data.resolution; or ImageFolder(path, R)): centre-cropped as ahpa prepare crops them")
        yield np.stack([it.image for it in good])
    if converted:
        kinds = ", ".join(f"{k} {kind}" for kind, k in converted.most_common())
        warnings.warn(f"{folder.path}: {sum(converted.values())} of {decoded} image(s) were not RGB and were converted "
                      f"({kinds}; the first: {first_converted}) and are measured so: a few are usual among photos, but a "
                      "model's samples are RGB, so check how these were written", ConvertedImagesWarning, stacklevel=2)
    if skipped:
        shown = "; ".join(f"{name}: {reason}" for name, reason in skipped[:3])
        warnings.warn(f"{folder.path}: skipped {len(skipped)} file(s) that cannot be decoded ({shown}"
                      f"{'; ...' if len(skipped) > 3 else ''}); remove or re-encode them", SkippedFilesWarning, stacklevel=2)
        if not decoded and world_size == 1:  # (one rank of several may draw only bad files; the others' images count)
            raise ValueError(f"no image of {folder.path} could be decoded ({len(skipped)} skipped; {shown}"
                             f"{'; ...' if len(skipped) > 3 else ''}): nothing to measure")


def _holds_an_image(folder: Path) -> bool:
    """Whether a folder holds an image file that prepare would list: the walk stops at the first one."""
    for _, files in walk_folder(folder):
        if any(Path(f).suffix.lower() in IMAGE_EXTENSIONS for f in files):
            return True
    return False


def check_image_source(source: "str | Path | ImageFolder", what: str = "image source") -> Path:
    """The path of a folder or an .npz (images, samples or statistics), the two a source path may be; a caller that
    measures something else first (`ahpa eval`, a run's evaluation) checks its inputs here before that work."""
    path = source.path if isinstance(source, ImageFolder) else Path(source).expanduser()
    shown = str(path if isinstance(source, ImageFolder) else source)
    if not path.exists():
        raise FileNotFoundError(f"{what} {shown!r} does not exist")
    if not path.is_dir() and path.suffix != ".npz":
        raise ValueError(f"{what} {shown!r} is neither a folder of images nor an .npz (images, samples or statistics)")
    if path.is_dir():  # the folders people give by mistake, named; and a folder without images, before any work
        if (path / "config.yaml").is_file() and (path / "checkpoints").is_dir():
            raise ValueError(f"{what} {shown!r} is a training run, not images: sample it first "
                             f"(ahpa sample --run {shown} --num 10000 --out samples.npz)")
        if (path / "manifest.json").is_file() and (path / "shards").is_dir():
            raise ValueError(f"{what} {shown!r} is a prepared cache (latents), not images: give the images it was "
                             "prepared from")
        if not _holds_an_image(path):
            image_files(path)  # raises, naming the extensions and what the folder holds instead
    return path


def iter_image_batches(
    source, batch_size: int = 250, *, rank: int = 0, world_size: int = 1, max_images: int | None = None
) -> ImageBatches:
    """The uint8 NHWC batches of `source` (see the module doc), with world_size > 1 this rank's share, and their
    number of images as `.total` (see `ImageBatches`).

    `max_images` takes the first images of the source (before sharding). An iterable of batches is
    passed through as it is (it is the caller's to shard), only checked and cut at `max_images`.
    """
    if batch_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size; got {batch_size}, {rank}, {world_size}")
    if isinstance(source, (str, Path, ImageFolder)):
        path = check_image_source(source)
        if path.is_dir():
            folder = source if isinstance(source, ImageFolder) else ImageFolder(path)
            listing = list_source(folder.path, labels="none")  # listed now, for the total
            n = _capped(len(listing), max_images)
            return ImageBatches(_iter_folder(folder, listing, batch_size, rank, world_size, n),
                                share_count(n, batch_size, rank, world_size))
        key = npz_image_key(path)
        if key is None:
            keys = sorted(npz_names(path))
            raise ValueError(f"{str(path)!r} holds no images under {' or '.join(NPZ_IMAGE_KEYS)} (keys: {keys})")
        count = npz_image_count(path)  # from the header; None only for a header np.save does not write for images
        total = None if count is None else share_count(_capped(count, max_images), batch_size, rank, world_size)
        return ImageBatches(_iter_npz(path, key, batch_size, rank, world_size, max_images), total)
    if isinstance(source, (np.ndarray, torch.Tensor)):
        n = _capped(len(_check_batch(source, "image array")), max_images)
        return ImageBatches(_iter_array(source, batch_size, rank, world_size, max_images, "image array"),
                            share_count(n, batch_size, rank, world_size))
    if isinstance(source, Iterable):
        return ImageBatches(_iter_batches(source, max_images), None)
    raise TypeError(f"unsupported image source of type {type(source).__name__}")


def _capped(n: int, limit: int | None) -> int:
    return n if limit is None else max(0, min(n, limit))


def _iter_batches(batches: Iterable, limit: int | None):
    seen = 0
    for batch in batches:
        if limit is not None and seen >= limit:
            return
        batch = _check_batch(batch, "image batch")
        if limit is not None:
            batch = batch[: limit - seen]
        seen += len(batch)
        yield batch
