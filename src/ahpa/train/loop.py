"""A training run: set-up and resume, one deterministic step, checkpoints (when the loop logs, saves, evaluates and
stops: ahpa.train.schedule; other outputs: ahpa.train.outputs).

Rerunning the same command on the same run directory resumes exactly: the data position and all
random draws are functions of (seed, step), and a checkpoint holds model, EMA, aligner (router
and running statistics), optimiser and prior statistics (and train.posthoc_ema's power-function EMAs when on).
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Callable

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from ahpa import config as config_mod
from ahpa import lock
from ahpa.config import Config
from ahpa.data.order import batch_indices, micro_batches, process_requests
from ahpa.data.batches import PriorBatch
from ahpa.device import autocast
from ahpa.priors.targets import standardise_levels
from ahpa.provenance import device_name, resumed_software_note
from ahpa.sample import SamplerBundle
from ahpa.train import outputs, schedule
from ahpa.train.build import Parts, build_parts, check_batch_split, given_encoder_spec, registered_entries
from ahpa.train.checkpoint import checkpoint_step, list_checkpoints, save_checkpoint
from ahpa.train.distributed import current, ddp_without_buffer_sync, full_value, raise_from_main
from ahpa.train.draws import step_draws
from ahpa.train.ema import ema_decay, ema_note, ema_update
from ahpa.train.evaluate import Evaluator
from ahpa.train.notes import guidance_note, heads_cost_note, ignored_settings_note, precision_note, setup_note
from ahpa.train.posthoc_track import check_space, cost_note
from ahpa.train.divergence import TooManyBadSteps  # noqa: F401 (API: what a run that diverges raises)
from ahpa.train.run_dir import RunConfigError  # noqa: F401 (API: what a refused run directory raises)
from ahpa.train.run_dir import check_moved_inputs, check_run_dir, removed_if_refused
from ahpa.train.run_state import checkpoint_state, must_fit, restore
from ahpa.train.wandb_sink import missing_wandb
from ahpa.transport.path import get_path


class Trainer:
    """One training run. Under torchrun (process group initialised) it trains with DDP, or with FSDP2
    when train.fsdp is set: each process takes its slice of the same global batch, so 2 processes x b
    equal 1 process x 2b. With one process, train.fsdp trains unsharded (nothing to shard over)."""

    def __init__(self, cfg: Config, run_dir: str | Path, external=None, encoder=None,
                 progress: Callable[[str, int | None], Callable[[int], None] | None] | None = None,
                 space_check: bool = True):
        """`progress(label, total)` as for `run`, here for the measurement of eval.ref when the run evaluates (label
        "reference [<detector>]", total the images it reads: minutes for 50,000, once per machine, then cached and
        not called).
        `space_check=False` (`ahpa train --no-space-check`) skips the refusal of train.posthoc_ema's snapshots that
        need more than the run directory's disk has free (ahpa.train.posthoc_track.check_space)."""
        if not isinstance(cfg, Config):
            raise TypeError(f"Trainer takes a Config (ahpa.load_config(path, overrides)), not a {type(cfg).__name__}")
        with removed_if_refused(Path(run_dir), current().rank):  # refused, it leaves no new empty --out behind
            self._set_up(cfg, run_dir, external, encoder, progress, space_check)

    def _set_up(self, cfg: Config, run_dir: str | Path, external, encoder, progress, space_check: bool) -> None:
        d = current()
        spec, encoder_notes = given_encoder_spec(encoder, cfg.prior.encoder) if encoder is not None else ("", [])
        if spec and not cfg.prior.encoder:
            cfg = config_mod.from_dict(cfg.to_dict())  # a copy that names the encoder: resume, export and sample need it
            cfg.prior.encoder = spec
        cfg = config_mod.with_absolute_paths(cfg)  # the run's files, named the same from any directory
        self.cfg, self.run_dir, self.rank, self.world = cfg, Path(run_dir), d.rank, d.world
        self.path = get_path(cfg.transport.path)
        t = cfg.train
        check_batch_split(t.batch_size, t.grad_accum, self.world)
        if t.wandb:  # refused before the minutes of set-up, not when logging starts; rank 0 logs, so its install counts
            missing = missing_wandb(t.wandb) if self.rank == 0 else None
            raise_from_main(RunConfigError(missing) if missing else None)
        moved = check_run_dir(self.run_dir, cfg, self.rank)  # input paths changed on resume: {key: (run's, new)}
        self.parts: Parts = build_parts(cfg, external=external, encoder=encoder)
        self._registered = registered_entries(cfg, self.parts)  # what the parts were checked with
        self.step = 0
        self.ema_updates = 0
        self._torn = False  # a step left part-done by an exception (Ctrl-C in a notebook): see _check_still_current
        self.messages: list[str] = (self.parts.notes + encoder_notes + ignored_settings_note(cfg, self.parts.levels)
                                    + heads_cost_note(self.parts) + precision_note(t.precision, self.parts.device)
                                    + ema_note(t.ema_decay, t.ema_warmup, t.steps)
                                    + cost_note(t, self.parts.posthoc, self.world, bool(t.fsdp and self.world > 1))
                                    + guidance_note(cfg, self.parts.model.cfg.num_classes))
        notes, self._moved_inputs = check_moved_inputs(self.run_dir, cfg, self.parts.encoder, moved)
        self.messages += notes
        resumed, skipped = restore(self.run_dir, self.parts, cfg, self.world)
        self.messages += skipped + ([resumed.message] if resumed else [])
        if resumed is not None:
            self.step, self.ema_updates = resumed.step, resumed.ema_updates
            if self.step < t.steps:  # a complete run rerun (to export) trains no step under this software
                self.messages += resumed_software_note(self.run_dir, self.step)
        if self.parts.posthoc is not None and space_check:  # the step resumed from known, before minutes more set-up
            refused = None
            if self.rank == 0:  # its disk: the one process that writes snapshots
                try:
                    check_space(t, self.parts.posthoc, self.run_dir, self.step)
                except RunConfigError as e:
                    refused = e
            raise_from_main(refused)
        # before any training: a missing detector or reference fails now, not at the first evaluation
        self.evaluator = Evaluator.for_run(cfg, self.step, self.parts.device, self.run_dir, self.rank, self.world,
                                           progress)
        self.messages += self.evaluator.notes if self.evaluator is not None else []
        if self.evaluator is None and cfg.eval.every and self.step >= t.steps:  # said, not done silently
            self.messages.append(f"eval.every={cfg.eval.every}: the run is complete and is not evaluated again; "
                                 "measure its samples with `ahpa sample` and `ahpa eval`, or train on (a larger "
                                 "train.steps) to evaluate as it goes")
        p = self.parts
        self.sharded = None  # ahpa.train.fsdp.Sharded under FSDP
        if t.fsdp and self.world > 1:
            from ahpa.train.fsdp import Sharded

            self.sharded = Sharded(p, self.world)  # after loading: sharding keeps the loaded weights
            sharded = "model, EMA and aligner" if self.parts.aligner is not None else "model and EMA"
            self.messages.append(f"train.fsdp: {sharded} sharded over {self.world} processes (FSDP2)")
        elif t.fsdp:
            self.messages.append("train.fsdp: one process has nothing to shard over; training unsharded")
        if resumed is not None:
            with must_fit(self.run_dir, self.step):
                if self.sharded is not None:
                    self.sharded.load_optimizer_state(resumed.optimizer_state)
                else:
                    p.optimizer.load_state_dict(resumed.optimizer_state)
        # a prepared cache gathers the coming steps' rows in a background thread (ahpa.data.prefetch)
        if cfg.data.prefetch and hasattr(p.source, "start_prefetch"):
            plan = functools.partial(process_requests, batch_size=t.batch_size, n=len(p.source), seed=t.seed,
                                     hflip=cfg.data.hflip, rank=self.rank, world=self.world, accum=t.grad_accum)
            p.source.start_prefetch(plan, self.step)
        # the fused AdamW skips a step whose gradients are not finite without a host sync (found_inf)
        self.bad_total = torch.zeros((), device=p.device)
        self.bad_run = torch.zeros((), device=p.device)
        self._constants: dict[tuple[int, torch.dtype], torch.Tensor] = {}  # _constant's
        self.net, self.align_net = p.model, p.aligner
        if self.world > 1 and self.sharded is None:
            ids = [p.device.index] if p.device.type == "cuda" else None
            # buffers are equal on every process by construction (the SiT's fixed position embedding; the aligner's
            # running means, updated from all-reduced terms): no broadcast of rank 0's before every forward
            self.net = DDP(p.model, device_ids=ids, **ddp_without_buffer_sync())
            if p.aligner is not None and any(q.requires_grad for q in p.aligner.parameters()):
                self.align_net = DDP(p.aligner, device_ids=ids, **ddp_without_buffer_sync())
        # the parameters the step's clipping and EMA walk, listed once: after sharding, which replaces them (a small
        # model's step is host-bound on a GPU, and walking the module tree every step costs that time)
        self._trainable = p.trainable()
        self._ema_pairs = (list(p.ema.parameters()), list(p.model.parameters()))
        if p.posthoc is not None:  # train.posthoc_ema's copies, listed the same way
            p.posthoc.bind(p.model)
        self.messages.insert(0, setup_note(cfg, p, self.world, self.sharded is not None, device_name(p.device)))
        if t.compile:  # after DDP or sharding, as torch.compile expects
            self.net = torch.compile(self.net, mode=t.compile_mode)
            if self.align_net is not None:  # its heads, losses and router: dozens of small kernels when eager
                self.align_net = torch.compile(self.align_net, mode=t.compile_mode)

    # ---- checkpoint ----
    def state_dict(self) -> dict | None:
        """The checkpoint (ahpa.train.run_state). Under FSDP every process calls it; only rank 0 gets the dict."""
        return checkpoint_state(self.parts, self.sharded, self.rank, self.step, self.ema_updates, self.world, self.cfg)

    # ---- one step ----
    def _lr(self, step: int) -> float:
        t = self.cfg.train
        return t.lr * min(1.0, (step + 1) / t.warmup_steps) if t.warmup_steps else t.lr

    def _draws(self, step: int, n: int, latent_shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
        p = self.parts
        return step_draws(self.cfg, step, n, latent_shape, p.device, p.source.samples_posterior, p.model.cfg.num_tokens)

    def aligning(self, step: int) -> bool:
        """Whether step `step` has the alignment loss (align.stop_step ends it; the aligner is then not run)."""
        stop = self.cfg.align.stop_step
        return self.parts.aligner is not None and (stop == 0 or step < stop)

    def _loss(self, batch: PriorBatch, d: dict[str, torch.Tensor], align_on: bool):
        p, c = self.parts, self.cfg
        x = p.stats.latent.apply(batch.latent, channel_dim=1)  # [B, C, h, w] the posterior sample, standardised
        y = torch.where(d["drop"], self._constant(p.model.null_class, batch.labels.dtype), batch.labels)  # [B]
        x_t = self.path.interpolate(x, d["eps"], d["t"])  # t [B]: 0 data, 1 noise
        target = self.path.velocity(x, d["eps"], d["t"])  # d x_t / dt, [B, C, h, w] fp32
        taps = p.aligner.taps if align_on else ()
        with autocast(p.device, p.amp):
            pred, hidden = self.net(x_t, d["t"], y, taps)  # [B, C, h, w], one [B, N, D] per tap
        # a mean over the batch and every element, as SiT's and REPA's mean_flat: align.weight has REPA's scale
        flow = (pred.float() - target).pow(2).mean()
        metrics = {"loss/flow": flow.detach()}
        loss = flow
        if align_on:
            if p.external is not None:
                with autocast(p.device, p.amp):
                    targets = [p.external(batch.images, p.grid)]  # 1 x [B, N, C], not standardised (REPA)
            else:
                targets = standardise_levels(batch.levels, p.levels, p.stats)  # K x [B, N, C_k]
            with autocast(p.device, p.amp):
                # the weighted alignment loss plus, for a learned router, its own objective (ahpa.align.objective):
                # both are scaled by align.weight below
                align, extra = self.align_net(hidden, targets, d["t"], d.get("kept"))
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
        for g in p.optimizer.param_groups:
            g["lr"] = self._lr(step)
        if not p.model.training:  # sampling with the trained weights set it to eval; .train() walks every module
            p.model.train()
        align_on = self.aligning(step)
        self._torn = True  # until the step's last update: gradients, weights, EMA and running means change in turn
        if align_on:
            if not p.aligner.training:
                p.aligner.train()
        elif p.source.reads_priors:  # alignment has stopped (align.stop_step): the priors are no longer read
            p.source.drop_levels()
        totals: dict[str, torch.Tensor] = {}
        scale = p.loss_scale  # fp16 only (ahpa.train.loss_scale)
        total_loss = 0  # the step's loss, for the loss scale's judgement of a skip
        for a, sl in enumerate(micro_batches(B, self.rank, self.world, accum)):
            d = draws if sl == slice(0, B) else {k: v[sl] for k, v in draws.items()}  # the whole batch: no views
            with self._no_sync(last=a == accum - 1):
                loss, metrics = self._loss(p.source.fetch(idx[sl], d["flip"], d.get("posterior")), d, align_on)
                scaled = loss * scale.scale if scale is not None else loss
                (scaled / accum if accum > 1 else scaled).backward()  # / 1, forward and backward: two kernels for nothing
            if scale is not None:
                total_loss = total_loss + loss.detach()
            for k, v in metrics.items():  # the micro-batches' mean; one micro-batch's metrics as they are, no operator
                v = v / accum if accum > 1 else v
                totals[k] = totals[k] + v if k in totals else v
        if scale is not None:
            scale.unscale_(self._trainable)
        grad_norm = torch.nn.utils.clip_grad_norm_(self._trainable, c.train.grad_clip if c.train.grad_clip > 0 else float("inf"))
        grad_norm = full_value(grad_norm)  # under FSDP a replicated DTensor: the global norm, no communication
        # a non-finite loss or gradient: skip the optimiser and EMA updates, count it (no host sync)
        found_inf = (grad_norm - grad_norm).ne(0).float()  # inf - inf and NaN - NaN are NaN: 3 kernels, isfinite's 6
        p.optimizer.found_inf, p.optimizer.grad_scale = found_inf, None
        p.optimizer.step()
        p.optimizer.zero_grad(set_to_none=True)
        ema_update(*self._ema_pairs, ema_decay(self.ema_updates, c.train.ema_decay, c.train.ema_warmup), keep=found_inf)
        if p.posthoc is not None:  # power-function EMAs, t counting every step from 1 (ahpa.train.posthoc_track)
            p.posthoc.update(step + 1)
        if align_on:  # once per step, from all micro-batches: accumulating gradients trains as the whole batch does
            p.aligner.update_running(totals.pop("running/sums"), totals.pop("running/counts"), skip=found_inf)
        # a skip that fp16's loss scale deals with (an overflow, the scale halves) is not a bad step
        overflow = scale.update(found_inf, total_loss) if scale is not None else None
        bad = found_inf - overflow if overflow is not None else found_inf
        self.bad_total += bad
        self.bad_run = (self.bad_run + bad) * bad
        totals["grad_norm"] = grad_norm.detach()
        # a skipped step's metrics are dropped from the averages (masked, not branched on): one comparison for all
        # of them, and a zero made once (a zeros_like per metric was a kernel each, every step)
        skipped = found_inf > 0
        totals = {k: torch.where(skipped, self._constant(0, v.dtype), v) for k, v in totals.items()}
        totals["good_steps"] = 1 - found_inf
        if overflow is not None:
            totals["overflow_steps"] = overflow
        self.ema_updates += 1
        self.step += 1
        self._torn = False
        return totals

    def _constant(self, value: int, dtype: torch.dtype) -> torch.Tensor:
        """A 0-dim `value` of `dtype` on the run's device, made once: the step's torch.where takes it every step where
        a full_like or zeros_like was a kernel each time."""
        key = (value, dtype)
        if key not in self._constants:
            self._constants[key] = torch.full((), value, dtype=dtype, device=self.parts.device)
        return self._constants[key]

    def _no_sync(self, last: bool):
        """DDP reduces gradients on the last accumulation micro-step only. FSDP reduce-scatters on every
        micro-step: skipping it would keep a full unsharded gradient per process, which sharding is there
        to avoid."""
        if last or self.world == 1:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        for net in (self.net, self.align_net):
            net = getattr(net, "_orig_mod", net)  # torch.compile wraps the DDP module: no_sync is the DDP's
            if isinstance(net, DDP):
                stack.enter_context(net.no_sync())
        return stack

    # ---- outputs ----
    def unsharded(self, name: str, on_all_ranks: bool = True) -> torch.nn.Module | None:
        """parts.<name> ("model", "ema" or "aligner") with full weights: the module itself without FSDP;
        under FSDP a frozen plain copy gathered onto every process, or onto rank 0 alone (None on the
        others) when `on_all_ranks` is off. Under FSDP every process must call it."""
        if self.sharded is None:
            return getattr(self.parts, name)
        return self.sharded.plain(name, everywhere=on_all_ranks)

    def sampler_bundle(self, use_ema: bool = True, on_all_ranks: bool = True) -> SamplerBundle | None:
        """What sampling needs, with the EMA (or the trained) backbone; see `unsharded` for FSDP."""
        p = self.parts
        model = self.unsharded("ema" if use_ema else "model", on_all_ranks)
        if model is None:
            return None
        return SamplerBundle(model.eval(), self.path, p.stats.latent, p.encoder, p.device, p.amp)

    def save(self) -> Path | None:
        """Writes a checkpoint from rank 0. Every process calls it (FSDP gathers the full state)."""
        state = self.state_dict()
        if self.rank != 0:
            return None
        return save_checkpoint(self.run_dir / "checkpoints", self.step, state, self.cfg.train.keep_checkpoints)

    def export(self, path: str | Path | None = None) -> Path | None:
        """Writes the EMA backbone as a plain SiT from rank 0. Every process calls it (FSDP gathers)."""
        p = self.parts
        ema = self.unsharded("ema", on_all_ranks=False)
        if self.rank != 0:
            return None
        return outputs.export(path or self.run_dir / "model.safetensors", ema, p.stats.latent, p.encoder, self.cfg)

    def _check_still_current(self) -> None:
        """Before training: this process holds the run directory (until run() ends), no one trained it past the
        step this Trainer was built at (another Trainer of this process, or a launch in between): training on would
        redo those steps and log every one of them twice; no extension it uses was registered again since it was
        built (a notebook's cell rerun with an edited loss), which it would train with unchecked; and no exception
        (Ctrl-C) left its last step part-done: its gradients accumulated, or its weights updated but not its EMA,
        and training on would apply that step twice. Rank 0 decides."""
        error = None
        if self.rank == 0:
            try:
                lock.hold(self.run_dir / lock.LOCK_FILE, f"run directory {self.run_dir}")
            except OSError as e:
                error = e
            newest = max((checkpoint_step(p) for p in list_checkpoints(self.run_dir / "checkpoints")), default=0)
            if error is None and self._torn:
                error = RunConfigError(f"this Trainer's run() was interrupted inside step {self.step + 1}, part of which "
                                       f"its weights, optimiser and EMA hold: training on would apply it twice. Build a "
                                       f"new Trainer: it resumes {self.run_dir} from "
                                       + (f"its newest checkpoint (step {newest})" if newest else "the start (no checkpoint yet)")
                                       + "; run(should_stop=...) stops between steps, saving one")
            if error is None and newest > self.step:
                error = RunConfigError(f"{self.run_dir} was trained to step {newest} after this Trainer was built at step "
                                       f"{self.step} (by another Trainer or launch): build a new Trainer to resume it")
            replaced = [(key, name, reg) for key, reg, name, entry in self._registered
                        if reg.entries.get(name) is not entry]
            if error is None and replaced:
                key, name, reg = replaced[0]
                error = RunConfigError(f"{key}={name!r} was registered again after this Trainer was built, which "
                                       f"checked the {reg.what} it had then: build a new Trainer (it resumes the run) "
                                       "to check and train the new one")
        raise_from_main(error)

    def run(self, on_log: Callable[[int, dict], None] | None = None,
            should_stop: Callable[[], int] | None = None,
            on_eval: Callable[[int, dict[str, float]], None] | None = None,
            progress: Callable[[str, int], Callable[[int], None] | None] | None = None) -> dict:
        """Trains to train.steps. Returns the last log row, with "stopped": the reason when `should_stop` asked for
        an early, clean exit (a checkpoint is saved first: rerun to resume).

        Every callback is optional and runs on every process (a CLI shows them on rank 0):
        - `on_log(step, row)` with each logged window's row (losses, img/s);
        - `should_stop()` returns 0 to go on, or a reason to stop: a signal number, or True;
        - `on_eval(step, {"FD-r20": ...})` after each evaluation;
        - `progress(label, total)` when a sample grid ("grid") or an evaluation ("eval") starts generating `total`
          images on this process; it may return a callback that takes the number of images of each batch.
        """
        hooks = schedule.RunHooks(on_log, should_stop, on_eval, progress)
        try:
            self._check_still_current()
            return schedule.train(self, hooks)
        finally:
            if self.rank == 0:
                lock.release(self.run_dir / lock.LOCK_FILE)  # taken by _check_still_current
