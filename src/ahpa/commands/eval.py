"""ahpa eval SAMPLES --ref REF --detector D [--detector D ...]: Fréchet distances, last line JSON."""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("eval", help="Fréchet distance of samples against a reference, per detector")
    p.add_argument("samples", help="samples: ADM .npz (arr_0), images .npz, or an image folder")
    p.add_argument("--ref", required=True, help="reference: image source, or a statistics .npz (mu, sigma)")
    p.add_argument("--detector", action="append", required=True,
                   help="torchscript:FILE | inception:FILE | dinov2:DIR (repeatable)")
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--device", default="auto")
    p.add_argument("--save-ref-stats", help="also write the reference statistics to this .npz (one detector only)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ahpa.metrics import compute_stats, load_detector, reference_stats
    from ahpa.train.build import resolve_device

    device = resolve_device(args.device)
    if args.save_ref_stats and len(args.detector) != 1:
        raise ValueError("--save-ref-stats needs exactly one --detector")
    results = {}
    for spec in args.detector:
        det = load_detector(spec, device)
        ref = reference_stats(args.ref, det, args.batch)
        if args.save_ref_stats:
            ref.save(args.save_ref_stats, detector=det.name)
        sam = compute_stats(args.samples, det, args.batch)
        results[det.name] = sam.frechet_distance(ref)
        print(f"{det.name}: {results[det.name]:.6g}  ({sam.count} samples vs {ref.count or 'stored'} reference)")
    print(json.dumps(results))
    return 0
