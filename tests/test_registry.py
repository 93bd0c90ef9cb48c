"""Extension points: an encoder kind added by a user (register_encoder) or by an installed package (entry point)
is a valid spec everywhere a spec is read."""

import numpy as np
import pytest

from ahpa.data.procedural import make_shapes
from ahpa.priors import registry
from ahpa.priors.kl_vae import KLVAE


@pytest.fixture
def toy_kind(monkeypatch):
    monkeypatch.setattr(registry.ENCODERS, "entries", dict(registry.ENCODERS.entries))  # the test's kinds go with it
    registry.register_encoder("toy", lambda where, spec: KLVAE.random(seed=int(where)))
    return "toy"


def test_a_registered_encoder_kind_prepares_trains_and_is_recorded(toy_kind, tmp_path, tiny):
    from ahpa import config
    from ahpa.data.prepare import PrepareOptions, prepare
    from ahpa.train.loop import Trainer

    enc = registry.load_encoder("toy:3")
    assert enc.spec == "toy:3" and "toy" in registry.kinds()
    images, labels = make_shapes(16, 16, seed=0)
    np.savez(tmp_path / "set.npz", images=images, labels=labels)
    res = prepare(PrepareOptions(images=str(tmp_path / "set.npz"), vae="toy:3", resolution=16, out=str(tmp_path / "c"),
                                 workers=0, shard_size=8, flips="generated", grid=4))
    assert res.complete and res.images == 16
    Trainer(tiny("data.source=cache", f"data.path={tmp_path / 'c'}", "prior.encoder=toy:3", "train.steps=1"),
            tmp_path / "run").run()
    # an encoder object passed from Python is named in config.yaml, so that resume, export and sample find it
    Trainer(tiny("prior.encoder=", "train.steps=1"), tmp_path / "obj", encoder=registry.load_encoder("toy:4")).run()
    assert config.load(tmp_path / "obj" / "config.yaml").prior.encoder == "toy:4"
    # an object the run could not load again, or another encoder than the config names, is refused before training
    # (before, the run trained on the object and recorded the config's encoder: sampling then failed or used the wrong VAE)
    other = KLVAE.random(seed=5)
    for spec, overrides, message in [("", [], "has no spec, which the run records to load it again: set its `spec` to KIND:WHERE"),
                                     ("toy:5", ["prior.encoder=toy:4"], "prior.encoder='toy:4' is not the encoder given")]:
        other.spec = spec
        with pytest.raises(ValueError, match=message):
            Trainer(tiny("prior.encoder=", *overrides, "train.steps=1"), tmp_path / "bad", encoder=other)
    other.spec = "nokind:5"  # trains in this process (a benchmark's stand-in), and the run says what it will lack
    notes = Trainer(tiny("prior.encoder=", "train.steps=1"), tmp_path / "nokind", encoder=other).messages
    assert any("spec 'nokind:5', whose kind no loader is registered for" in m and "ahpa sample --run" in m for m in notes)
    other.spec = "toy:4"
    Trainer(tiny("prior.encoder=toy:4", "train.steps=1"), tmp_path / "same", encoder=other)  # the same one: fine
    # sampling a run with --encoder naming a VAE of another latent shape: both named, not torch's list of keys
    import torch

    from ahpa.priors.kl_vae import KLVAEConfig
    from ahpa.train.resume import run_sampler

    registry.register_encoder("wide", lambda where, spec: KLVAE(KLVAEConfig(latent_channels=8)))
    with pytest.raises(ValueError, match=r"obj's checkpoint does not fit the SiT its config describes \(size mismatch .*"
                                         r"--encoder 'wide:1' is not shaped like the VAE the run was trained with \('toy:4'\)"):
        run_sampler(tmp_path / "obj", torch.device("cpu"), encoder="wide:1")
    with pytest.raises(ValueError, match=r"unknown encoder kind 'toi' in 'toi:3' \(did you mean 'toy'\?\); valid kinds: .*toy"):
        registry.load_encoder("toi:3")


def test_an_installed_package_adds_a_kind_by_entry_point(monkeypatch):
    import importlib.metadata

    monkeypatch.setattr(registry.ENCODERS, "entries", dict(registry.ENCODERS.entries))

    class EntryPoint:
        name = "pkg-vae"

        def load(self):
            return lambda where, spec: KLVAE.random(seed=int(where))

    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group: [EntryPoint()] if group == registry.ENTRY_POINT_GROUP else [])
    assert "pkg-vae" in registry.ENCODERS  # valid before it is loaded, as a name in a config's choices is
    assert registry.load_encoder("pkg-vae:1").spec == "pkg-vae:1"
