"""Extensions from outside the repository: a package's "ahpa.plugins" module is found by every process that
reads a registry name (the CLI, a fresh session reading a run's config.yaml), a broken extension is named with its
package, and a method, loss, router mode or encoder that breaks the contract fails when it is built, naming it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import FakeEntryPoint

ROOT = Path(__file__).resolve().parents[1]

PLUGIN = '''
import torch
import torch.nn.functional as F
from ahpa.align.loss import register_loss
from ahpa.align.methods import MethodSpec, register_method
from ahpa.align.router import register_router_mode

register_loss("plug-mse", lambda p, q, cfg: F.mse_loss(p.float(), q.float(), reduction="none").flatten(1).mean(1))
register_method(MethodSpec(name="plug-uniform", levels="all", router="uniform", loss="plug-mse",
                           about="every level, uniform weights, MSE"))
register_router_mode("plug-first", lambda t, k: torch.nn.functional.one_hot(torch.zeros_like(t).long(), k).float())
'''


def _install(site: Path, dist: str, module: str, source: str | None, group: str = "ahpa.plugins") -> None:
    """A package as pip leaves it: the module and its dist-info with the entry point (what importlib.metadata reads)."""
    if source is not None:
        (site / f"{module}.py").write_text(source)
    info = site / f"{dist}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{group}]\n{dist} = {module}\n")


def _ahpa(site: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{ROOT / 'src'}"}
    return subprocess.run([sys.executable, "-m", "ahpa", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_a_plugin_package_is_found_by_a_fresh_cli_process(tmp_path):
    _install(tmp_path, "myplug", "myplug_ahpa", PLUGIN)
    out = _ahpa(tmp_path, "train", "--config", "configs/tiny.yaml", "--show-config", "align.method=plug-uniform",
                "align.loss=plug-mse")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "method: plug-uniform" in out.stdout and "loss: plug-mse" in out.stdout
    # a router mode of the package trains a run started from the CLI
    run = _ahpa(tmp_path, "train", "--config", "configs/tiny.yaml", "--out", str(tmp_path / "run"), "train.steps=2",
                "align.router=plug-first")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "router: plug-first" in (tmp_path / "run" / "config.yaml").read_text()
    # without the package the same names are refused, listing what is valid
    bare = _ahpa(tmp_path / "none", "train", "--config", "configs/tiny.yaml", "--show-config", "align.method=plug-uniform")
    assert bare.returncode == 2 and "align.method='plug-uniform' is not valid" in bare.stderr


def test_a_run_of_a_package_method_samples_and_exports_without_the_package_but_resumes_only_with_it(tmp_path):
    """What sampling and exporting need is the plain SiT; the package's method, loss and router are training's. Its
    run used to be refused by `ahpa sample --run` and `ahpa export` (reading config.yaml checked the names)."""
    (tmp_path / "site").mkdir()
    _install(tmp_path / "site", "myplug", "myplug_ahpa", PLUGIN)
    run = tmp_path / "run"
    trained = _ahpa(tmp_path / "site", "train", "--config", "configs/tiny.yaml", "--out", str(run), "train.steps=2",
                    "align.method=plug-uniform", "align.loss=plug-mse")
    assert trained.returncode == 0, trained.stderr[-2000:]
    bare = tmp_path / "none"  # a process without the package
    for args in (["sample", "--run", str(run), "--num", "2", "--steps", "2", "--out", str(tmp_path / "ckpt.npz")],
                 ["sample", "--model", str(run / "model.safetensors"), "--num", "2", "--steps", "2", "--out",
                  str(tmp_path / "export.npz")],
                 ["export", "--run", str(run), "--out", str(tmp_path / "again.safetensors")],
                 ["compare", str(run), "--out", str(tmp_path / "compared")]):  # compare read it unresolved already
        done = _ahpa(bare, *args)
        assert done.returncode == 0, (args, done.stderr[-2000:])
    # the same SiT from its checkpoint and from the export written at the end of training: the same samples
    import numpy as np

    assert np.array_equal(np.load(tmp_path / "ckpt.npz")["arr_0"], np.load(tmp_path / "export.npz")["arr_0"])
    # resuming builds the aligner: refused as before, naming what the process lacks
    resumed = _ahpa(bare, "train", "--config", "configs/tiny.yaml", "--out", str(run), "train.steps=4")
    assert resumed.returncode == 2 and "align.method='plug-uniform' is not valid" in resumed.stderr
    assert ("this process lacks the package or session code the run trained with (its last start recorded the "
            "extension packages myplug 0.1): install or register it before resuming this run.") in resumed.stderr
    # resumed "as it was" (`--config RUN/config.yaml`, what a refused resume suggests): the same fix, naming the
    # package (the config file's refusal came first, and said only how a name registered from Python is lost)
    as_was = _ahpa(bare, "train", "--config", str(run / "config.yaml"), "--out", str(run), "train.steps=4")
    assert as_was.returncode == 2 and "align.method='plug-uniform' is not valid" in as_was.stderr
    assert ("; this process lacks the package or session code the run trained with (its last start recorded the "
            "extension packages myplug 0.1): install or register it before resuming this run.") in as_was.stderr


def test_a_broken_plugin_is_named_with_its_package(tmp_path):
    _install(tmp_path, "brokenplug", "brokenplug_ahpa", "import no_such_module_here\n")
    out = _ahpa(tmp_path, "train", "--config", "configs/tiny.yaml", "--show-config", "align.method=plug-uniform")
    assert out.returncode == 2
    assert ("align.method='plug-uniform' is not valid; valid values: " in out.stderr and "; the 'ahpa.plugins' entry "
            "point brokenplug = 'brokenplug_ahpa' of package 'brokenplug' failed to load: ModuleNotFoundError" in out.stderr), out.stderr
    # a broken package cannot stop runs that do not use it
    ok = _ahpa(tmp_path, "train", "--config", "configs/tiny.yaml", "--show-config", "align.method=ahpa")
    assert ok.returncode == 0, ok.stderr[-2000:]


def test_an_encoder_entry_point_that_fails_breaks_its_kind_only(packages):
    from ahpa.priors import registry

    def broken():
        raise ModuleNotFoundError("No module named 'badvae_pkg'")

    packages(encoders=[FakeEntryPoint("badvae-pkg", broken, "badvae", "badvae_pkg.vae:load")])
    assert "badvae" in registry.kinds()
    assert registry.load_encoder("ahpa-vae:random").spec == "ahpa-vae:random"  # before: every kind failed
    with pytest.raises(ImportError, match=r"encoder kind 'badvae' .* entry point badvae = 'badvae_pkg.vae:load' of "
                                          r"package 'badvae-pkg' failed to load: ModuleNotFoundError"):
        registry.load_encoder("badvae:x")


def test_encoder_registrations_and_loaders_that_break_the_contract(monkeypatch):
    from ahpa.priors import registry
    from ahpa.priors.kl_vae import KLVAE

    monkeypatch.setattr(registry.ENCODERS, "entries", dict(registry.ENCODERS.entries))
    with pytest.raises(ValueError, match="encoder kind 'taef2' is built in"):
        registry.register_encoder("taef2", lambda where, spec: KLVAE.random())
    with pytest.raises(ValueError, match="needs a function loader"):
        registry.register_encoder("x", "not callable")
    # refused when registered, as a loss or router mode of the wrong signature is (it used to wait for the first load)
    with pytest.raises(ValueError, match=r"the loader of encoder kind 'onearg' .* cannot be called as loader\(where: str, spec: str\)"):
        registry.register_encoder("onearg", lambda where: KLVAE.random())
    assert "onearg" not in registry.ENCODERS.entries
    registry.register_encoder("loose", lambda where, spec: KLVAE.random().train().requires_grad_(True))
    enc = registry.load_encoder("loose:1")  # frozen, whatever the loader left: no dropout, no gradients
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    registry.register_encoder("notenc", lambda where, spec: torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="returned Linear, not a PriorEncoder"):
        registry.load_encoder("notenc:1")


def test_an_encoder_returning_other_levels_than_it_declares_is_named():
    from ahpa.priors.kl_vae import KLVAE

    class Dropping(KLVAE):
        def _encode(self, x, levels):
            out = super()._encode(x, levels)
            out.features.pop(next(iter(out.features)))
            return out

    enc = Dropping.random()
    name = next(lv.name for lv in enc.levels if lv.name != "latent")
    with pytest.raises(ValueError, match=rf"Dropping._encode .* was asked for level '{name}' and returned features"):
        enc.encode(torch.rand(2, 3, 16, 16), [lv.name for lv in enc.levels])


@pytest.fixture
def losses():
    """The loss registry as it was, restored in place after the test (the config's choices read it)."""
    from ahpa.align import loss as loss_mod
    from ahpa.align.methods import LOSSES

    saved = dict(LOSSES.entries)
    yield loss_mod
    LOSSES.entries.clear()
    LOSSES.entries.update(saved)


def test_losses_that_break_the_contract_fail_when_registered_or_built(losses):
    from ahpa.align.objective import Aligner
    from ahpa.config import AlignCfg

    with pytest.raises(ValueError, match="loss 'cosine' is built in"):
        losses.register_loss("cosine", lambda p, q, cfg: (p - q).pow(2).mean((1, 2)))
    with pytest.raises(ValueError, match=r"loss 'twoargs' .* cannot be called as fn\(prediction \[B, N, C\]"):
        losses.register_loss("twoargs", lambda p, q: (p - q).pow(2).mean((1, 2)))
    losses.register_loss("scalar", lambda p, q, cfg: (p - q).pow(2).mean())
    losses.register_loss("per-token", lambda p, q, cfg: (p - q).pow(2).mean(-1))
    for name, shape in [("scalar", r"\(\)"), ("per-token", r"\(2, 3\)")]:
        with pytest.raises(ValueError, match=rf"align.loss='{name}' returned {shape} for \[B=2, N=3, C=4\] inputs"):
            Aligner(16, ["a", "b"], [4, 4], AlignCfg(), "uniform", name)

    def stream_after(loss: str) -> torch.Tensor:  # the probe draws nothing: a run's seed gives the same weights
        torch.manual_seed(0)
        Aligner(16, ["a", "b"], [4, 4], AlignCfg(), "uniform", loss)
        return torch.rand(3)

    losses.register_loss("ok-mse", lambda p, q, cfg: (p - q).pow(2).mean((1, 2)))
    assert torch.equal(stream_after("ok-mse"), stream_after("cosine"))


def test_a_negative_detached_or_low_precision_loss_fails_when_built(losses):
    """-cos (REPA's form, 1 - cos less the constant) is negative on average: the router divides each level's loss by
    its running mean, and its gradient blew up by orders of magnitude while clipping stalled the backbone, silently. A loss without
    a gradient trains no head; a bf16 one loses the small differences the router compares."""
    import torch.nn.functional as F

    from ahpa.align.objective import Aligner
    from ahpa.config import AlignCfg

    cases = {
        "negcos": (lambda p, q, cfg: -F.cosine_similarity(p.float(), q.float(), dim=-1).mean(1),
                   r"align.loss='negcos' returned \[-?[0-9.]+, -?[0-9.]+\]: a loss is >= 0 .* 1 - cos, not -cos"),
        # below 0 by a little, at a perfect match only: refused too (>= 0, and 0 at a perfect match)
        "offset": (lambda p, q, cfg: 1 - F.cosine_similarity(p.float(), q.float(), dim=-1).mean(1) - 0.01,
                   r"align.loss='offset' returned \[-?[0-9.]+, -?[0-9.]+\]: a loss is >= 0"),
        "detached": (lambda p, q, cfg: (p.detach() - q).pow(2).mean((1, 2)),
                     r"align.loss='detached' returned a torch.float32 tensor without a gradient to the prediction"),
        "half": (lambda p, q, cfg: (p - q).pow(2).mean((1, 2)).bfloat16(),
                 r"align.loss='half' returned a torch.bfloat16 tensor with a gradient"),
    }
    for name, (fn, message) in cases.items():
        losses.register_loss(name, fn)
        with pytest.raises(ValueError, match=message):
            Aligner(16, ["a", "b"], [4, 4], AlignCfg(), "uniform", name)
    losses.register_loss("one-minus-cos", lambda p, q, cfg: 1 - F.cosine_similarity(p.float(), q.float(), dim=-1).mean(1))
    Aligner(16, ["a", "b"], [4, 4], AlignCfg(), "uniform", "one-minus-cos")


def test_a_loss_that_is_not_finite_on_the_probe_fails_when_built(losses):
    """A loss that divides by a norm gives NaN (0/0) or inf at a perfect match: the probe's negative check let it
    through (NaN < 0 is false), and the steps it touched were skipped as non-finite. Refused, naming the loss, what it
    returned and for which target."""
    from ahpa.align.objective import Aligner
    from ahpa.config import AlignCfg

    cases = {
        "relative": (lambda p, q, cfg: (p - q).pow(2).sum((1, 2)) / (p - q).abs().sum((1, 2)),
                     r"align.loss='relative' returned \[nan, nan\] for a target equal to the prediction: a loss is finite"),
        "inverse": (lambda p, q, cfg: 1 / (p - q).pow(2).mean((1, 2)),
                    r"align.loss='inverse' returned \[inf, inf\] for a target equal to the prediction"),
        "overflow": (lambda p, q, cfg: (p - q).pow(2).mean((1, 2)) * 1e39,
                     r"align.loss='overflow' returned \[inf, inf\] for a target unlike the prediction"),
        # one sample's value only (a norm that is 0 for that sample): every value is checked
        "one-sample": (lambda p, q, cfg: (p - q).pow(2).mean((1, 2)) / p[:, 0, 0].clamp_min(0),
                       r"align.loss='one-sample' returned \[inf, \d+\.\d+\] for a target unlike the prediction"),
    }
    for name, (fn, message) in cases.items():
        losses.register_loss(name, fn)
        with pytest.raises(ValueError, match=message):
            Aligner(16, ["a", "b"], [4, 4], AlignCfg(), "uniform", name)


def test_every_registry_refuses_names_alike_and_names_a_misspelt_one():
    """Methods, router modes, losses and encoder kinds are one Registry each (ahpa.registry): a name that cannot be
    written in an override, or a built-in one, is refused alike, and a misspelt name is named with the nearest valid
    one and the list (an unknown method or router mode used to get the list only)."""
    from ahpa.align.loss import register_loss
    from ahpa.align.methods import MethodSpec, get_method, register_method
    from ahpa.align.objective import Aligner
    from ahpa.align.router import Router, register_router_mode
    from ahpa.config import AlignCfg
    from ahpa.priors.registry import load_encoder, register_encoder

    kinds = {  # what: (register NAME, a built-in name, look up a misspelling of it, the list's word)
        "alignment method": (lambda n: register_method(MethodSpec(n, "all", "", "cosine", "")), "ahpa",
                             lambda: get_method("ahpaa"), "methods"),
        "router mode": (lambda n: register_router_mode(n, lambda t, k: t), "soft", lambda: Router(2, "sotf"), "modes"),
        "loss": (lambda n: register_loss(n, lambda p, q, cfg: p), "cosine",
                 lambda: Aligner(16, ["a"], [4], AlignCfg(), "uniform", "cosin"), "losses"),
        "encoder kind": (lambda n: register_encoder(n, lambda where, spec: None), "taef2",
                         lambda: load_encoder("taef:x"), "kinds"),
    }
    for what, (register, built_in, misspelt, plural) in kinds.items():
        # a ':' too: a spec splits at its first one (KIND:WHERE), so a kind "my:vae" would never be found
        for bad in ("my name", "my:vae"):
            with pytest.raises(ValueError, match=rf"^{what} name '{bad}': give a name without spaces"):
                register(bad)
        with pytest.raises(ValueError, match=rf"^{what} '{built_in}' is built in"):
            register(built_in)
        with pytest.raises(ValueError, match=rf"^unknown {what} .*\(did you mean '{built_in}'\?\); valid {plural}: "):
            misspelt()


def test_a_router_mode_whose_branch_returns_the_wrong_thing_fails_when_built(monkeypatch):
    from ahpa.align.methods import ROUTER_MODES, RouterMode
    from ahpa.align.router import Router

    monkeypatch.setitem(ROUTER_MODES.entries, "ramp", RouterMode(learned=False))
    original = Router.route

    def route(self, t):
        if self.mode != "ramp":
            return original(self, t)
        return self.bad(t)

    monkeypatch.setattr(Router, "route", route)
    for bad, message in [(lambda t: torch.full((len(t), 3), 1 / 3), r"returned \(101, 3\); it returns a pair"),
                         (lambda t: (torch.ones(len(t), 3),) * 2, r"weights at t = 0.00, 0.01, 0.02, 0.03, ... are no distribution .*row sums 3.0000..3.0000")]:
        monkeypatch.setattr(Router, "bad", staticmethod(bad), raising=False)
        with pytest.raises(ValueError, match=rf"router mode 'ramp': .*{message}"):
            Router(3, "ramp")


def test_plugins_load_once_when_a_name_is_missing_and_a_broken_one_blames_only_its_own_names(monkeypatch):
    """In-process, with two installed packages (one registers a method, one fails to import): built-in names import
    neither; the first unknown name imports both, once; the working package's names are valid although the other
    failed; a name nobody registers is refused naming the broken package once; listing the names imports them."""
    import importlib.metadata

    from ahpa import plugins
    from ahpa.align.methods import METHODS, MethodSpec
    from ahpa.config_rules import CHOICES

    calls = []

    class Dist:
        name = "pkg"

    class Good:
        name, value, dist = "good", "good_mod", Dist()

        def load(self):
            calls.append("good")
            monkeypatch.setitem(METHODS.entries, "plug-good", MethodSpec(name="plug-good", levels="all", router="uniform",
                                                                 loss="cosine", about="test"))

    class Bad:
        name, value, dist = "bad", "bad_mod", Dist()

        def load(self):
            calls.append("bad")
            raise ModuleNotFoundError("No module named 'bad_mod'")

    def entry_points(group):
        calls.append("scan")
        return [Good(), Bad()] if group == plugins.GROUP else []

    monkeypatch.setattr(plugins, "_loaded", False)
    monkeypatch.setattr(plugins, "_failures", [])
    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    methods = CHOICES["align.method"]
    assert "ahpa" in methods and calls == []  # a built-in name imports no package
    assert "plug-good" in methods  # the first name not found imports them: valid, whatever the other one did
    assert calls == ["scan", "good", "bad"]
    from ahpa import config

    for _ in range(2):
        with pytest.raises(config.ConfigError) as err:
            config.load(None, ["align.method=plug-none"])
        assert str(err.value).count("entry point bad = 'bad_mod'") == 1
    assert calls == ["scan", "good", "bad"]  # imported once per process
    # in a fresh process, listing the valid names (--show-config, an error message) lists the packages' too
    METHODS.entries.pop("plug-good")
    monkeypatch.setattr(plugins, "_loaded", False)
    monkeypatch.setattr(plugins, "_failures", [])
    assert "plug-good" in list(methods)


def test_a_loss_or_router_mode_with_the_wrong_shape_in_another_place_fails_when_built(losses, monkeypatch):
    from ahpa.align.methods import ROUTER_MODES, RouterMode
    from ahpa.align.objective import Aligner
    from ahpa.align.router import Router
    from ahpa.config import AlignCfg

    # a mean over the batch instead of the tokens: one value per token, [N], not per sample
    losses.register_loss("batch-mean", lambda p, q, cfg: (p - q).pow(2).mean((0, 2)))
    with pytest.raises(ValueError, match=r"align.loss='batch-mean' returned \(3,\) for \[B=2, N=3, C=4\] inputs"):
        Aligner(16, ["a", "b"], [4, 4], AlignCfg(), "uniform", "batch-mean")

    monkeypatch.setitem(ROUTER_MODES.entries, "ramp", RouterMode(learned=False))
    original = Router.route
    monkeypatch.setattr(Router, "route", lambda self, t: original(self, t) if self.mode != "ramp" else self.bad(t))
    third = torch.full((101, 3), 1 / 3)
    for bad, message in [(lambda t: (third, torch.full((len(t), 2), 0.5)), r"returned \[\(101, 3\), \(101, 2\)\]"),
                         (lambda t: (torch.tensor([[1.5, -0.5, 0.0]]).expand(len(t), 3),) * 2,
                          r"are no distribution over the levels \(smallest weight -0.5000, row sums 1.0000..1.0000\)")]:
        monkeypatch.setattr(Router, "bad", staticmethod(bad), raising=False)
        with pytest.raises(ValueError, match=rf"router mode 'ramp': .*{message}"):
            Router(3, "ramp")


def test_an_encoder_returning_maps_of_other_channels_than_it_declares_is_named():
    from ahpa.priors.kl_vae import KLVAE

    class Widened(KLVAE):
        part = "latent"

        def _encode(self, x, levels):
            out = super()._encode(x, levels)
            if self.part == "latent":
                out.mean = torch.cat([out.mean, out.mean[:, :1]], 1)
            else:
                out.features[self.part] = torch.cat([out.features[self.part]] * 2, 1)
            return out

    enc = Widened.random()
    every = [lv.name for lv in enc.levels]
    with pytest.raises(ValueError, match=rf"Widened._encode .* returned a latent of {enc.latent_channels + 1} channels"):
        enc.encode(torch.rand(2, 3, 16, 16), every)
    enc.part = level = next(lv for lv in enc.levels if lv.name != "latent").name
    with pytest.raises(ValueError, match=rf"returned level '{level}' with {2 * enc.level(level).channels} channels"):
        enc.encode(torch.rand(2, 3, 16, 16), every)

    class Pooled(KLVAE):  # every level pooled to 1x1: the channels agree, and it used to train without a word
        def _encode(self, x, levels):
            out = super()._encode(x, levels)
            out.features = {k: v.mean((2, 3), keepdim=True) for k, v in out.features.items()}
            return out

    pooled = Pooled.random()
    first = pooled.levels[0]
    with pytest.raises(ValueError, match=rf"returned level '{first.name}' at \(1, 1\) for images \(16, 16\); its Level "
                                         rf"declares stride {first.stride}, so \({16 // first.stride}, {16 // first.stride}\)"):
        pooled.encode(torch.rand(2, 3, 16, 16), [first.name])


def test_an_encoder_that_contradicts_itself_is_named_before_it_trains():
    """Two statements of one fact must agree: a logvar returned or not against `stochastic` (on the fly the attribute
    decided whether the latent is sampled, in a prepared cache the logvar did: one config trained two ways), and the
    latent Level against latent_channels and factor (a bare shape error at the first step), and unique level names."""
    from ahpa.priors.base import Level
    from ahpa.priors.kl_vae import KLVAE

    images = torch.rand(2, 3, 16, 16)
    enc = KLVAE.random()
    enc.stochastic = False  # but it returns a logvar
    with pytest.raises(ValueError, match="returned a posterior logvar but its `stochastic` is False.*set stochastic = "
                                         "True or return logvar=None"):
        enc.encode(images)

    class NoLogvar(KLVAE):  # stochastic (the default) without a logvar
        def _encode(self, x, levels):
            out = super()._encode(x, levels)
            out.logvar = None
            return out

    with pytest.raises(ValueError, match="returned no posterior logvar but its `stochastic` is True"):
        NoLogvar.random().encode(images)
    enc = KLVAE.random()
    latent = enc.level("latent")
    enc.levels = (*enc.levels[:-1], Level("latent", 2 * latent.channels, latent.stride))
    with pytest.raises(ValueError, match=rf"declares Level\('latent', {2 * latent.channels}, {latent.stride}\) but "
                                         rf"latent_channels={latent.channels}"):
        enc.encode(images)
    enc.levels = (enc.levels[0], *enc.levels)
    with pytest.raises(ValueError, match="each name once"):
        enc.encode(images)


def test_an_encoder_entry_point_named_as_a_built_in_kind_is_listed_once_and_never_loaded(monkeypatch):
    import importlib.metadata

    from ahpa.priors import registry

    class Shadow:
        name, value, dist = "taef2", "shadow_pkg:load", None

        def load(self):
            raise AssertionError("a built-in kind must not load a package's loader")

    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group: [Shadow()] if group == registry.ENTRY_POINT_GROUP else [])
    kinds = registry.kinds()
    assert kinds.count("taef2") == 1 and registry.ENCODERS["taef2"] is registry._taef2


def test_a_name_registered_in_the_session_is_not_replaced_by_a_package_imported_later(monkeypatch):
    """A package registering "plug-same" is imported lazily (the first name not found). Registering the same name in
    the session imports the packages first, so the session's entry stays, also after a later lookup of a missing name."""
    import importlib.metadata

    from ahpa import plugins
    from ahpa.align.methods import METHODS, MethodSpec, register_method
    from ahpa.config_rules import CHOICES

    def spec(about):
        return MethodSpec(name="plug-same", levels="all", router="uniform", loss="cosine", about=about)

    class Package:
        name, value, dist = "pkg", "pkg_mod", None

        def load(self):
            METHODS.entries["plug-same"] = spec("the package's")

    monkeypatch.setattr(plugins, "_loaded", False)
    monkeypatch.setattr(plugins, "_failures", [])
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [Package()] if group == plugins.GROUP else [])
    monkeypatch.delitem(METHODS.entries, "plug-same", raising=False)
    register_method(spec("the session's"))
    try:
        assert "plug-missing" not in CHOICES["align.method"]  # a lookup that would import the packages
        assert METHODS["plug-same"].about == "the session's"
    finally:
        METHODS.entries.pop("plug-same", None)


def test_an_encoder_registered_by_a_plugin_module_is_found_by_its_kind_alone(monkeypatch):
    """docs/extending.md: an "ahpa.plugins" module may register encoders too. Its kind used to be found only when a
    lookup of a method, loss or router name had imported the packages first."""
    import importlib.metadata

    from ahpa import plugins
    from ahpa.priors import registry

    class Package:
        name, value, dist = "pkg", "pkg_mod", None

        def load(self):
            monkeypatch.setitem(registry.ENCODERS.entries, "plugvae", lambda where, spec: registry._ahpa_vae("random", spec))

    monkeypatch.setattr(plugins, "_loaded", False)
    monkeypatch.setattr(plugins, "_failures", [])
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [Package()] if group == plugins.GROUP else [])
    assert registry.load_encoder("plugvae:x").spec == "plugvae:x"
    with pytest.raises(ValueError, match="encoder kind name 'my vae'.*written as prior.encoder=KIND:WHERE"):
        registry.register_encoder("my vae", lambda where, spec: None)


def test_an_encoder_without_a_latent_level_is_named_and_the_latent_by_name_is_the_mean():
    """Every encoder's levels end with the latent (the heads of vae-latent are sized from it): one that declares none
    is named when it encodes, not a KeyError from a lookup. Asked for by name, the latent is the posterior mean,
    whatever the encoder's own _encode does (it never sees the name)."""
    from ahpa.priors.kl_vae import KLVAE

    images = torch.rand(2, 3, 16, 16)
    enc = KLVAE.random()
    out = enc.encode(images, ["latent"])
    assert torch.equal(out.features["latent"], out.mean)
    enc.levels = enc.levels[:-1]
    with pytest.raises(ValueError, match=r"declares levels .* without the latent: the last is Level\('latent', "):
        enc.encode(images)


def test_an_unknown_encoder_kind_names_a_plugin_package_that_failed_to_import(packages):
    """The kind a spec names may be a broken package's: the refusal says which package failed, not only the valid
    kinds (which then lack it, and read as if the package were not installed)."""
    from ahpa.priors.registry import parse_spec

    def broken():
        raise ModuleNotFoundError("No module named 'bad_mod'")

    packages(FakeEntryPoint("pkg", broken, "bad", "bad_mod"))
    with pytest.raises(ValueError, match=r"unknown encoder kind 'plugkind' in 'plugkind:/w'; valid kinds: .*"
                                         r"entry point bad = 'bad_mod'"):
        parse_spec("plugkind:/w")


def test_installed_extension_packages_are_named_by_version_and_in_each_start_record(tmp_path):
    """A package's method, loss or encoder changes what a run trains as ahpa's own code does: `ahpa --version` (for
    a bug report) and each start of a run (starts.jsonl, which `ahpa compare` reads) name the installed packages
    that extend ahpa, in every entry-point group ahpa reads. They used to name none: two runs of a method whose
    package had changed looked alike."""
    import json
    import shutil

    from ahpa import compare, external_kinds, plugins
    from ahpa.priors import registry

    site = tmp_path / "site"
    site.mkdir()
    _install(site, "myplug", "myplug_ahpa", PLUGIN)
    _install(site, "myvae", "myvae_mod", None, group=registry.ENTRY_POINT_GROUP)  # an encoder's: never imported here
    version = _ahpa(site, "--version")
    assert version.returncode == 0 and "\nextensions: myplug 0.1, myvae 0.1 (" in version.stdout, version.stdout
    bare = _ahpa(tmp_path / "none", "--version")
    assert "\nextensions: none installed (" in bare.stdout, bare.stdout
    run = tmp_path / "run"
    out = _ahpa(site, "train", "--config", "configs/tiny.yaml", "--out", str(run), "train.steps=1", "train.sample_every=0",
                "align.method=plug-uniform")
    assert out.returncode == 0, out.stderr[-2000:]
    start = json.loads((run / "starts.jsonl").read_text().splitlines()[-1])
    assert start["extensions"] == "myplug 0.1, myvae 0.1"
    # the same run started without them: compare names the difference
    shutil.copytree(run, tmp_path / "bare")
    (tmp_path / "bare" / "starts.jsonl").write_text(json.dumps({**start, "extensions": None}) + "\n")
    runs = [compare.read_run(run), compare.read_run(tmp_path / "bare")]
    assert compare.differing_environment(runs) == {"extensions": ["myplug 0.1, myvae 0.1", None]}
    assert set(plugins.GROUPS) == {plugins.GROUP, registry.ENTRY_POINT_GROUP, external_kinds.ENTRY_POINT_GROUP}


def test_no_installed_extension_is_recorded_as_none(monkeypatch):
    """starts.jsonl's "extensions" is null (JSON) where no package extends ahpa, as before the field and as `ahpa
    compare` reads an absent fact, not an empty string that would differ from it."""
    import importlib.metadata

    from ahpa import plugins

    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group=None: [])
    assert plugins.installed_extensions() is None


def test_a_run_whose_registered_loss_turns_non_finite_in_training_names_it_when_it_stops(losses, tmp_path,
                                                                                         monkeypatch):
    """A registered loss passes the check when the aligner is built ([B=2] inputs) and returns NaN on the training
    batches: every step is skipped and the run stops. The message used to offer only the learning rate, clipping,
    QK-norm, fp32 and the data, none of which is the cause; it names the registered code the run computes with."""
    from ahpa import config
    from ahpa.train.divergence import TooManyBadSteps
    from ahpa.train.loop import Trainer
    from tests.conftest import TINY

    def nan_in_training(p, q, cfg):
        mse = (p.float() - q.float()).pow(2).flatten(1).mean(1)
        return mse if p.shape[0] == 2 else mse * float("nan")  # the check's batch is 2, the run's 8

    losses.register_loss("nan-later", nan_in_training)
    cfg = config.load(None, [*TINY, "train.steps=6", "train.max_bad_steps=3", "align.loss=nan-later"])
    with pytest.raises(TooManyBadSteps, match=r"3 steps in a row .* or the registered code the run computes with "
                                              r"\(loss 'nan-later'\)"):
        Trainer(cfg, tmp_path / "run").run()
    # a run of built-in parts only is told the usual causes alone
    from ahpa.train.schedule import registered_code

    assert registered_code(Trainer(config.load(None, [*TINY, "train.steps=1"]), tmp_path / "plain")) == []
    # an encoder kind registered in the session is code outside ahpa too
    from ahpa.priors import registry
    from ahpa.priors.kl_vae import KLVAE

    monkeypatch.setattr(registry.ENCODERS, "entries", dict(registry.ENCODERS.entries))
    registry.register_encoder("myvae", lambda where, spec: KLVAE.random())
    tr = Trainer(config.load(None, [*TINY, "train.steps=1", "prior.encoder=myvae:x"]), tmp_path / "mine")
    assert registered_code(tr) == ["prior.encoder='myvae:x'"]


def test_a_plugin_module_naming_a_mode_before_registering_it_is_told_the_order(packages):
    """A package's module that registers its method before the router mode the method names fails to import. The
    refusal used to say that a name registered from Python exists only in the process that registered it, and to
    declare an entry point: advice that does not apply to a package's own module. It names the order."""
    from ahpa.align.methods import METHODS, MethodSpec, register_method
    from ahpa.align.router import register_router_mode

    def module():
        register_method(MethodSpec("ordered", "all", "later-mode", "cosine", "the mode is registered below"))
        register_router_mode("later-mode", lambda t, k: torch.full((t.shape[0], k), 1.0 / k))

    packages(FakeEntryPoint("orderpkg", module, "orderpkg", "orderpkg_mod"))
    with pytest.raises(ValueError) as refused:
        METHODS.check("ordered")
    message = str(refused.value)
    assert ("method 'ordered': unknown router mode 'later-mode'; valid modes: soft, topk, snr, uniform (package "
            "'orderpkg' is importing its 'ahpa.plugins' module: register a router mode or loss before the method "
            "that names it)") in message, message
    assert "exists only in the process" not in message


def test_a_run_of_a_name_registered_elsewhere_is_refused_with_what_it_lacks(losses, tmp_path):
    """A run trained with a session's (or a package's) loss, reopened in a process without it: the refusal said to
    choose a new --out or fix the key named, for a run of an older ahpa. It names what the process lacks and the
    extension packages the run's last start recorded."""
    import json

    from ahpa import config
    from ahpa.align.methods import LOSSES
    from ahpa.train.loop import Trainer
    from ahpa.train.run_dir import RunConfigError
    from tests.conftest import TINY

    saved = dict(LOSSES.entries)
    losses.register_loss("mse2", lambda p, q, cfg: (p.float() - q.float()).pow(2).flatten(1).mean(1))
    Trainer(config.load(None, [*TINY, "train.steps=1", "align.loss=mse2"]), tmp_path / "run").run()
    LOSSES.entries.clear()
    LOSSES.entries.update(saved)  # a new process: the session's loss is gone
    with pytest.raises(RunConfigError) as refused:
        Trainer(config.load(None, [*TINY, "train.steps=2"]), tmp_path / "run")
    message = str(refused.value)
    assert "align.loss='mse2' is not valid" in message and "fix the key named" not in message
    assert message.endswith("this process lacks the package or session code the run trained with: install or "
                            "register it before resuming this run.")
    starts = tmp_path / "run" / "starts.jsonl"
    start = json.loads(starts.read_text().splitlines()[-1])
    starts.write_text(json.dumps({**start, "extensions": "myahpa 0.2"}) + "\n")
    with pytest.raises(RunConfigError, match=r"trained with \(its last start recorded the extension packages myahpa "
                                             r"0\.2\): install"):
        Trainer(config.load(None, [*TINY, "train.steps=2"]), tmp_path / "run")
    # a registered method or router mode as well; a run without a start record (an older ahpa's) names no packages
    saved_config = (tmp_path / "run" / "config.yaml").read_text()
    valid = saved_config.replace("  loss: mse2\n", "  loss: cosine\n")
    starts.unlink()
    for key, value in (("method", "ahpa"), ("router", "soft")):
        line = f"  {key}: {value}\n"
        assert line in valid
        (tmp_path / "run" / "config.yaml").write_text(valid.replace(line, f"  {key}: gone\n"))
        with pytest.raises(RunConfigError) as refused:
            Trainer(config.load(None, [*TINY, "train.steps=2"]), tmp_path / "run")
        message = str(refused.value)
        assert f"align.{key}='gone' is not valid" in message, message
        assert message.endswith("this process lacks the package or session code the run trained with: install or "
                                "register it before resuming this run."), message
    # a key whose name begins as a registered one's (align.router_tau) is no registered name: the older-ahpa fix
    (tmp_path / "run" / "config.yaml").write_text(valid.replace("  router_tau: 1.0\n", "  router_tau: abc\n"))
    with pytest.raises(RunConfigError, match=r"align.router_tau must be a number, got 'abc'\); a run would write "
                                             r"over it: choose a new --out; or, for a run of an older ahpa, fix the key"):
        Trainer(config.load(None, [*TINY, "train.steps=2"]), tmp_path / "run")


def _documented_settings_module() -> str:
    """The package module of docs/extending.md's "Settings of your own, and a loss per level", as written."""
    import re

    text = (ROOT / "docs" / "extending.md").read_text()
    return re.search(r"## Settings of your own, and a loss per level\n.*?```python\n(.*?)```", text, re.S).group(1)


def test_the_documented_settings_and_level_aware_loss_through_the_cli(tmp_path):
    """A package's loss and router mode declare settings of their own (align.options.NAME) and the loss computes each
    level its own way (its `level` keyword): a package could add neither without editing ahpa (a parameter was a field
    of AlignCfg, and a loss could not tell the latent from a stage). Set on the command line, checked as ahpa's keys
    are, shown by --show-config, recorded in config.yaml, held on resume, compared by `ahpa compare`, and read without
    the package by `ahpa sample --run`."""
    import json

    site = tmp_path / "site"
    site.mkdir()
    _install(site, "docplug", "docplug_ahpa", _documented_settings_module())
    base = ["--config", "configs/tiny.yaml", "align.loss=latent-mse", "align.router=power"]
    shown = _ahpa(site, "train", *base, "--show-config", "align.options.latent_weight=2")
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert ("    # the latent's MSE is multiplied by it (a float >= 0; loss 'latent-mse')\n    latent_weight: 2.0\n"
            "    # the power the router's soft weights are raised to (a float > 0; router mode 'power')\n"
            "    sharpness: 2.0\n") in shown.stdout, shown.stdout
    for bad, message in (("align.options.latent_weight=-1", "command line: align.options.latent_weight=-1.0 is out of "
                                                            "range; it must be a float >= 0 (loss 'latent-mse')"),
                         ("align.options.latent_wieght=1", "unknown config key 'align.options.latent_wieght' (did you "
                                                           "mean 'align.options.latent_weight'?)"),
                         ("align.options.sharpness=high", "align.options.sharpness must be a number, got 'high'")):
        refused = _ahpa(site, "train", *base, "--show-config", bad)
        assert refused.returncode == 2 and message in refused.stderr, (bad, refused.stderr[-2000:])
    runs = {}
    for weight in (1, 3):
        runs[weight] = tmp_path / f"run{weight}"
        out = _ahpa(site, "train", *base, "--out", str(runs[weight]), "train.steps=2", "train.sample_every=0",
                    "train.log_every=1", f"align.options.latent_weight={weight}")
        assert out.returncode == 0, out.stderr[-2000:]
    # the run's first line names the settings it reads, as in force (sharpness: its default)
    assert f"weight 0.5; options.latent_weight={weight:.1f}; options.sharpness=2.0)" in out.stdout + out.stderr
    saved = (runs[3] / "config.yaml").read_text()
    assert "  options:\n    latent_weight: 3.0\n    sharpness: 2.0\n" in saved, saved
    # the level reached the loss, and the setting with it: at the first step (the same weights and batch) the latent's
    # loss is 3x, the stages' the same
    first = [json.loads((r / "metrics.jsonl").read_text().splitlines()[0]) for r in (runs[1], runs[3])]
    names = first[0]["level_names"]
    assert "latent" in names and len(names) > 1
    for name, one, three in zip(names, first[0]["align/level_loss"], first[1]["align/level_loss"]):
        assert three == pytest.approx(3 * one if name == "latent" else one, rel=1e-5), (name, one, three)
    # a resume that changes the setting is refused as any change is; the same setting resumes
    changed = _ahpa(site, "train", *base, "--out", str(runs[3]), "train.steps=3", "align.options.latent_weight=2")
    assert changed.returncode == 2 and "align.options.latent_weight: run has 3.0, command gives 2.0" in changed.stderr
    same = _ahpa(site, "train", "--config", str(runs[3] / "config.yaml"), "--out", str(runs[3]), "train.steps=3")
    assert same.returncode == 0, same.stderr[-2000:]
    # compare names the setting where the runs differ
    compared = _ahpa(site, "compare", str(runs[1]), str(runs[3]), "--out", str(tmp_path / "cmp"))
    assert compared.returncode == 0, compared.stderr[-2000:]
    assert "align.options.latent_weight" in (tmp_path / "cmp" / "compare.md").read_text()
    # without the package: the settings are unknown keys, read as written where only the SiT is needed
    bare = tmp_path / "none"
    sampled = _ahpa(bare, "sample", "--run", str(runs[3]), "--num", "2", "--steps", "2", "--out", str(tmp_path / "s.npz"))
    assert sampled.returncode == 0, sampled.stderr[-2000:]
    resumed = _ahpa(bare, "train", "--config", "configs/tiny.yaml", "--out", str(runs[3]), "train.steps=4")
    assert resumed.returncode == 2 and "this process lacks the package or session code" in resumed.stderr, resumed.stderr
