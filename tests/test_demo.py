"""The demo pipeline end to end at a reduced size (the full size runs with `ahpa demo`)."""

import json

from ahpa.demo.pipeline import run_demo


def test_demo_pipeline_small(tmp_path):
    report = run_demo(tmp_path / "demo", num_images=256, vae_steps=15, judge_steps=20, num_check=16,
                      sit_overrides=["train.steps=6", "train.log_every=3", "train.ckpt_every=3", "sample.steps=3"])
    for key in ("samples", "router", "losses", "model"):
        assert (tmp_path / "demo" / report["files"][key].split("demo/", 1)[1]).exists(), key
    saved = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert saved["num_samples"] == 16 and 0.0 <= saved["class_consistency"] <= 1.0
    assert set(saved["seconds"]) == {"data", "vae", "judge", "sit", "sample"}
    # a rerun starts afresh rather than resuming the SiT over a new VAE
    again = run_demo(tmp_path / "demo", num_images=256, vae_steps=15, judge_steps=20, num_check=16,
                     sit_overrides=["train.steps=6", "train.log_every=3", "train.ckpt_every=3", "sample.steps=3"])
    assert again["class_consistency"] == report["class_consistency"]
