"""What `ahpa prepare` reads: an image folder, an `.npz` array file or a text file list, as numbered items.

Item i is the same file on every run and every process (sorted listing), so that shard boundaries and the
cache's order are functions of the source alone. `ItemDataset` decodes item i in a DataLoader worker and
returns either a crop ready for the encoder or the reason it was skipped.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ahpa.data.decode import IMAGE_EXTENSIONS, BadImage, adm_center_crop, load_rgb, upsample_size
from ahpa.data.path_table import PathTable
from ahpa.data.workers import share_listing, start_worker, unshare, worker_context

LABEL_MODES = ("auto", "folders", "none")
LIST_SUFFIXES = (".txt", ".lst")


@dataclass
class Listing:
    """Numbered items of a source. Exactly one of `paths` / `array` is set."""

    kind: str  # folder | npz | list
    location: Path
    labels: np.ndarray  # int64 [N]
    class_names: list[str] | None  # None when the source has no labels (every label is 0)
    paths: PathTable | None = None  # folder: relative to `location`; list: as the list names them
    array: np.ndarray | None = None  # uint8 [N, H, W, 3] for npz
    ignored: list[str] = field(default_factory=list)  # files of a folder without an image extension
    label_note: str = ""  # where the labels come from, for the report ("" = the labels array says it: labels_text)
    label_doubt: str = ""  # what to do when the labels are likely not what was meant ("" = nothing)

    def labels_text(self) -> str:
        if self.label_note:
            return self.label_note
        k = self.num_classes
        return f"{k} class(es), from the {self.kind}'s labels" if k > 1 else "none (the source gives no labels)"

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names) if self.class_names else int(self.labels.max(initial=0)) + 1

    def keep(self, items: slice | np.ndarray) -> None:
        """Keep only `items` (the first ones, as a slice: the path table's view; or ascending indices), in place."""
        self.labels = self.labels[items]
        if self.paths is not None:
            self.paths = self.paths[items] if isinstance(items, slice) else self.paths.take(items)
        if self.array is not None:
            self.array = self.array[items]

    def name(self, i: int) -> str:
        """How the report names item i: the path relative to a folder, the path from a list, or npz[i]."""
        return f"{self.location.name}[{i}]" if self.paths is None else self.paths.name(i)

    def fingerprint(self) -> str:
        """A hash of what the items are (names and byte sizes, or the array's bytes), to notice a changed source."""
        h = hashlib.sha256()
        h.update(f"{self.kind}:{len(self)}".encode())
        h.update(np.ascontiguousarray(self.labels).tobytes())
        if self.array is not None:
            # the whole array: an npz fits in memory by construction, and hashing runs at ~1 GB/s
            h.update(repr(self.array.shape).encode())
            h.update(memoryview(np.ascontiguousarray(self.array)).cast("B"))
        else:
            for name, file in self.paths.named_files():
                try:
                    size = os.stat(file).st_size
                except OSError:
                    size = -1
                # a name that is not UTF-8 (a Latin-1 file name) as its bytes: what the file system holds
                h.update(f"{name}\0{size}\n".encode(errors="surrogateescape"))
        return h.hexdigest()


def walk_folder(root: Path):
    """os.walk of `root` in sorted order, hidden entries left out, into linked folders too (class folders linked from
    elsewhere are common), but never into a link back to a folder above it, which would never end."""
    above: dict[str, frozenset[str]] = {str(root): frozenset()}  # a folder walked -> the real paths above it
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        chain = above.pop(dirpath) | {os.path.realpath(dirpath)}
        dirnames[:] = [d for d in sorted(dirnames) if not d.startswith(".")  # sorted walk: a stable order
                       and os.path.realpath(os.path.join(dirpath, d)) not in chain]
        above.update((os.path.join(dirpath, d), chain) for d in dirnames)
        yield dirpath, [f for f in sorted(filenames) if not f.startswith(".")]  # .DS_Store and friends


def _folder(root: Path, labels: str) -> Listing:
    names: list[str] = []  # relative to root
    ignored: list[str] = []
    subfolders: list[str] = []  # first-level, in walk (sorted) order: the candidates for classes
    for dirpath, filenames in walk_folder(root):
        rel = os.path.relpath(dirpath, root)
        prefix = "" if rel == "." else rel + os.sep
        if rel != "." and os.sep not in rel:
            subfolders.append(rel)
        for f in filenames:
            (names if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS else ignored).append(prefix + f)
    if not names:
        raise ValueError(
            f"no images found under {root} (looked recursively for {', '.join(sorted(IMAGE_EXTENSIONS))}"
            + (f"; found only {len(ignored)} other files, e.g. {ignored[0]!r})" if ignored else ")")
        )
    loose = next((n for n in names if os.sep not in n), None)
    if labels == "folders" and loose is not None:
        raise ValueError(f"--labels folders needs every image inside a class sub-folder of {root}, but {loose} is not")
    paths = PathTable(names, root)
    classes = sorted({n.split(os.sep, 1)[0] for n in names if os.sep in n})
    if labels == "none" or (labels == "auto" and loose is not None):
        note = "none (--labels none)" if labels == "none" else "none (every image lies at the top level)"
        doubt = ""
        if labels == "auto" and classes:  # one stray file turns a class-conditional run into an unconditional one
            top = sum(os.sep not in n for n in names)
            note = (f"none: {top} image(s) lie at the top level of {root} (e.g. {loose!r}) beside {len(classes)} "
                    "sub-folder(s) of images, so the sub-folders are not read as classes")
            doubt = ("move the top-level images into a class folder (--labels folders names every one in the way), "
                     "or pass --labels none to say that no labels are meant")
        return Listing("folder", root, np.zeros(len(names), np.int64), None, paths=paths, ignored=ignored,
                       label_note=note, label_doubt=doubt)
    index = {c: k for k, c in enumerate(classes)}
    y = np.fromiter((index[n.split(os.sep, 1)[0]] for n in names), np.int64, len(names))
    shown = ", ".join(classes[:5]) + (", ..." if len(classes) > 5 else "")
    note = f"{len(classes)} class(es) from the sub-folder names ({shown})"
    # a folder without images is no class (torchvision's ImageFolder refuses it): said, since the user counted it
    empty = [d for d in subfolders if d not in index]
    if empty:
        note += (f"; {len(empty)} sub-folder(s) without image files, not classes: "
                 + ", ".join(empty[:5]) + (", ..." if len(empty) > 5 else ""))
    return Listing("folder", root, y, classes, paths=paths, ignored=ignored, label_note=note)


def _file_list(path: Path, labels: str) -> Listing:
    """One image path per line, optionally a TAB and an integer label; '#' comments and blank lines skipped.

    Relative paths are relative to the list file's directory.
    """
    paths, ys, first_unlabelled = [], [], None
    # a name that is not UTF-8 (a Latin-1 file name) kept as its bytes, as a folder listing keeps it
    for n, raw in enumerate(path.read_text(errors="surrogateescape").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, label = line.rpartition("\t")
        if sep:
            try:
                ys.append(int(label))
            except ValueError:
                raise ValueError(f"{path}:{n}: label {label!r} after the TAB is not an integer") from None
        else:
            name, first_unlabelled = line, first_unlabelled or n
        p = Path(name.strip()).expanduser()
        paths.append(str(p if p.is_absolute() else path.parent / p))
    if ys and first_unlabelled is not None:
        raise ValueError(f"{path}:{first_unlabelled}: this line has no TAB and label, others do: label every line or none")
    if not paths:
        raise ValueError(f"file list {path} names no images (one path per line, optionally TAB label)")
    if labels == "folders":
        raise ValueError("--labels folders applies to an image folder; a file list gives labels after a TAB")
    if ys and labels != "none":
        y = np.array(ys, np.int64)
        if y.min() < 0:
            raise ValueError(f"{path}: labels must be >= 0, found {y.min()}")
        return Listing("list", path, y, None, paths=PathTable(paths))
    return Listing("list", path, np.zeros(len(paths), np.int64), None, paths=PathTable(paths))


def _npz(path: Path, labels: str) -> Listing:
    from ahpa.data.sources import load_npz_images

    images, y = load_npz_images(path)
    if len(images) == 0:
        raise ValueError(f"{path} holds no images")
    if y is None or labels == "none":
        return Listing("npz", path, np.zeros(len(images), np.int64), None, array=images)
    y = np.asarray(y).astype(np.int64).reshape(-1)
    if len(y) != len(images):
        raise ValueError(f"{path}: {len(y)} labels for {len(images)} images")
    return Listing("npz", path, y, None, array=images)


def first_of_each_class(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Indices (ascending: the source's order) of the first `per_class` items of each label: int64 [M]."""
    order = np.argsort(labels, kind="stable")  # by class, each class's items in source order
    sorted_labels = labels[order]
    starts = np.searchsorted(sorted_labels, sorted_labels, side="left")  # where each item's class begins
    rank_in_class = np.arange(len(labels)) - starts
    return np.sort(order[rank_in_class < per_class])


def list_source(src: str | Path, labels: str = "auto", limit: int = 0, per_class: int = 0) -> Listing:
    """Numbered items of SRC (a folder, a .npz, or a .txt/.lst file list): with `per_class` > 0 the first that many of
    each class (in the source's order), then the first `limit` only if > 0."""
    if labels not in LABEL_MODES:
        raise ValueError(f"labels mode {labels!r} is not valid; valid: {', '.join(LABEL_MODES)}")
    path = Path(src).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"image source {str(path)!r} does not exist (give a folder, a .npz file or a .txt file list)")
    if path.is_dir():
        listing = _folder(path, labels)
    elif path.suffix.lower() == ".npz":
        listing = _npz(path, labels)
    elif path.suffix.lower() in LIST_SUFFIXES:
        listing = _file_list(path, labels)
    else:
        raise ValueError(f"image source {path} is neither a folder, a .npz file nor a {'/'.join(LIST_SUFFIXES)} file list")
    if per_class:
        listing.keep(first_of_each_class(listing.labels, per_class))
    if limit and limit < len(listing):
        listing.keep(slice(0, limit))
    return listing


@dataclass
class Item:
    """One decoded item. `image` is uint8 [R, R, 3] when cropped, or [h, w, 3] (short side < R) when
    `small` (upsampled later, in float, with the batch); None when skipped, with `reason`."""

    index: int
    image: np.ndarray | None
    small: bool = False
    reason: str = ""
    conversions: tuple[str, ...] = ()


class ItemDataset(torch.utils.data.Dataset):
    """Item i -> `Item`, decoded and ADM-cropped in a DataLoader worker (resolution None: decoded only, as it is);
    bad files become skip records."""

    def __init__(self, listing: Listing, resolution: int | None):
        self.listing, self.resolution = listing, resolution
        self.paths, self.array = listing.paths, listing.array
        self._sent: dict | None = None

    def __getstate__(self) -> dict:
        # a worker started by forkserver or spawn unpickles its dataset: it gets what decoding reads (not the
        # labels or the names of ignored files), the large arrays in shared memory, put there once for all workers
        if self._sent is None:
            self._sent = share_listing(self.listing)
            self.paths, self.array = self.listing.paths, self.listing.array
        return {"resolution": self.resolution, "sent": self._sent}

    def __setstate__(self, state: dict) -> None:
        self.listing, self.resolution, self._sent = None, state["resolution"], None
        self.paths, self.array = unshare(state["sent"])

    def __len__(self) -> int:
        return len(self.array) if self.array is not None else len(self.paths)

    def __getitem__(self, i: int) -> Item:
        if self.array is not None:
            arr, conversions = self.array[i], []
        else:
            try:
                arr, conversions = load_rgb(self.paths[i])
            except BadImage as e:
                return Item(i, None, reason=e.reason)
        if self.resolution is None:
            return Item(i, arr, conversions=tuple(conversions))
        if min(arr.shape[:2]) < self.resolution:
            return Item(i, np.ascontiguousarray(arr), small=True, conversions=tuple(conversions) + ("upsampled (smaller than R)",))
        return Item(i, adm_center_crop(arr, self.resolution), conversions=tuple(conversions))


def collate_items(items: list[Item]) -> list[Item]:
    return items  # images of a batch may differ in size (small ones); `assemble` stacks them on the device


def default_workers() -> int:
    """Processes decoding images when the user names none (prepare, vae-train, eval, a run's reference): the CPUs,
    at most 8."""
    return min(8, os.cpu_count() or 1)


def make_loader(listing: Listing, resolution: int | None, batches: list[list[int]], workers: int) -> torch.utils.data.DataLoader:
    """Decode the given batches of item indices in `workers` processes (0: in this process), in order."""
    return torch.utils.data.DataLoader(
        ItemDataset(listing, resolution), batch_sampler=batches, num_workers=workers, collate_fn=collate_items,
        worker_init_fn=functools.partial(start_worker, os.getpid()), prefetch_factor=4 if workers else None,
        multiprocessing_context=worker_context() if workers else None,  # how and why: ahpa.data.workers
    )


def assemble(items: list[Item], size: int, device: torch.device) -> torch.Tensor:
    """Decoded items -> float [n, 3, R, R] in [0, 1] on the device, in item order.

    Cropped items are uint8 [R, R, 3] already. Items whose short side is below R are upsampled here, per
    shape group and in float (no uint8 rounding): bicubic to ADM's target size, then the centre crop. For a
    square source (CIFAR 32 -> 64) this is exactly `ahpa.data.batches.prepare_images`, so a cache and
    on-the-fly encoding feed the encoder the same pixels.
    """
    x = torch.empty((len(items), 3, size, size), device=device)
    regular = [j for j, it in enumerate(items) if not it.small]
    if regular:
        u8 = torch.from_numpy(np.stack([items[j].image for j in regular]))  # [b, R, R, 3]
        if device.type == "cuda":
            u8 = u8.pin_memory()
        x[torch.tensor(regular, device=device)] = u8.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
    groups: dict[tuple[int, int], list[int]] = {}
    for j, it in enumerate(items):
        if it.small:
            groups.setdefault(it.image.shape[:2], []).append(j)
    for (h, w), pos in groups.items():
        u8 = torch.from_numpy(np.stack([items[j].image for j in pos])).to(device)  # [b, h, w, 3]
        img = u8.permute(0, 3, 1, 2).float().div_(255.0)  # [b, 3, h, w]
        H, W = upsample_size(h, w, size)
        img = F.interpolate(img, size=(H, W), mode="bicubic", align_corners=False).clamp_(0, 1)
        top, left = (H - size) // 2, (W - size) // 2
        x[torch.tensor(pos, device=device)] = img[:, :, top : top + size, left : left + size]
    return x


def to_uint8_hwc(x: torch.Tensor) -> torch.Tensor:
    """float [n, 3, R, R] in [0, 1] -> uint8 [n, R, R, 3] (exact for values that came from uint8)."""
    return x.mul(255).round_().to(torch.uint8).permute(0, 2, 3, 1)


def crop_items(items: list[Item], size: int) -> np.ndarray:
    """Decoded items -> uint8 [n, R, R, 3] as `assemble` makes them (exact for cropped items; small ones upsampled
    in float, then rounded once)."""
    return to_uint8_hwc(assemble(items, size, torch.device("cpu"))).numpy()


def decode_all(listing: Listing, resolution: int, workers: int = 0, batch: int = 256) -> tuple[np.ndarray, list[list[str]]]:
    """Every item of a listing, decoded and ADM-cropped as `ahpa prepare` does, in memory: (uint8 [N, R, R, 3],
    skipped [name, reason]). For small sets (training the small VAE); a cache is the way for large ones."""
    batches = [list(range(s, min(s + batch, len(listing)))) for s in range(0, len(listing), batch)]
    kept, skipped = [], []
    for items in make_loader(listing, resolution, batches, workers):
        good = [it for it in items if it.image is not None]
        skipped += [[listing.name(it.index), it.reason] for it in items if it.image is None]
        if good:
            kept.append(crop_items(good, resolution))
    if not kept:
        raise ValueError(f"none of the {len(listing)} items of {listing.location} could be decoded")
    return np.concatenate(kept), skipped
