from pathlib import Path

import pytest
import yaml

from ahpa import config, config_resume

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "src" / "ahpa" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = config.load(path)
    assert cfg.train.steps > 0 and cfg.align.method in config.CHOICES["align.method"]


def test_defaults_are_the_published_settings_of_sit_repa_and_sra2():
    """The defaults are SiT's recipe (AdamW lr 1e-4, betas (0.9, 0.999), no weight decay, batch 256, EMA 0.9999,
    label drop 0.1, linear path, uniform t), REPA's alignment for B (depth 4, lambda 0.5, a 2048-wide projector)
    and SRA2's smooth-L1 beta 0.05, as docs/method.md gives them; and the optimiser is AdamW with them."""
    import torch

    from ahpa.models.sit import SiT, SiTConfig
    from ahpa.train.build import build_optimizer

    cfg = config.Config()
    t, a = cfg.train, cfg.align
    assert (t.lr, t.betas, t.weight_decay, t.batch_size, t.ema_decay, t.label_dropout) == (1e-4, [0.9, 0.999], 0.0, 256,
                                                                                             0.9999, 0.1)
    assert (cfg.transport.path, cfg.transport.time_sampler) == ("linear", "uniform")
    assert (a.depth, a.weight, a.projector_dim, a.smooth_l1_beta) == (4, 0.5, 2048, 0.05)
    opt = build_optimizer(cfg, SiT(SiTConfig(input_size=4, hidden_size=16, depth=1, num_heads=2, num_classes=2)), None)
    group = opt.param_groups[0]
    assert isinstance(opt, torch.optim.AdamW)
    assert (group["lr"], group["betas"], group["weight_decay"]) == (1e-4, (0.9, 0.999), 0.0)


def test_the_imagenet_configs_are_the_papers_run_and_repas_b2():
    """imagenet256-xl2.yaml is the AHPA paper's run (SiT-XL/2, alignment depth 7, lr 2e-4, grad clip 2.0, batch 256,
    400K steps); imagenet256-b2.yaml REPA's B/2 (depth 4, lambda 0.5, lr 1e-4); both sample with REPA's guidance
    interval (guidance up to t = 0.7)."""
    by_name = {p.name: config.load(p) for p in CONFIGS}
    xl, b = by_name["imagenet256-xl2.yaml"], by_name["imagenet256-b2.yaml"]
    assert (xl.model.preset, xl.align.depth, xl.train.lr, xl.train.grad_clip, xl.train.batch_size, xl.train.steps) == (
        "XL/2", 7, 2e-4, 2.0, 256, 400_000)
    assert (b.model.preset, b.align.depth, b.align.weight, b.train.lr, b.train.batch_size) == ("B/2", 4, 0.5, 1e-4, 256)
    assert xl.sample.guidance_high == b.sample.guidance_high == 0.7


def test_the_imagenet512_configs_are_the_512_recipe_at_1024_tokens():
    """imagenet512-xl2.yaml: SiT-XL/2 as SiT and REPA train it at 512 (lr 1e-4, batch 256, grad clip 1.0) with the
    AHPA paper's XL alignment (depth 7, lambda 0.5); imagenet512-b2.yaml: imagenet256-b2.yaml at 512. On SD-VAE's
    64x64x4 latent both are 32x32 = 1,024 tokens, with position embeddings for all of them and a tap inside the
    model; they sample as the 256 configs do; REPA's DINOv2-B/14 (16x16 tokens at 224) runs at 448 to tile them."""
    from types import SimpleNamespace

    from ahpa.models.sit import sincos_pos_embed
    from ahpa.priors.external import tiling_side
    from ahpa.train.build import sit_config

    by_name = {p.name: config.load(p) for p in CONFIGS}
    xl, b = by_name["imagenet512-xl2.yaml"], by_name["imagenet512-b2.yaml"]
    assert (xl.model.preset, xl.data.resolution, xl.train.lr, xl.train.batch_size, xl.train.grad_clip, xl.align.depth,
            xl.align.weight) == ("XL/2", 512, 1e-4, 256, 1.0, 7, 0.5)
    b256 = by_name["imagenet256-b2.yaml"].to_dict()
    b256["data"] |= {"resolution": 512, "path": "caches/imagenet512-sdvae"}
    assert b.to_dict() == b256
    sd_vae = SimpleNamespace(factor=8, latent_channels=4, spec="diffusers:stabilityai/sd-vae-ft-ema")
    for cfg in (xl, b):
        sc = sit_config(cfg, sd_vae, 1000)
        assert (sc.input_size, sc.grid, sc.num_tokens) == (64, 32, 1024)
        assert sincos_pos_embed(sc.hidden_size, sc.grid).shape == (1024, sc.hidden_size)
        assert 1 <= cfg.align.depth <= sc.depth
        assert cfg.sample == by_name["imagenet256-xl2.yaml"].sample
    assert tiling_side(224 // 14, 32) * 14 == 448


def test_overrides_parse_types_and_lists():
    cfg = config.load(None, ["train.steps=7", "train.lr=3e-4", "align.levels=[stage1,latent]", "data.hflip=false",
                             "train.betas=[0.9,0.95]"])
    assert cfg.train.steps == 7 and cfg.train.lr == 3e-4 and cfg.data.hflip is False
    assert cfg.align.levels == ["stage1", "latent"] and cfg.train.betas == [0.9, 0.95]


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: ten\n")
    with pytest.raises(config.ConfigError, match=r"bad\.yaml: train.steps must be an integer"):
        config.load(bad)
    bad.write_text("trian:\n  steps: 3\n")
    with pytest.raises(config.ConfigError, match="sections are"):
        config.load(bad)
    with pytest.raises(config.ConfigError, match="does not exist"):
        config.load(tmp_path / "missing.yaml")


@pytest.mark.parametrize("item", ["train.log_every=0", "train.ckpt_every=0", "train.grad_accum=0", "train.batch_size=-1",
                                  "train.batch_size=0", "train.steps=-5", "train.ema_decay=2", "sample.steps=0",
                                  "align.router_momentum=1", "eval.num=1", "sample.guidance_high=1.5"])
def test_values_out_of_range_fail_as_they_are_set(item, tmp_path):
    key = item.partition("=")[0]
    with pytest.raises(config.ConfigError, match=rf"overrides: {key}=\S+ is out of range; it must be "):
        config.load(None, [item])
    section, _, name = key.partition(".")
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"{section}:\n  {name}: {item.partition('=')[2]}\n")
    with pytest.raises(config.ConfigError, match=rf"bad\.yaml: {key}="):
        config.load(bad)


def test_every_range_is_checked_against_a_key_that_exists():
    keys = set(config.flatten(config.Config().to_dict()))
    assert set(config.RANGES) <= keys
    defaults = config.flatten(config.Config().to_dict())
    assert all(config.RANGES[k][0](defaults[k]) for k in config.RANGES), "a default lies outside its own range"


def test_resume_conflicts_allow_only_run_length_and_cadence():
    a = config.load(None, [])
    b = config.load(None, ["train.steps=5", "train.log_every=3", "sample.steps=9", "train.grad_accum=4"])
    assert config_resume.resume_conflicts(a, b) == []
    c = config.load(None, ["align.weight=1.0"])
    assert config_resume.resume_conflicts(a, c) == ["align.weight: run has 0.5, command gives 1.0"]


def test_show_config_documents_every_key_and_is_a_config_file(tmp_path):
    """`ahpa train --show-config`: every key with the comment written beside its field, as YAML that loads back to
    the same configuration; nothing is written. A new key without a comment fails here."""
    import dataclasses
    import subprocess
    import sys

    from ahpa.config_doc import field_comments

    cfg = config.Config()
    for section in dataclasses.fields(cfg):
        comments = field_comments(type(getattr(cfg, section.name)))
        undocumented = [f"{section.name}.{f.name}" for f in dataclasses.fields(getattr(cfg, section.name))
                        if not comments.get(f.name) and not config.CHOICES.get(f"{section.name}.{f.name}")]
        assert not undocumented, f"document these keys in ahpa/config_sections.py: {undocumented}"
    out = subprocess.run([sys.executable, "-m", "ahpa.cli", "train", "--show-config", "align.token_fraction=0.5",
                          "prior.encoder=taef2:/a b", "eval.detectors=[x:1,y:2]"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "# the share of each image's tokens that the heads align" in out.stdout
    from ahpa.align.methods import METHODS  # the registry: a method added in source is listed too

    assert f"  # {' | '.join(METHODS)}\n  method: ahpa\n" in out.stdout
    (tmp_path / "shown.yaml").write_text(out.stdout)
    assert config.load(tmp_path / "shown.yaml") == config.load(
        None, ["align.token_fraction=0.5", "prior.encoder=taef2:/a b", "eval.detectors=[x:1,y:2]"])
    assert [p.name for p in tmp_path.iterdir()] == ["shown.yaml"]  # no run directory


def test_overrides_may_come_before_and_after_options(capsys):
    """`ahpa train --config F a=1 --out X b=2`: both overrides count, in order; anything else is still refused."""
    from ahpa.cli import main

    assert main(["train", "train.steps=7", "--show-config", "train.lr=0.01", "train.steps=9"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["train"]["steps"] == 9 and shown["train"]["lr"] == 0.01
    with pytest.raises(SystemExit):
        main(["train", "--show-config", "--bogus", "train.lr=0.01"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_cli_names_where_another_librarys_error_came_from(monkeypatch, capsys):
    """A ValueError raised inside torch or diffusers reads like ours without its place ("Expected more than 1 value
    per channel"); the CLI names the file and line, and AHPA_TRACEBACK=1 prints the traceback."""
    from ahpa.cli import main
    from ahpa.commands import compare

    namespace = {}
    exec(compile("def fail(args):\n    raise ValueError('Expected more than 1 value per channel')\n", "/lib/torch/nn/fake.py", "exec"),
         namespace)
    ours = compare.run
    monkeypatch.setattr(compare, "run", namespace["fail"])
    assert main(["compare", "x"]) == 2
    assert capsys.readouterr().err.strip() == ("ahpa compare: error: Expected more than 1 value per channel (raised in "
                                               "/lib/torch/nn/fake.py:2; AHPA_TRACEBACK=1 prints the traceback)")
    monkeypatch.setenv("AHPA_TRACEBACK", "1")
    assert main(["compare", "x"]) == 2
    assert "Traceback (most recent call last)" in capsys.readouterr().err
    monkeypatch.delenv("AHPA_TRACEBACK")
    monkeypatch.setattr(compare, "run", ours)
    assert main(["compare", "/no/such/run"]) == 2  # ours: the message alone
    assert capsys.readouterr().err.strip().endswith("give directories that `ahpa train --out` wrote")


def test_a_preset_is_checked_when_it_is_set():
    """--show-config (which builds no model) refused no preset; the config now checks it against the model's sizes."""
    from ahpa import config

    with pytest.raises(config.ConfigError, match=r"model.preset='Q/3' is not valid; valid values: S/1, S/2, S/4, B/1"):
        config.load(None, ["model.preset=Q/3"])
    assert config.load(None, ["model.preset=XL/2"]).model.preset == "XL/2"


@pytest.mark.parametrize("change", ["train.batch_size=16", "train.seed=1", "data.hflip=false", "train.lr=0.5",
                                    "model.depth=3", "prior.encoder=taef2:x", "align.method=repa"])
def test_settings_that_change_the_run_are_never_resumable(change):
    """Batch size and seed fix the data order (ahpa.data.order), the rest the model or its objective."""
    from ahpa import config

    assert config_resume.resume_conflicts(config.load(None, []), config.load(None, [change])), change


@pytest.mark.parametrize("item", ["train.steps=true", "train.batch_size=false", "data.resolution=true"])
def test_a_boolean_is_not_an_integer(item, tmp_path):
    """YAML's true is a Python bool, an int subclass; train.steps=true must not become 1 step."""
    key = item.partition("=")[0]
    with pytest.raises(config.ConfigError, match=rf"{key} must be an integer \(at least 1\), got (True|False)"):
        config.load(None, [item])
    section, _, name = key.partition(".")
    (tmp_path / "c.yaml").write_text(f"{section}:\n  {name}: {item.partition('=')[2]}\n")
    with pytest.raises(config.ConfigError, match="must be an integer"):
        config.load(tmp_path / "c.yaml")


@pytest.mark.parametrize("item", ["train.lr=0", "transport.time_std=0", "align.router_tau=0", "align.smooth_l1_beta=0",
                                  "model.mlp_ratio=0", "align.snr_width=0", "align.token_fraction=0"])
def test_positive_settings_refuse_zero(item):
    """The boundary of the strictly positive ranges."""
    key = item.partition("=")[0]
    with pytest.raises(config.ConfigError, match=rf"{key}=0(\.0)? is out of range"):
        config.load(None, [item])
    config.load(None, [f"{key}=0.5"])  # and the smallest ordinary value is fine


@pytest.mark.parametrize("change", ["train.ema_decay=0.999", "train.ema_warmup=false", "train.warmup_steps=10",
                                    "train.label_dropout=0.2", "train.grad_clip=0.5", "train.betas=[0.9,0.95]",
                                    "train.weight_decay=0.01", "train.precision=bf16", "transport.path=cosine",
                                    "align.weight=1.0", "align.stop_step=5", "data.limit=10"])
def test_optimisation_settings_are_not_resumable(change):
    """RESUMABLE_CHANGES grown by a key that changes the trained weights."""
    assert config_resume.resume_conflicts(config.load(None, []), config.load(None, [change])), change


def test_unknown_options_are_refused_even_beside_overrides_left_over(capsys):
    """Overrides after an option are appended only when every left-over argument is one; an unknown option
    next to a left-over override is still argparse's usage error (exit 2 via SystemExit), not taken for an
    override."""
    from ahpa.cli import main

    for stray in ("--bogus", "stray"):
        with pytest.raises(SystemExit) as e:
            main(["train", "train.steps=7", "--show-config", stray, "train.lr=0.01"])
        assert e.value.code == 2
        assert f"unrecognized arguments: {stray} train.lr=0.01" in capsys.readouterr().err


def test_show_config_keeps_the_comment_above_a_key_and_the_one_beside_it():
    """A key documented both above and beside (sample.guidance_low) shows both, in that order."""
    from ahpa.config_doc import documented_yaml

    text = documented_yaml(config.Config())
    block = text.split("sample:\n", 1)[1].split("  guidance_low:", 1)[0].splitlines()
    assert block[-3].startswith("  # guidance runs for t in [guidance_low, guidance_high] only")
    assert block[-2].startswith("  # guidance_high=0.7 (no guidance near pure noise)")
    assert block[-1] == "  # guidance from this t ..."


def test_version_names_ahpa_torch_and_the_model_libraries(capsys):
    import torch

    from ahpa import __version__
    from ahpa.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    out = capsys.readouterr().out
    # in a git checkout the first line names its commit (ahpa.provenance.source_revision); installed, the version alone
    from ahpa.provenance import source_revision

    source = source_revision()
    first = f"ahpa {__version__}" + (f" (checkout at {source})" if source else "")
    assert stop.value.code == 0 and out.startswith(first + "\n")
    assert f"torch {torch.__version__} (" in out and "diffusers" in out and "safetensors" in out and "\nwandb" in out


def test_python_callers_get_named_mistakes(tmp_path, capsys):
    """One override given as a string (not a list) is one override, not its characters; a Trainer given a path where
    a Config goes, and a name registered in another Python process, are named with the fix."""
    from ahpa.train.loop import Trainer

    assert config.load(None, "train.steps=5").train.steps == 5
    with pytest.raises(TypeError, match="Trainer takes a Config .*load_config.*not a str"):
        Trainer("configs/tiny.yaml", tmp_path)
    with pytest.raises(config.ConfigError, match="registered from Python exists only in the process that registered it"):
        config.load(None, ["align.method=all-snr"])
    # a typo gets the near name, and the study's run names what they are made of, not the plugin note
    with pytest.raises(config.ConfigError, match=r"align.method='reap' is not valid; .* \(did you mean 'repa'\?\)$"):
        config.load(None, ["align.method=reap"])
    with pytest.raises(config.ConfigError, match=r"'ahpa-topk' names a run of the study: align.method=ahpa align.router=topk"):
        config.load(None, ["align.method=ahpa-topk"])
    with pytest.raises(config.ConfigError, match=r"did you mean 'heun'"):
        config.load(None, ["sample.solver=heunn"])
    with pytest.raises(config.ConfigError, match=r"did you mean 'repa'"):  # as the README writes it
        config.load(None, ["align.method=REPA"])
    # from Python the overrides are "overrides" (a notebook has no command line); `ahpa train` names its command line
    with pytest.raises(config.ConfigError, match=r"^overrides: align.method='ahap'"):
        config.load(None, ["align.method=ahap"])
    from ahpa.cli import main

    assert main(["train", "--out", str(tmp_path / "x"), "align.method=ahap"]) == 2
    assert "ahpa train: error: command line: align.method='ahap' is not valid" in capsys.readouterr().err
    # a misspelt encoder kind is named before `ahpa train` says it sets up a run (minutes of statistics), and leaves
    # no run directory behind
    assert main(["train", "--out", str(tmp_path / "y"), "prior.encoder=ahpa-vea:random"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ahpa train: error: unknown encoder kind 'ahpa-vea'") and "did you mean 'ahpa-vae'" in err
    assert not (tmp_path / "y").exists()
    # keys, sections, encoder and detector kinds and devices get the near name too
    from ahpa.device import resolve_device
    from ahpa.metrics.detectors import parse_spec
    from ahpa.priors.registry import load_encoder

    for call, near in ((lambda: config.load(None, ["align.methd=ahpa"]), "did you mean 'align.method'"),
                       (lambda: config.load(None, ["alin.method=ahpa"]), "did you mean 'align'"),
                       (lambda: load_encoder("taef:/x"), "did you mean 'taef2'"),
                       (lambda: parse_spec("torchscrip:x.pt"), "did you mean 'torchscript'"),
                       (lambda: resolve_device("cpuu"), "did you mean 'cpu'")):
        with pytest.raises(ValueError, match=near):
            call()


def test_a_failed_or_interrupted_command_is_reported_once_per_launch(tmp_path, monkeypatch, capsys):
    """A failed command's message: on stderr in one process; under torchrun in each process's error file (torchrun's
    summary shows it) and printed by rank 0 alone; under another launcher (no error file) by every process, naming
    its rank. Ctrl-C says that a rerun resumes where the command keeps its work (train, sample, prepare) only."""
    import json

    from ahpa.cli import main
    from ahpa.commands import compare as compare_cmd, train as train_cmd

    for var in ("RANK", "WORLD_SIZE", "TORCHELASTIC_ERROR_FILE"):
        monkeypatch.delenv(var, raising=False)
    message = f"ahpa compare: error: {tmp_path} is not a run directory (no config.yaml); give directories that `ahpa train --out` wrote"
    assert main(["compare", str(tmp_path)]) == 2
    assert capsys.readouterr().err == message + "\n"
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    for rank, printed in (("1", ""), ("0", message + "\n")):
        error_file.unlink(missing_ok=True)
        monkeypatch.setenv("RANK", rank)
        assert main(["compare", str(tmp_path)]) == 2
        assert capsys.readouterr().err == printed
        assert json.loads(error_file.read_text())["message"]["message"] == message
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE")
    monkeypatch.setenv("RANK", "1")
    assert main(["compare", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"[rank 1] {message}\n"
    monkeypatch.delenv("RANK")

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_cmd, "run", interrupted)
    monkeypatch.setattr(compare_cmd, "run", interrupted)
    assert main(["train"]) == 130
    assert capsys.readouterr().err == "interrupted; rerun the same command to resume\n"
    assert main(["compare", str(tmp_path)]) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_show_config_is_printed_once_under_torchrun(monkeypatch, capsys):
    from ahpa.cli import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    tiny = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
    for rank, shown in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        assert main(["train", "--config", tiny, "--show-config"]) == 0
        assert ("train:" in capsys.readouterr().out) is shown


def test_an_empty_guidance_interval_is_refused_once_every_key_is_set(tmp_path):
    """sample.guidance_low > sample.guidance_high passed each key's own range check and turned guidance off without
    a word (guidance runs for low <= t <= high). The pair is checked after the file and the overrides are in, so an
    override may repair a file's value; `ahpa train` (config.load) and `ahpa sample` (from_dict) both refuse it."""
    with pytest.raises(config.ConfigError, match=r"overrides: sample.guidance_low=0.8 exceeds "
                                                 r"sample.guidance_high=0.2: .* give low <= high"):
        config.load(None, ["sample.guidance_low=0.8", "sample.guidance_high=0.2"])
    with pytest.raises(config.ConfigError, match="ahpa sample: sample.guidance_low=0.8 exceeds"):
        config.from_dict({"sample": {"guidance_low": 0.8, "guidance_high": 0.2}}, where="ahpa sample")
    path = tmp_path / "c.yaml"
    path.write_text("sample:\n  guidance_low: 0.8\n  guidance_high: 0.2\n")
    with pytest.raises(config.ConfigError, match=r"c\.yaml: sample.guidance_low=0.8 exceeds"):
        config.load(path)
    assert config.load(path, ["sample.guidance_high=0.9"]).sample.guidance_high == 0.9
    assert config.load(None, ["sample.guidance_low=0.3", "sample.guidance_high=0.3"]).sample.guidance_low == 0.3


def test_a_setting_misspelt_on_a_config_object_or_overrides_given_as_a_dict_are_named(tmp_path):
    """A notebook edits the Config it loaded: `cfg.train.stepz = 30` added a stray attribute and the run trained the
    default 1000 steps; it is refused as an unknown override key is. Overrides given as a dict were read by their
    keys alone, each refused as "not of the form section.key=value"."""
    cfg = config.load(None, ["train.steps=5"])
    cfg.train.steps = 30  # a setting it has
    assert cfg.train.steps == 30
    with pytest.raises(AttributeError, match=r"unknown config key 'train.stepz' \(did you mean 'train.steps'\?\); "
                                             r"valid keys in train: steps, "):
        cfg.train.stepz = 30
    with pytest.raises(AttributeError, match=r"unknown config key 'trian' \(did you mean 'train'\?\); sections are: "):
        cfg.trian = config.TrainCfg()
    assert not hasattr(cfg.train, "stepz") and config.from_dict(cfg.to_dict()).train.steps == 30
    with pytest.raises(config.ConfigError, match=r"^overrides: a list of 'section.key=value' strings, .* not a dict"):
        config.load(None, {"train.steps": 5})


def test_registered_names_may_be_left_unresolved_where_no_aligner_is_built_and_nothing_else(tmp_path):
    """A run's config.yaml read to sample or export its SiT (ahpa.train.resume.run_sampler): the method, loss, router
    mode and REPA encoder kind of a package not installed here are kept as written; every other check stands."""
    from ahpa.config_rules import REGISTERED_KEYS

    run = {"align": {"method": "pkg-method", "loss": "pkg-loss", "router": "pkg-mode"},
           "prior": {"external": "pkgkind:/weights/vit"}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(run))
    with pytest.raises(config.ConfigError, match=r"align\.\w+='pkg-\w+' is not valid; valid values: "):
        config.load(path)  # read strictly by default: a resume, a --config
    cfg = config.load(path, unresolved=REGISTERED_KEYS)
    assert (cfg.align.method, cfg.align.loss, cfg.align.router, cfg.prior.external) == (
        "pkg-method", "pkg-loss", "pkg-mode", "pkgkind:/weights/vit")
    refused = [  # (an edit of the run's file, what is named): unknown keys, other keys' values, malformed names
        ({"align": {"methd": "ahpa"}}, r"unknown config key 'align.methd' \(did you mean 'align.method'\?\)"),
        ({"transport": {"path": "linaer"}}, r"transport.path='linaer' is not valid; valid values: linear, cosine"),
        ({"align": {"method": "two words"}}, r"align.method='two words' is not valid; valid values: "),
        ({"align": {"router": ["soft"]}}, r"align.router must be a string, got \['soft'\]"),
        ({"prior": {"external": "pkgkind"}}, r"prior.external='pkgkind' is not valid: .* is not KIND:DIR"),
        ({"prior": {"external": "pkg kind:/w"}}, r"prior.external='pkg kind:/w' is not valid: unknown external encoder"),
        ({"prior": {"external": "pkgkind:"}}, r"prior.external='pkgkind:' is not valid: .* is not KIND:DIR"),
        ({"align": {"method": "pkg:method"}}, r"align.method='pkg:method' is not valid; valid values: "),
        ({"align": {"router_tau": 0}}, r"align.router_tau=0.0 is out of range"),
    ]
    for edit, named in refused:
        path.write_text(yaml.safe_dump({**run, **edit} if "align" not in edit else
                                       {**run, "align": {**run["align"], **edit["align"]}}))
        with pytest.raises(config.ConfigError, match=named):
            config.load(path, unresolved=REGISTERED_KEYS)
    # overrides are read alike; a kind is the text before the first colon, so its WHERE may hold one (C:/...)
    cfg = config.load(None, ["align.method=pkg-method", "prior.external=pkgkind:C:/weights/vit"],
                      unresolved=REGISTERED_KEYS)
    assert (cfg.align.method, cfg.prior.external) == ("pkg-method", "pkgkind:C:/weights/vit")
    # only the registered names: any other key given as unresolved is checked as ever
    with pytest.raises(config.ConfigError, match=r"sample.solver='eulr' is not valid"):
        config.load(None, ["sample.solver=eulr"], unresolved=("sample.solver",))
