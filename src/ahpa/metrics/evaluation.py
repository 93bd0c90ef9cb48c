"""One evaluation of a sample source against a reference under one detector: the metrics asked for,
from one pass over the samples.

- `fd`: the Fréchet distance (FID for Inception-v3, FD-r20, FD-DINOv2, ...);
- `sfid`: sFID, the Fréchet distance of Inception-v3's spatial features as ADM's evaluator computes it
  (ahpa.metrics.spatial), from the same pass as FID;
- `is`: the Inception Score, or its analogue under another classifier (IS-r20 with a CIFAR ResNet);
- `pr`: improved precision and recall (k-NN manifolds, k = 3) of the first `pr_num` samples against the
  first `pr_num` reference images.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from pathlib import Path

from ahpa.metrics.detectors import Detector, metric_tag
from ahpa.metrics.inception_score import inception_score
from ahpa.metrics.measurement import measure
from ahpa.metrics.precision_recall import precision_recall
from ahpa.metrics.reference import reference_measurement

METRICS = ("fd", "sfid", "is", "pr")


class EvaluationWarning(UserWarning):
    """What makes an evaluation's figures less comparable than they look: fewer samples than asked for, fewer than
    the detector's features (a biased FD), samples and reference at different sizes, precision/recall over sets of
    unequal size."""


def metric_names(detector: Detector) -> dict[str, str]:
    """The names under which `evaluate` reports each metric of this detector."""
    tag = metric_tag(detector.name)
    suffix = f"-{tag}" if tag else ""
    return {"fd": detector.name, "sfid": detector.spatial_name, "is": f"IS{suffix}", "is_std": f"IS{suffix}-std",
            "precision": f"precision{suffix}", "recall": f"recall{suffix}"}


def parse_metrics(text: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    items = [m.strip() for m in text.split(",")] if isinstance(text, str) else list(text)
    bad = [m for m in items if m not in METRICS]
    if bad or not items:
        raise ValueError(f"unknown metric(s) {bad} in {text!r}; choose from {', '.join(METRICS)} (comma separated)")
    return tuple(dict.fromkeys(items))


def check_settings(
    metrics,
    *,
    num: int | None = None,
    batch_size: int = 250,
    is_splits: int = 10,
    pr_num: int = 10_000,
    pr_k: int = 3,
    names: dict[str, str] | None = None,
    count: int | None = None,
) -> None:
    """Raise ValueError for settings of `evaluate` that measure nothing or that would fail only once every image was
    measured (an Inception Score over 0 splits, precision/recall with k = 0 or with fewer than k + 1 points): a
    50,000-image pass must not be spent to learn that. `names` maps a parameter to the name its caller's user knows
    it by (`ahpa eval`'s options)."""
    metrics = parse_metrics(metrics)

    def name(field: str) -> str:
        return (names or {}).get(field, field)

    if num is not None and num < 1:
        raise ValueError(f"{name('num')} must be at least 1 (the number of samples to evaluate), got {num}")
    if batch_size < 1:
        raise ValueError(f"{name('batch_size')} must be at least 1 (images per detector call), got {batch_size}")
    if "is" in metrics and is_splits < 1:
        raise ValueError(f"{name('is_splits')} must be at least 1 (the Inception Score is averaged over that many "
                         f"parts of the samples; 10 is the usual), got {is_splits}")
    if "pr" in metrics:
        if pr_k < 1:
            raise ValueError(f"{name('pr_k')} must be at least 1 (each point's k-th nearest neighbour sets its "
                             f"radius; 3 is the usual), got {pr_k}")
        if pr_num <= pr_k:
            raise ValueError(f"{name('pr_num')} must be larger than {name('pr_k')} ({pr_k}): each of the first "
                             f"{name('pr_num')} points needs {pr_k} neighbours among them; got {pr_num}")
    # against the samples there are (`count`, when known before reading them: an .npz's header)
    n = min(count, num) if count is not None and num is not None else count
    if n:  # none at all: the measurement names the empty source itself
        if ("fd" in metrics or "sfid" in metrics) and n < 2:
            raise ValueError(f"a Fréchet distance needs at least 2 samples for a covariance; the samples hold {n}")
        if "is" in metrics and n < is_splits:
            raise ValueError(f"{name('is_splits')} {is_splits} needs at least that many samples; the samples hold {n}")
        if "pr" in metrics and n <= pr_k:
            raise ValueError(f"{name('pr_k')} {pr_k} needs more than {pr_k} samples (each needs {pr_k} neighbours); "
                             f"the samples hold {n}")


def metrics_by_detector(metrics, detectors: list[Detector]) -> list[tuple[str, ...]]:
    """The metrics each of `detectors` is evaluated with when one call asks for `metrics` under all of them: every
    metric under every detector, except the Inception Score, which only detectors with a classifier head give, and
    sFID, which only Inception-v3 gives. The usual ImageNet row (FID, sFID, IS, FD-DINOv2: Inception and DINOv2 with
    `fd,sfid,is`) thus needs no second call, where refusing the pair would make a user drop either `is` or DINOv2. A
    ValueError when no detector can give one of them. A detector may be left with no metric (`is` alone under a
    DINOv2): ()."""
    metrics = parse_metrics(metrics)
    which = ", ".join(repr(d.spec) for d in detectors)
    one = len(detectors) == 1
    if "is" in metrics and not any(d.has_classes for d in detectors):
        raise ValueError(f"the Inception Score needs a classifier head, which {'detector' if one else 'no detector of'} "
                         f"{which} {'lacks' if one else 'has'}; drop `is` from the metrics or add a "
                         "detector with one (inception:FILE, the CIFAR ResNets)")
    if "sfid" in metrics and not any(d.has_spatial for d in detectors):
        raise ValueError(f"sFID is measured in Inception-v3's spatial features, which {'detector' if one else 'no detector of'} "
                         f"{which} {'lacks' if one else 'has'}; drop `sfid` from the metrics or add "
                         "--detector inception:inception-2015-12-05.pt")
    return [tuple(m for m in metrics if (m != "is" or d.has_classes) and (m != "sfid" or d.has_spatial))
            for d in detectors]


def evaluate(
    samples,
    ref,
    detector: Detector,
    metrics=("fd",),
    *,
    num: int | None = None,
    batch_size: int = 250,
    is_splits: int = 10,
    pr_num: int = 10_000,
    pr_k: int = 3,
    cache_dir: str | Path | None = None,
    progress: Callable[[str, int | None], Callable[[int], None] | None] | None = None,
    option_names: dict[str, str] | None = None,
) -> tuple[dict[str, float], dict]:
    """({metric name: value}, {"samples": FeatureStats, "reference": FeatureStats or None}) for the first `num`
    samples; the reference's statistics come back when a metric needed them (None for `is` alone).

    `progress(label, total)` is called as each pass over images starts ("reference [<metric>]", none when the
    reference is cached; "samples [<metric>]"), with the number of images it reads (None for an iterable of
    batches), and may return a callback that takes the number of images of each batch (a bar's update);
    `option_names` as check_settings' `names` (the caller's names of the parameters, in its errors).
    """
    metrics = parse_metrics(metrics)
    settings = dict(num=num, batch_size=batch_size, is_splits=is_splits, pr_num=pr_num, pr_k=pr_k, names=option_names)
    check_settings(metrics, **settings)
    names = metric_names(detector)
    metrics_by_detector(metrics, [detector])  # `is` needs a classifier head
    keep = pr_num if "pr" in metrics else 0
    spatial = "sfid" in metrics
    if spatial:
        detector.check_spatial()  # before the reference's pass: a network that cannot give them is refused now

    def bar(label: str):  # measure's factory: given a pass's total, the caller's bar for it
        return functools.partial(progress, f"{label} [{detector.name}]") if progress is not None else None

    # the reference first: its statistics are cached for the next evaluation, so a reference that cannot be read
    # (images of several sizes without a resolution, a missing file) fails before the samples' work, not after it
    ref_m = None
    if "fd" in metrics or "pr" in metrics or spatial:
        ref_m = reference_measurement(ref, detector, cache_dir, batch_size, keep=keep, progress=bar("reference"),
                                      spatial=spatial)
    got = measure(samples, detector, batch_size, probs="is" in metrics, keep=keep, spatial=spatial, max_images=num,
                  progress=bar("samples"))
    # against the images that decoded: a folder, counted by its files beforehand, may hold fewer (undecodable ones)
    check_settings(metrics, **settings, count=got.stats.count)
    out: dict[str, float] = {}
    ref_stats = None
    if ref_m is not None:
        ref_stats = ref_m.stats
        if "fd" in metrics:
            out[names["fd"]] = got.stats.frechet_distance(ref_m.stats)
        if spatial:
            out[names["sfid"]] = got.spatial.frechet_distance(ref_m.spatial)
        if "pr" in metrics:
            out[names["precision"]], out[names["recall"]] = precision_recall(ref_m.features, got.features, k=pr_k)
    if "is" in metrics:
        out[names["is"]], out[names["is_std"]] = inception_score(got.probs, is_splits)
    pr_sizes = (len(got.features), len(ref_m.features)) if "pr" in metrics else None
    for message in caveats(got.stats, ref_stats, detector, num, "fd" in metrics, pr_sizes, spatial):
        warnings.warn(message, EvaluationWarning, stacklevel=2)
    return out, {"samples": got.stats, "reference": ref_stats, "samples_spatial": got.spatial,
                 "reference_spatial": ref_m.spatial if ref_m is not None else None}


def rank_deficient(count: int, name: str, dim: int, metric: str) -> str:
    """The caveat of `count` images (`name`: "samples", "reference images") measured in `dim` features, count <= dim:
    said by `ahpa eval` after measuring and by a run that evaluates before its first step."""
    return (f"{count} {name} for {dim} features ({metric}): the covariance is rank-deficient and the Fréchet distance "
            f"biased upward; compare only figures of the same number of {name}")


def caveats(samples, reference, detector: Detector, num: int | None, fd: bool,
            pr_sizes: tuple[int, int] | None = None, spatial: bool = False) -> list[str]:
    """Why the figures of this evaluation may not compare with others (EvaluationWarning's messages); `pr_sizes`:
    the numbers of samples and of reference images precision/recall compared; `spatial`: sFID was measured."""
    out = []
    if pr_sizes is not None and pr_sizes[0] != pr_sizes[1]:
        # a set's k-NN radii shrink as it grows, so the sizes move both figures (0.865/0.832 at 200 vs 1,000 CIFAR
        # images, 0.895/0.815 at 200 vs 200, for the same images)
        # two conventions: Kynkäänniemi et al.'s code takes sets of equal size; ADM's evaluator (whose figures the
        # DiT, SiT and REPA tables quote) all of its 50,000 samples against its reference batch's 10,000 images
        out.append(f"precision/recall compares {pr_sizes[0]} samples with {pr_sizes[1]} reference images, and the "
                   "sizes move both figures: compare only figures of the same sizes. Kynkäänniemi et al. compare sets "
                   f"of equal size (pr_num, ahpa eval --pr-num, {min(pr_sizes)}); ADM's evaluator, whose figures the "
                   "DiT, SiT and REPA papers report, all 50,000 samples with its reference batch's 10,000 images "
                   "(--pr-num 50000)")
    if num and samples.count < num:
        out.append(f"{num} samples asked for, but the samples gave {samples.count} images: the metrics are of those")
    dims = ([(detector.dim, detector.name)] if fd else []) + ([(detector.spatial_dim, detector.spatial_name)] if spatial else [])
    for name, stats in (("samples", samples), ("reference images", reference)):
        for dim, metric in dims:
            if stats is not None and stats.count and stats.count <= dim:
                out.append(rank_deficient(stats.count, name, dim, metric))
    sizes = (samples.image_size, reference.image_size if reference is not None else None)
    if None not in sizes and sizes[0] != sizes[1]:
        (h, w), (rh, rw) = sizes
        out.append(f"samples are {h}x{w} but the reference is {rh}x{rw}; detectors resize images to their input size, "
                   "so the FD mixes the resolution gap with sample quality (a folder of reference images is read at "
                   f"the samples' size with resolution={h}: ahpa eval --resolution {h})")
    return out
