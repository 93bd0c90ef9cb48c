"""Throughput of `prepare` against the bare encoder forward, same device, batch and images; JSON out.

    python benchmarks/prepare_throughput.py --images ../shared/data/cifar10/test.npz \
        --vae taef2:../shared/weights/taef2 --resolution 64 --grid 8 --num 512 --batch 64 --out result.json
    python benchmarks/prepare_throughput.py --sd-config ../shared/reference/sd-vae-ft-ema.config.json \
        --resolution 256 --num 32 --batch 8                # SD-VAE architecture, random weights

bare: `encoder.encode(x, all levels)` over the same images, already decoded and on the device, synchronised;
alternated with the prepare runs; each prepare rate is divided by the mean of the bare rates around it.
prepare: the whole pipeline (decode in workers, crop/upsample, encode, pool, round, copy to host, write,
checksum, statistics) with --flips none so that both encode each image exactly once; the rate counts the
encoding loop (first batch to last shard committed) and, separately, the wall time of the whole call.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_encoder(args, device):
    if args.sd_config:
        from ahpa.priors.diffusers_vae import DiffusersVAE

        torch.manual_seed(0)
        enc = DiffusersVAE.from_config(json.loads(Path(args.sd_config).read_text()))
        enc.spec = f"diffusers:<random from {Path(args.sd_config).name}>"
        return enc.to(device)
    from ahpa.priors.registry import load_encoder

    return load_encoder(args.vae, device)


def load_batches(args, device: torch.device) -> list[torch.Tensor]:
    """The first `num` images exactly as prepare feeds them to the encoder (decoded, cropped/upsampled)."""
    from ahpa.data.listing import ItemDataset, assemble, list_source

    items = ItemDataset(list_source(args.images, limit=args.num), args.resolution)
    good = [it for it in (items[i] for i in range(len(items))) if it.image is not None]
    return [assemble(good[i : i + args.batch], args.resolution, device) for i in range(0, len(good), args.batch)]


def bare_rate(encoder, batches: list[torch.Tensor], precision: str, device: torch.device) -> float:
    """Images/s of the encoder forwards alone over the same images.

    The same images matter: on CPU the speed depends on the pixels (uniform noise runs ~20% slower).
    """
    levels = [n for n in encoder.level_names if n != "latent"]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        encoder.encode(batches[0], levels)  # warm-up (allocator, cudnn autotune)
        sync(device)
        t0 = time.perf_counter()
        for x in batches:
            encoder.encode(x, levels)
        sync(device)
    return sum(len(x) for x in batches) / (time.perf_counter() - t0)


def prepare_rate(args, encoder, device: torch.device) -> dict:
    from ahpa.data.prepare import PrepareOptions, prepare

    stamps: list[tuple[float, int]] = []
    with tempfile.TemporaryDirectory(prefix="ahpa-bench-") as tmp:
        opts = PrepareOptions(images=args.images, vae=encoder.spec, resolution=args.resolution, out=str(Path(tmp) / "c"),
                              grid=args.grid, batch=args.batch, workers=args.workers, flips="none", limit=args.num,
                              shard_size=args.shard_size, device=str(device), precision=args.precision)
        inside = [0.0]
        plain = encoder.encode

        def timed(*a, **kw):  # time spent inside the encoder during prepare (synchronised)
            t = time.perf_counter()
            out = plain(*a, **kw)
            sync(device)
            inside[0] += time.perf_counter() - t
            return out

        encoder.encode = timed
        try:
            t0 = time.perf_counter()
            res = prepare(opts, on_progress=lambda p: stamps.append((time.perf_counter(), p.items_done)), encoder=encoder)
            wall = time.perf_counter() - t0
        finally:
            del encoder.encode  # back to the class method
    # stamps[0]: before the loop; stamps[1]: first batch done (includes worker start-up and warm-up): start there
    (t_first, n_first), (t_last, n_last) = stamps[1], stamps[-1]
    return {"images": res.images, "wall_s": wall, "wall_img_per_s": res.images / wall,
            "loop_img_per_s": (n_last - n_first) / max(t_last - t_first, 1e-9),
            "bytes_per_image": res.bytes / res.images, "encoder_share": inside[0] / wall}


def parser() -> argparse.ArgumentParser:
    """The command line (tests/test_docs_commands.py reads its flags to check the documented commands)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", default=str(SHARED / "data" / "cifar10" / "test.npz"))
    p.add_argument("--vae", default=f"taef2:{SHARED / 'weights' / 'taef2'}")
    p.add_argument("--sd-config", default="", help="build a random AutoencoderKL from this config instead of --vae")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--grid", type=int, default=0)
    p.add_argument("--num", type=int, default=512, help="images through prepare (bare: the same number of forwards)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--shard-size", type=int, default=4096)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=3, help="prepare runs, each between two bare measurements")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads on CPU (0 = torch default)")
    p.add_argument("--out", default="", help="write the JSON here too")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not Path(args.images).exists():
        print(f"images {args.images} not found (pass --images)", file=sys.stderr)
        return 2
    from ahpa.device import resolve_device

    device = resolve_device(args.device)
    encoder = build_encoder(args, device)
    batches = load_batches(args, device)
    # bare, prepare, bare, prepare, ..., bare: each prepare is compared with the mean of its neighbours, so
    # that load from other processes on a shared machine biases neither side; the median ratio is reported
    bares = [bare_rate(encoder, batches, args.precision, device)]
    preps = []
    for _ in range(args.repeats):
        preps.append(prepare_rate(args, encoder, device))
        bares.append(bare_rate(encoder, batches, args.precision, device))
    ratios_loop = [p["loop_img_per_s"] / ((a + b) / 2) for p, a, b in zip(preps, bares, bares[1:])]
    ratios_wall = [p["wall_img_per_s"] / ((a + b) / 2) for p, a, b in zip(preps, bares, bares[1:])]
    bare = statistics.median(bares)
    prep = {k: statistics.median(p[k] for p in preps) for k in preps[0]}
    result = {
        "encoder": encoder.spec,
        "resolution": args.resolution,
        "batch": args.batch,
        "num": args.num,
        "workers": args.workers,
        "precision": args.precision,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "bare_img_per_s": round(bare, 2),
        "bare_img_per_s_runs": [round(b, 2) for b in bares],
        "prepare_loop_img_per_s": round(prep["loop_img_per_s"], 2),
        "prepare_wall_img_per_s": round(prep["wall_img_per_s"], 2),
        "ratio_loop": round(statistics.median(ratios_loop), 3),
        "ratio_loop_runs": [round(r, 3) for r in ratios_loop],
        "ratio_wall": round(statistics.median(ratios_wall), 3),
        # the fraction of prepare's wall time spent inside encoder.encode: the ratio prepare could reach if the
        # encoder ran as fast as alone; unlike the wall ratios it hardly moves with load from other processes
        "encoder_share_of_prepare": round(prep["encoder_share"], 3),
        "prepare_wall_s": round(prep["wall_s"], 2),
        "bytes_per_image": round(prep["bytes_per_image"], 1),
    }
    if device.type != "cuda":
        result["gpu"] = "unmeasured (no GPU in this run)"
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
