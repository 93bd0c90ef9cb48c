"""The conventions that tie training to sampling and to the objective as documented, which smoke tests (the loss
falls, two runs agree bitwise) cannot see: the flow target and the direction of t, λ, label dropout, the EMA's
weight, what guidance is given, the latents the VAE decodes, the standardised inputs training sees and the
learning-rate warm-up. Each was a surviving hand-made mutation."""

import pytest
import torch

from ahpa.config import SampleCfg
from ahpa.train.ema import ema_decay, ema_note, ema_update
from ahpa.train.loop import Trainer


def _step_inputs(tr: Trainer, n: int = 8, step: int = 0):
    """One step's batch and random draws, as train_step makes them."""
    mc = tr.parts.model.cfg
    d = tr._draws(step, n, (mc.in_channels, mc.input_size, mc.input_size))
    return tr.parts.source.fetch(torch.arange(n), d["flip"], d.get("posterior")), d


def test_the_flow_loss_is_zero_for_the_exact_velocity(tmp_path, tiny):
    """A network that knows the step's noise recovers x from (x_t, t) by the path's own convention (t = 1 is noise,
    the one the sampler integrates from) and returns the path's velocity: the loss is then 0. A negated target or
    a flipped t in training would leave it large."""
    tr = Trainer(tiny("align.method=none"), tmp_path / "r")
    batch, d = _step_inputs(tr)
    path = tr.path

    def oracle(x_t, t, y, taps=()):
        a, s = (f(t.double())[:, None, None, None] for f in (path.alpha, path.sigma))
        x = (x_t.double() - s * d["eps"].double()) / a
        return path.velocity(x, d["eps"].double(), t.double()).float(), []

    tr.net = oracle
    _, metrics = tr._loss(batch, d, False)
    assert metrics["loss/flow"].item() < 1e-6


def test_the_alignment_loss_enters_with_weight_lambda(tmp_path, tiny):
    """loss = flow + λ · alignment, where the logged loss/align is already weighted (uniform weights: no router
    objective adds to it)."""
    tr = Trainer(tiny("align.method=multi-uniform", "align.weight=0.25"), tmp_path / "r")
    batch, d = _step_inputs(tr)
    loss, m = tr._loss(batch, d, True)
    assert torch.allclose(loss, m["loss/flow"] + m["loss/align"], rtol=1e-6) and m["loss/align"].item() > 0.01
    tr.cfg.align.weight = 0.5
    assert torch.allclose(tr._loss(batch, d, True)[1]["loss/align"], 2 * m["loss/align"], rtol=1e-5)


def test_label_dropout_feeds_the_null_class(tmp_path, tiny):
    """The labels the network sees are the null class exactly where the step's draws drop them."""
    tr = Trainer(tiny("align.method=none", "train.label_dropout=0.5"), tmp_path / "r")
    batch, d = _step_inputs(tr, n=16)
    assert d["drop"].any() and not d["drop"].all()
    seen, net = [], tr.net
    tr.net = lambda x, t, y, taps=(): (seen.append(y.clone()), net(x, t, y, taps))[1]
    tr._loss(batch, d, False)
    null = tr.parts.model.null_class
    assert (batch.labels != null).all()
    assert torch.equal(seen[0], torch.where(d["drop"], torch.full_like(batch.labels, null), batch.labels))


def test_the_ema_moves_by_one_minus_decay_and_not_on_a_skipped_step():
    ema, model = [torch.nn.Parameter(torch.zeros(3))], [torch.nn.Parameter(torch.ones(3))]
    ema_update(ema, model, 0.9)
    assert torch.allclose(ema[0], torch.full((3,), 0.1))
    ema_update(ema, model, 0.9, keep=torch.tensor(1.0))
    assert torch.allclose(ema[0], torch.full((3,), 0.1))
    assert ema_decay(0, 0.9999, True) == pytest.approx(0.1) and ema_decay(10**6, 0.9999, True) == 0.9999


def test_the_ema_after_n_steps_is_the_closed_form():
    """Tracking a fixed model m from e_0 = 0 with decay d, n steps give e_n = m (1 - d^n). Training passes `keep` on
    every step (0 when the step is not skipped): that must move the EMA as a step without it does. The warm-up decay
    is min(d, (1 + n) / (10 + n)); without warm-up, d."""
    ema, model = [torch.nn.Parameter(torch.zeros(3))], [torch.nn.Parameter(torch.tensor([1.0, -2.0, 4.0]))]
    for _ in range(5):
        ema_update(ema, model, 0.8, keep=torch.tensor(0.0))
    assert torch.allclose(ema[0], model[0] * (1 - 0.8**5))
    assert ema_decay(5, 0.9999, True) == pytest.approx(6 / 15) and ema_decay(5, 0.3, True) == 0.3
    assert ema_decay(5, 0.9, False) == 0.9


def test_sampling_guides_with_the_settings_and_the_null_class(tmp_path, tiny, monkeypatch):
    import ahpa.sample as sample

    bundle = Trainer(tiny("train.steps=1"), tmp_path / "r").sampler_bundle()
    seen, real = [], sample.guided_velocity

    def spy(fn, x, t, y, null_class, scale, interval, micro_batch):
        seen.append((null_class, scale, tuple(interval)))
        return real(fn, x, t, y, null_class, scale, interval, micro_batch)

    monkeypatch.setattr(sample, "guided_velocity", spy)
    cfg = SampleCfg(solver="euler", steps=2, cfg_scale=2.5, guidance_low=0.1, guidance_high=0.7, micro_batch=8)
    sample.generate(bundle, [0, 1], torch.tensor([0, 1]), 0, cfg)
    assert seen and set(seen) == {(bundle.model.null_class, 2.5, (0.1, 0.7))}


def test_samples_are_decoded_from_unstandardised_latents(tmp_path, tiny, monkeypatch):
    """The solver works in standardised latents; the VAE decodes mean + std · z."""
    import ahpa.sample as sample
    from ahpa.priors.targets import ChannelStats

    bundle = Trainer(tiny("train.steps=1"), tmp_path / "r").sampler_bundle()
    c = bundle.latent_shape[0]
    mean = torch.arange(c).float() + 1.0
    bundle.latent_stats = ChannelStats(mean, torch.full((c,), 3.0))
    z = torch.randn(2, *bundle.latent_shape)
    monkeypatch.setattr(sample, "solve", lambda *a, **k: z)
    got, decode = [], bundle.encoder.decode
    monkeypatch.setattr(bundle.encoder, "decode", lambda x: (got.append(x.clone()), decode(x))[1])
    sample.generate(bundle, [0, 1], torch.tensor([0, 1]), 0, SampleCfg(solver="euler", steps=2, micro_batch=2))
    assert torch.allclose(torch.cat(got), z * 3.0 + mean[None, :, None, None])


def test_training_standardises_the_latent_and_each_levels_targets_with_the_datas_statistics(tmp_path, tiny, monkeypatch):
    """The path interpolates (latent - mean) / std per channel and each level's pooled map reaches the aligner as
    (map - mean_k) / std_k, with the statistics measured on the data (not 0 and 1: a missing or inverted
    standardisation would pass otherwise)."""
    tr = Trainer(tiny("align.method=multi-uniform"), tmp_path / "r")
    batch, d = _step_inputs(tr)
    stats, seen = tr.parts.stats, {}
    interpolate, align_net = type(tr.path).interpolate, tr.align_net
    monkeypatch.setattr(type(tr.path), "interpolate",
                        lambda path, x, eps, t: (seen.update(x=x), interpolate(path, x, eps, t))[1])
    tr.align_net = lambda hidden, targets, t, kept=None: (seen.update(targets=targets),
                                                          align_net(hidden, targets, t, kept))[1]
    tr._loss(batch, d, True)
    mean, std = stats.latent.mean, stats.latent.std
    assert not torch.allclose(mean, torch.zeros_like(mean)) and not torch.allclose(std, torch.ones_like(std))
    assert torch.allclose(seen["x"], (batch.latent - mean[None, :, None, None]) / std[None, :, None, None], atol=1e-5)
    for name, target in zip(tr.parts.levels, seen["targets"]):
        s = stats.levels[name]
        assert torch.allclose(target, (batch.levels[name] - s.mean) / s.std, atol=1e-5), name


def test_the_learning_rate_warms_up_linearly_to_train_lr():
    """step s of a warm-up of W steps trains at lr (s + 1) / W, then at lr (constant)."""
    from types import SimpleNamespace

    from ahpa.config import TrainCfg

    run = SimpleNamespace(cfg=SimpleNamespace(train=TrainCfg(lr=1e-3, warmup_steps=4)))
    assert [Trainer._lr(run, s) for s in range(6)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    run.cfg.train.warmup_steps = 0
    assert Trainer._lr(run, 0) == 1e-3


def test_a_run_too_short_for_its_ema_says_that_its_samples_show_the_initial_weights():
    """configs/imagenet256-b2.yaml shrunk to a few dozen steps keeps ema_decay 0.9999 without warm-up: its grids,
    evaluations and export were the initial weights' (FD 16.804 then 16.806), and nothing said so."""
    assert ema_note(0.9999, False, 40) == [
        "train.ema_decay=0.9999 without train.ema_warmup: after 40 steps the EMA, which the grids, evaluations, "
        "export and samples use, still holds 100% of the initial weights (half of them after 6,931 steps); for a "
        "short run set train.ema_warmup=true or a lower train.ema_decay"]
    assert ema_note(0.9999, False, 400_000) == []  # the ImageNet configs' own length
    assert ema_note(0.9999, True, 40) == []  # the warm-up ramps the decay: the EMA follows from the start
    assert ema_note(0.9, False, 40) == []
    assert "after 1 step the EMA" in ema_note(0.9999, False, 1)[0]
