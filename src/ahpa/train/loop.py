"""The training loop: deterministic steps, checkpoints, logs, sample grids and router plots.

Rerunning the same command on the same run directory resumes exactly: the data position and all
random draws are functions of (seed, step), and a checkpoint holds model, EMA, aligner (router
and running statistics), optimiser and prior statistics.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch

from ahpa import config as config_mod
from ahpa.config import Config
from ahpa.data.order import batch_indices
from ahpa.data.batches import PriorBatch
from ahpa.priors.targets import PriorStats, standardise_levels
from ahpa.sample import SamplerBundle, export_model, generate
from ahpa.train import plots
from ahpa.train.build import Parts, build_parts, compute_stats
from ahpa.train.checkpoint import load_latest, save_checkpoint
from ahpa.train.ema import ema_decay, ema_update
from ahpa.train.logger import MetricsLogger
from ahpa.train.rng import generator
from ahpa.transport.path import get_path
from ahpa.transport.timesteps import sample_t

TRAIN_STREAM = 1
GRID_SEED = 1234


class RunConfigError(ValueError):
    pass


class Trainer:
    def __init__(self, cfg: Config, run_dir: str | Path, rank: int = 0, world: int = 1, external=None):
        self.cfg, self.run_dir, self.rank, self.world = cfg, Path(run_dir), rank, world
        self.path = get_path(cfg.transport.path)
        t = cfg.train
        if t.batch_size % (t.grad_accum * world):
            raise ValueError(f"train.batch_size={t.batch_size} is not divisible by grad_accum x processes = {t.grad_accum * world}")
        self._check_resume_config()
        self.parts: Parts = build_parts(cfg, external=external)
        self.step = 0
        self.ema_updates = 0
        self.messages: list[str] = []
        self._load()

    # ---- set-up and resume ----
    def _check_resume_config(self) -> None:
        saved_file = self.run_dir / "config.yaml"
        if saved_file.exists():
            saved = config_mod.load(saved_file)
            conflicts = config_mod.resume_conflicts(saved, self.cfg)
            if conflicts:
                raise RunConfigError(
                    f"{self.run_dir} holds a run with another configuration; only the run length and cadences may "
                    f"change on resume. Differences:\n  " + "\n  ".join(conflicts) + "\nUse a new --out directory to start another run."
                )

    def _load(self) -> None:
        p = self.parts
        state, skipped = load_latest(self.run_dir / "checkpoints")
        self.messages += skipped
        if state is None:
            p.stats = compute_stats(p)
            return
        p.model.load_state_dict(state["model"])
        p.ema.load_state_dict(state["ema"])
        if p.aligner is not None:
            p.aligner.load_state_dict(state["aligner"])
        p.optimizer.load_state_dict(state["optimizer"])
        p.stats = PriorStats.from_dict(state["stats"])
        self.step, self.ema_updates = state["step"], state["ema_updates"]
        self.messages.append(f"resumed from step {self.step}")

    def state_dict(self) -> dict:
        p = self.parts
        return {
            "step": self.step,
            "ema_updates": self.ema_updates,
            "config": self.cfg.to_dict(),
            "model": p.model.state_dict(),
            "ema": p.ema.state_dict(),
            "aligner": p.aligner.state_dict() if p.aligner is not None else None,
            "optimizer": p.optimizer.state_dict(),
            "stats": p.stats.to_dict(),
            "levels": p.levels,
            "encoder": p.encoder.identity(),
        }

    # ---- one step ----
    def _lr(self, step: int) -> float:
        t = self.cfg.train
        return t.lr * min(1.0, (step + 1) / t.warmup_steps) if t.warmup_steps else t.lr

    def _draws(self, step: int, n: int, latent_shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
        """All random numbers of one global batch, from (seed, step): identical on every process."""
        c, dev = self.cfg, self.parts.device
        g = generator(c.train.seed, step, stream=TRAIN_STREAM, device=dev)
        return {
            "flip": (torch.rand(n, generator=g, device=dev) < 0.5) & c.data.hflip,
            "t": sample_t(n, c.transport.time_sampler, g, dev, c.transport.time_mean, c.transport.time_std),
            "eps": torch.randn((n, *latent_shape), generator=g, device=dev),
            "drop": torch.rand(n, generator=g, device=dev) < c.train.label_dropout,
            "posterior": torch.randn((n, *latent_shape), generator=g, device=dev),
        }

    def _loss(self, batch: PriorBatch, d: dict[str, torch.Tensor]):
        p, c = self.parts, self.cfg
        x = p.stats.latent.apply(batch.latent, channel_dim=1)
        y = torch.where(d["drop"], torch.full_like(batch.labels, p.model.null_class), batch.labels)
        x_t = self.path.interpolate(x, d["eps"], d["t"])
        target = self.path.velocity(x, d["eps"], d["t"])
        taps = (c.align.depth,) if p.aligner is not None else ()
        with torch.autocast(p.device.type, dtype=p.amp, enabled=p.amp is not None):
            pred, hidden = p.model(x_t, d["t"], y, taps)
        flow = (pred.float() - target).pow(2).mean()
        metrics = {"loss/flow": flow.detach()}
        loss = flow
        if p.aligner is not None:
            if p.external is not None:
                targets = [p.external(batch.images, p.grid)]
            else:
                targets = standardise_levels(batch.levels, p.levels, p.stats)
            with torch.autocast(p.device.type, dtype=p.amp, enabled=p.amp is not None):
                align, extra = p.aligner(hidden[0], targets, d["t"])
            loss = loss + c.align.weight * align
            metrics["loss/align"] = c.align.weight * extra.pop("align/weighted")
            metrics.update(extra)
        return loss, metrics

    def train_step(self) -> dict[str, torch.Tensor]:
        p, c = self.parts, self.cfg
        step, accum, B = self.step, c.train.grad_accum, c.train.batch_size
        idx = batch_indices(step, B, len(p.source), c.train.seed)
        mc = p.model.cfg
        draws = self._draws(step, B, (mc.in_channels, mc.input_size, mc.input_size))
        per_rank = B // self.world
        lo = self.rank * per_rank
        for g in p.optimizer.param_groups:
            g["lr"] = self._lr(step)
        p.model.train()
        if p.aligner is not None:
            p.aligner.train()
        totals: dict[str, torch.Tensor] = {}
        micro = per_rank // accum
        for a in range(accum):
            sl = slice(lo + a * micro, lo + (a + 1) * micro)
            d = {k: v[sl] for k, v in draws.items()}
            loss, metrics = self._loss(p.source.fetch(idx[sl], d["flip"], d["posterior"]), d)
            (loss / accum).backward()
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0) + v / accum
        grad_norm = torch.nn.utils.clip_grad_norm_(p.trainable(), c.train.grad_clip if c.train.grad_clip > 0 else float("inf"))
        totals["grad_norm"] = grad_norm.detach()
        p.optimizer.step()
        p.optimizer.zero_grad(set_to_none=True)
        ema_update(p.ema, p.model, ema_decay(self.ema_updates, c.train.ema_decay, c.train.ema_warmup))
        self.ema_updates += 1
        self.step += 1
        return totals

    # ---- outputs ----
    def sampler_bundle(self, use_ema: bool = True) -> SamplerBundle:
        p = self.parts
        model = p.ema if use_ema else p.model
        return SamplerBundle(model.eval(), self.path, p.stats.latent, p.encoder, p.device, p.amp)

    def write_samples(self) -> Path:
        n = self.cfg.sample.grid_images
        k = self.parts.model.cfg.num_classes
        labels = torch.arange(n) % k
        images = generate(self.sampler_bundle(), list(range(n)), labels, GRID_SEED, self.cfg.sample)
        out = plots.save_grid(images.numpy(), self.run_dir / "samples" / f"step_{self.step:09d}.png", nrow=min(k, 16) if k <= 16 else None)
        plots.save_grid(images.numpy(), self.run_dir / "samples.png", nrow=min(k, 16) if k <= 16 else None)
        return out

    def write_router_plot(self) -> Path | None:
        al = self.parts.aligner
        if al is None:
            return None
        t, w = al.router_table()
        row = {"step": self.step, "t": t.tolist(), "weights": w.tolist(), "levels": al.levels}
        with open(self.run_dir / "router.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        title = f"router ({al.router.mode}) at step {self.step}"
        plots.router_heatmap(t.numpy(), w.numpy(), al.levels, self.run_dir / "plots" / f"router_{self.step:09d}.png", title)
        return plots.router_heatmap(t.numpy(), w.numpy(), al.levels, self.run_dir / "router.png", title)

    def save(self) -> Path:
        return save_checkpoint(self.run_dir / "checkpoints", self.step, self.state_dict(), self.cfg.train.keep_checkpoints)

    def export(self, path: str | Path | None = None) -> Path:
        p = self.parts
        return export_model(path or self.run_dir / "model.safetensors", p.ema, p.stats.latent, p.encoder.spec,
                            self.cfg.transport.path, self.cfg.data.resolution)

    # ---- the loop ----
    def run(self, on_log: Callable[[int, dict], None] | None = None) -> dict:
        c = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(config_mod.dump(c))
        logger = MetricsLogger(self.run_dir) if self.rank == 0 else None
        if logger is not None:
            logger.truncate_after(self.step)
        sums: dict[str, torch.Tensor] = {}
        count, t0, last = 0, time.perf_counter(), {}
        names = self.parts.levels
        while self.step < c.train.steps:
            metrics = self.train_step()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0) + v
            count += 1
            done = self.step == c.train.steps
            if self.step % c.train.log_every == 0 or done:
                row = {k: (v / count).tolist() for k, v in sums.items()}  # the only host sync: once per log
                bad = [k for k, v in row.items() if not torch.isfinite(torch.tensor(v)).all()]
                if bad:
                    raise FloatingPointError(f"non-finite {bad} at step {self.step}; lower train.lr or check the data")
                dt = time.perf_counter() - t0
                row.update(images=self.step * c.train.batch_size, lr=self._lr(self.step - 1),
                           img_per_s=count * c.train.batch_size / max(dt, 1e-9), level_names=names)
                if logger is not None:
                    logger.log(self.step, row)
                if on_log is not None:
                    on_log(self.step, row)
                sums, count, t0, last = {}, 0, time.perf_counter(), row
            if self.rank == 0 and (self.step % c.train.ckpt_every == 0 or done):
                self.save()
                self.write_router_plot()
            if self.rank == 0 and c.train.sample_every and (self.step % c.train.sample_every == 0 or done):
                self.write_samples()
        if self.rank == 0:
            if (self.run_dir / "metrics.jsonl").exists():
                plots.loss_curves(self.run_dir / "metrics.jsonl", self.run_dir / "losses.png", names)
            self.export()
            (self.run_dir / "DONE").write_text(json.dumps({"step": self.step}) + "\n")
        if logger is not None:
            logger.close()
        return last
