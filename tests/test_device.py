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
