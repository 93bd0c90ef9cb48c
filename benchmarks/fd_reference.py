"""Reference Fréchet distance: CIFAR-10 test set (10k) vs training set (50k), per detector.

The floor a perfect CIFAR-10 generator sits near (a fresh sample of the same distribution), so every
reported FD has a scale. Prints one JSON line; --out writes the same JSON to a file.

    .venv/bin/python benchmarks/fd_reference.py --data-dir ../shared/data/cifar10 \
        --detector torchscript:../shared/detectors/cifar10-resnet20.pt \
        --detector torchscript:../shared/detectors/cifar10-resnet32.pt --out docs/fd_reference.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from ahpa.metrics import compute_stats, load_detector


def parser() -> argparse.ArgumentParser:
    """The command line (tests/test_docs_commands.py reads its flags to check the documented commands)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, required=True, help="folder with test.npz and train.npz")
    ap.add_argument("--detector", action="append", required=True, help="detector spec; repeat for several")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--max-images", type=int, help="first N images of each set (smoke runs)")
    ap.add_argument("--save-stats", type=Path, help="folder to keep the per-set statistics (.npz) in")
    return ap


def main() -> None:
    args = parser().parse_args()

    result = {"test": str(args.data_dir / "test.npz"), "ref": str(args.data_dir / "train.npz"), "fd": {}, "seconds": {}}
    t_all = time.perf_counter()
    for spec in args.detector:
        det = load_detector(spec, args.device)
        t0 = time.perf_counter()
        stats = {}
        for split in ("test", "train"):
            stats[split] = compute_stats(args.data_dir / f"{split}.npz", det, args.batch_size, max_images=args.max_images)
            if args.save_stats:
                args.save_stats.mkdir(parents=True, exist_ok=True)
                stats[split].save(args.save_stats / f"cifar10-{split}-{det.name}.npz")
        result["fd"][det.name] = stats["test"].frechet_distance(stats["train"])
        result["seconds"][det.name] = round(time.perf_counter() - t0, 2)
        result.setdefault("count", {"test": stats["test"].count, "train": stats["train"].count})
    result["seconds"]["total"] = round(time.perf_counter() - t_all, 2)
    result["env"] = {
        "device": args.device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }
    line = json.dumps(result)
    print(line)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(line + "\n")


if __name__ == "__main__":
    main()
