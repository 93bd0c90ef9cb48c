"""Extension points: an encoder kind added by a user (register_encoder) or by an installed package (entry point)
is a valid spec everywhere a spec is read."""

import re

import numpy as np
import torch
import pytest

from ahpa.data.procedural import make_shapes
from ahpa.priors import registry
from ahpa.priors.base import Level
from ahpa.priors.kl_vae import KLVAE
from tests.conftest import FakeEntryPoint


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


class Strided(KLVAE):
    """The ahpa-vae with one more level first: the image average-pooled by `stride` (a map of side resolution // stride,
    as a strided convolution without padding gives)."""

    def __init__(self, stride: int):
        super().__init__(KLVAE.random().cfg)
        self.load_state_dict(KLVAE.random().state_dict())
        self.stride, self.spec = stride, f"strided:{stride}"
        self.levels = (Level("pooled", 3, stride),) + self.levels

    def _encode(self, x, levels):
        out = super()._encode(x, tuple(n for n in levels if n != "pooled"))
        if "pooled" in levels:
            out.features["pooled"] = torch.nn.functional.avg_pool2d(x, self.stride)
        return out


def test_a_level_that_does_not_pool_evenly_to_the_tokens_is_refused_naming_the_fix(monkeypatch, tmp_path, tiny):
    """A custom level whose stride does not divide a token's side (4 pixels here: factor 4 x patch 1) trained without a
    word: its map was adaptively pooled to the token grid, from overlapping cells of unequal size (stride 3: 5x5 onto
    4x4, the image's last row and column left out) or a cell copied into 2x2 tokens (stride 8), so a token's target was
    not its patch. Refused on the fly as `ahpa prepare` refuses it, naming the level, its map, the resolution and the
    fix; a stride that divides the token trains."""
    from ahpa.data.prepare import PrepareOptions, prepare
    from ahpa.data.shard_encoder import PrepareError
    from ahpa.train.loop import Trainer

    monkeypatch.setattr(registry.ENCODERS, "entries", dict(registry.ENCODERS.entries))
    registry.register_encoder("strided", lambda where, spec: Strided(int(where)))
    for stride, side, fix in [(3, 5, r"align.levels \(those that pool evenly: stage1, stage2, stage3, latent\)$"),
                              (8, 2, r"latent\), or take a model.preset of patch /2 or /4")]:
        with pytest.raises(ValueError, match=rf"prior.encoder='strided:{stride}': level 'pooled' has stride {stride}, a "
                                             rf"{side}x{side} map at resolution 16, which does not pool evenly to the 4x4 "
                                             rf"token grid: a token covers 4x4 pixels, .*{fix}"):
            Trainer(tiny(f"prior.encoder=strided:{stride}"), tmp_path / "run")
    with pytest.raises(ValueError, match=r"level 'pooled' has stride 3"):  # checked after a level that pools evenly
        Trainer(tiny("prior.encoder=strided:3", "align.levels=[stage1,pooled]"), tmp_path / "run")
    with pytest.raises(ValueError, match=r"a 3x3 map at resolution 24, .*or take a model.preset of patch /2$"):
        Trainer(tiny("prior.encoder=strided:8", "data.resolution=24"), tmp_path / "run")  # /4 does not divide 6
    Trainer(tiny("prior.encoder=strided:8", "align.levels=[stage1,latent]"), tmp_path / "run")  # left out: trains
    Trainer(tiny("prior.encoder=strided:8", "model.preset=S/2"), tmp_path / "run")  # tokens of 8x8 pixels
    Trainer(tiny("prior.encoder=strided:2"), tmp_path / "run")
    images, labels = make_shapes(8, 16, seed=0)
    np.savez(tmp_path / "set.npz", images=images, labels=labels)
    for stride, resolution, grid, fix in [(3, 16, 4, "leave the level out of --levels (no grid of the latent fits it)"),
                                          (8, 16, 4, "choose --grid 2 or 1, or leave the level out of --levels"),
                                          # a 10x10 map divides into the 2x2 grid, but 3 does not divide 32: not the image
                                          (3, 32, 2, "leave the level out of --levels (no grid of the latent fits it)")]:
        with pytest.raises(PrepareError, match=rf"--grid {grid}: level 'pooled' has stride {stride}, .*; {re.escape(fix)}"):
            prepare(PrepareOptions(images=str(tmp_path / "set.npz"), vae=f"strided:{stride}", resolution=resolution,
                                   grid=grid, out=str(tmp_path / "c"), workers=0))


def test_an_installed_package_adds_a_kind_by_entry_point(monkeypatch):
    import importlib.metadata

    monkeypatch.setattr(registry.ENCODERS, "entries", dict(registry.ENCODERS.entries))

    class EntryPoint:
        name, value, dist = "pkg-vae", "pkg_vae:load", None

        def load(self):
            return lambda where, spec: KLVAE.random(seed=int(where))

    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group: [EntryPoint()] if group == registry.ENTRY_POINT_GROUP else [])
    assert "pkg-vae" in registry.ENCODERS  # valid before it is loaded, as a name in a config's choices is
    assert registry.load_encoder("pkg-vae:1").spec == "pkg-vae:1"


def test_a_misspelt_name_with_a_broken_package_installed_names_the_key_the_near_name_and_the_package(packages):
    """A typo of a registered mode, with some other installed package broken: the error used to be the broken
    package's ImportError alone, without the key, the file, or the near spelling the user meant."""
    from ahpa import config
    from ahpa.align.router import register_router_mode

    def broken():
        raise ModuleNotFoundError("No module named 'bad_mod'")

    packages(FakeEntryPoint("badpkg", broken))
    register_router_mode("linear-ramp", lambda t, k: torch.full((len(t), k), 1 / k))
    with pytest.raises(config.ConfigError, match=r"^overrides: align.router='linear-rmp' is not valid; valid values: "
                                                 r".*linear-ramp \(did you mean 'linear-ramp'\?\); the 'ahpa.plugins' "
                                                 r"entry point badpkg = 'badpkg_mod' of package 'badpkg' failed to load"):
        config.load(None, ["align.router=linear-rmp"])


def test_two_packages_giving_one_name_are_both_named_and_neither_is_used(packages):
    """Two installed packages registering one router mode, or one encoder kind: whichever was imported last used to win
    silently (the order of installation chose what a run trained with); now the name is refused naming both."""
    from ahpa import config
    from ahpa.align.router import register_router_mode

    def ramp(value):
        return lambda: register_router_mode("linear-ramp", lambda t, k: torch.full((len(t), k), value / k))

    def registers_kind():
        registry.register_encoder("dupvae", lambda where, spec: KLVAE.random())

    loader = lambda where, spec: KLVAE.random()  # noqa: E731
    packages(FakeEntryPoint("pkg-a", ramp(1.0)), FakeEntryPoint("pkg-b", ramp(2.0)), FakeEntryPoint("pkg-c", registers_kind),
             encoders=[FakeEntryPoint("pkg-d", lambda: loader, "twovae"), FakeEntryPoint("pkg-e", lambda: loader, "twovae"),
                       FakeEntryPoint("pkg-f", lambda: loader, "dupvae")])
    both = r"is given by packages 'pkg-a', 'pkg-b': "
    with pytest.raises(config.ConfigError, match=rf"align.router='linear-ramp' is not valid.*router mode 'linear-ramp' {both}"):
        config.load(None, ["align.router=linear-ramp"])
    for kind, claims in [("twovae", "'pkg-d', 'pkg-e'"), ("dupvae", "'pkg-c', 'pkg-f'")]:
        with pytest.raises(ValueError, match=rf"encoder kind '{kind}' is given by packages {claims}: "):
            registry.load_encoder(f"{kind}:x")
    # the session's own registration is what it asked for, and one package alone is fine
    register_router_mode("linear-ramp", lambda t, k: torch.full((len(t), k), 1 / k))
    assert config.load(None, ["align.router=linear-ramp"]).align.router == "linear-ramp"


def test_a_loss_or_router_mode_registered_again_after_a_trainer_was_built_stops_it(packages, tiny, tmp_path):
    """A notebook registers a loss, builds a Trainer (which probes the loss), then reruns the cell with an edited
    function: the Trainer used to train with the new one unprobed (-cos trained without a word). It refuses now,
    naming the setting; a new Trainer checks the new function."""
    import torch.nn.functional as F

    from ahpa.align.loss import register_loss
    from ahpa.align.router import register_router_mode
    from ahpa.train.loop import RunConfigError, Trainer

    mse = lambda p, q, cfg: (p.float() - q.float()).pow(2).flatten(1).mean(1)  # noqa: E731
    negative_cos = lambda p, q, cfg: -F.cosine_similarity(p.float(), q.float(), dim=-1).mean(1)  # noqa: E731
    flat = lambda t, k: torch.full((len(t), k), 1 / k)  # noqa: E731
    register_loss("mine", mse)
    register_router_mode("mine-flat", flat)
    cfg = tiny("align.loss=mine", "align.router=mine-flat", "train.steps=1")
    doubled = lambda t, k: 2 * flat(t, k)  # noqa: E731
    for again, key in [(lambda: register_loss("mine", negative_cos), "align.loss='mine'"),
                       (lambda: register_router_mode("mine-flat", doubled), "align.router='mine-flat'")]:
        trainer = Trainer(cfg, tmp_path / key[6:10])
        again()
        with pytest.raises(RunConfigError, match=rf"{key} was registered again after this Trainer was built"):
            trainer.run()
        register_loss("mine", mse)
        register_router_mode("mine-flat", flat)
    register_loss("mine", negative_cos)
    with pytest.raises(ValueError, match="align.loss='mine' returned .*: a loss is >= 0"):
        Trainer(cfg, tmp_path / "new")
    register_loss("mine", mse)
    Trainer(cfg, tmp_path / "new").run()


def test_an_extension_that_raises_when_first_called_is_named_not_a_bare_traceback(packages):
    """A loader, a loss or a router mode raising an error of its own (not a ValueError: a RuntimeError of torch, a
    KeyError) when ahpa first calls it used to reach the CLI as a traceback from inside ahpa, naming neither the
    extension nor the call; now a ValueError names both, its cause chained (the traceback into the user's code)."""
    from ahpa.align.loss import register_loss
    from ahpa.align.objective import Aligner
    from ahpa.align.router import Router, register_router_mode
    from ahpa.config import AlignCfg

    def loader(where, spec):
        raise RuntimeError("no weights of this format")

    def grid_loss(p, q, cfg):  # a spatial loss: tokens as a square grid
        side = int(p.shape[1] ** 0.5)
        return (p - q).reshape(p.shape[0], side, side, p.shape[2]).diff(dim=1).pow(2).flatten(1).mean(1)

    registry.register_encoder("raises", loader)
    with pytest.raises(ValueError, match=r"^the loader of encoder kind 'raises' failed on 'raises:x': RuntimeError: no "
                                         r"weights of this format") as err:
        registry.load_encoder("raises:x")
    assert isinstance(err.value.__cause__, RuntimeError)
    register_loss("grid", grid_loss)
    with pytest.raises(ValueError, match=r"^align.loss='grid' failed on the check's inputs \[B=2, N=3, C=4\]: "
                                         r"RuntimeError: .*a loss takes any number of tokens N"):
        Aligner(16, ["a", "b"], [4, 4], AlignCfg(), "uniform", "grid")
    register_router_mode("lookup", lambda t, k: {4: torch.full((len(t), 4), 0.25)}[k])
    with pytest.raises(ValueError, match=r"^router mode 'lookup': Router.route\(t \[101\]\) with K=3 failed: KeyError: 3"):
        Router(3, "lookup")


def test_a_run_or_export_whose_encoder_kind_is_not_registered_here_names_its_file_and_why(toy_kind, tiny, tmp_path):
    """A run trained on a kind registered in a notebook, sampled in a fresh session: the refusal was "unknown encoder
    kind 'toy'" alone, naming neither the run or export that asked for it nor why a kind that trained is unknown."""
    from ahpa.sample import load_export
    from ahpa.train.loop import Trainer
    from ahpa.train.resume import run_sampler

    Trainer(tiny("prior.encoder=toy:3", "train.steps=1"), tmp_path / "run").run()
    registry.ENCODERS.entries.pop(toy_kind)  # as in another process
    why = (r"unknown encoder kind 'toy' in 'toy:3'; valid kinds: .* \(a name registered from Python exists only in the "
           r"process that registered it: register it again before loading, or declare it as an entry point")
    with pytest.raises(ValueError, match=rf"{tmp_path / 'run'} decodes with 'toy:3' \(its config.yaml's prior.encoder\): {why}"):
        run_sampler(tmp_path / "run", "cpu")
    export = tmp_path / "run" / "model.safetensors"
    with pytest.raises(ValueError, match=rf"{export} decodes with 'toy:3': {why}"):
        load_export(export, "cpu")


def test_compare_knows_the_methods_and_router_modes_of_installed_packages(packages):
    """`ahpa compare` in a fresh process read the registries' entries without importing the packages: a package's
    fixed-router method showed align.router as read, and its learned mode's router_tau as not read."""
    from ahpa.align.methods import MethodSpec, register_method
    from ahpa.align.router import register_router_mode
    from ahpa.compare import unread_settings

    def module():
        register_router_mode("plug-sharp", lambda soft: soft, learned=True)
        register_method(MethodSpec("plug-fixed", "all", "uniform", "cosine", "every level, uniform"))

    packages(FakeEntryPoint("pkg", module))
    run = {"data.source": "procedural", "align.router": "plug-sharp", "align.router_tau": 2.0,
           "align.router_normalize": True, "align.loss": "default"}
    assert "align.router_tau" not in unread_settings({**run, "align.method": "ahpa"})
    assert {"align.router", "align.router_tau"} <= unread_settings({**run, "align.method": "plug-fixed"})


def test_a_method_built_from_an_installed_package_s_router_mode_and_loss(packages):
    """A script's MethodSpec naming a router mode and a loss of an installed package, before anything imported the
    package: it was refused ("router 'plug-ramp' is not one of soft, topk, snr, uniform"), without a near spelling
    for a misspelt one either."""
    from ahpa.align.loss import register_loss
    from ahpa.align.methods import MethodSpec
    from ahpa.align.router import register_router_mode

    def module():
        register_router_mode("plug-ramp", lambda t, k: torch.full((len(t), k), 1 / k))
        register_loss("plug-mse", lambda p, q, cfg: (p.float() - q.float()).pow(2).flatten(1).mean(1))

    packages(FakeEntryPoint("pkg", module))
    assert MethodSpec("mine", "all", "plug-ramp", "plug-mse", "").router == "plug-ramp"
    with pytest.raises(ValueError, match=r"^method 'mine': unknown router mode 'plug-rmp' \(did you mean 'plug-ramp'\?\)"):
        MethodSpec("mine", "all", "plug-rmp", "cosine", "")
    with pytest.raises(ValueError, match=r"^method 'mine': unknown loss 'cosin' \(did you mean 'cosine'\?\); valid "):
        MethodSpec("mine", "all", "", "cosin", "")
