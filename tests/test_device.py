"""What ahpa does differently per device type where a machine here cannot run it (Apple's MPS): checked by the
choices the code makes, since no MPS device exists on CI."""

from __future__ import annotations

import torch

from ahpa.device import autocast, float64_device


def test_no_autocast_is_built_for_mps_where_the_run_does_not_autocast(monkeypatch):
    """torch < 2.5 fails to construct even a disabled autocast for MPS ("unsupported scalarType"), so a laptop's fp32
    training step, sampling and alignment losses crashed before their first matmul. Without a dtype nothing is built
    for MPS; on the CPU and CUDA a disabled autocast still shuts out a caller's."""
    real = torch.autocast

    def old_torch_autocast(device_type, *args, **kwargs):  # as torch 2.4 behaves for MPS
        if device_type == "mps":
            raise RuntimeError("unsupported scalarType")
        return real(device_type, *args, **kwargs)

    monkeypatch.setattr(torch, "autocast", old_torch_autocast)
    with autocast(torch.device("mps"), None):
        pass
    a = torch.ones(2, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (a @ a).dtype == torch.bfloat16
        with autocast(torch.device("cpu"), None):  # the losses' region: computed as written
            assert (a @ a).dtype == torch.float32
        with autocast(torch.device("cpu"), torch.bfloat16):
            assert (a @ a).dtype == torch.bfloat16


def test_float64_statistics_of_an_mps_device_live_on_the_cpu():
    """MPS has no float64: the Fréchet statistics of a detector on MPS (training's evaluation, `ahpa eval` on a
    laptop) and the covariance sums of `ahpa prepare --reduce` are summed on the CPU instead of failing to allocate."""
    from ahpa.metrics.frechet import FeatureStats

    assert float64_device("mps") == torch.device("cpu")
    assert float64_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert float64_device("cpu") == torch.device("cpu")
    stats = FeatureStats(dim=3, device="mps")
    assert stats.device == torch.device("cpu") and stats.sum.device.type == "cpu"
    stats.update(torch.arange(6.0).reshape(2, 3))
    assert stats.count == 2 and stats.sum.tolist() == [3.0, 5.0, 7.0]


def test_autocast_autocasts_where_asked_and_shuts_out_a_callers_on_cuda_and_the_cpu(monkeypatch):
    """With a dtype the region autocasts on any device (train.precision=bf16 on a laptop's MPS too); without one, CUDA
    and the CPU get a disabled autocast, which is what keeps a GPU step's bf16 out of the alignment losses. Nothing is
    built for MPS without a dtype (the test above). The autocasts built are read off torch.autocast's calls."""
    import contextlib

    built = []

    def recorded(device_type, dtype=None, enabled=True):
        built.append((device_type, dtype, enabled))
        return contextlib.nullcontext()

    monkeypatch.setattr(torch, "autocast", recorded)
    for device, dtype in [("mps", torch.bfloat16), ("cuda", torch.bfloat16), ("cuda", None), ("cpu", None), ("mps", None)]:
        with autocast(torch.device(device), dtype):
            pass
    assert built == [("mps", torch.bfloat16, True), ("cuda", torch.bfloat16, True), ("cuda", None, False),
                     ("cpu", None, False)]


def test_bf16_precision_computes_every_region_it_names_in_bf16(tmp_path):
    """train.precision=bf16 (the default on CUDA: auto) autocasts the training step's SiT, the on-the-fly encoder and a
    run's sampling; prepare --precision bf16 its encoder, for the shards and the PCA bases. Each region passes the
    run's dtype to ahpa.device.autocast: one left at None would silently run in fp32 (twice the time on a GPU) while
    the run says bf16. Read off the dtype the first layer of each network returns, on the CPU."""
    import numpy as np
    from torch import nn

    from ahpa import config
    from ahpa.config import SampleCfg
    from ahpa.data.prepare import PrepareOptions, prepare
    from ahpa.data.procedural import make_shapes
    from ahpa.priors.kl_vae import KLVAE
    from ahpa.sample import iter_samples
    from ahpa.train.loop import Trainer
    from ahpa.train.resume import run_sampler
    from tests.conftest import TINY

    seen: dict[str, set] = {}

    def watch(name: str, net: nn.Module, kind: type) -> None:
        def hook(mod, args, out):
            if len(args[0]) > 1:  # not prepare's probe of one blank image (whether the encoder gives a logvar)
                seen.setdefault(name, set()).add(out.dtype)

        next(m for m in net.modules() if isinstance(m, kind)).register_forward_hook(hook)

    trainer = Trainer(config.load(None, [*TINY, "train.precision=bf16", "train.steps=1"]), tmp_path / "run")
    watch("step", trainer.net, nn.Linear)
    watch("on the fly", trainer.parts.encoder, nn.Conv2d)
    trainer.run()
    bundle = run_sampler(tmp_path / "run", torch.device("cpu"))[0]
    watch("sampling", bundle.model, nn.Linear)
    for _ in iter_samples(bundle, 0, 2, 0, 2, SampleCfg(steps=1, micro_batch=2)):
        pass
    images, labels = make_shapes(8, 16, seed=0)
    np.savez(tmp_path / "set.npz", images=images, labels=labels)
    encoder = KLVAE.random(seed=0)
    watch("prepare", encoder, nn.Conv2d)
    prepare(PrepareOptions(images=str(tmp_path / "set.npz"), vae="ahpa-vae:random", resolution=16, workers=0,
                           out=str(tmp_path / "cache"), shard_size=8, flips="none", grid=4, precision="bf16", reduce=2,
                           reduce_images=8), encoder=encoder)
    assert (tmp_path / "cache" / "reduce.safetensors").exists()  # the PCA bases were fitted: both passes ran
    assert seen == {name: {torch.bfloat16} for name in ("step", "on the fly", "sampling", "prepare")}
