"""The demo pipeline end to end at a reduced size (the full size runs with `ahpa demo`)."""

import json

import pytest

from ahpa.demo.pipeline import MARKER, claim_output_dir, run_demo


def test_demo_pipeline_small(tmp_path):
    report = run_demo(tmp_path / "demo", num_images=256, vae_steps=15, judge_steps=20, num_check=16,
                      sit_overrides=["train.steps=6", "train.log_every=3", "train.ckpt_every=3", "sample.steps=3"])
    for key in ("samples", "router", "losses", "metrics", "tb", "model"):
        assert (tmp_path / "demo" / report["files"][key].split("demo/", 1)[1]).exists(), key
    saved = json.loads((tmp_path / "demo" / "report.json").read_text())
    # the plumbing at a size too small to judge the samples: .ci/run runs the full demo, which checks them
    assert saved["num_samples"] == 16 and 0.0 <= saved["class_consistency"] <= 1.0
    assert set(saved["seconds"]) == {"data", "vae", "judge", "sit", "sample"}
    # a rerun starts afresh rather than resuming the SiT over a new VAE
    again = run_demo(tmp_path / "demo", num_images=256, vae_steps=15, judge_steps=20, num_check=16,
                     sit_overrides=["train.steps=6", "train.log_every=3", "train.ckpt_every=3", "sample.steps=3"])
    assert again["class_consistency"] == report["class_consistency"]


def test_demo_deletes_nothing_it_did_not_write(tmp_path):
    precious = tmp_path / "mine" / "data" / "important.txt"
    precious.parent.mkdir(parents=True)
    precious.write_text("x")
    with pytest.raises(ValueError, match="not made by `ahpa demo`"):
        run_demo(tmp_path / "mine")
    assert precious.exists()
    # in the demo's own directory, a bad override fails before the rerun clears anything
    own = tmp_path / "demo"
    claim_output_dir(own)
    (own / "run").mkdir()
    (own / "run" / "keep").write_text("x")
    with pytest.raises(ValueError, match="train.stepz"):
        run_demo(own, sit_overrides=["train.stepz=1"])
    assert (own / "run" / "keep").exists()
    claim_output_dir(own)  # a rerun's claim clears the demo's outputs, and only those
    assert not (own / "run").exists() and (own / MARKER).exists()
