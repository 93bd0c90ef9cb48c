import json
import os
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from ahpa import config
from ahpa.models.sit import SiT
from ahpa.priors.external import ExternalEncoder
from ahpa.train.loop import RunConfigError, Trainer
from tests.conftest import TINY


class PatchTokens(nn.Module):
    """A stand-in external encoder: 4x4 patches of a 16x16 resize -> 16 tokens of 12 channels."""

    def forward(self, x):
        x = torch.nn.functional.interpolate(x, size=16)
        return x.unfold(2, 4, 4).unfold(3, 4, 4).permute(0, 2, 3, 1, 4, 5).reshape(x.shape[0], 16, -1)[..., :12]


def tiny_external():
    return ExternalEncoder(PatchTokens(), channels=12, input_size=16)


@pytest.mark.parametrize("method,extra", [
    ("none", []), ("vae-latent", []), ("vae-level", ["align.levels=[stage2]"]), ("multi-uniform", []),
    ("ahpa", []), ("ahpa", ["align.router=snr"]), ("ahpa", ["align.router=topk"]), ("repa", []),
    ("ahpa", ["align.shared_trunk=false", "align.level_depths=[stage1:1,latent:3]"]),
])
def test_each_method_loss_is_finite_and_falls_on_a_fixed_batch(tmp_path, tiny, method, extra):
    cfg = tiny(f"align.method={method}", "train.lr=0.003", *extra)
    tr = Trainer(cfg, tmp_path / "run", external=tiny_external() if method == "repa" else None)
    p = tr.parts
    idx = torch.arange(8)
    draws = tr._draws(0, 8, (p.model.cfg.in_channels, p.model.cfg.input_size, p.model.cfg.input_size))
    key = "loss/flow" if method == "none" else "loss/align"
    history = []
    for _ in range(25):
        loss, metrics = tr._loss(p.source.fetch(idx, draws["flip"], draws["posterior"]), draws, tr.aligning(0))
        assert torch.isfinite(loss)
        history.append(metrics[key].item())
        p.optimizer.zero_grad()
        loss.backward()
        p.optimizer.step()
    assert history[-1] < 0.9 * history[0], history


@pytest.mark.parametrize("extra", [(), ("align.token_fraction=0.5", "align.router_t_bins=3")])
def test_resume_three_plus_three_equals_six_bitwise(tmp_path, tiny, extra):
    straight = Trainer(tiny("train.steps=6", *extra), tmp_path / "a")
    straight.run()
    first = Trainer(tiny("train.steps=3", *extra), tmp_path / "b")
    first.run()
    second = Trainer(tiny("train.steps=6", *extra), tmp_path / "b")
    assert second.step == 3 and "resumed from step 3" in second.messages
    # the first line says what the run trains on (device, precision, compilation, batch per process)
    assert second.messages[0].startswith("training on cpu (") and "fp32, eager: 6 steps of global batch 8 (8 per process)" in second.messages[0]
    second.run()
    for name in ("model", "ema", "aligner"):
        a, b = getattr(straight.parts, name).state_dict(), getattr(second.parts, name).state_dict()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}.{k} differs after resume"
    rows = [json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]


def test_resume_refuses_other_settings_but_allows_run_length(tmp_path, tiny):
    Trainer(tiny("train.steps=2"), tmp_path / "r").run()
    with pytest.raises(RunConfigError, match="train.lr"):
        Trainer(tiny("train.steps=4", "train.lr=0.5"), tmp_path / "r")
    Trainer(tiny("train.steps=3", "train.log_every=2"), tmp_path / "r").run()
    # a shorter length than the run has trained is refused, and the run's config.yaml keeps its own
    with pytest.raises(RunConfigError, match="train.steps=1, but .* is at step 3 .* Give train.steps=3 or more"):
        Trainer(tiny("train.steps=1"), tmp_path / "r")
    assert config.load(tmp_path / "r" / "config.yaml").train.steps == 3
    # a start that failed before its first checkpoint leaves config.yaml but binds nothing
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "config.yaml").write_text(config.dump(tiny("train.lr=0.5")))
    Trainer(tiny("train.steps=2"), tmp_path / "f").run()
    assert config.load(tmp_path / "f" / "config.yaml").train.lr == tiny().train.lr


def test_alignment_stops_at_align_stop_step(tmp_path, tiny):
    """HASTE-style termination: identical to the aligned run before align.stop_step; from it on the flow loss
    alone trains the backbone, the aligner (heads, router, running means) is left as it was, and the logs say so."""
    stopped = Trainer(tiny("train.steps=5", "train.log_every=4", "align.stop_step=3"), tmp_path / "s")
    aligned = Trainer(tiny("train.steps=5", "train.log_every=4"), tmp_path / "a")
    for _ in range(3):
        m_s, m_a = stopped.train_step(), aligned.train_step()
        assert "loss/align" in m_s and torch.equal(m_s["loss/align"], m_a["loss/align"])
    for k, v in aligned.parts.model.state_dict().items():
        assert torch.equal(v, stopped.parts.model.state_dict()[k]), k
    frozen = {k: v.clone() for k, v in stopped.parts.aligner.state_dict().items()}
    before = {k: v.clone() for k, v in stopped.parts.model.state_dict().items()}
    for _ in range(2):
        metrics = stopped.train_step()
        assert not any(k.startswith(("loss/align", "align/")) for k in metrics), sorted(metrics)
    assert all(torch.equal(v, stopped.parts.aligner.state_dict()[k]) for k, v in frozen.items())
    assert any(not torch.equal(v, stopped.parts.model.state_dict()[k]) for k, v in before.items())

    # through run(): a log row ends at the stop (log_every 4 alone would mix steps 1-4), resuming across it is exact,
    # and the loss plot takes alignment rows that end
    Trainer(tiny("train.steps=2", "train.log_every=4", "align.stop_step=3"), tmp_path / "r").run()
    resumed = Trainer(tiny("train.steps=5", "train.log_every=4", "align.stop_step=3"), tmp_path / "r")
    resumed.run()
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], "loss/align" in r) for r in rows] == [(2, True), (3, True), (4, False), (5, False)]
    assert (tmp_path / "r" / "losses.png").exists()
    for name in ("model", "aligner"):
        for k, v in getattr(stopped.parts, name).state_dict().items():
            assert torch.equal(v, getattr(resumed.parts, name).state_dict()[k]), f"{name}.{k} differs after resume"
    with pytest.raises(ValueError, match="align.stop_step=-1"):
        Trainer(tiny("align.stop_step=-1"), tmp_path / "bad")


def test_steps_logged_after_the_checkpoint_a_crash_fell_back_to_appear_once(tmp_path, tiny):
    """In metrics.jsonl and in TensorBoard: the resumed run logs steps 3 and 4 again, and TensorBoard hides the
    first attempt's (purge_step) instead of drawing them twice."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny("train.steps=4", "train.log_every=1", "train.ckpt_every=2", "train.sample_every=0")
    Trainer(cfg, tmp_path).run()
    for f in (tmp_path / "checkpoints").glob("step_000000004.pt*"):  # as if killed before the last save
        f.unlink()
    (tmp_path / "DONE").unlink()
    Trainer(cfg, tmp_path).run()
    assert len(list((tmp_path / "tb").glob("events.*"))) == 2
    tb = EventAccumulator(str(tmp_path / "tb"))
    tb.Reload()
    assert [e.step for e in tb.Scalars("loss/flow")] == [1, 2, 3, 4]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss/flow" in r] == [1, 2, 3, 4]


def test_a_stop_between_log_steps_logs_its_window_and_records_the_router(tmp_path, tiny):
    """Stopped at step 3 with log_every=2 and ckpt_every=4: step 3 is logged (else it never would be; the resumed
    run's row 4 holds step 4 alone) and the stop's checkpoint has its router record, as every checkpoint does."""
    cfg = tiny("train.steps=4", "train.log_every=2", "train.ckpt_every=4", "train.sample_every=0", "align.router=soft")
    tr = Trainer(cfg, tmp_path)
    assert tr.run(should_stop=lambda: tr.step >= 3)["stopped"]
    Trainer(cfg, tmp_path).run()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss/flow" in r] == [2, 3, 4]
    assert [json.loads(line)["step"] for line in (tmp_path / "router.jsonl").read_text().splitlines()] == [3, 4]


def test_img_per_s_counts_the_training_steps_only(tmp_path, tiny, monkeypatch):
    """Checkpoints, sample grids and evaluations happen between log windows; a window's img/s is its steps' images
    over their time, not over the checkpoint's too (after one, a window read many times slower; `ahpa compare` took a
    median of such windows). A clock that advances 1 s per step and 100 s per checkpoint."""
    import types

    from ahpa.train import schedule

    clock = [0.0]
    monkeypatch.setattr(schedule, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    step, save = Trainer.train_step, Trainer.save

    def timed_step(self):
        clock[0] += 1.0
        return step(self)

    def slow_save(self, *args, **kwargs):
        clock[0] += 100.0
        return save(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train_step", timed_step)
    monkeypatch.setattr(Trainer, "save", slow_save)
    Trainer(tiny("train.steps=6", "train.log_every=2", "train.ckpt_every=2"), tmp_path).run()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["img_per_s"]) for r in rows if "img_per_s" in r] == [(2, 8.0), (4, 8.0), (6, 8.0)]


def test_img_per_s_leaves_out_each_launchs_first_step(tmp_path, tiny, monkeypatch, capsys):
    """torch.compile compiles in a launch's first step (CUDA graphs record, cuDNN tunes): minutes on a GPU against a
    fraction of a second a step, so the first window's img/s read 0 on the bar and pulled `ahpa compare`'s min-max.
    Every launch's first window is timed from the end of that step; a window of that step alone has no img/s, and the
    bar shows none. A clock that advances 100 s in a launch's first step and 1 s in the others."""
    import types

    from ahpa.cli import main
    from ahpa.train import schedule

    clock, launches = [0.0], []
    monkeypatch.setattr(schedule, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    step = Trainer.train_step

    def timed_step(self):
        clock[0] += 1.0 if self in launches else 100.0
        launches.append(self)
        return step(self)

    monkeypatch.setattr(Trainer, "train_step", timed_step)
    Trainer(tiny("train.steps=4", "train.log_every=2"), tmp_path).run()
    Trainer(tiny("train.steps=6", "train.log_every=1"), tmp_path).run()  # resumed: its first step compiles again
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r.get("img_per_s")) for r in rows if "loss/flow" in r] == [(2, 8.0), (4, 8.0), (5, None), (6, 8.0)]
    assert "bad_steps" in rows[2] and "mfu" not in rows[2]  # the rest of the row is there
    # the command's bar reads the row: "—" where it has no img/s
    assert main(["train", "--out", str(tmp_path / "cli"), *TINY, "train.steps=2", "train.log_every=1",
                 "train.sample_every=0"]) == 0
    assert "img/s=—" in capsys.readouterr().err


def test_repa_takes_a_plain_module_and_freezes_it(tmp_path, tiny):
    """Trainer(external=any module mapping images to tokens [B, N, C]), as docs/method.md says: wrapped with its channels
    read from one forward, and frozen, a module left in train mode too (its BatchNorm statistics moved with every
    batch, so REPA's targets drifted); a module that returns no [B, N, C] is named."""

    class WithNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.BatchNorm2d(3)
            self.tokens = PatchTokens()

        def forward(self, x):
            return self.tokens(self.norm(x))

    module = WithNorm().train()
    before = module.norm.running_mean.clone()
    tr = Trainer(tiny("align.method=repa", "train.steps=3"), tmp_path / "run", external=module)
    tr.run()
    assert tr.parts.external.channels == 12 and not module.training
    assert torch.equal(module.norm.running_mean, before) and not any(p.requires_grad for p in module.parameters())
    with pytest.raises(ValueError, match=r"the external encoder returned \(1, 3, 224, 224\) .* returns tokens \[B, N, C\]"):
        Trainer(tiny("align.method=repa", "train.steps=1"), tmp_path / "bad", external=nn.Identity())
    # given to a method that aligns no external encoder: it used to train without it, without a word
    with pytest.raises(ValueError, match="align.method=ahpa aligns no external encoder's tokens: set align.method=repa"):
        Trainer(tiny("train.steps=1"), tmp_path / "not-repa", external=module)


def test_img_per_s_leaves_out_the_evaluation_a_resume_redoes_first(tmp_path, tiny, monkeypatch):
    """A run stopped after its checkpoint but before the evaluation due at that step redoes it when resumed, before
    its first step: the first window's img/s is its steps' images over their time, not over that evaluation's
    too. A clock that advances 1 s per step and 100 s per evaluation; the evaluator a stand-in."""
    import types

    from ahpa.train import evaluate, schedule

    clock = [0.0]
    monkeypatch.setattr(schedule, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    step = Trainer.train_step

    def timed_step(self):
        clock[0] += 1.0
        return step(self)

    evaluated = []

    def slow_evaluate(tr, logger, hooks):
        clock[0] += 100.0
        evaluated.append(tr.step)

    stand_in = types.SimpleNamespace(notes=[], missing=lambda step, last_step: step == 2)
    monkeypatch.setattr(Trainer, "train_step", timed_step)
    monkeypatch.setattr(schedule, "evaluate", slow_evaluate)
    Trainer(tiny("train.steps=2", "train.log_every=2"), tmp_path).run()
    monkeypatch.setattr(evaluate.Evaluator, "for_run", classmethod(lambda cls, *args: stand_in))
    Trainer(tiny("train.steps=4", "train.log_every=2", "eval.every=2"), tmp_path).run()
    assert evaluated == [2, 4]  # the missing one first, then the last step's
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["img_per_s"]) for r in rows if "img_per_s" in r] == [(2, 8.0), (4, 8.0)]


def test_a_sample_grid_made_in_pieces_for_its_progress_bar_is_the_grid_made_at_once(tmp_path, tiny):
    """The grid is generated sample.micro_batch images at a time (a progress bar's updates); every image keeps its
    own noise and class, so the PNG is the one a single call makes (to rounding; bitwise on this CPU)."""
    from PIL import Image

    from ahpa.config import SampleCfg
    from ahpa.sample import generate
    from ahpa.train import outputs

    tr = Trainer(tiny("train.steps=1"), tmp_path / "r")
    tr.run()
    bundle, k = tr.sampler_bundle(), tr.parts.model.cfg.num_classes
    cfg = SampleCfg(steps=3, micro_batch=3, grid_images=8, cfg_scale=1.5)
    seen = []
    grid = outputs.write_samples(bundle, cfg, tmp_path, 7, on_batch=seen.append)
    assert seen == [3, 3, 2]
    whole = generate(bundle, list(range(8)), torch.arange(8) % k, outputs.GRID_SEED, cfg)
    at_once = outputs.plots.save_grid(whole.numpy(), tmp_path / "at_once.png", nrow=k if k <= 16 else None)
    a, b = (np.asarray(Image.open(p)).astype(int) for p in (grid, at_once))
    assert a.shape == b.shape and np.abs(a - b).max() <= 1
    # 16-pixel images are drawn 4x (nearest neighbour): a tile of 64 pixels, each source pixel a 4x4 block
    side = whole.shape[1]
    assert side == 16 and a.shape[0] == 2 + ((8 + k - 1) // k if k <= 16 else 3) * (64 + 2)
    tile = a[2:66, 2:66]
    assert np.array_equal(tile, whole[0].numpy().repeat(4, 0).repeat(4, 1))


def test_run_outputs_and_export_is_a_plain_sit(tmp_path, tiny):
    tr = Trainer(tiny("train.steps=2", "train.sample_every=2"), tmp_path / "r")
    tr.run()
    run = tmp_path / "r"
    for name in ("config.yaml", "metrics.jsonl", "router.png", "losses.png", "samples.png", "model.safetensors", "DONE"):
        assert (run / name).exists(), name
    # progress in training images seen (EDM2): the global batch of 8 per step
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["images"]) for r in rows] == [(1, 8), (2, 16)]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(run / "tb"))
    tb.Reload()
    assert set(tb.Tags()["images"]) == {"samples", "router"} and "loss/flow" in tb.Tags()["scalars"]
    # weights that do not change with t (multi-uniform, one level, REPA's external one) draw no router plot
    Trainer(tiny("train.steps=2", "align.method=multi-uniform"), tmp_path / "u").run()
    assert not (tmp_path / "u" / "router.png").exists() and not (tmp_path / "u" / "router.jsonl").exists()
    # every output is readable by others as the umask allows (safetensors' writer used to leave exports at 0600)
    umask = os.umask(0)
    os.umask(umask)
    for name in ("config.yaml", "model.safetensors", "samples.png"):
        assert (run / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    assert next((run / "checkpoints").iterdir()).stat().st_mode & 0o777 == 0o666 & ~umask
    exported = load_file(str(run / "model.safetensors"))
    vanilla = SiT(tr.parts.model.cfg)
    assert sum(v.numel() for v in exported.values()) == vanilla.num_params()
    assert set(exported) == set(vanilla.state_dict())
    assert tr.parts.aligner is not None and tr.parts.aligner.projector.flops_per_token() > 0


def test_config_errors_name_the_valid_choices(tiny):
    with pytest.raises(config.ConfigError, match="valid keys in train"):
        tiny("train.stpes=3")
    with pytest.raises(config.ConfigError, match=r"'train.hflip' \(did you mean data.hflip\?\)"):
        tiny("train.hflip=true")
    with pytest.raises(config.ConfigError, match="valid values: none, repa"):
        tiny("align.method=sra")
    with pytest.raises(config.ConfigError, match="must be an integer"):
        tiny("train.steps=many")
    with pytest.raises(config.ConfigError, match="valid values: euler, heun"):
        tiny("sample.solver=ddim")
    with pytest.raises(config.ConfigError, match=r"align.levels='\[stage1' is not a valid value .*written \[a,b\]"):
        tiny("align.levels=[stage1")


def test_a_global_batch_that_does_not_split_names_the_grad_accum_that_fits(tmp_path, tiny):
    """A run resumed on fewer or other GPUs keeps its global batch: the refusal said 'not divisible by grad_accum x
    processes = 6' and left the user to find a train.grad_accum that fits; it now names them."""
    with pytest.raises(ValueError, match=r"train.batch_size=8 \(the global batch\) is not divisible by train.grad_accum "
                       r"x processes = 3 x 1: with 1 process, train.grad_accum may be 1, 2, 4, 8$"):
        Trainer(tiny("train.grad_accum=3"), tmp_path / "a")
    assert not (tmp_path / "a").exists()
    from ahpa.train.build import check_batch_split

    check_batch_split(256, 4, 8)  # 8 per micro-step
    with pytest.raises(ValueError, match=r"= 4 x 3: no train.grad_accum fits 3 processes: launch a number of processes "
                       r"that divides 256$"):
        check_batch_split(256, 4, 3)
    with pytest.raises(ValueError, match=r"= 7 x 2: with 2 processes, train.grad_accum may be 1, 2, 3, 4, 5, 6, 8, 9, "
                       r"\.\.\.$"):
        check_batch_split(720, 7, 2)  # 360's divisors: more than a line


def test_bad_sizes_and_paths(tmp_path, tiny):
    with pytest.raises(ValueError, match="not divisible by the VAE factor 4"):
        Trainer(tiny("data.resolution=18"), tmp_path / "a")
    with pytest.raises(ValueError, match="not divisible by patch size 2"):
        Trainer(tiny("data.resolution=12", "model.preset=S/2"), tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="/no/such/vae"):
        Trainer(tiny("prior.encoder=ahpa-vae:/no/such/vae"), tmp_path / "c")
    # a relative path is read from the current directory, not the config file's: the message says which
    with pytest.raises(FileNotFoundError, match=re.escape(f"'no/such/vae' (relative to {os.getcwd()})")):
        Trainer(tiny("prior.encoder=ahpa-vae:no/such/vae"), tmp_path / "c")
    with pytest.raises(ValueError, match="valid kinds"):
        Trainer(tiny("prior.encoder=sdvae:/x"), tmp_path / "d")
    assert not (tmp_path / "a" / "DONE").exists()
    (tmp_path / "garbage.npz").write_text("not an npz")
    with pytest.raises(ValueError, match=r"garbage.npz' is not a readable .npz of images .*np.savez"):
        Trainer(tiny("data.source=npz", f"data.path={tmp_path / 'garbage.npz'}"), tmp_path / "e")
    # a torch user's batch, floats in NCHW, is named with its conversion
    np.savez(tmp_path / "floats.npz", images=np.zeros((4, 3, 16, 16), np.float32), labels=np.zeros(4, np.int64))
    with pytest.raises(ValueError, match=r"images must be uint8 \[N, H, W, 3\], got float32 \(4, 3, 16, 16\); a torch "
                                         r"batch .* is \(x \* 255\).round\(\).byte\(\).permute\(0, 2, 3, 1\).numpy\(\)"):
        Trainer(tiny("data.source=npz", f"data.path={tmp_path / 'floats.npz'}"), tmp_path / "e")
    with pytest.raises(ValueError, match="is a folder.*ahpa prepare --images FOLDER"):
        Trainer(tiny("data.source=npz", f"data.path={tmp_path}"), tmp_path / "f")
    with pytest.raises(ValueError, match="garbage.npz is a file; --out names a directory"):
        Trainer(tiny(), tmp_path / "garbage.npz")


def test_a_device_this_machine_lacks_is_refused_by_name(tmp_path, tiny, monkeypatch):
    """A typo or a CUDA device on a CPU build fails with the setting's name and the fix, not inside torch."""
    from ahpa.device import resolve_device

    with pytest.raises(ValueError, match=r"train.device='gpu' is not a device \(did you mean 'cuda'\?\); valid: auto, cpu, cuda"):
        Trainer(tiny("train.device=gpu"), tmp_path / "a")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"--device='cuda:1': this torch .* use --device=auto or cpu"):
        resolve_device("cuda:1", "--device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"has 1 CUDA device\(s\), cuda:0..cuda:0"):
        resolve_device("cuda:1")
    assert resolve_device("cpu") == torch.device("cpu")


def test_activation_checkpointing_trains_identically_and_may_change_on_resume(tmp_path, tiny):
    straight = Trainer(tiny("train.steps=4"), tmp_path / "a")
    straight.run()
    first = Trainer(tiny("train.steps=2"), tmp_path / "b")
    first.run()
    second = Trainer(tiny("train.steps=4", "train.activation_checkpointing=-1"), tmp_path / "b")
    assert second.parts.model.checkpoint_blocks == 3 and second.parts.ema.checkpoint_blocks == 0
    second.run()
    for name in ("model", "ema", "aligner"):  # recomputation repeats the same kernels: bitwise on the CPU
        a, b = getattr(straight.parts, name).state_dict(), getattr(second.parts, name).state_dict()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}.{k} differs with activation checkpointing"
    with pytest.raises(ValueError, match=r"train.activation_checkpointing=4: .*give 0 \(off\), 1..3"):
        Trainer(tiny("train.activation_checkpointing=4"), tmp_path / "c")


def test_no_posterior_noise_is_drawn_for_a_deterministic_latent(tmp_path, tiny):
    tr = Trainer(tiny(), tmp_path / "run")
    assert tr.parts.source.samples_posterior  # ahpa-vae has a posterior
    shape = (tr.parts.model.cfg.in_channels, tr.parts.model.cfg.input_size, tr.parts.model.cfg.input_size)
    with_noise = tr._draws(5, 8, shape)
    tr.parts.source.samples_posterior = False  # as for TAEF2
    without = tr._draws(5, 8, shape)
    assert "posterior" in with_noise and "posterior" not in without
    for k, v in without.items():  # the posterior is the stream's last draw: every other draw is unchanged
        assert torch.equal(v, with_noise[k]), k


def test_compiled_training_matches_eager(tmp_path, tiny):
    """train.compile compiles the backbone and the aligner (heads, losses, router): same training, to
    float tolerance (inductor fuses and reorders arithmetic), the learned router included: its first
    update, whose gradient is zero in exact arithmetic, is zeroed exactly, so Adam has no rounding noise
    to amplify (without that, the router parted by 5e-4 after 3 steps here)."""
    runs = {}
    for flag in ("false", "true"):
        tr = Trainer(tiny("train.steps=3", f"train.compile={flag}", "align.router=soft"), tmp_path / flag)
        tr.run()
        runs[flag] = tr
    assert isinstance(runs["true"].align_net, torch._dynamo.eval_frame.OptimizedModule)
    for name in ("model", "aligner"):
        eager, compiled = getattr(runs["false"].parts, name).state_dict(), getattr(runs["true"].parts, name).state_dict()
        for key in eager:
            torch.testing.assert_close(compiled[key], eager[key], rtol=1e-4, atol=1e-5)


def test_a_run_says_when_its_alignment_heads_are_a_large_part_of_the_arithmetic(tmp_path, tiny):
    """A projector wide for its SiT (REPA's 2048 on the study's S/1 adds 25%) is named with the fix; a narrow one and
    vanilla SiT say nothing."""
    from ahpa.train.notes import HEADS_NOTE_SHARE

    def note(*extra):
        tr = Trainer(tiny(*extra), tmp_path / "-".join(extra).replace("=", "_"))
        p = tr.parts
        share = (p.aligner.projector.flops_per_token() * p.model.cfg.num_tokens / p.model.flops_per_image()
                 if p.aligner is not None else 0.0)
        return share, [m for m in tr.messages if "alignment heads" in m]

    share, msgs = note("align.projector_dim=256")
    assert share > HEADS_NOTE_SHARE and len(msgs) == 1
    assert f"{share:.0%}" in msgs[0] and "align.projector_dim=256" in msgs[0] and "32-wide" in msgs[0]
    share, msgs = note("align.projector_dim=8")
    assert share <= HEADS_NOTE_SHARE and msgs == []
    assert note("align.method=none") == (0.0, [])


def test_a_share_of_the_tokens_changes_no_other_draw_and_splits_across_micro_batches(tmp_path, tiny):
    """align.token_fraction draws the kept tokens from a stream of their own, for the global batch: every other draw
    is unchanged, and 2 micro-batches of 4 train as one batch of 8 (what 2 processes do)."""
    share = Trainer(tiny("align.token_fraction=0.5", "train.steps=3"), tmp_path / "a")
    whole = Trainer(tiny(), tmp_path / "w")
    shape = (share.parts.model.cfg.in_channels, share.parts.model.cfg.input_size, share.parts.model.cfg.input_size)
    a, b = share._draws(7, 8, shape), whole._draws(7, 8, shape)
    assert set(a) - set(b) == {"kept"} and a["kept"].shape == (8, share.parts.model.cfg.num_tokens // 2)
    for k, v in b.items():
        assert torch.equal(v, a[k]), k
    share.run()
    accum = Trainer(tiny("align.token_fraction=0.5", "train.steps=3", "train.grad_accum=2"), tmp_path / "b")
    accum.run()
    for name in ("model", "aligner"):
        x, y = getattr(share.parts, name).state_dict(), getattr(accum.parts, name).state_dict()
        assert max((x[k].float() - y[k].float()).abs().max().item() for k in x) < 1e-5, name
    with pytest.raises(ValueError, match=r"align.token_fraction=0.0 is out of range; it must be in \(0, 1\]"):
        Trainer(tiny("align.token_fraction=0"), tmp_path / "c")


def test_a_run_names_its_files_absolutely_and_resumes_from_any_directory(tmp_path, tiny, monkeypatch):
    """Relative paths are taken from the working directory once, at the start: config.yaml and the export then
    name the same files wherever a later command runs (resume, `ahpa sample --model`)."""
    from ahpa.data.procedural import make_shapes
    from ahpa.priors.kl_vae import KLVAE
    from ahpa.sample import load_export

    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    images, labels = make_shapes(32, 16, seed=0)
    np.savez(work / "data" / "set.npz", images=images, labels=labels)
    KLVAE.random().save(work / "vae")
    monkeypatch.chdir(work)
    Trainer(tiny("data.source=npz", "data.path=data/set.npz", "prior.encoder=ahpa-vae:vae", "train.steps=2"), "run").run()
    saved = config.load(work / "run" / "config.yaml")
    assert saved.data.path == str(work / "data" / "set.npz") and saved.prior.encoder == f"ahpa-vae:{work / 'vae'}"
    monkeypatch.chdir(tmp_path)  # elsewhere: the absolute form of the same files resumes the run
    again = Trainer(tiny("data.source=npz", f"data.path={work}/data/set.npz", f"prior.encoder=ahpa-vae:{work}/vae",
                         "train.steps=3"), work / "run")
    assert again.step == 2
    assert load_export(work / "run" / "model.safetensors", torch.device("cpu")).encoder.spec == f"ahpa-vae:{work / 'vae'}"
    # the export records its VAE's weights: another VAE of the same shape is refused, as for a run
    from ahpa.priors.registry import load_encoder

    KLVAE.random(seed=1).save(work / "other-vae")
    with pytest.raises(ValueError, match=r"other-vae' is not the VAE .*model.safetensors was trained with: its weights' sha256"):
        load_export(work / "run" / "model.safetensors", torch.device("cpu"), load_encoder(f"ahpa-vae:{work / 'other-vae'}"))


def test_settings_the_method_does_not_read_are_named(tmp_path, tiny):
    notes = lambda *extra: [m for m in Trainer(tiny(*extra), tmp_path / str(len(extra))).messages if "read" in m or "keeps" in m]  # noqa: E731
    assert notes("align.method=multi-uniform", "align.router=snr") == [
        "align.method=multi-uniform does not read align.router: ignored"]
    assert notes("align.router=snr", "align.router_entropy=0", "align.snr_width=0.5") == [
        "align.router=snr does not read align.router_entropy: ignored"]
    assert notes("align.router_topk=3", "align.snr_width=0.5", "align.router_tau=2") == [
        "align.router=soft does not read align.router_topk, align.snr_width: ignored"]
    assert notes("align.router_normalize=false", "align.router_t_bins=4") == [
        "align.router=soft does not read align.router_t_bins: ignored"]
    assert notes("align.method=none", "align.weight=1.5", "align.token_fraction=0.5") == [
        "align.method=none does not read align.depth, align.weight, align.projector_dim, align.token_fraction: ignored"]
    assert notes("align.router=topk", "align.router_topk=9") == [
        "align.router_topk=9 keeps all 4 levels: the same as router=soft"]
    assert notes("align.smooth_l1_beta=0.1") == ["the cosine loss does not read align.smooth_l1_beta: ignored"]
    assert notes("eval.ref=/r.npz", "eval.detectors=[torchscript:/d.pt]") == [
        "eval.every=0 does not read eval.detectors, eval.ref: ignored (eval.every=N evaluates every N steps)"]
    assert notes("align.method=vae-latent", "align.smooth_l1_beta=0.1") == []  # its loss is smooth-L1
    assert notes("train.compile_mode=reduce-overhead") == [
        "train.compile=false does not read train.compile_mode=reduce-overhead: ignored, the run is eager "
        "(train.compile=true compiles)"]
    from ahpa.train.notes import ignored_settings_note

    assert ignored_settings_note(tiny("align.method=repa", "align.levels=[latent]"), ["external"]) == [
        "align.method=repa aligns its external encoder's tokens alone (prior.external), not the VAE's levels: "
        "align.levels=['latent'] is ignored"]
    assert notes() == []


def test_settings_a_zoo_of_methods_does_not_read_are_named(tiny):
    """Comparing every method from one set of overrides: REPA's encoder given to a method of the VAE's levels, and a
    router given one level to weigh, changed nothing and said nothing."""
    from ahpa.train.notes import ignored_settings_note

    assert ignored_settings_note(tiny("prior.external=dinov2:/w/dinov2"), ["stage1", "latent"]) == [
        "align.method=ahpa does not read prior.external=dinov2:/w/dinov2 (REPA's encoder): ignored"]
    assert ("align.method=none does not read prior.external=dinov2:/w/dinov2 (REPA's encoder): ignored"
            in ignored_settings_note(tiny("align.method=none", "prior.external=dinov2:/w/dinov2"), []))
    assert ignored_settings_note(tiny("align.method=repa", "prior.external=dinov2:/w/dinov2"), ["external"]) == []
    assert ignored_settings_note(tiny("align.levels=[stage2]"), ["stage2"]) == [
        "align.levels: one level (stage2), which align.router=soft gives weight 1 at every t, as align.method=vae-level does"]
    assert ignored_settings_note(tiny("align.method=multi-uniform", "align.levels=[stage2]"), ["stage2"]) == [
        "align.levels: one level (stage2), which align.method=multi-uniform gives weight 1 at every t, as "
        "align.method=vae-level does"]
    assert ignored_settings_note(tiny("align.method=vae-level", "align.levels=[stage2]"), ["stage2"]) == []


def test_a_method_that_fixes_a_router_is_judged_by_that_router(monkeypatch, tmp_path, tiny):
    """A method with a fixed SNR schedule reads align.snr_width (the router uses it), not align.router."""
    from ahpa.align.methods import METHODS, MethodSpec

    monkeypatch.setitem(METHODS.entries, "all-snr", MethodSpec("all-snr", "all", "snr", "cosine", "every level, SNR schedule"))
    trainer = Trainer(tiny("align.method=all-snr", "align.snr_width=0.05", "align.router_tau=2"), tmp_path)
    assert [m for m in trainer.messages if "read" in m] == ["align.method=all-snr does not read align.router_tau: ignored"]
    assert trainer.parts.aligner.router.width == 0.05


def test_a_vanilla_runs_loss_plot_is_one_panel(tmp_path):
    """A vanilla SiT run logs no per-level losses: its losses.png is the flow loss alone, not a figure with an empty
    second panel beside it; a run with levels keeps both panels."""
    import json

    from PIL import Image

    from ahpa.train import plots

    def draw(name, extra):
        rows = [{"step": i, "images": 100 * i, "loss/flow": 1.0 / i, **extra} for i in (1, 2, 3)]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        with Image.open(plots.loss_curves(tmp_path / f"{name}.jsonl", tmp_path / f"{name}.png", ["a", "b"])) as im:
            return im.size

    (w1, h1), (w2, h2) = draw("vanilla", {}), draw("aligned", {"loss/align": 0.5, "align/level_loss": [0.3, 0.2]})
    assert h1 == h2 and w1 < 0.7 * w2


def test_a_data_path_that_procedural_data_does_not_read_is_named(tiny):
    """README's "with your data, pass data.path=..." under a config of procedural data trained on the shapes without a
    word; the run's notes say the path is ignored and which data.source reads it."""
    from ahpa.train.notes import ignored_settings_note

    notes = ignored_settings_note(tiny("data.path=/photos/train.npz"), ["stage1", "latent"])
    assert notes == ["data.source=procedural does not read data.path=/photos/train.npz: ignored, this run trains on "
                     "procedural shapes (data.source=npz reads an .npz; a folder of images is encoded by `ahpa prepare` "
                     "and read as data.source=cache)"]
    assert ignored_settings_note(tiny(), ["stage1", "latent"]) == []


def test_guiding_a_model_guidance_cannot_help_is_said_when_the_run_starts(tmp_path, tiny):
    """An unlabelled folder or .npz trains one class; sample.cfg_scale=2 from a shared config then guided the run's
    grids and evaluations (twice the network calls, the noise of two estimates of one distribution) without a word:
    `ahpa sample` warned, the run did not. Likewise a null class that never trains (train.label_dropout=0)."""
    images = np.random.default_rng(0).integers(0, 256, (16, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "unlabelled.npz", images=images)
    data = ["data.source=npz", f"data.path={tmp_path / 'unlabelled.npz'}"]
    runs = iter(range(10))
    notes = lambda *extra: [m for m in Trainer(tiny(*extra), tmp_path / f"run{next(runs)}").messages  # noqa: E731
                            if "guid" in m]
    assert notes(*data, "sample.cfg_scale=2") == [
        "sample.cfg_scale=2: the model has a single class (its data had no labels): the class and the null class learn "
        "the same images, so guidance adds the noise of their difference, not conditioning, at twice the network "
        "calls; the run's sample grids and evaluations guide with it, as `ahpa sample --run` does by default "
        "(sample.cfg_scale=1 does not guide)"]
    assert notes(*data) == []
    assert notes("sample.cfg_scale=1.5", "train.label_dropout=0")[0].startswith(
        "sample.cfg_scale=1.5: the model was trained with train.label_dropout=0")
    assert notes("sample.cfg_scale=1.5") == []  # procedural shapes: classes and label dropout


def test_a_finished_run_says_which_class_each_column_of_its_grid_holds(tmp_path, capsys):
    """samples.png is class-balanced, one class per column, and names none: the run's last lines name them, as
    `ahpa sample --grid` does (a run on your own folder's classes showed a grid nobody could read)."""
    from ahpa.cli import main
    from ahpa.data.procedural import CLASS_NAMES

    assert main(["train", "--out", str(tmp_path / "run"), *TINY, "train.steps=1", "train.sample_every=1"]) == 0
    out = capsys.readouterr().out
    assert f"{tmp_path / 'run' / 'samples.png'}; its columns, left to right: {', '.join(CLASS_NAMES)}\n" in out
