"""The Python session of docs/extending.md ("From Python") runs as written: the documented API is the real one."""

import os
import re
from pathlib import Path

import numpy as np

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"


def test_the_documented_python_session_runs(tmp_path, monkeypatch):
    text = DOC.read_text()
    code = re.search(r"## From Python\n.*?```python\n(.*?)```", text, re.S).group(1)
    (tmp_path / "configs").symlink_to(DOC.parents[1] / "configs")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, str(DOC), "exec"), scope)
    assert scope["images"].shape == (8, 16, 16, 3) and str(scope["images"].dtype) == "torch.uint8"
    assert scope["weights"].shape == (51, len(scope["levels"])) and np.allclose(scope["weights"].sum(1).numpy(), 1.0)
    assert "loss/flow" in scope["last"] and scope["again"].num_classes == scope["bundle"].num_classes
    assert scope["step"] == 20 and scope["bundle2"].device == scope["again"].device == scope["bundle"].device
    assert isinstance(scope["notes"], list) and any(n.startswith("training on") for n in scope["notes"])
    assert os.path.isfile("runs/notebook/DONE")
    assert [r["step"] for r in scope["rows"]] == [5, 10, 15, 20] and "loss/flow" in scope["rows"][-1]
    assert os.path.getsize("runs/notebook/router-now.png") and os.path.getsize("runs/notebook/grid.png")


def test_import_ahpa_stays_light_and_names_its_api():
    import subprocess
    import sys

    code = "import sys, ahpa; assert 'torch' not in sys.modules; print(sorted(ahpa.__all__)); ahpa.Trainer; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "'Trainer'" in out.stdout and out.stdout.strip().endswith("True")


def test_the_api_takes_device_names_and_names_one_this_machine_lacks():
    """load_encoder, load_detector, load_export and run_sampler take "cpu", "cuda:1", "auto" or a torch.device, and a
    device this machine lacks is named with the fix (it was a bare AssertionError from torch, or 'str' object has no
    attribute 'type')."""
    import pytest
    import torch

    import ahpa
    from ahpa.metrics.detectors import load_detector

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: nothing to refuse")
    calls = [lambda: ahpa.load_encoder("ahpa-vae:random", "cuda"), lambda: ahpa.run_sampler(".", "cuda:0"),
             lambda: ahpa.load_export("x.safetensors", "cuda"), lambda: load_detector("torchscript:.", "cuda")]
    for call in calls:
        with pytest.raises(ValueError, match=r"device='cuda(:0)?': this torch .* use device=auto or cpu"):
            call()
    assert next(ahpa.load_encoder("ahpa-vae:random", "auto").parameters()).device.type == "cpu"


def test_every_registry_is_named_by_ahpa():
    """The five registries from `ahpa` itself, as docs/extending.md names them: ahpa.LOSSES and ahpa.ENCODERS were
    missing beside ahpa.METHODS and ahpa.ROUTER_MODES; ahpa.EXTERNALS (REPA's encoder kinds) joined them."""
    import ahpa
    from ahpa.registry import Registry

    for name in ("METHODS", "ROUTER_MODES", "LOSSES", "ENCODERS", "EXTERNALS"):
        assert isinstance(getattr(ahpa, name), Registry), name
    assert "cosine" in ahpa.LOSSES and "ahpa-vae" in ahpa.ENCODERS and "transformers" in ahpa.EXTERNALS
    assert callable(ahpa.register_external)


def test_stop_signals_turn_a_notebooks_interrupt_into_a_stop_with_a_checkpoint(tmp_path, tiny, monkeypatch):
    """In a notebook, the kernel's interrupt (SIGINT) raised KeyboardInterrupt out of run(), losing the steps since the
    last checkpoint. Inside `ahpa.StopSignals()` it stops the run after the step in progress, with a checkpoint of
    that step, as `ahpa train` does with Ctrl-C; the handlers in place before are back after the block, and a new
    Trainer resumes at that step. (A SIGINT outside the block would be pytest's KeyboardInterrupt.)"""
    import os
    import signal

    import ahpa
    from ahpa.train.checkpoint import checkpoint_step, list_checkpoints
    from ahpa.train.loop import Trainer

    step = Trainer.train_step

    def interrupted_at_3(self):
        out = step(self)
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(Trainer, "train_step", interrupted_at_3)
    cfg = tiny("train.steps=40", "train.ckpt_every=100", "train.sample_every=0")
    before = signal.getsignal(signal.SIGINT)
    tr = Trainer(cfg, tmp_path)
    with ahpa.StopSignals() as stop:
        result = tr.run(should_stop=stop)
    assert result["stopped"] == signal.SIGINT and result["step"] == 3 and stop() == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is before
    assert [checkpoint_step(p) for p in list_checkpoints(tmp_path / "checkpoints")] == [3]
    monkeypatch.setattr(Trainer, "train_step", step)
    assert Trainer(tiny("train.steps=5", "train.ckpt_every=100", "train.sample_every=0"), tmp_path).step == 3
