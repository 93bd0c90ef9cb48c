"""The edges of an extension's own settings (align.options.NAME) and of a loss given its level, which a mutation audit
of that change found unchecked: each assertion here failed on a one-line change of the code it names. The main paths
are tests/test_extension_settings.py's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def registries(monkeypatch):
    """The alignment registries as built in, restored after the test: a message listing what is declared is exact
    whatever other tests of this process registered."""
    from ahpa.align.methods import LOSSES, METHODS, ROUTER_MODES

    for reg in (METHODS, ROUTER_MODES, LOSSES):
        monkeypatch.setattr(reg, "entries", {k: v for k, v in reg.entries.items() if k in reg.built_in})


def _mse(p, q, cfg):
    return (p.float() - q.float()).pow(2).flatten(1).mean(1)


def _flat(t, k):
    return torch.full((t.shape[0], k), 1.0 / k)


def _scale(help: str = "multiplies the MSE"):
    from ahpa.align.settings import Setting

    return Setting("scale", 1.0, help, gt=0)


def test_a_declaration_is_checked_at_its_edges():
    from ahpa.align.settings import Setting

    for args, kw, message in [
        (("w", 1.0, "two\nlines"), {}, r"setting 'w': give help=, one line"),  # --show-config prints one line
        (("w", "a", "x"), {"choices": ("a", 1)}, r"setting 'w': its choice 1 is not a str"),
        (("w", True, "x"), {"type": int}, r"setting 'w': its default True is not an int"),  # a bool is no number
        (("w", True, "x"), {"type": float}, r"setting 'w': its default True is not a float"),
    ]:
        with pytest.raises(ValueError, match=message):
            Setting(*args, **kw)
    assert type(Setting("w", 1, "x", type=float).default) is float  # as a user's value is read (1 == 1.0 hides it)
    assert Setting("on", True, "x").allowed() == "true or false"
    listed = Setting("m", "a", "x", choices=["a", "b"])  # a list is kept as a tuple: one declaration, however written
    assert listed.choices == ("a", "b") and listed == Setting("m", "a", "x", choices=("a", "b"))
    closed, opened = Setting("w", 0.5, "x", ge=0, le=1), Setting("w", 0.5, "x", gt=0, lt=1)
    assert closed.problem(0.0) is None and closed.problem(1.0) is None
    assert opened.problem(0.0) == opened.problem(1.0) == "is out of range; it must be a float > 0 and < 1"


def test_each_registration_checks_its_settings_against_every_other(registries):
    """A loss, a router mode and a method are each checked: Setting objects, each name once, and one meaning per name
    against every entry of every kind (a namesake of another kind and one of its own kind included; only the entry a
    registration replaces is skipped)."""
    from ahpa.align.loss import register_loss
    from ahpa.align.methods import LOSSES, MethodSpec, register_method
    from ahpa.align.router import register_router_mode
    from ahpa.align.settings import Setting

    with pytest.raises(ValueError, match=r"loss 'dict': settings= takes ahpa.align.settings.Setting objects, not dict"):
        register_loss("dict", _mse, settings=[{"name": "scale"}])
    with pytest.raises(ValueError, match=r"router mode 'twice': declares setting 'scale' more than once"):
        register_router_mode("twice", _flat, settings=[_scale(), _scale()])
    with pytest.raises(ValueError, match=r"method 'twice': declares setting 'scale' more than once"):
        MethodSpec("twice", "all", "uniform", "cosine", "x", settings=[_scale(), _scale()])
    register_loss("once", _mse, settings=(s for s in [Setting("gain", 1.0, "x")]))  # an iterable, read once: kept
    assert LOSSES.entries["once"].settings == (Setting("gain", 1.0, "x"),)
    register_router_mode("scaled", _flat, settings=[Setting("scale", 2, "an integer scale")])
    for register, what in ((lambda: register_loss("scaled", _mse, settings=[_scale()]), "loss 'scaled'"),
                           (lambda: register_router_mode("other", _flat, settings=[_scale()]), "router mode 'other'"),
                           (lambda: register_method(MethodSpec("m", "all", "", "cosine", "x", settings=[_scale()])),
                            "method 'm'")):
        with pytest.raises(ValueError, match=rf"{what} declares setting align.options.scale as .*, and router mode "
                                             r"'scaled' declares it as .*: one key has one meaning"):
            register()


def test_the_settings_a_run_reads_are_those_of_the_parts_it_runs(registries):
    """Vanilla SiT runs no loss and no router mode, a method of an external encoder no router mode; with a part not
    registered here no setting is known (the config keeps them as written); a setting the method and its loss both
    declare is the method's; a method without alignment reads its own settings."""
    from ahpa.align.loss import register_loss
    from ahpa.align.methods import MethodSpec, align_settings_read, register_method, settings_in_use
    from ahpa.align.router import register_router_mode
    from ahpa.align.settings import Setting

    register_loss("scaled", _mse, settings=[_scale()])
    register_router_mode("flat", _flat, settings=[Setting("flatness", "full", "how flat")])
    register_method(MethodSpec("ext-plug", "external", "", "scaled", "x"))
    register_method(MethodSpec("sit-plug", "none", "uniform", "cosine", "x", settings=[Setting("bias", 0, "x")]))
    register_method(MethodSpec("all-plug", "all", "flat", "scaled", "x", settings=[_scale("the MSE's factor")]))
    assert settings_in_use("none", "flat", "scaled") == {}
    assert list(settings_in_use("ext-plug", "flat", "default")) == ["scale"]
    assert settings_in_use("ahpa", "soft", "gone") is None
    assert settings_in_use("all-plug", "soft", "default")["scale"] == (_scale("the MSE's factor"), "method 'all-plug'")
    assert "options.bias" in align_settings_read("sit-plug", "soft", True, "default")
    # vanilla SiT given a loss's setting: noted once, as a setting no part of the run declares
    from ahpa import config
    from ahpa.train.notes import ignored_settings_note

    notes = ignored_settings_note(config.load(None, [*TINY, "align.method=none", "align.options.scale=2"]), ["latent"])
    assert [n for n in notes if "options" in n] == ["align.options.scale: no method, loss or router mode this run uses "
                                                    "declares it (a setting of method 'all-plug', loss 'scaled'): ignored"]


def test_options_read_unresolved_keep_the_files_values_and_parse_the_command_lines(tmp_path):
    """`ahpa sample --run` and `ahpa export` read a run's config.yaml without its package: a string setting of the file
    ('@latest', '1.0') was parsed again as YAML, so the run could not be sampled ('@' starts no YAML token) or its
    value changed type. A command line's value is a string to parse; a name that is none is refused."""
    from ahpa import config
    from ahpa.config_rules import REGISTERED_KEYS

    path = tmp_path / "config.yaml"
    path.write_text("align:\n  method: gone\n  options:\n    tag: '@latest'\n    version: '1.0'\n    view: 'a: b'\n")
    cfg = config.load(path, ["align.options.width=2"], unresolved=REGISTERED_KEYS)
    assert cfg.align.options == {"tag": "@latest", "version": "1.0", "view": "a: b", "width": 2}
    with pytest.raises(config.ConfigError, match=r"unknown config key 'align.options.not-a-name'"):
        config.load(path, ["align.options.not-a-name=1"], unresolved=REGISTERED_KEYS)
    path.write_text("align:\n  method: gone\n  options:\n    1: 2\n")  # YAML's key 1 is a number: named, refused
    with pytest.raises(config.ConfigError, match=r"unknown config key 'align.options.1'"):
        config.load(path, unresolved=REGISTERED_KEYS)


def test_options_in_every_form_a_config_takes_them(registries, monkeypatch):
    from ahpa import config
    from ahpa.align.loss import register_loss
    from ahpa.align.settings import Setting

    register_loss("scaled", _mse, settings=[_scale()])
    register_loss("other", _mse, settings=[Setting("gain", 1.0, "x")])
    cfg = config.load(None, [*TINY, "align.options.gain=2", "align.loss=scaled"])
    assert list(cfg.align.options.items()) == [("scale", 1.0), ("gain", 2.0)]  # what the run reads first
    assert config.load(None, [*TINY, "align.options="]).align.options == {}
    assert config.from_dict({"align": {"loss": "scaled"}}).align.options == {"scale": 1.0}  # a notebook's, filled
    for data, message in (({"align": {"options": {1: 2}}}, r"unknown config key 'align.options.1'"),
                          ({"align": {"optionsx": 1}}, r"unknown config key 'align.optionsx' \(did you mean")):
        with pytest.raises(config.ConfigError, match=message):
            config.from_dict(data)
    # nothing declared here: said so, with the packages that failed to import (the setting may be one of theirs)
    monkeypatch.setattr(config, "load_plugins", lambda: ["the 'ahpa.losses' entry point x failed to load: boom"])
    monkeypatch.setattr(config, "declared_settings", lambda: {})
    with pytest.raises(config.ConfigError, match=r"none is registered in this process; the 'ahpa.losses' entry point "
                                                 r"x failed to load: boom$"):
        config.load(None, [*TINY, "align.options.x=1"])


def test_show_config_names_whose_each_setting_is_and_whether_the_run_uses_it(registries, tmp_path):
    from ahpa import config
    from ahpa.align.loss import register_loss
    from ahpa.align.methods import MethodSpec, register_method
    from ahpa.align.settings import Setting
    from ahpa.config_doc import documented_yaml
    from ahpa.config_rules import REGISTERED_KEYS

    register_loss("scaled", _mse, settings=[_scale()])
    register_loss("other", _mse, settings=[Setting("gain", 1.0, "the gain")])
    register_method(MethodSpec("all-plug", "all", "", "scaled", "x", settings=[_scale("the MSE's factor")]))
    shown = documented_yaml(config.load(None, [*TINY, "align.method=all-plug", "align.options.gain=2"]))
    assert ("  options:\n    # the MSE's factor (a float > 0; method 'all-plug')\n    scale: 1.0\n"
            "    # the gain (a float; loss 'other'; not used by this run)\n    gain: 2.0\n\n") in shown, shown
    assert ("  # declared here, by extensions this run does not use: scale (method 'all-plug', loss 'scaled'), gain "
            "(loss 'other')\n  options: {}\n") in documented_yaml(config.load(None, TINY))
    path = tmp_path / "config.yaml"
    path.write_text("align:\n  method: gone\n  options:\n    mode: fast\n")
    unresolved = documented_yaml(config.load(path, unresolved=REGISTERED_KEYS))
    assert "  options:\n    # (no extension registered here; not used by this run)\n    mode: fast\n" in unresolved


def test_a_loss_is_named_with_the_level_it_failed_at_and_given_level_only_by_keyword(registries):
    from ahpa.align.loss import register_loss
    from ahpa.align.objective import Aligner
    from ahpa.config import AlignCfg

    def fails_at_latent(p, q, cfg, level):
        if level == "latent":
            raise RuntimeError("no latent here")
        return _mse(p, q, cfg)

    register_loss("fails-latent", fails_at_latent)
    with pytest.raises(ValueError, match=r"align.loss='fails-latent' failed at level 'latent' on the check's inputs "
                                         r"\[B=2, N=3, C=4\]: RuntimeError: no latent here"):
        Aligner(16, ["stage1", "latent"], [4, 4], AlignCfg(), "uniform", "fails-latent")
    seen = []

    def positional(p, q, cfg, level=None, /):  # cannot be given `level` by keyword: called with three arguments
        seen.append(level)
        return _mse(p, q, cfg)

    register_loss("positional", positional)
    Aligner(16, ["stage1", "latent"], [4, 4], AlignCfg(), "uniform", "positional")
    assert seen == [None, None]


def test_the_studys_variants_of_settings_are_named_and_ordered_by_name(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import study

    flags = ["--size", "smoke", "--encoder", "ahpa-vae:random", "--cache", str(tmp_path), "--results", "r.jsonl"]
    for item in ("align.options.=1", "align.options.scale"):  # no name; no value
        with pytest.raises(SystemExit, match=rf"--variant '{item}': expected KEY=VALUE"):
            study.parse_args([*flags, "--variant", item])
    args = study.parse_args([*flags, "--variant", "align.options.zeta=1", "--variant", "align.options.alpha=2"])
    assert args.variant == ["align.options.alpha=2", "align.options.zeta=1"]  # one configuration, one label


def test_a_learned_router_modes_function_is_given_the_runs_settings(registries):
    from ahpa.align.router import Router, register_router_mode
    from ahpa.align.settings import Setting
    from ahpa.config import AlignCfg

    def sharpened(soft, cfg):  # the soft weights raised to a power, renormalised
        w = soft ** cfg.options["power"]
        return w / w.sum(-1, keepdim=True)

    register_router_mode("sharp", sharpened, learned=True, settings=[Setting("power", 2.0, "the power", gt=0)])
    router = Router(2, "sharp", cfg=AlignCfg(router="sharp", options={"power": 3.0}))
    weights, soft = router.route(torch.rand(4))
    assert torch.allclose(weights, soft ** 3 / (soft ** 3).sum(-1, keepdim=True))


def test_resuming_a_run_whose_setting_no_extension_here_declares_names_the_missing_package(registries, tmp_path):
    """Its method, loss and router mode may all be known here (an older or newer version of the package, or the
    session's code not run): the unknown align.options key is what is missing, and the fix is the package's."""
    from ahpa import config
    from ahpa.train.run_dir import RunConfigError, check_run_dir

    (tmp_path / "config.yaml").write_text("align:\n  options:\n    gone: 1\n")
    with pytest.raises(RunConfigError, match=r"unknown config key 'align.options.gone'.*\); this process lacks the "
                                             r"package or session code the run trained with: install"):
        check_run_dir(tmp_path, config.load(None, TINY), 0)
