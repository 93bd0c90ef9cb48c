"""An extension's own settings (align.options.NAME, ahpa.align.settings) and a loss that knows its level: declared,
checked, filled in, passed to the functions, read without the package where only the SiT is needed, compared, and
varied by the study (docs/extending.md, "Settings of your own, and a loss per level"). The CLI's path is
tests/test_plugins.py::test_the_documented_settings_and_level_aware_loss_through_the_cli."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def registries(monkeypatch):
    """Every alignment registry as it was, restored after the test (the config's choices read them)."""
    from ahpa.align.methods import LOSSES, METHODS, ROUTER_MODES

    for reg in (METHODS, ROUTER_MODES, LOSSES):
        monkeypatch.setattr(reg, "entries", dict(reg.entries))


def _mse(p, q, cfg):
    return (p.float() - q.float()).pow(2).flatten(1).mean(1) * cfg.options["scale"]


def test_a_setting_declaration_is_checked_when_made():
    from ahpa.align.settings import Setting

    assert Setting("beta", 1, "smooth-L1's beta", type=float, gt=0).default == 1.0  # a float setting's default
    assert Setting("beta", 0.5, "x", gt=0, le=1).allowed() == "a float > 0 and <= 1"
    assert Setting("mode", "a", "x", choices=("a", "b")).allowed() == "one of a, b"
    cases = [
        (("bad name", 1.0, "x"), r"setting 'bad name': give a name that is a Python identifier"),
        (("w", [1.0], "x"), r"setting 'w': its type is list; a setting is one of bool, int, float, str"),
        (("w", 1.0, ""), r"setting 'w': give help=, one line"),
        (("w", -1.0, "x", None, (), 0), r"setting 'w': its default -1.0 is out of range; it must be a float > 0"),
        (("w", "c", "x", None, ("a", "b")), r"setting 'w': its default 'c' is not valid; it must be one of a, b"),
        (("w", "a", "x", None, (), 0), r"setting 'w': bounds \(gt\) are for an int or float setting, not a str"),
        (("w", 1.0, "x", int), r"setting 'w': its default 1.0 is not an int"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            Setting(*args)


def test_settings_are_filled_checked_and_kept_only_for_what_a_run_uses(registries):
    """The method, loss and router mode in use get their settings (given, or the default); a value of the wrong type,
    out of range or misspelt is refused naming the key, as a key of AlignCfg is; one of an extension not in use is
    kept (the run notes it). Before, align.options was no key at all: every such override was refused."""
    from ahpa import config
    from ahpa.align.loss import register_loss
    from ahpa.align.methods import MethodSpec, register_method
    from ahpa.align.router import register_router_mode
    from ahpa.align.settings import Setting

    register_loss("scaled", _mse, settings=[Setting("scale", 1.0, "multiplies the MSE", gt=0)])
    register_router_mode("flat", lambda t, k, cfg: torch.full((t.shape[0], k), 1.0 / k),
                         settings=[Setting("flatness", "full", "how flat", choices=("full", "half"))])
    register_method(MethodSpec("scaled-flat", "all", "flat", "scaled", "x",
                               settings=[Setting("scale", 1.0, "multiplies the MSE", gt=0)]))  # alike: one setting
    cfg = config.load(None, [*TINY, "align.method=scaled-flat", "align.options.scale=2"])
    assert cfg.align.options == {"scale": 2.0, "flatness": "full"}
    assert config.load(None, TINY).align.options == {}  # ahpa's own parts declare none: nothing written
    kept = config.load(None, [*TINY, "align.options={scale: 3}"])  # YAML's mapping; the loss is not in use
    assert kept.align.options == {"scale": 3.0}
    from ahpa.train.notes import ignored_settings_note

    # naming what declares it (it said "a setting of another extension")
    assert ("align.options.scale: no method, loss or router mode this run uses declares it (a setting of method "
            "'scaled-flat', loss 'scaled'): ignored") in ignored_settings_note(kept, ["stage1", "latent"])
    assert not any("options" in n for n in ignored_settings_note(cfg, ["stage1", "latent"]))
    refused = {
        "align.options.scale=0": r"overrides: align.options.scale=0.0 is out of range; it must be a float > 0 "
                                 r"\(method 'scaled-flat', loss 'scaled'\)",
        "align.options.scal=1": r"unknown config key 'align.options.scal' \(did you mean 'align.options.scale'\?\); "
                                r"align.options holds .*: scale \(method 'scaled-flat', loss 'scaled'\), flatness",
        "align.options.flatness=half-ish": r"align.options.flatness='half-ish' is not valid; it must be one of full, half",
        "align.options=3": r"align.options must be a mapping of NAME: VALUE",
    }
    for item, message in refused.items():
        with pytest.raises(config.ConfigError, match=message):
            config.load(None, [*TINY, "align.method=scaled-flat", item])
    # a value not of the type says what the setting takes and whose it is, as an out-of-range one does (it said
    # "must be a number, got 'abc'" alone, leaving the user to find the rule in --show-config)
    with pytest.raises(config.ConfigError, match=r"align.options.scale must be a number, got 'abc' \(a float > 0; "
                                                 r"method 'scaled-flat', loss 'scaled'\)$"):
        config.load(None, [*TINY, "align.method=scaled-flat", "align.options.scale=abc"])
    # a notebook's edit is checked when the Trainer copies the config, as an override is
    cfg.align.options["scale"] = -1.0
    with pytest.raises(config.ConfigError, match=r"align.options.scale=-1.0 is out of range"):
        config.from_dict(cfg.to_dict())


def test_a_setting_unknown_here_says_to_install_or_register_what_declares_it(registries):
    """A run's or a YAML file's setting whose package is missing here (not installed in this environment, or a
    session's code not run) is no typo: the refusal said "none is registered in this process", or listed the other
    extensions' settings, without the fix."""
    from ahpa import config
    from ahpa.align.loss import register_loss
    from ahpa.align.settings import Setting

    fix = (r"; a setting is declared by the package or session code of a method, loss or router mode: install that "
           r"package in this environment \(`ahpa --version` lists the extension packages installed\) or run its code "
           r"before this, docs/extending.md$")
    with pytest.raises(config.ConfigError, match=r"unknown config key 'align.options.margin'; align.options holds the "
                                                 r"settings that .* declare: none is registered in this process" + fix):
        config.load(None, [*TINY, "align.options.margin=0.2"])
    register_loss("scaled", _mse, settings=[Setting("scale", 1.0, "multiplies the MSE", gt=0)])
    with pytest.raises(config.ConfigError, match=r"declare: scale \(loss 'scaled'\)" + fix):
        config.load(None, [*TINY, "align.options.margin=0.2"])
    with pytest.raises(config.ConfigError) as near:  # a near spelling is the likelier fix: no more than that
        config.load(None, [*TINY, "align.options.scal=1"])
    assert "did you mean 'align.options.scale'?" in str(near.value) and "install" not in str(near.value)


def test_a_loss_declaring_level_is_given_each_levels_name_and_probed_at_each(registries):
    """A loss could not tell which level it computes ("MSE for the latent, cosine for the stages" needed a library
    edit). One that declares `level` gets the name by keyword, when probed and in training; one that does not is
    called with three arguments as before."""
    from ahpa.align.loss import register_loss
    from ahpa.align.objective import Aligner
    from ahpa.config import AlignCfg

    seen = []

    def by_level(p, q, cfg, *, level):  # keyword-only and required: passed by keyword, checked at registration
        seen.append(level)
        mse = (p.float() - q.float()).pow(2).flatten(1).mean(1)
        return mse if level == "latent" else 1 - F.cosine_similarity(p.float(), q.float(), dim=-1).mean(1)

    register_loss("by-level", by_level)
    aligner = Aligner(16, ["stage1", "latent"], [4, 4], AlignCfg(), "uniform", "by-level")
    assert seen == ["stage1"] * 2 + ["latent"] * 2  # the probe: a target unlike the prediction and one equal, per level
    seen.clear()
    preds = [torch.randn(3, 5, 4), torch.randn(3, 5, 4)]
    targets = [preds[0] * 2, preds[1] * 2]
    losses = aligner.level_losses(preds, targets)  # [B, K]
    assert seen == ["stage1", "latent"]
    assert torch.allclose(losses[:, 0], torch.zeros(3), atol=1e-6)  # cosine: a scaled target is a perfect match
    assert torch.allclose(losses[:, 1], preds[1].pow(2).flatten(1).mean(1))
    # the probe names the level where a loss fails
    register_loss("bad-latent", lambda p, q, cfg, level: (p - q).pow(2).mean((1, 2)) * (-1.0 if level == "latent" else 1))
    with pytest.raises(ValueError, match=r"align.loss='bad-latent' returned at level 'latent' \[-"):
        Aligner(16, ["stage1", "latent"], [4, 4], AlignCfg(), "uniform", "bad-latent")
    # a function that takes `level` positionally only cannot be given it by keyword: called with three arguments
    with pytest.raises(ValueError, match=r"loss 'posonly' .* cannot be called as fn\(prediction"):
        register_loss("posonly", lambda p, q, cfg, level, /: p.sum((1, 2)))


def test_settings_reach_the_loss_and_the_router_and_default_where_built_by_hand(registries):
    """A loss reads cfg.options["NAME"] and a router mode's function that declares `cfg` gets the run's AlignCfg; an
    Aligner or Router built by hand from AlignCfg() gets the declared defaults."""
    from ahpa import config
    from ahpa.align.loss import register_loss
    from ahpa.align.objective import Aligner
    from ahpa.align.router import Router, register_router_mode
    from ahpa.align.settings import Setting

    register_loss("scaled", _mse, settings=[Setting("scale", 1.0, "multiplies the MSE", gt=0)])

    def first_share(t, k, cfg):  # the first level's weight is a setting, the rest share what is left
        w = torch.full((t.shape[0], k), (1 - cfg.options["first"]) / (k - 1))
        w[:, 0] = cfg.options["first"]
        return w

    register_router_mode("first-share", first_share, settings=[Setting("first", 0.5, "the first level's weight",
                                                                       ge=0, le=1)])
    assert Router(3, "first-share").route(torch.zeros(2))[0][0].tolist() == pytest.approx([0.5, 0.25, 0.25])
    cfg = config.load(None, [*TINY, "align.loss=scaled", "align.router=first-share", "align.options.scale=4",
                             "align.options.first=0.8"]).align
    aligner = Aligner(16, ["a", "b"], [4, 4], cfg, "first-share", "scaled")
    assert aligner.router(torch.zeros(1))[0].tolist() == pytest.approx([0.8, 0.2])
    p = torch.ones(2, 3, 4)
    assert aligner.level_losses([p, p], [p * 0, p * 0])[:, 0].tolist() == [4.0, 4.0]
    by_hand = Aligner(16, ["a", "b"], [4, 4], config.AlignCfg(), "uniform", "scaled")
    assert by_hand.cfg.options == {"scale": 1.0}


def test_a_declaration_two_extensions_make_otherwise_is_refused(registries):
    from ahpa.align.loss import register_loss
    from ahpa.align.router import register_router_mode
    from ahpa.align.settings import Setting

    register_loss("scaled", _mse, settings=[Setting("scale", 1.0, "multiplies the MSE", gt=0)])
    with pytest.raises(ValueError, match=r"router mode 'other' declares setting align.options.scale as .*, and loss "
                                         r"'scaled' declares it as .*: one key has one meaning"):
        register_router_mode("other", lambda t, k: torch.full((t.shape[0], k), 1.0 / k),
                             settings=[Setting("scale", 2, "an integer scale")])
    # the session registers its loss again with another declaration (a notebook's cell rerun): its own, replaced
    register_loss("scaled", _mse, settings=[Setting("scale", 2.0, "multiplies the MSE", gt=0)])
    from ahpa.align.methods import MethodSpec, register_method

    # the same declaration in other words is one setting: a method naming the loss may declare it too
    register_method(MethodSpec("uses-scaled", "all", "uniform", "scaled", "x",
                               settings=[Setting("scale", 2.0, "the MSE's factor", gt=0)]))
    with pytest.raises(ValueError, match=r"loss 'twice': declares setting 'scale' more than once"):
        register_loss("twice", _mse, settings=[Setting("scale", 1.0, "x"), Setting("scale", 1.0, "x")])


def test_a_runs_settings_are_read_without_their_extension_only_where_the_sit_is_needed(registries, tmp_path):
    """ahpa.config.load(unresolved=...) (`ahpa sample --run`, `ahpa export`): a setting no extension here declares is
    kept as written, as the run's method name is; read strictly (a resume), it is refused."""
    from ahpa import config
    from ahpa.config_rules import REGISTERED_KEYS

    path = tmp_path / "config.yaml"
    path.write_text("align:\n  method: gone\n  options:\n    latent_weight: 2.0\n    mode: fast\n")
    cfg = config.load(path, unresolved=REGISTERED_KEYS)
    assert cfg.align.options == {"latent_weight": 2.0, "mode": "fast"}
    with pytest.raises(config.ConfigError, match=r"unknown config key 'align.options.latent_weight'"):
        config.load(path, unresolved=("align.method",))


def test_compare_reads_a_setting_absent_from_a_run_as_not_read(tmp_path):
    from ahpa.compare import NOT_READ, Run, differing_settings

    base = {"align.method": "gone", "align.loss": "default"}  # a package's method, not installed here
    runs = [Run("a", tmp_path, {**base, "align.options.w": 1.0}), Run("b", tmp_path, {**base, "align.options.w": 2.0}),
            Run("c", tmp_path, dict(base))]
    assert differing_settings(runs) == {"align.options.w": [1.0, 2.0, NOT_READ]}


def test_the_study_varies_a_registered_methods_setting_in_the_table_of_its_baselines(registries, monkeypatch, tmp_path):
    """--variant align.options.NAME=VALUE: refused before (not one of the study's switches). It names the row
    (METHOD[options.NAME=VALUE]), keyed with the baselines (the study key leaves a method's own switches out), and a
    method that does not read it is refused."""
    from ahpa.align.loss import register_loss
    from ahpa.align.methods import MethodSpec, register_method
    from ahpa.align.settings import Setting

    register_loss("scaled", _mse, settings=[Setting("scale", 1.0, "multiplies the MSE", gt=0)])
    register_method(MethodSpec("plug-scaled", "all", "uniform", "scaled", "every level, a scaled MSE"))
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import study
    from study_setup import check_methods, method_label, study_config, study_key

    flags = ["--size", "smoke", "--encoder", "ahpa-vae:random", "--cache", str(tmp_path), "--results", "r.jsonl"]
    args = study.parse_args([*flags, "--variant", "align.options.scale=0.5", "--variant", "align.weight=1"])
    assert args.variant == ["align.weight=1", "align.options.scale=0.5"]  # the table's switches first
    assert method_label("plug-scaled", args) == "plug-scaled[weight=1,options.scale=0.5]"
    size = study.SIZES["smoke"]
    assert study_config(args, size, "plug-scaled").align.options == {"scale": 0.5}
    keyed = study_config(args, size, "plug-scaled", variants=False)
    assert keyed.align.options == {"scale": 1.0}
    key, common = study_key(keyed, args, "smoke")
    assert key == study_key(study_config(args, size, "none", variants=False), args, "smoke")[0]
    assert not any(k.startswith("align.options") for k in common)
    check_methods(args, size, ["plug-scaled"], ["stage1", "latent"])
    with pytest.raises(SystemExit, match=r"--variant align.options.scale=0.5: multi-uniform does not read it"):
        check_methods(study.parse_args([*flags, "--variant", "align.options.scale=0.5"]), size, ["multi-uniform"],
                      ["stage1", "latent"])
    with pytest.raises(SystemExit, match=r"--variant 'align.optionz.scale=1': expected KEY=VALUE"):
        study.parse_args([*flags, "--variant", "align.optionz.scale=1"])


def test_the_study_refuses_a_variants_bad_value_by_its_flag_before_it_reads_data(registries, monkeypatch, tmp_path):
    """A --variant value out of range or of the wrong type, an extension's setting or ahpa's own key: a Python
    traceback of the config's error (naming "overrides"), after the study had hashed the data and prepared the cache."""
    from ahpa.align.loss import register_loss
    from ahpa.align.methods import MethodSpec, register_method
    from ahpa.align.settings import Setting

    register_loss("scaled", _mse, settings=[Setting("scale", 1.0, "multiplies the MSE", gt=0)])
    register_method(MethodSpec("plug-scaled", "all", "uniform", "scaled", "every level, a scaled MSE"))
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import study

    # data that does not exist: the refusal comes before anything reads it
    flags = ["--size", "smoke", "--methods", "plug-scaled", "--encoder", "ahpa-vae:random", "--cache",
             str(tmp_path / "cache"), "--data", str(tmp_path / "absent.npz"), "--results", str(tmp_path / "r.jsonl")]
    for variant, message in (("align.options.scale=0", "align.options.scale=0.0 is out of range; it must be a float "
                                                       "> 0 (loss 'scaled')"),
                             ("align.options.scale=abc", "align.options.scale must be a number, got 'abc' (a float > "
                                                         "0; loss 'scaled')"),
                             ("align.weight=abc", "align.weight must be a number, got 'abc'")):
        with pytest.raises(SystemExit) as refused:
            study.main([*flags, "--variant", variant])
        assert str(refused.value) == f"--variant {variant}: {message}", str(refused.value)
    assert not (tmp_path / "r.jsonl").exists() and not (tmp_path / "cache").exists()
