import json
import shutil

import numpy as np
import pytest

from ahpa import config
from ahpa.data.procedural import make_shapes
from ahpa.priors.kl_vae import KLVAE
from ahpa.train import inputs
from ahpa.train.loop import RunConfigError, Trainer


def _inputs(root, seed=0):
    root.mkdir(parents=True)
    images, labels = make_shapes(32, 16, seed=seed)
    np.savez(root / "set.npz", images=images, labels=labels)
    KLVAE.random(seed=seed).save(root / "vae")
    return root / "set.npz", root / "vae"


def test_a_run_resumes_from_its_files_under_a_new_path_and_refuses_other_files(tmp_path, tiny):
    """Staging a run's data and VAE elsewhere (node-local scratch, another machine's home) keeps the run going;
    other files under the moved-to path are refused, naming the key and both paths."""
    data, vae = _inputs(tmp_path / "home")
    run = tmp_path / "run"
    args = lambda d, v, steps: tiny("data.source=npz", f"data.path={d}", f"prior.encoder=ahpa-vae:{v}", f"train.steps={steps}")  # noqa: E731
    Trainer(args(data, vae, 2), run).run()
    record = json.loads((run / inputs.FILE).read_text())
    assert record["data.path"]["value"] == str(data) and record["data.path"]["identity"].startswith("sha256:")
    assert record["prior.encoder"]["identity"].startswith("weights-sha256:")

    scratch = tmp_path / "scratch"
    shutil.copytree(tmp_path / "home", scratch)
    shutil.rmtree(tmp_path / "home")  # the old paths are gone
    again = Trainer(args(scratch / "set.npz", scratch / "vae", 3), run)
    assert again.step == 2
    assert sum("moved" in m for m in again.messages) == 2
    again.run()
    assert config.load(run / "config.yaml").data.path == str(scratch / "set.npz")
    assert json.loads((run / inputs.FILE).read_text())["data.path"]["value"] == str(scratch / "set.npz")

    other_data, other_vae = _inputs(tmp_path / "other", seed=1)
    with pytest.raises(RunConfigError, match=r"data.path: .*other/set.npz' is not the run's input"):
        Trainer(args(other_data, scratch / "vae", 4), run)
    with pytest.raises(RunConfigError, match=r"prior.encoder: .*other/vae' is not the run's input"):
        Trainer(args(scratch / "set.npz", other_vae, 4), run)
    # anything else that differs is refused as before, with a word on the paths
    with pytest.raises(RunConfigError, match=r"(?s)align.weight: run has 0.5.*\(data.path may name the same files"):
        Trainer(tiny("data.source=npz", f"data.path={other_data}", f"prior.encoder=ahpa-vae:{scratch / 'vae'}",
                     "align.weight=1.0", "train.steps=4"), run)


def test_a_run_without_a_record_refuses_moved_files_and_records_them_when_it_resumes(tmp_path, tiny):
    data, vae = _inputs(tmp_path / "home")
    run = tmp_path / "run"
    cfg = tiny("data.source=npz", f"data.path={data}", f"prior.encoder=ahpa-vae:{vae}", "train.steps=2")
    Trainer(cfg, run).run()
    (run / inputs.FILE).unlink()  # as a run from before inputs.json
    shutil.copytree(tmp_path / "home", tmp_path / "scratch")
    moved = tiny("data.source=npz", f"data.path={tmp_path / 'scratch' / 'set.npz'}", f"prior.encoder=ahpa-vae:{vae}",
                 "train.steps=3")
    with pytest.raises(RunConfigError, match="no record of .*set.npz'.s content"):
        Trainer(moved, run)
    Trainer(tiny("data.source=npz", f"data.path={data}", f"prior.encoder=ahpa-vae:{vae}", "train.steps=3"), run).run()
    assert (run / inputs.FILE).is_file()  # recorded by the resume at the old path: the next move is recognised
    assert Trainer(moved, run).step == 3


def test_a_prepared_cache_is_known_by_its_manifest(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "manifest.json").write_text('{"complete": true}\n')
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert inputs.data_identity(str(tmp_path / "a")) == inputs.data_identity(str(tmp_path / "b"))
    assert inputs.data_identity(str(tmp_path / "a")).startswith("manifest-sha256:")
    (tmp_path / "b" / "manifest.json").write_text('{"complete": true, "count": 2}\n')
    assert inputs.data_identity(str(tmp_path / "a")) != inputs.data_identity(str(tmp_path / "b"))
    assert inputs.data_identity(str(tmp_path / "missing")) is None and inputs.data_identity("") is None
