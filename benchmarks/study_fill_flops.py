"""Adds `tflop_per_step` to study result rows recorded before study.py wrote it (sixth session), in place.

    python benchmarks/study_fill_flops.py docs/study/gpu/results.jsonl

(Plain .jsonl only; the pilots' gzipped rows were filled before they were compressed.)

The figure is derived, not measured: the same `study.tflop_per_step` that study.py now calls, on a SiT and an
aligner built from each row's config and variants (model FLOPs of the backbone and of the alignment heads, per
training step). Rows that already have it are left as they are. Only TAEF2 caches are known (their level
channels are not in the rows); a row of another encoder is an error.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from study import tflop_per_step
from ahpa.align.objective import Aligner
from ahpa.config import AlignCfg
from ahpa.models.sit import SiT, SiTConfig

TAEF2_CHANNELS = {"stage1": 64, "stage2": 64, "stage3": 64, "stage4": 64, "latent": 32}  # the study cache's levels


def cost_of(row: dict) -> dict:
    cfg = dict(row["config"])
    for item in row.get("variant", []):  # a run's own switches (projector width, stop step) are not in its config
        key, _, value = item.partition("=")
        cfg[key] = value
    if not str(cfg["prior.encoder"]).startswith("taef2:"):
        raise SystemExit(f"{row['method']}: encoder {cfg['prior.encoder']} is not TAEF2; its level channels are unknown")
    preset = SiTConfig.preset(cfg["model.preset"])
    sizes = {k: int(cfg.get(f"model.{k}") or 0) or getattr(preset, k) for k in ("hidden_size", "depth", "num_heads")}
    model = SiT(SiTConfig(**sizes, patch_size=preset.patch_size, mlp_ratio=float(cfg["model.mlp_ratio"]),
                          input_size=int(cfg["data.resolution"]) // 8, in_channels=32, num_classes=10))
    aligner = None
    if row.get("levels"):
        shared = str(cfg.get("align.shared_trunk", True)).lower() not in ("false", "0")
        heads = AlignCfg(projector_dim=int(cfg["align.projector_dim"]), shared_trunk=shared,
                         token_fraction=float(cfg.get("align.token_fraction", 1.0)))
        aligner = Aligner(sizes["hidden_size"], row["levels"], [TAEF2_CHANNELS[name] for name in row["levels"]],
                          heads, "uniform", "cosine")
    return tflop_per_step(model, aligner, int(cfg["train.batch_size"]), int(cfg.get("align.stop_step") or 0))


def parser() -> argparse.ArgumentParser:
    """The command line (tests/test_docs_commands.py reads its flags to check the documented commands)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path, nargs="+")
    return ap


def main() -> None:
    args = parser().parse_args()
    for path in args.results:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        filled = 0
        for row in rows:
            if row.get("kind") == "eval" and "tflop_per_step" not in row:
                row["tflop_per_step"] = cost_of(row)
                filled += 1
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        print(f"{path}: {filled} rows filled")


if __name__ == "__main__":
    main()
