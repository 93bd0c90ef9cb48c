"""`ahpa demo`: the whole pipeline on procedural data, in a few minutes on a CPU, with a check.

Stages: make the data set -> train the small VAE -> train a judge classifier on real images ->
train a SiT with AHPA on the VAE's levels -> sample with guidance -> the judge's accuracy on the
samples (the share assigned to their conditioning class).
"""

from __future__ import annotations

import json
import shutil
import time
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ahpa import config as config_mod
from ahpa.data.procedural import CLASS_NAMES, make_shapes
from ahpa.demo.classifier import accuracy, train_classifier
from ahpa.priors.kl_vae import KLVAEConfig, train_vae
from ahpa.priors.reconstruction import reconstruct
from ahpa.sample import iter_samples
from ahpa.train import plots
from ahpa.train.loop import Trainer

Progress = Callable[[str, int], Any]  # (description, total) -> object with update(n), set_postfix(dict), close()


class _Silent:
    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, *a, **k) -> None: ...
    def close(self) -> None: ...


def demo_config(overrides: list[str] | tuple[str, ...] = ()) -> config_mod.Config:
    with resources.as_file(resources.files("ahpa") / "configs" / "demo.yaml") as path:
        return config_mod.load(path, overrides)


MARKER = ".ahpa-demo"  # in a directory the demo made, so that a rerun may clear what it wrote there
OWNED = ("data", "vae", "run", "samples.png", "report.json")


def claim_output_dir(out: Path) -> None:
    """Makes `out` the demo's: new or empty, or made by an earlier demo (its marker), whose outputs are removed.
    A rerun starts afresh because a resumed SiT run over a retrained VAE would mix two latent spaces. Any
    other non-empty directory is refused: the demo never deletes what it did not write."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"demo output {out} is a file; choose a directory with --out")
    if out.is_dir() and not (out / MARKER).exists() and any(out.iterdir()):
        raise ValueError(f"demo output {out} is not empty and was not made by `ahpa demo`; the demo writes (and, "
                         f"on a rerun, deletes) {', '.join(OWNED)} there. Choose a new or empty directory with --out")
    for owned in OWNED:
        target = out / owned
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by `ahpa demo`: a rerun here deletes " + " ".join(OWNED) + "\n")


def run_demo(
    out: str | Path, progress: Progress | None = None, num_images: int = 4096, vae_steps: int = 400,
    sit_overrides: list[str] | tuple[str, ...] = (), num_check: int = 400, seed: int = 0, judge_steps: int = 400,
) -> dict:
    """Runs every stage into `out` and returns the report (also written to out/report.json)."""
    progress = progress or (lambda desc, total: _Silent())
    out = Path(out)
    cfg = demo_config([f"train.seed={seed}", *sit_overrides])  # a bad override fails before anything is touched
    claim_output_dir(out)
    timings: dict[str, float] = {}
    res = cfg.data.resolution
    torch.manual_seed(seed)

    t0 = time.perf_counter()
    images, labels = make_shapes(num_images, res, seed=seed)
    data_file = out / "data" / "shapes.npz"
    data_file.parent.mkdir(parents=True, exist_ok=True)
    np.savez(data_file, images=images, labels=labels, class_names=np.array(CLASS_NAMES))
    timings["data"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    vae_dir = out / "vae"
    bar = progress("vae", vae_steps)

    def vae_step(step: int, mse: float) -> None:
        bar.update(1)
        if step % 20 == 0:
            bar.set_postfix({"mse": f"{mse:.4f}"})

    vae = train_vae(images, KLVAEConfig(channels=[16, 32, 64], latent_channels=4), steps=vae_steps, batch_size=32,
                    seed=seed, on_step=vae_step)
    bar.close()
    vae.save(vae_dir)
    timings["vae"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    held_images, held_labels = make_shapes(800, res, seed=seed + 1)
    bar = progress("judge", judge_steps)
    judge = train_classifier(images, labels, len(CLASS_NAMES), steps=judge_steps, seed=seed, on_step=lambda s: bar.update(1))
    bar.close()
    judge_acc = accuracy(judge, held_images, held_labels)
    rec_acc = accuracy(judge, reconstruct(vae, held_images), held_labels)
    timings["judge"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    cfg = demo_config([f"train.seed={seed}", *sit_overrides, f"prior.encoder=ahpa-vae:{vae_dir}", f"data.path={data_file}"])
    trainer = Trainer(cfg, out / "run")
    bar = progress("sit", cfg.train.steps)
    bar.update(trainer.step)

    def on_log(step: int, row: dict) -> None:
        bar.update(step - trainer_step[0])
        trainer_step[0] = step
        bar.set_postfix({k: f"{row[key]:.3f}" for k, key in (("flow", "loss/flow"), ("align", "loss/align")) if key in row})

    trainer_step = [trainer.step]
    trainer.run(on_log)
    bar.close()
    timings["sit"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    bundle = trainer.sampler_bundle()
    bar = progress("sample", num_check)
    samples, sample_labels = [], []
    for _, imgs, ys in iter_samples(bundle, 0, num_check, seed + 7, cfg.sample.micro_batch, cfg.sample):
        samples.append(imgs.numpy())
        sample_labels.append(ys.numpy())
        bar.update(len(imgs))
    bar.close()
    samples, sample_labels = np.concatenate(samples), np.concatenate(sample_labels)
    sample_acc = accuracy(judge, samples, sample_labels)
    grid = plots.save_grid(samples[:64], out / "samples.png", nrow=len(CLASS_NAMES))
    timings["sample"] = time.perf_counter() - t0

    report = {
        "class_consistency": sample_acc,
        "judge_accuracy_real": judge_acc,
        "judge_accuracy_vae_reconstructions": rec_acc,
        "chance": 1 / len(CLASS_NAMES),
        "target": 0.8,
        "passed": sample_acc >= 0.8,
        "num_samples": int(num_check),
        "seconds": {k: round(v, 1) for k, v in timings.items()},
        "files": {
            "samples": str(grid),
            "router": str(out / "run" / "router.png"),
            "losses": str(out / "run" / "losses.png"),
            "metrics": str(out / "run" / "metrics.jsonl"),
            "tb": str(out / "run" / "tb"),
            "run": str(out / "run"),
            "vae": str(vae_dir),
            "model": str(out / "run" / "model.safetensors"),
        },
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
