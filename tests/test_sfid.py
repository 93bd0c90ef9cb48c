"""sFID: Inception-v3's spatial features as ADM's evaluator reads them, from the same pass as FID.

The real network (inception-2015-12-05.pt) is not available offline, so these tests use a small TorchScript network
laid out as NVIDIA's translation is (`layers` with TensorFlow's block names, `mixed_6.conv` the 1x1 branch of a block,
a `forward(img, return_features, use_fp16, no_output_bias)` that resizes to 299 and scales inside). Its forward is
written here independently of ahpa.metrics.spatial, so that the check of the split tests something.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ahpa.metrics import load_detector, measure
from ahpa.metrics.evaluation import EvaluationWarning, evaluate, metrics_by_detector
from ahpa.metrics.frechet import FeatureStats, frechet_distance
from tests.test_scores import FakeInception, TinyClassifier


class Mixed(nn.Module):
    """An Inception block: its 1x1 branch `conv` (TensorFlow's mixed_N/conv) and a tower."""

    def __init__(self, cin: int, cconv: int, ctower: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(cin, cconv, 1), nn.ReLU())
        self.tower = nn.Conv2d(cin, ctower, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv(x), self.tower(x)], dim=1)


class LayeredInception(FakeInception):
    """NVIDIA's TorchScript Inception-v3 in miniature: pool_3 features 2048, 1008 classes (FakeInception's head); 9x9
    maps at mixed_6 where the real network has 17x17 (567 spatial features instead of 2023: the same code, cheaper
    Fréchet distances)."""

    def __init__(self, offset: float = 128.0, scale: float = 128.0, swap_hw: bool = False, keep: int = 2048):
        super().__init__()
        torch.manual_seed(0)
        self.offset, self.scale = offset, scale
        self.swap_hw, self.keep = swap_hw, keep  # other forwards, which sFID's check must tell from this one
        self.layers = nn.Sequential(OrderedDict(
            conv=nn.Conv2d(3, 8, 3, stride=2), pool0=nn.AdaptiveAvgPool2d(9), mixed_5=Mixed(8, 6, 6),
            mixed_6=Mixed(12, 10, 6), mixed_7=nn.Conv2d(16, 2048, 1), pool2=nn.AdaptiveAvgPool2d(1),
        ))

    def pool_features(self, img: torch.Tensor) -> torch.Tensor:
        n, _, h, w = img.shape
        if self.swap_hw:  # a forward written for square images: each side's half pixel taken from the other side
            h, w = w, h
        x = img.to(torch.float32)
        # TensorFlow 1's resize: half a pixel of each size off the centred grid, borders clamped
        theta = torch.tensor([[1.0, 0.0, 1.0 / w - 1.0 / 299], [0.0, 1.0, 1.0 / h - 1.0 / 299]]).unsqueeze(0)
        grid = F.affine_grid(theta.expand(n, 2, 3), [n, 3, 299, 299], False)
        x = (F.grid_sample(x, grid, "bilinear", "border", False) - self.offset) / self.scale
        return self.layers(x).view(n, 2048)[:, : self.keep]


def _script(module: nn.Module, path: Path) -> Path:
    with warnings.catch_warnings():  # torch >= 2.10 deprecates TorchScript authoring; the files stay valid
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(module.eval()).save(str(path))
    return path


@pytest.fixture(scope="module")
def inception(tmp_path_factory) -> str:
    return f"inception:{_script(LayeredInception(), tmp_path_factory.mktemp('det') / 'inception-2015-12-05.pt')}"


def _images(n: int, seed: int, side: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, side, side, 3), dtype=np.uint8)


def _by_hand(images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(pool_3, spatial) features computed from the miniature network's own modules, spatial in ADM's NHWC order."""
    net = LayeredInception().eval()
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    n, _, h, w = x.shape
    with torch.no_grad():
        pool = net(x, return_features=True)
        theta = torch.tensor([[1.0, 0.0, 1.0 / w - 1.0 / 299], [0.0, 1.0, 1.0 / h - 1.0 / 299]]).unsqueeze(0)
        y = F.grid_sample(x.float(), F.affine_grid(theta.expand(n, 2, 3), [n, 3, 299, 299], False), "bilinear",
                          "border", False)
        y = net.layers.mixed_5(net.layers.pool0(net.layers.conv((y - 128) / 128)))
        conv = net.layers.mixed_6.conv(y)[:, :7]  # [N, 7, 9, 9]
    return pool, np.transpose(conv.numpy(), (0, 2, 3, 1)).reshape(n, -1)  # TensorFlow's (h, w, c) order


def test_spatial_features_are_mixed_6_conv_in_adm_order(inception):
    det = load_detector(inception)
    assert det.has_spatial and det.spatial_name == "sFID" and det.spatial_dim == 7 * 9 * 9
    imgs = _images(5, 0)
    pool, spatial = det.features_and_spatial(torch.from_numpy(imgs).permute(0, 3, 1, 2))
    want_pool, want_spatial = _by_hand(imgs)
    assert spatial.shape == (5, 567)
    torch.testing.assert_close(pool, want_pool, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(spatial, torch.from_numpy(want_spatial), rtol=1e-4, atol=1e-5)
    # the first 7 features are the 7 channels at the top-left pixel (NHWC), not channel 0's first 7 pixels (NCHW)
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2)
    torch.testing.assert_close(spatial[:, :7], torch.from_numpy(want_spatial.reshape(5, 9, 9, 7)[:, 0, 0]))
    torch.testing.assert_close(pool, det.features(x))  # one pass gives FID's features too, as the forward does
    # other detectors have none
    resnet = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(ValueError, match="no spatial features: sFID is Inception-v3's"):
        load_detector(f"torchscript:{_script(_Float(resnet), Path(inception.partition(':')[2]).with_name('r20.pt'))}").check_spatial()


class _Float(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images.float() / 255)


def test_sfid_refused_for_a_network_whose_forward_differs(tmp_path):
    # pytorch-fid style scaling (x / 127.5 - 1): its own FID works, but its layers run after NVIDIA's scaling do not
    # give its pool_3 back, so an sFID from them would be of another computation
    other = load_detector(f"inception:{_script(LayeredInception(offset=127.5, scale=127.5), tmp_path / 'other.pt')}")
    other.features(torch.zeros(2, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"do not give back the network.s own pool_3 features \(relative difference 5"):
        other.check_spatial()
    with pytest.raises(ValueError, match="do not give back"):
        measure(_images(4, 1), other, spatial=True)
    with pytest.raises(ValueError, match="do not give back"):  # asked directly, the features are refused too
        other.features_and_spatial(torch.zeros(2, 3, 16, 16, dtype=torch.uint8))


@pytest.mark.parametrize("kind, said", [
    # half a pixel of each side from the other side: the same on square images, so only a non-square probe tells
    (dict(swap_hw=True), r"relative difference \d\.\de-04"),
    # a forward giving other features than the layers' pool_3 (here its first 1024)
    (dict(keep=1024), r"shapes \(2, 1024\) and \(2, 2048\)"),
], ids=["h and w swapped", "other features"])
def test_sfid_refused_for_a_forward_that_resizes_otherwise_or_gives_other_features(kind, said, tmp_path):
    other = load_detector(f"inception:{_script(LayeredInception(**kind), tmp_path / 'other.pt')}")
    with pytest.raises(ValueError, match=f"do not give back the network.s own pool_3 features \\({said}"):
        other.check_spatial()


def test_sfid_refused_for_a_network_not_laid_out_as_nvidias(tmp_path):
    # no `layers` at all (test_scores' FakeInception), and a mixed_6 without its 1x1 branch `conv`: refused with the
    # layers it has, while FID still works with either
    flat = load_detector(f"inception:{_script(FakeInception(), tmp_path / 'flat.pt')}")
    with pytest.raises(ValueError, match=r"reads the layer layers.mixed_6.conv .* lacks \(its layers: none\)"):
        flat.check_spatial()
    net = LayeredInception()
    net.layers.mixed_6 = nn.Conv2d(12, 16, 3, padding=1)
    bare = load_detector(f"inception:{_script(net, tmp_path / 'bare.pt')}")
    with pytest.raises(ValueError, match=r"lacks \(its layers: conv, pool0, mixed_5, mixed_6, mixed_7, pool2\)"):
        bare.check_spatial()
    assert bare.features(torch.zeros(2, 3, 16, 16, dtype=torch.uint8)).shape == (2, 2048)
    # float images are refused as every detector refuses them
    good = load_detector(f"inception:{_script(LayeredInception(), tmp_path / 'good.pt')}")
    with pytest.raises(TypeError, match="detectors take uint8 image tensors"):
        good.features_and_spatial(torch.full((2, 3, 16, 16), 128.0))


def test_sfid_against_an_adm_reference_batch_uses_its_stored_mu_s(inception, tmp_path):
    det = load_detector(inception)
    samples, ref_imgs, other = _images(30, 1), _images(40, 2), _images(50, 3)
    np.savez(tmp_path / "samples.npz", arr_0=samples)
    # ADM's layout: a batch of images and the statistics of the full dataset (here: of other images), spatial as mu_s
    other_pool, other_spatial = _by_hand(other)
    np.savez(tmp_path / "ref.npz", arr_0=ref_imgs, mu=other_pool.numpy().mean(0), sigma=np.cov(other_pool.numpy(), rowvar=False),
             mu_s=other_spatial.mean(0), sigma_s=np.cov(other_spatial, rowvar=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EvaluationWarning)  # 30 samples for 567 features: said, and expected here
        got, stats = evaluate(tmp_path / "samples.npz", tmp_path / "ref.npz", det, ("sfid",))
    _, spatial = _by_hand(samples)
    want = frechet_distance(spatial.mean(0), np.cov(spatial, rowvar=False), other_spatial.mean(0),
                            np.cov(other_spatial, rowvar=False))
    # (FID's 2048 features against the stored mu, sigma: tests/test_scores.py; each 2048-wide FD costs seconds here)
    assert set(got) == {"sFID"} and got["sFID"] == pytest.approx(want, rel=1e-6)
    assert stats["samples_spatial"].count == 30 and stats["reference_spatial"].count == 0  # stored: no count

    # mu and sigma alone (no mu_s) and no images: refused before any image is measured, saying what to give
    np.savez(tmp_path / "stats.npz", mu=other_pool.numpy().mean(0), sigma=np.cov(other_pool.numpy(), rowvar=False))
    with pytest.raises(ValueError, match=r"mu_s, sigma_s.*--metrics fd,sfid --save-ref-stats"):
        evaluate(tmp_path / "samples.npz", tmp_path / "stats.npz", det, ("sfid",))


def test_sfid_of_reference_images_is_cached_and_saved_with_adm_names(inception, tmp_path, monkeypatch, capsys):
    from ahpa.cli import main
    from ahpa.metrics import reference as reference_mod

    samples, ref = tmp_path / "samples.npz", tmp_path / "ref.npz"
    np.savez(samples, arr_0=_images(30, 4))
    np.savez(ref, images=_images(40, 5, side=24))
    argv = ["eval", str(samples), "--ref", str(ref), "--detector", inception, "--metrics", "sfid,is", "--is-splits",
            "3", "--batch", "16", "--ref-cache", str(tmp_path / "cache")]
    assert main(argv) == 0
    out = capsys.readouterr()
    first = json.loads(out.out.strip().splitlines()[-1])
    assert set(first) == {"sFID", "IS", "IS-std"}
    _, s = _by_hand(_images(30, 4))
    _, r = _by_hand(_images(40, 5, side=24))
    want = frechet_distance(s.mean(0), np.cov(s, rowvar=False), r.mean(0), np.cov(r, rowvar=False))
    assert first["sFID"] == pytest.approx(want, rel=1e-6)
    assert "40 reference images for 567 features (sFID)" in out.err  # rank-deficient: said for sFID's dimension too
    assert "features (FID)" not in out.err  # FID's Fréchet distance was not asked for: nothing to say of its features
    cached = sorted(p.name.partition("-")[0] for p in (tmp_path / "cache").iterdir())
    assert cached == ["FID", "sFID"]  # FID's statistics too: the same pass measured them, and fd needs them next

    # a second call reads both from the cache: measuring the reference again would fail here
    real = reference_mod.measure

    def samples_only(source, *a, **k):
        assert Path(source) == samples, "the reference was measured again despite the cache"
        return real(source, *a, **k)

    monkeypatch.setattr(reference_mod, "measure", samples_only)
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == pytest.approx(first, rel=1e-6)
    monkeypatch.undo()

    # --save-ref-stats writes sFID's statistics as ADM's reference batches name them; they then serve as the reference
    saved = tmp_path / "saved.npz"
    assert main([*argv[:6], "--metrics", "sfid", "--no-ref-cache", "--save-ref-stats", str(saved)]) == 0
    capsys.readouterr()
    with np.load(saved) as f:
        assert {"mu", "sigma", "mu_s", "sigma_s"} <= set(f.keys()) and f["mu_s"].shape == (567,)
    assert FeatureStats.load(saved, spatial=True).detector == "sFID"
    assert main(["eval", str(samples), "--ref", str(saved), "--detector", inception, "--metrics", "sfid"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["sFID"] == pytest.approx(first["sFID"], rel=1e-6)


def test_sfid_is_inceptions_only(inception, tmp_path, capsys):
    from ahpa.cli import main

    resnet = _script(_Float(nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())),
                     tmp_path / "cifar10-resnet20.pt")
    r20, inc = load_detector(f"torchscript:{resnet}"), load_detector(inception)
    assert metrics_by_detector("fd,sfid", [inc, r20]) == [("fd", "sfid"), ("fd",)]
    with pytest.raises(ValueError, match="sFID is measured in Inception-v3's spatial features"):
        metrics_by_detector("fd,sfid", [r20])
    samples = tmp_path / "samples.npz"
    np.savez(samples, arr_0=_images(20, 6))
    base = ["eval", str(samples), "--ref", str(samples), "--no-ref-cache", "--metrics", "fd,sfid"]
    assert main([*base, "--detector", f"torchscript:{resnet}", "--detector", inception]) == 0
    out = capsys.readouterr()
    assert set(json.loads(out.out.strip().splitlines()[-1])) == {"FD-r20", "FID", "sFID"}
    assert "sFID is computed with FID only; skipped for the detector(s) other than Inception-v3: FD-r20" in out.err
    assert main([*base, "--detector", f"torchscript:{resnet}"]) == 2
    assert "drop `sfid` from the metrics" in capsys.readouterr().err


def test_sfid_split_of_the_real_inception():
    # the file itself, where it is (AHPA_INCEPTION, or ../shared/detectors): its layers, run as sFID runs them, give
    # back its own pool_3 features, and mixed_6/conv has ADM's 7 x 17 x 17 features
    from tests.test_scores import INCEPTION

    if not INCEPTION.is_file():
        pytest.skip(f"needs the Inception-v3 TorchScript file {INCEPTION} (set AHPA_INCEPTION); not available offline here")
    det = load_detector(f"inception:{INCEPTION}")
    assert det.spatial_dim == 2023
    pool, spatial = det.features_and_spatial(torch.from_numpy(_images(3, 7, side=64)).permute(0, 3, 1, 2))
    assert pool.shape == (3, 2048) and spatial.shape == (3, 2023)


def test_sfid_completes_a_reference_cache_that_holds_fids_statistics_only(inception, tmp_path, monkeypatch):
    """A cache written by an evaluation without sFID (precision/recall here: FID's statistics and first features) is
    completed with sFID's statistics, then read whole; an sFID file that holds another metric's statistics is
    measured afresh, not taken for sFID's."""
    from ahpa.metrics import reference as reference_mod

    det, cache = load_detector(inception), tmp_path / "cache"
    samples, ref = tmp_path / "samples.npz", tmp_path / "ref.npz"
    np.savez(samples, arr_0=_images(12, 4))
    np.savez(ref, images=_images(16, 5, side=24))
    _, r = _by_hand(_images(16, 5, side=24))
    run = dict(pr_num=8, cache_dir=cache)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EvaluationWarning)  # few images for their features: expected here
        evaluate(samples, ref, det, ("pr",), **run)
        assert sorted(p.name.partition("-")[0] for p in cache.iterdir()) == ["FID", "FID"]  # statistics, features
        first, stats = evaluate(samples, ref, det, ("sfid", "pr"), **run)
        np.testing.assert_allclose(stats["reference_spatial"].mean, r.mean(0), rtol=1e-5, atol=1e-6)
        assert stats["reference_spatial"].count == 16
        real = reference_mod.measure
        monkeypatch.setattr(reference_mod, "measure", lambda source, *a, **k: (
            real(source, *a, **k) if Path(source) == samples else pytest.fail("the reference was measured again")))
        assert evaluate(samples, ref, det, ("sfid", "pr"), **run)[0] == pytest.approx(first, rel=1e-6)
        monkeypatch.undo()
        (sfid_file,) = cache.glob("sFID-*.npz")
        FeatureStats.load(next(cache.glob("FID-*.npz"))).save(sfid_file, detector="FID")
        assert evaluate(samples, ref, det, ("sfid",), **run)[0]["sFID"] == pytest.approx(first["sFID"], rel=1e-6)
        assert FeatureStats.load(sfid_file).detector == "sFID"  # and written again


@pytest.mark.parametrize("stray", [{}, {"mu_s": np.zeros(567)}], ids=["no mu_s", "mu_s without sigma_s"])
def test_sfid_against_a_reference_batch_without_mu_s_measures_its_images(inception, tmp_path, stray):
    """ADM's layout with mu and sigma but no mu_s (a batch saved before sFID), or half of sFID's pair: FID's statistics
    are the stored ones (of the full dataset), sFID's are measured from the images beside them, and both are saved
    with their own counts (the stored statistics' unknown, the images' 12); the reference's progress bar has all 12."""
    det = load_detector(inception)
    ref_imgs = _images(12, 2)
    mu, sigma = np.full(2048, 0.25), np.eye(2048) / 16  # stand for the full dataset's
    np.savez(tmp_path / "samples.npz", arr_0=_images(10, 1))
    np.savez(tmp_path / "ref.npz", arr_0=ref_imgs, mu=mu, sigma=sigma, **stray)
    bars = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EvaluationWarning)
        got, stats = evaluate(tmp_path / "samples.npz", tmp_path / "ref.npz", det, ("sfid",),
                              progress=lambda label, total: bars.append((label, total)))
    assert bars == [("reference [FID]", 12), ("samples [FID]", 10)]
    assert set(got) == {"sFID"}
    np.testing.assert_allclose(stats["reference"].mean, mu)  # the stored statistics, not the images'
    _, r = _by_hand(ref_imgs)
    np.testing.assert_allclose(stats["reference_spatial"].mean, r.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["reference_spatial"].cov, np.cov(r, rowvar=False), rtol=1e-4, atol=1e-6)
    assert stats["reference"].count == 0 and stats["reference_spatial"].count == 12
    for s in (stats["samples_spatial"], stats["reference_spatial"]):
        assert (s.detector, s.image_size) == ("sFID", (32, 32))
    stats["reference"].save(tmp_path / "saved.npz", detector="FID", spatial=stats["reference_spatial"])
    assert FeatureStats.load(tmp_path / "saved.npz").count == 0  # unknown, as stored
    assert FeatureStats.load(tmp_path / "saved.npz", spatial=True).count == 12
    # a file of neither images nor statistics: refused by what it lacks (images), not as statistics without mu_s
    np.savez(tmp_path / "neither.npz", foo=np.zeros(3))
    with pytest.raises(ValueError, match=r"holds no images under arr_0 or images \(keys: \['foo'\]\)"):
        evaluate(tmp_path / "samples.npz", tmp_path / "neither.npz", det, ("sfid",))


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_sfid_statistics_measured_by_two_processes_are_those_of_one(inception, tmp_path):
    """measure(spatial=True) under torchrun: each process reads its share and the spatial sums are all-reduced like
    FID's, so both processes hold the statistics of all the images."""
    np.savez(tmp_path / "images.npz", arr_0=_images(10, 8))
    script = tmp_path / "two.py"
    script.write_text("""
import os, sys, numpy as np, torch.distributed as dist
from ahpa.metrics import load_detector, measure
dist.init_process_group("gloo")
rank = dist.get_rank()
got = measure(sys.argv[2], load_detector(sys.argv[1]), 3, rank=rank, world_size=2, spatial=True)
np.savez(f"{sys.argv[3]}/rank{rank}.npz", mu=got.spatial.mean, sigma=got.spatial.cov, count=got.spatial.count)
dist.barrier()
os._exit(0)  # as the CLI ends a torchrun process: tearing gloo down can abort (ahpa.commands.exit)
""")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script), inception, str(tmp_path / "images.npz"), str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    _, want = _by_hand(_images(10, 8))
    for rank in (0, 1):
        with np.load(tmp_path / f"rank{rank}.npz") as f:
            assert int(f["count"]) == 10
            np.testing.assert_allclose(f["mu"], want.mean(0), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(f["sigma"], np.cov(want, rowvar=False), rtol=1e-4, atol=1e-6)


def test_eval_refuses_what_sfid_cannot_measure_before_any_image_is(inception, tmp_path, monkeypatch, capsys):
    """ahpa eval's refusals come before the first detector's pass (hours at 50k ImageNet samples): an Inception whose
    forward is not NVIDIA's listed after another detector, a reference of FID's statistics without sFID's listed after
    a classifier that needs no reference (its Inception Score alone), and sFID of one sample."""
    from ahpa.cli import main
    from ahpa.metrics import evaluation, reference

    resnet = _script(_Float(nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())), tmp_path / "r.pt")
    other = _script(LayeredInception(offset=127.5, scale=127.5), tmp_path / "other.pt")
    samples = tmp_path / "samples.npz"
    np.savez(samples, arr_0=_images(6, 9))
    for module in (evaluation, reference):
        monkeypatch.setattr(module, "measure", lambda *a, **k: pytest.fail("an image was measured before the refusal"))
    base = ["eval", str(samples), "--ref", str(samples), "--no-ref-cache"]
    assert main([*base, "--metrics", "fd,sfid", "--detector", f"torchscript:{resnet}", "--detector",
                 f"inception:{other}"]) == 2
    assert "do not give back the network's own pool_3 features" in capsys.readouterr().err
    stats = tmp_path / "fid-stats.npz"
    np.savez(stats, mu=np.zeros(2048), sigma=np.eye(2048), detector=np.array("FID"))
    classifier = _script(TinyClassifier(), tmp_path / "classifier.pt")
    assert main(["eval", str(samples), "--ref", str(stats), "--metrics", "is,sfid", "--is-splits", "2", "--detector",
                 f"torchscript:{classifier}", "--detector", inception]) == 2
    assert "sFID needs the reference's spatial statistics (mu_s, sigma_s" in capsys.readouterr().err
    assert main([*base, "--metrics", "sfid", "--num", "1", "--detector", inception]) == 2
    assert "a Fréchet distance needs at least 2 samples for a covariance; the samples hold 1" in capsys.readouterr().err
