"""ahpa eval SAMPLES --ref REF --detector D [--detector D ...] [--metrics fd,sfid,is,pr] [--resolution R]: last line JSON."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

from ahpa.commands.examples import with_examples


# evaluate's parameters as this command's options, for the messages of check_settings
OPTIONS = {"num": "--num", "batch_size": "--batch", "is_splits": "--is-splits", "pr_num": "--pr-num", "pr_k": "--pr-k"}


def register(sub) -> None:
    p = sub.add_parser("eval", help="FID / FD, sFID, Inception Score, precision/recall of samples against a reference",
                       **with_examples(
        "  # against a folder of your images of any size: read at 64x64 as `ahpa prepare` reads them",
        "  ahpa eval samples.npz --ref photos/ --resolution 64 --detector inception:inception-2015-12-05.pt",
        "  # the ADM suite (FID, sFID, IS, precision, recall) against ADM's ImageNet reference batch",
        "  ahpa eval samples.npz --ref VIRTUAL_imagenet256_labeled.npz --detector inception:inception-2015-12-05.pt \\",
        "      --metrics fd,sfid,is,pr --pr-num 50000",
        "The last line printed is one JSON object. More: docs/evaluation.md"))
    p.add_argument("samples", help="samples: ADM .npz (arr_0), images .npz, or an image folder")
    p.add_argument("--ref", required=True, help="reference: image source, or a statistics .npz (mu, sigma)")
    p.add_argument("--detector", action="append", required=True,
                   help="torchscript:FILE | inception:FILE | dinov2:DIR (repeatable)")
    p.add_argument("--metrics", default="fd",
                   help="comma-separated: fd (Fréchet distance), sfid (spatial FID; Inception-v3 only), is "
                        "(Inception Score; needs a classifier head), pr (precision/recall; needs reference images). "
                        "Default: fd")
    p.add_argument("--num", type=int, help="evaluate the first NUM samples (default: all)")
    p.add_argument("--is-splits", type=int, default=10, help="Inception Score splits (default 10)")
    p.add_argument("--pr-num", type=int, default=10_000,
                   help="precision/recall on the first PR_NUM samples and reference images (default 10000)")
    p.add_argument("--pr-k", type=int, default=3, help="neighbourhood size k of precision/recall (default 3)")
    p.add_argument("--resolution", type=int, default=None,
                   help="read image folders at RxR as `ahpa prepare` reads them (ADM centre crop, smaller images "
                        "upsampled): for a reference folder of photos of many sizes. .npz files are taken as they are. "
                        "Default: folder images as decoded, all of one size")
    p.add_argument("--workers", type=int, default=None,
                   help="processes decoding an image folder (default: the CPUs, at most 8; 0 = this process)")
    p.add_argument("--batch", type=int, default=250, help="images per detector call (default 250)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default auto)")
    p.add_argument("--ref-cache", type=Path, default=None,
                   help="directory for cached reference measurements (default: $AHPA_CACHE/reference, else "
                        "$XDG_CACHE_HOME/ahpa/reference or ~/.cache/ahpa/reference; AHPA_CACHE=off: none)")
    p.add_argument("--no-ref-cache", action="store_true", help="measure the reference afresh and keep nothing")
    p.add_argument("--save-ref-stats", help="also write the reference statistics to this .npz (one detector only; "
                                           "with sfid, its statistics too, as mu_s and sigma_s)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ahpa.metrics import load_detector
    from ahpa.metrics.evaluation import EvaluationWarning, check_settings, evaluate, metrics_by_detector, parse_metrics
    from ahpa.data.listing import default_workers
    from ahpa.metrics.images import (ConvertedImagesWarning, SkippedFilesWarning, check_image_source, folder_source,
                                     image_files, npz_image_count, npz_image_key)
    from ahpa.metrics.measurement import check_reference, is_stats_file
    from ahpa.metrics.reference import default_cache_dir, load_reference
    from ahpa.device import resolve_device

    metrics = parse_metrics(args.metrics)
    # before any image is measured: evaluate checks them too, but only after an earlier detector's whole pass; and
    # against the samples there are: an .npz's header, or a folder's image files (at most the images that decode)
    folder = Path(args.samples).expanduser()
    count = len(image_files(folder)) if folder.is_dir() else npz_image_count(args.samples)
    check_settings(metrics, num=args.num, batch_size=args.batch, is_splits=args.is_splits, pr_num=args.pr_num,
                   pr_k=args.pr_k, names=OPTIONS, count=count)
    if args.save_ref_stats and len(args.detector) != 1:
        raise ValueError("--save-ref-stats needs exactly one --detector")
    for path, what in ((args.samples, "SAMPLES"), (args.ref, "--ref")):
        check_image_source(path, what)  # the reference too, before any sample is measured (the samples come first)
    if args.resolution is not None and not any(Path(p).expanduser().is_dir() for p in (args.samples, args.ref)):
        # said, since the output's size warning would otherwise look like the option's doing
        print(f"ahpa eval: note: --resolution {args.resolution} applies to image folders only; SAMPLES and --ref are "
              ".npz files, measured at the size they hold", file=sys.stderr)
    workers = default_workers() if args.workers is None else args.workers
    samples, ref_source = (folder_source(p, args.resolution, workers) for p in (args.samples, args.ref))
    device = resolve_device(args.device, "--device")
    # every detector loaded and checked against the metrics and the reference before the first image is measured: a
    # refusal of the second detector must not come after the first one's pass (hours at 50k ImageNet samples)
    detectors = [load_detector(spec, device) for spec in args.detector]
    plans = metrics_by_detector(metrics, detectors)
    for det, mine in zip(detectors, plans):
        if "sfid" in mine:
            det.check_spatial()  # the network, run layer by layer, gives back its own FID features (a probe batch)
        if "fd" in mine or "pr" in mine or "sfid" in mine:
            check_reference(args.ref, det, args.pr_num if "pr" in mine else 0, "sfid" in mine)
    for metric, what, lacking in (("is", "the Inception Score", "without a classifier head"),
                                  ("sfid", "sFID", "other than Inception-v3")):
        skipped = [f"{d.name} ({d.spec}{'' if mine else '; no other metric asked: not evaluated'})"
                   for d, mine in zip(detectors, plans) if metric in metrics and metric not in mine]
        if skipped:  # computed where it can be (the usual FID + IS + FD-DINOv2 call), and said where it is not
            able = ", ".join(d.name for d, mine in zip(detectors, plans) if metric in mine)
            print(f"ahpa eval: note: {what} is computed with {able} only; skipped for the detector(s) {lacking}: "
                  f"{', '.join(skipped)}", file=sys.stderr)
    # stored statistics alone are already the cheap form of a reference: nothing to cache
    stats_only = is_stats_file(args.ref) and npz_image_key(args.ref) is None
    cache = None if args.no_ref_cache or stats_only else (args.ref_cache or default_cache_dir())
    from tqdm import tqdm

    bars = []

    def progress(label: str, total: int | None):
        # called as a pass over images starts (none for a reference read from the cache), with the images it reads:
        # the bar shows how far and how long to go
        bars.append(tqdm(total=total, desc=label, unit="img", dynamic_ncols=True, leave=False))
        return bars[-1].update

    results, said = {}, set()  # a warning of every detector alike (fewer images, a size gap) is said once
    ours = (SkippedFilesWarning, ConvertedImagesWarning, EvaluationWarning)
    for det, mine in zip(detectors, plans):
        if not mine:
            continue
        caught = []
        try:
            with warnings.catch_warnings(record=True) as caught:  # said after the bars close, also before an error
                for category in ours:
                    warnings.simplefilter("always", category)
                values, stats = evaluate(samples, ref_source, det, mine, num=args.num, batch_size=args.batch,
                                          is_splits=args.is_splits, pr_num=args.pr_num, pr_k=args.pr_k, cache_dir=cache,
                                          progress=progress, option_names=OPTIONS)
        finally:  # also on an error: an open bar would leave its line for the error message to continue
            while bars:
                bars.pop().close()
            for w in caught:
                if not issubclass(w.category, ours):  # anything else (numpy, torch) as Python shows it
                    warnings.showwarning(w.message, w.category, w.filename, w.lineno)
                elif str(w.message) not in said:
                    said.add(str(w.message))
                    print(f"ahpa eval: warning: {w.message}", file=sys.stderr)
        ref = stats["reference"]
        # `is` alone reads no reference; stored statistics without a count (ADM's) say no number
        against = "; no reference needed" if ref is None else f" vs {ref.count or 'stored'} reference"
        if "pr" in mine and ref is not None:  # precision/recall read the first --pr-num of each, not every image
            n = stats["samples"].count
            against += f"; precision/recall: the first {min(args.pr_num, n)} vs {min(args.pr_num, ref.count or args.pr_num)}"
        if args.save_ref_stats:  # the statistics evaluate measured (or read), measured here only for `is` alone
            ref = ref or load_reference(ref_source, det, cache, args.batch)
            ref.save(args.save_ref_stats, detector=det.name, spatial=stats["reference_spatial"])
        shown = "  ".join(f"{k}: {v:.6g}" for k, v in values.items())
        print(f"{shown}  ({stats['samples'].count} samples{against})")
        results.update(values)
    print(json.dumps(results))
    return 0
