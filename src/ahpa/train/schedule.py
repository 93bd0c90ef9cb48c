"""When a run logs, saves, draws a sample grid, evaluates and stops, around Trainer.train_step: the loop of
Trainer.run (the step itself, set-up and resume are ahpa.train.loop's).

Logging reads the window's sums once (window_means, the one host sync of a window); a checkpoint is never written
inside a streak of skipped steps, except on a stop; a stop signal is voted on by every process every 10 steps and
acted on at the next vote (no host sync that drains the GPU's queue), and
the run saves and goes before any grid or evaluation (a scheduler's grace period is short); time spent saving,
drawing and evaluating is left out of img/s, as is a launch's first step (torch.compile compiles in it, CUDA graphs
record, cuDNN tunes: minutes on a GPU, where a step takes a fraction of a second).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable, NamedTuple

import torch

from ahpa import config as config_mod
from ahpa.atomic import atomic_write_text
from ahpa.device import peak_tflops
from ahpa.provenance import environment, record_start
from ahpa.train import eval_setup, inputs, outputs, posthoc_track, wandb_sink
from ahpa.train.build import frozen_flops_per_image, train_flops_per_image
from ahpa.train.distributed import LateMax, agreed_max
from ahpa.train.divergence import DivergenceWatch, TooManyBadSteps
from ahpa.train.evaluate import EvaluationStopped, log_evaluation
from ahpa.train.logger import MetricsLogger, add_to_window, truncate_jsonl, window_means

if TYPE_CHECKING:
    from ahpa.train.loop import Trainer


class RunHooks(NamedTuple):
    """Trainer.run's callbacks (documented there)."""
    on_log: Callable[[int, dict], None] | None
    should_stop: Callable[[], int] | None
    on_eval: Callable[[int, dict[str, float]], None] | None
    progress: Callable[[str, int], Callable[[int], None] | None] | None


def registered_code(tr: Trainer) -> list[str]:
    """The registered loss, router mode and encoder kinds (not built in) the run computes with, named: code
    outside ahpa, whose output is checked when the run is built but not at each step (a host sync each), so a run
    whose every step is skipped names it beside the usual causes."""
    from ahpa.align.methods import LOSSES, ROUTER_MODES
    from ahpa.external_kinds import EXTERNALS
    from ahpa.priors.registry import ENCODERS

    p, named = tr.parts, []
    if p.aligner is not None:
        if p.aligner.loss_kind not in LOSSES.built_in:
            named.append(f"loss {p.aligner.loss_kind!r}")
        if p.aligner.router.mode not in ROUTER_MODES.built_in:
            named.append(f"router mode {p.aligner.router.mode!r}")
    for key, spec, registry in (("prior.encoder", getattr(p.encoder, "spec", ""), ENCODERS),
                                ("prior.external", tr.cfg.prior.external if p.external is not None else "", EXTERNALS)):
        kind = (spec or "").partition(":")[0]
        if kind and kind not in registry.built_in:
            named.append(f"{key}={spec!r}")
    return named


def stop_agreed(tr: Trainer, should_stop: Callable[[], int] | None, vote: LateMax) -> int:
    """Whether to stop now: 0, or the reason (a signal number) any process has. Under torchrun every process votes
    every 10 steps and acts on the vote before (`LateMax`: the answer is read when the GPU has long finished the
    collective), so a signal stops the run 10 to 19 steps after it arrives, and a process that was not signalled
    stops with the others' reason (a scheduler's signal may reach the processes of some nodes only, or late)."""
    if should_stop is None:
        return 0
    if tr.world == 1:
        return int(should_stop())
    if tr.step % 10:
        return 0
    return int(vote(int(should_stop())))


def log_row(tr: Trainer, sums: dict[str, torch.Tensor], count: int, t0: float, timed: int) -> dict:
    """The window's row: its `count` steps' means; img/s of its last `timed` steps, which began at `t0` (a window that
    holds only a launch's first step has no img/s)."""
    c = tr.cfg
    row, n_good = window_means(sums)
    row.update(images=tr.step * c.train.batch_size, lr=tr._lr(tr.step - 1), level_names=tr.parts.levels,
               bad_steps=int(tr.bad_total.item()), skipped_in_window=count - round(n_good))
    if timed:
        row["img_per_s"] = timed * c.train.batch_size / max(time.perf_counter() - t0, 1e-9)
    peak = peak_tflops(tr.parts.device) if tr.parts.amp is not None and timed else None
    if peak:  # model FLOPs utilisation: the SiT's training arithmetic (3 x its forward; the heads' left out, as the
        # issue's and DiT's convention) per GPU over the listed GPU's dense 16-bit peak; none in fp32 or elsewhere
        row["mfu"] = row["img_per_s"] * 3 * tr.parts.model.flops_per_image() / (tr.world * peak * 1e12)
    if tr.parts.loss_scale is not None:  # fp16: the scale now; the window's overflows are among its skipped steps
        row["loss_scale"] = float(tr.parts.loss_scale.scale)
        row["overflow_steps"] = round(row["overflow_steps"])
    return row


def evaluate(tr: Trainer, logger: MetricsLogger | None, hooks: RunHooks) -> int:
    """The evaluation due now, logged: 0, or the reason (a signal number) it was given up for between two batches of
    samples. Every process then has the same reason (agreed_max: a host sync per batch, nothing beside generating
    it), and the evaluation is done again by the resume from this step's checkpoint (Evaluator.missing)."""
    on_batch = hooks.progress("eval", tr.evaluator.share()) if hooks.progress is not None else None
    should_stop = hooks.should_stop
    stop = None if should_stop is None else (lambda: int(agreed_max(int(should_stop()), tr.parts.device)))
    try:
        fd = tr.evaluator(tr.sampler_bundle(on_all_ranks=True), tr.cfg.sample, on_batch, stop)
    except EvaluationStopped as e:
        return e.reason
    if logger is not None:
        log_evaluation(logger, tr.run_dir, tr.step, tr.step * tr.cfg.train.batch_size, fd, eval_setup.describe(tr.cfg))
    if hooks.on_eval is not None:
        hooks.on_eval(tr.step, fd)
    return 0


def train(tr: Trainer, hooks: RunHooks) -> dict:
    """Trainer.run's loop: train to train.steps, and between steps log, save, draw a grid, evaluate and stop when
    the settings and hooks say so (documented in Trainer.run)."""
    c = tr.cfg
    main = tr.rank == 0
    # a complete run rerun (to export, or by a requeued job) trains nothing: its config.yaml keeps describing how
    # it was trained and evaluated (eval.* given now would claim otherwise), and no start is recorded; moved
    # inputs are still written down, so that sampling finds them
    complete = main and tr.step >= c.train.steps and (tr.run_dir / "DONE").exists()
    if main and (not complete or tr._moved_inputs is not None):
        tr.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(tr.run_dir / "config.yaml", config_mod.dump(c))  # a resume reads it back
    if main and not complete:
        # versions, commit, GPUs, and the arithmetic per image (speed-ups per FLOP in `ahpa compare`)
        record_start(tr.run_dir, tr.step, {**environment(tr.parts.device, tr.world),
                                           "train_flops_per_image": train_flops_per_image(tr.parts),
                                           "frozen_flops_per_image": frozen_flops_per_image(tr.parts)})
        if tr._moved_inputs is not None:  # moved files, identified by check_moved_inputs
            inputs.write(tr.run_dir, tr._moved_inputs)
        elif inputs.read(tr.run_dir) is None:  # a new run, or one from before inputs.json
            inputs.write(tr.run_dir, inputs.current(c, tr.parts.encoder))
    if main and tr.step < c.train.steps:  # a finished run trained further is unfinished until it ends again
        (tr.run_dir / "DONE").unlink(missing_ok=True)
    # train.wandb's W&B run: started (or refused, on every process) before the first step
    wandb_run = wandb_sink.start(c, tr.run_dir, main, skip=complete)
    logger = MetricsLogger(tr.run_dir, tr.step, wandb_run) if main else None
    if main:
        truncate_jsonl(tr.run_dir / "router.jsonl", tr.step)
        if tr.parts.posthoc is not None:
            posthoc_track.drop_after(tr.run_dir, tr.step)
    sums: dict[str, torch.Tensor] = {}
    # `timed`: the window's steps in its img/s, which began at t0; the launch's `first` step is not one of them
    count, timed, t0, last, first = 0, 0, time.perf_counter(), {}, True
    watch = DivergenceWatch(c.train.max_bad_steps)
    vote = LateMax(tr.parts.device)
    failed = False  # the training raised: W&B marks its run failed

    def save() -> None:
        tr.save()
        aligner = tr.unsharded("aligner", on_all_ranks=False) if tr.parts.aligner is not None else None
        if main and aligner is not None and aligner.router.varies:  # REPA's one level: nothing to plot
            logger.image("router", outputs.write_router_plot(aligner, tr.run_dir, tr.step), tr.step)

    def stopped_here(reason: int, window_start: float, saved: bool) -> dict:
        """Asked to stop, between steps or during an evaluation: the window so far logged (its steps would never be
        logged), the step saved with the router's record unless it just was, and the row that says so."""
        row = log_row(tr, sums, count, window_start, timed) if count else last
        if count and logger is not None:
            logger.log(tr.step, row)
        if not saved:
            save()
        return {**row, "stopped": reason, "step": tr.step}

    try:
        # the step resumed from was due an evaluation that was not logged: stopped, or died, after its checkpoint
        if tr.evaluator is not None and tr.evaluator.missing(tr.step, c.train.steps):
            stopped = evaluate(tr, logger, hooks)
            if stopped:  # the checkpoint resumed from is this step's
                return {**last, "stopped": stopped, "step": tr.step}
        while tr.step < c.train.steps:
            add_to_window(sums, tr.train_step())
            if first:  # compiled, recorded, tuned: its window's img/s is timed from its end
                first, t0 = False, time.perf_counter()
            else:
                timed += 1
            count += 1
            done = tr.step == c.train.steps
            # a window ends where alignment stops, so no logged mean mixes steps with and without it
            if tr.step % c.train.log_every == 0 or done or tr.step == c.align.stop_step:
                last = log_row(tr, sums, count, t0, timed)
                if logger is not None:  # the window that stops a run is logged first
                    logger.log(tr.step, last)
                if hooks.on_log is not None:
                    hooks.on_log(tr.step, last)
                bad = last["skipped_in_window"] - last.get("overflow_steps", 0)  # fp16's overflows are no sign
                verdict = watch.update(count, bad, int(tr.bad_run.item()), last=done)
                if verdict:
                    own = registered_code(tr)
                    raise TooManyBadSteps(
                        f"{verdict} (step {tr.step}); they were skipped, and no checkpoint is written inside a "
                        f"streak of them. Start a new run with a lower train.lr, a smaller train.grad_clip, "
                        f"model.qk_norm=true or train.precision=fp32, or check the data"
                        + (f"; or the registered code the run computes with ({', '.join(own)}): what it returns is "
                           "checked when the run is built, not at every step, and one value that is not finite "
                           "(a division by 0, a log of 0) skips the step (docs/extending.md)." if own else ".")
                    )
                sums, count, timed, t0 = {}, 0, 0, time.perf_counter()
            if posthoc_track.due(c.train, tr.step):  # before a stop: a run resumed from this step never writes them
                began = time.perf_counter()
                tr.parts.posthoc.snapshot(tr.sharded, tr.rank, tr.run_dir, tr.step)
                t0 += time.perf_counter() - began  # not training: not in img/s
            # asked to stop: log the window so far (its steps would never be logged), save with the router's
            # record and go, before any sample grid or evaluation (a scheduler's grace period is short); an
            # evaluation due at this step is done on resume (Evaluator.missing)
            stop = not done and stop_agreed(tr, hooks.should_stop, vote)
            if stop:  # a stop saves also inside a streak of skipped steps: they left the weights as they were
                return stopped_here(stop, t0, saved=False)
            paused = time.perf_counter()  # checkpoints, grids and evaluations are not training: not in img/s
            # every process takes part in saving and sampling (FSDP gathers); rank 0 writes. No checkpoint
            # inside a streak of skipped steps (the last good one stays the newest)
            saved = (tr.step % c.train.ckpt_every == 0 or done) and tr.bad_run.item() == 0
            if saved:
                save()
            if c.train.sample_every and c.sample.grid_images and (tr.step % c.train.sample_every == 0 or done):
                bundle = tr.sampler_bundle(on_all_ranks=False)
                if main:
                    on_batch = hooks.progress("grid", c.sample.grid_images) if hooks.progress is not None else None
                    grid = outputs.write_samples(bundle, c.sample, tr.run_dir, tr.step, on_batch)
                    logger.image("samples", grid, tr.step)
            if tr.evaluator is not None and (tr.step % c.eval.every == 0 or done):
                stop = evaluate(tr, logger, hooks)
                if stop:  # given up on a signal: as a stop between steps (the pause left out of the window's img/s)
                    return stopped_here(stop, t0 + time.perf_counter() - paused, saved)
            t0 += time.perf_counter() - paused
        tr.export()
        if main:
            outputs.finish(tr.run_dir, tr.parts.levels, tr.step)
        if watch.launch_skipped:  # said when the run completes: its steps without an update
            last = {**last, "launch_skipped": watch.launch_skipped, "launch_steps": watch.launch_steps}
    except BaseException:
        failed = True
        raise
    finally:
        if logger is not None:
            logger.close(failed)
    return last
