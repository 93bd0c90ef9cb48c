"""Detector measurements of image sources: feature statistics, and for the other metrics class
probabilities and raw features, all in one pass over the images.

`measure` reads a source (see `ahpa.metrics.images`) once: every batch goes through the detector into a
float64 `FeatureStats`; on request it also keeps the class probabilities of every image (Inception Score),
the features of the first `keep` images (precision/recall needs the points, not just their moments) and the
statistics of Inception's spatial features (sFID).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ahpa.metrics.detectors import Detector
from ahpa.metrics.frechet import FeatureStats
from ahpa.metrics.images import ImageFolder, iter_image_batches, npz_image_key, npz_names


# A progress bar's factory: called with the number of images a pass will read (None when unknown) when, and only
# when, a pass starts (a cached reference starts none); returns the per-batch update taking each batch's number of
# images, or None. Given the total up front, a bar shows an ETA (a 50,000-image pass is minutes).
Progress = Callable[[int | None], Callable[[int], None] | None]


@dataclass
class Measurement:
    stats: FeatureStats
    probs: torch.Tensor | None = None  # [N, K] float32 on the host, in source order
    features: torch.Tensor | None = None  # [min(N, keep), D] float32 on the detector's device
    spatial: FeatureStats | None = None  # sFID's statistics (Inception's spatial features), when asked for


def _to_nchw(batch) -> torch.Tensor:
    x = batch if isinstance(batch, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(batch))
    return x.permute(0, 3, 1, 2)  # NHWC -> NCHW view (channels-last strides; the detector copies as it needs)


def _distributed(world_size: int) -> bool:
    return world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()


def _nothing_measured(source, max_images: int | None) -> str:
    # said instead of FeatureStats' "no features accumulated", which names neither the source nor the reason
    if max_images is not None and max_images < 1:
        return f"max_images={max_images}: nothing to measure (it must be at least 1)"
    if isinstance(source, (str, Path, ImageFolder)):
        path = source.path if isinstance(source, ImageFolder) else source
        return f"{str(path)!r} holds 0 images: nothing to measure"
    return f"the {'image array' if isinstance(source, (np.ndarray, torch.Tensor)) else 'image batches'} held 0 images: nothing to measure"


def measure(
    source,
    detector: Detector,
    batch_size: int = 250,
    device: torch.device | str | None = None,
    *,
    probs: bool = False,
    keep: int = 0,
    spatial: bool = False,
    rank: int = 0,
    world_size: int = 1,
    max_images: int | None = None,
    progress: Progress | None = None,
) -> Measurement:
    """Statistics of `source` under `detector` (sums on `device`, default the detector's; with the (H, W) of
    its first image as `stats.image_size`), plus class probabilities (`probs=True`), the first `keep`
    features and the statistics of sFID's spatial features (`spatial=True`, Inception only).

    `progress(total)` is called once the source is opened, with the number of images this pass reads (this rank's
    share, capped at `max_images`; None for an iterable of batches, whose length is unknown): it may return a
    callback that takes the number of images of each batch (a progress bar's update). See `Progress`.

    With world_size > 1 each rank reads its share and, when torch.distributed is initialised, the sums are
    all-reduced so that every rank returns the statistics of the whole source; probabilities and kept
    features are per-image lists in source order, which one process gathers (world_size 1 only).
    """
    if world_size > 1 and (probs or keep):
        raise ValueError("class probabilities and kept features are measured by one process (world_size=1)")
    if probs and not detector.has_classes:
        raise ValueError(f"detector {detector.spec!r} ({detector.name}) has no classifier head: no class probabilities")
    if spatial:
        detector.check_spatial()  # before the first image: a network that cannot give them is refused here
    sums_on = device if device is not None else detector.device
    stats = FeatureStats(dim=detector.dim, device=sums_on)
    sstats = FeatureStats(dim=detector.spatial_dim, device=sums_on) if spatial else None
    prob_parts, feat_parts, kept, size = [], [], 0, None
    batches = iter_image_batches(source, batch_size, rank=rank, world_size=world_size, max_images=max_images)
    on_batch = progress(batches.total) if progress is not None else None
    for batch in batches:
        size = size or (int(batch.shape[1]), int(batch.shape[2]))
        images = _to_nchw(batch)
        if spatial:
            feats, spatial_feats = detector.features_and_spatial(images)
            sstats.update(spatial_feats)
        else:
            feats = detector.features(images)
        stats.update(feats)
        if kept < keep:
            feat_parts.append(feats[: keep - kept].float())
            kept += len(feat_parts[-1])
        if probs:
            prob_parts.append(detector.class_probs(images).float().cpu())
        if on_batch is not None:
            on_batch(len(images))
    if _distributed(world_size):
        stats = _all_reduced(stats)
        sstats = _all_reduced(sstats) if spatial else None
    if not stats.count and (world_size == 1 or _distributed(world_size)):  # one rank of several may get no batch
        raise ValueError(_nothing_measured(source, max_images))
    stats.detector = detector.name
    stats.image_size = size
    if sstats is not None:
        sstats.detector, sstats.image_size = detector.spatial_name, size
    return Measurement(
        stats,
        torch.cat(prob_parts) if prob_parts else None,
        torch.cat(feat_parts) if feat_parts else None,
        sstats,
    )


def _all_reduced(stats: FeatureStats) -> FeatureStats:
    flat = stats.to_tensor()
    torch.distributed.all_reduce(flat)
    return FeatureStats.from_tensor(flat)


def compute_stats(
    source,
    detector: Detector,
    batch_size: int = 250,
    device: torch.device | str | None = None,
    *,
    rank: int = 0,
    world_size: int = 1,
    max_images: int | None = None,
    progress: Progress | None = None,
) -> FeatureStats:
    """Feature statistics of `source` under `detector` (see `measure`)."""
    return measure(source, detector, batch_size, device, rank=rank, world_size=world_size, max_images=max_images,
                   progress=progress).stats


def stored_stats_usable(path: Path, detector: Detector) -> tuple[bool, str | None]:
    """Whether a statistics .npz may stand for `detector`, and which metric it says it holds."""
    keys = npz_names(path)  # before np.load: its error for a file that is no .npz misleads
    with np.load(path) as f:
        tag = str(f["detector"]) if "detector" in keys else None
    has_images = npz_image_key(path) is not None
    if "mu" not in keys or "sigma" not in keys:
        return False, tag
    if tag is not None:
        return tag == detector.name, tag
    # Untagged mu/sigma beside images is an ADM reference batch: Inception statistics, FID only.
    return (not has_images) or detector.name == "FID", tag


def is_stats_file(ref) -> bool:
    """Whether `ref` names an .npz of stored `mu`/`sigma` (with or without images beside them)."""
    if not isinstance(ref, (str, Path)) or Path(ref).suffix != ".npz" or not Path(ref).is_file():
        return False
    return {"mu", "sigma"} <= npz_names(ref)


def has_stored_spatial(ref) -> bool:
    """Whether `ref` names an .npz that stores sFID's statistics (`mu_s`, `sigma_s`: ADM's reference batches, and
    statistics `ahpa eval --metrics fd,sfid --save-ref-stats` wrote)."""
    return _npz_file(ref) and {"mu_s", "sigma_s"} <= npz_names(ref)


def _npz_file(ref) -> bool:
    return isinstance(ref, (str, Path)) and Path(ref).suffix == ".npz" and Path(ref).is_file()


def check_reference(ref, detector: Detector, keep: int = 0, spatial: bool = False) -> None:
    """Raise ValueError when the .npz `ref` holds statistics (mu, sigma) and no images, and those cannot serve
    `detector`: they were computed for another detector, or `keep` > 0 (precision/recall needs the features of the
    first `keep` reference images, which statistics do not hold), or `spatial` (sFID) and no `mu_s`/`sigma_s` are
    stored. Reads the file's names only, so that a caller with several detectors checks each before any image is
    measured."""
    if not _npz_file(ref) or npz_image_key(ref) is not None:
        return  # images (or a folder, an array) are measured under any detector
    usable, tag = stored_stats_usable(Path(ref), detector)
    if not usable and tag is not None:
        raise ValueError(f"statistics in {str(ref)!r} were computed for {tag}, not {detector.name} ({detector.spec}): "
                         "give the reference images, or statistics that detector measured (ahpa eval ... "
                         "--save-ref-stats)")
    if keep and usable and is_stats_file(ref):
        raise ValueError(f"precision/recall needs reference images, but {str(ref)!r} holds statistics (mu, sigma) "
                         "only; give the image source (folder or images .npz) as the reference")
    if spatial and usable and not has_stored_spatial(ref):
        raise ValueError(f"sFID needs the reference's spatial statistics (mu_s, sigma_s, as ADM's reference batches "
                         f"store them) or its images, but {str(ref)!r} holds mu and sigma only; give the image source, "
                         "or statistics written with them (ahpa eval ... --metrics fd,sfid --save-ref-stats FILE)")


def reference_stats(
    ref,
    detector: Detector,
    batch_size: int = 250,
    device: torch.device | str | None = None,
    **kwargs,
) -> FeatureStats:
    """Statistics of a reference: an image source, or an .npz of stored `mu`/`sigma`.

    Stored statistics are used when they were made with this detector (our files name it; an untagged
    ADM reference batch counts as Inception); otherwise images in the same file are measured afresh,
    and with no images the mismatch is an error rather than a wrong number.
    """
    check_reference(ref, detector)
    if _npz_file(ref) and stored_stats_usable(Path(ref), detector)[0]:
        stats = FeatureStats.load(ref)
        stats.detector = detector.name
        return stats
    return compute_stats(ref, detector, batch_size, device, **kwargs)


def fd_between(samples, ref, detector: Detector, batch_size: int = 250, device: torch.device | str | None = None) -> dict[str, float]:
    """{detector.name: Fréchet distance} between a sample source and a reference (source or stats)."""
    a = compute_stats(samples, detector, batch_size, device)
    b = reference_stats(ref, detector, batch_size, device)
    return {detector.name: a.frechet_distance(b)}
