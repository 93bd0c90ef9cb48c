from pathlib import Path

import pytest

from ahpa import config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "src" / "ahpa" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = config.load(path)
    assert cfg.train.steps > 0 and cfg.align.method in config.CHOICES["align.method"]


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


def test_resume_conflicts_allow_only_run_length_and_cadence():
    a = config.load(None, [])
    b = config.load(None, ["train.steps=5", "train.log_every=3", "sample.steps=9"])
    assert config.resume_conflicts(a, b) == []
    c = config.load(None, ["align.weight=1.0"])
    assert config.resume_conflicts(a, c) == ["align.weight: run has 0.5, command gives 1.0"]
