"""Fréchet distance, streaming statistics, image sources and detectors (ahpa.metrics)."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from ahpa.metrics import (
    KINDS,
    FeatureStats,
    compute_stats,
    fd_between,
    frechet_distance,
    iter_image_batches,
    load_detector,
    metric_name,
    reference_stats,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
R20 = SHARED / "detectors" / "cifar10-resnet20.pt"
CIFAR_TEST = SHARED / "data" / "cifar10" / "test.npz"
needs_shared = pytest.mark.skipif(
    not (R20.is_file() and CIFAR_TEST.is_file()),
    reason=f"shared detectors/data not found at {SHARED} (checkout without ../shared beside the repo)",
)


def random_spd(rng: np.random.Generator, d: int, n: int | None = None) -> np.ndarray:
    a = rng.standard_normal((n or 2 * d, d))
    return a.T @ a / len(a)


# --- Fréchet distance -----------------------------------------------------------------------------


def test_identical_statistics_give_zero():
    rng = np.random.default_rng(0)
    mu, sigma = rng.standard_normal(64), random_spd(rng, 64)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_diagonal_covariances_match_closed_form():
    rng = np.random.default_rng(1)
    d = 32
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    got = frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert isinstance(got, float)
    assert got == pytest.approx(expected, rel=1e-10, abs=1e-10)


def test_scaled_covariance_matches_closed_form():
    # S2 = c^2 S1  =>  tr sqrt(S1 S2) = c tr S1  =>  FD = |dmu|^2 + (1 - c)^2 tr S1.
    rng = np.random.default_rng(2)
    s1, c = random_spd(rng, 24), 1.7
    mu1, mu2 = rng.standard_normal(24), rng.standard_normal(24)
    expected = np.sum((mu1 - mu2) ** 2) + (1 - c) ** 2 * np.trace(s1)
    assert frechet_distance(mu1, s1, mu2, c * c * s1) == pytest.approx(expected, rel=1e-10)


def test_general_spd_matches_high_precision_reference():
    mpmath = pytest.importorskip("mpmath", reason="mpmath (a torch dependency) computes the reference")
    rng = np.random.default_rng(3)
    d = 8
    s1, s2 = random_spd(rng, d), random_spd(rng, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    with mpmath.workdps(50):
        # The non-symmetric product form, at 50 digits: a different route from ours (symmetric eigh).
        root = mpmath.sqrtm(mpmath.matrix(s1.tolist()) * mpmath.matrix(s2.tolist()))
        tr_root = sum(root[i, i] for i in range(d))
        ref = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * mpmath.re(tr_root))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-9)
    # Torch inputs give the same float.
    got_t = frechet_distance(*(torch.from_numpy(a) for a in (mu1, s1, mu2, s2)))
    assert got_t == pytest.approx(ref, rel=1e-9)


def test_rank_deficient_covariances_give_finite_result():
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((20, 64)), rng.standard_normal((30, 64)) + 0.5  # fewer samples than dims
    sa, sb = FeatureStats().update(a), FeatureStats().update(b)
    fd = sa.frechet_distance(sb)
    assert np.isfinite(fd) and fd > 0
    same = sa.frechet_distance(sa)
    assert np.isfinite(same) and 0 <= same < 1e-4 * np.trace(sa.cov)


def test_shape_mismatch_and_nonfinite_are_errors():
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="non-finite"):
        frechet_distance(np.zeros(2), np.eye(2) * np.nan, np.zeros(2), np.eye(2))


# --- streaming statistics -------------------------------------------------------------------------


def features(n: int = 1000, d: int = 16, seed: int = 5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) + 3.0  # correlated, offset mean


def test_streaming_equals_one_shot():
    x = features()
    stats = FeatureStats()
    for i, (lo, hi) in enumerate([(0, 7), (7, 300), (300, 301), (301, 1000)]):
        chunk = x[lo:hi]
        stats.update(torch.from_numpy(chunk) if i % 2 else chunk)  # torch and numpy batches mix
    assert stats.count == len(x)
    np.testing.assert_allclose(stats.mean, x.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.cov, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-10)


def test_merge_of_halves_equals_whole():
    x = features()
    whole = FeatureStats().update(x)
    a, b = FeatureStats().update(x[:400]), FeatureStats().update(x[400:])
    merged = a.merge(b)
    assert merged.count == whole.count
    np.testing.assert_allclose(merged.mean, whole.mean, rtol=1e-12)
    np.testing.assert_allclose(merged.cov, whole.cov, rtol=1e-10)
    # The flat tensor is what torch.distributed.all_reduce would sum.
    summed = FeatureStats().update(x[:400]).to_tensor() + FeatureStats().update(x[400:]).to_tensor()
    reduced = FeatureStats.from_tensor(summed)
    assert reduced.count == whole.count
    np.testing.assert_allclose(reduced.cov, whole.cov, rtol=1e-10)
    # An empty shard that knows its dimension reduces too.
    assert FeatureStats.from_tensor(FeatureStats(16).to_tensor() + whole.to_tensor()).count == whole.count


def test_save_load_round_trip(tmp_path):
    x = features()
    stats = FeatureStats().update(x[:600])
    stats.save(tmp_path / "s.npz", detector="FD-r20")
    back = FeatureStats.load(tmp_path / "s.npz")
    assert back.count == 600 and back.detector == "FD-r20"
    np.testing.assert_allclose(back.mean, stats.mean, rtol=1e-12)
    np.testing.assert_allclose(back.cov, stats.cov, rtol=1e-12)
    # The count makes the sums exact again: a loaded file can keep accumulating.
    back.update(x[600:])
    np.testing.assert_allclose(back.cov, np.cov(x, rowvar=False), rtol=1e-9)


def test_adm_reference_batch_accepted(tmp_path):
    x = features()
    mu, sigma = x.mean(0), np.cov(x, rowvar=False)
    np.savez(tmp_path / "ref.npz", mu=mu, sigma=sigma)  # ADM reference batches: mu/sigma, no count
    ref = FeatureStats.load(tmp_path / "ref.npz")
    np.testing.assert_array_equal(ref.mean, mu)
    assert ref.frechet_distance(FeatureStats().update(x)) < 1e-8
    with pytest.raises(ValueError, match="merged"):
        ref.merge(FeatureStats().update(x))
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        FeatureStats.load(tmp_path / "nope.npz")


# --- detectors and image sources ------------------------------------------------------------------


class _Pool(torch.nn.Module):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(images.float(), 2).flatten(1)  # [N, 12]


@pytest.fixture
def tiny_detector_file(tmp_path) -> Path:
    path = tmp_path / "cifar10-resnet32.pt"
    with warnings.catch_warnings():
        # torch >= 2.10 deprecates jit.script (a DeprecationWarning to 2.13, a FutureWarning from 2.14); files stay valid
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+.* is deprecated")
        torch.jit.script(_Pool()).save(str(path))
    return path


def test_metric_naming(tmp_path, tiny_detector_file):
    assert metric_name("torchscript", "x/cifar10-resnet20.pt") == "FD-r20"
    assert metric_name("torchscript", "cifar10-resnet32.pt") == "FD-r32"
    assert metric_name("torchscript", "my_net.pt") == "FD-my_net"
    assert metric_name("inception", "pt_inception.pth") == "FID"
    assert metric_name("dinov2", "weights/dinov2-b") == "FD-DINOv2"
    det = load_detector(f"torchscript:{tiny_detector_file}")
    assert det.name == "FD-r32" and det.dim == 12 and not det.has_logits
    with pytest.raises(NotImplementedError, match="logits"):
        det.logits(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    other = tmp_path / "foo.pt"
    other.write_bytes(tiny_detector_file.read_bytes())
    assert load_detector(f"torchscript:{other}").name == "FD-foo"


def test_loading_a_torchscript_detector_warns_the_user_of_nothing(tiny_detector_file):
    """torch 2.10 to 2.13 warn on every torch.jit.load with a DeprecationWarning, which Python hides outside __main__;
    torch 2.14 and 2.15 give the same message as a FutureWarning, which it shows, so each `ahpa eval` printed it while
    the filter named the first category only. Before torch 2.10 nothing warns and this checks that nothing else does."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_detector(f"torchscript:{tiny_detector_file}")
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []


def test_detector_spec_errors(tmp_path, tiny_detector_file):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_detector(f"torchscript:{tmp_path / 'missing.pt'}")
    with pytest.raises(ValueError, match=", ".join(KINDS)):
        load_detector(f"clip:{tiny_detector_file}")
    with pytest.raises(ValueError, match="KIND:PATH"):
        load_detector(str(tiny_detector_file))
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_detector(f"dinov2:{tiny_detector_file}")
    with pytest.raises(FileNotFoundError, match="no-dino"):
        load_detector(f"dinov2:{tmp_path / 'no-dino'}")
    det = load_detector(f"torchscript:{tiny_detector_file}")
    with pytest.raises(TypeError, match="uint8"):
        det.features(torch.zeros(1, 3, 8, 8))


def test_image_sources_agree(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(6)
    imgs = rng.integers(0, 256, (7, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "adm.npz", arr_0=imgs)
    np.savez_compressed(tmp_path / "ours.npz", images=imgs, labels=np.arange(7))
    folder = tmp_path / "pngs"
    (folder / "sub").mkdir(parents=True)
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(folder / ("sub" if i % 2 else "") / f"{i:03d}.png")
    (folder / "notes.txt").write_text("ignored")
    for src in (tmp_path / "adm.npz", tmp_path / "ours.npz", imgs, iter([imgs[:3], imgs[3:]])):
        got = np.concatenate([np.asarray(b) for b in iter_image_batches(src, 3)])
        np.testing.assert_array_equal(got, imgs)
    # Folder order is the sorted relative path order.
    got = np.concatenate(list(iter_image_batches(folder, 3)))
    order = sorted(range(7), key=lambda i: ("sub/" if i % 2 else "") + f"{i:03d}.png")
    np.testing.assert_array_equal(got, imgs[order])
    # Sharding: two ranks together see every image once; max_images cuts before sharding.
    shards = [list(iter_image_batches(tmp_path / "ours.npz", 2, rank=r, world_size=2, max_images=5)) for r in (0, 1)]
    assert [len(b) for b in shards[0]] == [2, 1] and [len(b) for b in shards[1]] == [2]
    Image.fromarray(imgs[0][:4]).convert("L").save(folder / "zz-small-gray.png")
    with pytest.raises(ValueError, match=r"pngs: 'zz-small-gray.png' is \(4, 8\), but '000.png' is \(8, 8\): .*\(ahpa eval --resolution R"):
        list(iter_image_batches(folder, 10))
    with pytest.raises(ValueError, match="arr_0 or images"):
        np.savez(tmp_path / "none.npz", x=np.zeros(3))
        iter_image_batches(tmp_path / "none.npz", 2)


def test_sharded_stats_merge_to_whole(tmp_path, tiny_detector_file):
    det = load_detector(f"torchscript:{tiny_detector_file}")
    imgs = np.random.default_rng(7).integers(0, 256, (50, 8, 8, 3), dtype=np.uint8)
    whole = compute_stats(imgs, det, batch_size=8)
    parts = [compute_stats(imgs, det, batch_size=8, rank=r, world_size=3) for r in range(3)]
    merged = parts[0].merge(parts[1]).merge(parts[2])
    assert merged.count == whole.count == 50
    np.testing.assert_allclose(merged.cov, whole.cov, rtol=1e-10)


def test_unreadable_npz_and_wrong_layouts_say_what_to_fix(tmp_path):
    from ahpa.metrics.measurement import is_stats_file

    garbage = tmp_path / "garbage.npz"
    garbage.write_text("notanpz\n")
    for call in (lambda: iter_image_batches(garbage, 2), lambda: is_stats_file(garbage)):
        with pytest.raises(ValueError, match=r"garbage.npz' is not a readable .npz \(zip\) archive.*arr_0 or images"):
            call()
    # the array's real shape (N included) and the usual fix
    np.savez(tmp_path / "nchw.npz", arr_0=np.zeros((20, 3, 8, 8), np.uint8))
    with pytest.raises(ValueError, match=r"uint8 \(20, 3, 8, 8\); channels come first \(NCHW\): transpose to \[N, H, W, 3\]"):
        list(iter_image_batches(tmp_path / "nchw.npz", 4))
    np.savez(tmp_path / "float.npz", images=np.zeros((20, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"float32 \(20, 8, 8, 3\); floats: scale to 0-255, round and cast to uint8"):
        list(iter_image_batches(tmp_path / "float.npz", 4))
    with pytest.raises(ValueError, match="scale to 0-255"):
        list(iter_image_batches(torch.zeros(4, 8, 8, 3), 4))


def test_folder_reads_what_prepare_reads_and_names_a_corrupt_file(tmp_path):
    from PIL import Image

    imgs = np.random.default_rng(8).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    for im, name in zip(imgs, ("a.bmp", "b.tiff", "c.webp", "d.png")):
        Image.fromarray(im).save(tmp_path / name, **({"lossless": True} if name.endswith(".webp") else {}))
    np.testing.assert_array_equal(np.concatenate(list(iter_image_batches(tmp_path, 4))), imgs)
    jpeg = io.BytesIO()
    Image.fromarray(imgs[0]).save(jpeg, "JPEG")
    (tmp_path / "e.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    # skipped and named, as prepare skips it: failing there would lose the measurement of every image before it
    with pytest.warns(UserWarning, match=r"skipped 1 file\(s\) that cannot be decoded \(e.jpg: corrupt or truncated"):
        np.testing.assert_array_equal(np.concatenate(list(iter_image_batches(tmp_path, 3))), imgs)
    (tmp_path / "e.jpg").unlink()
    (tmp_path / "._d.png").write_bytes(b"macOS resource fork")  # hidden files are no images, as in prepare
    (tmp_path / ".cache").mkdir()
    Image.fromarray(imgs[0]).save(tmp_path / ".cache" / "x.png")
    assert len(np.concatenate(list(iter_image_batches(tmp_path, 8)))) == 4


def test_a_folder_at_a_resolution_reads_the_pixels_prepare_trains_on(tmp_path):
    """Photos of several sizes (a user's own reference folder) are read at R as `ahpa prepare` crops them, and the
    reference cache keys them apart from the folder read as it is."""
    from PIL import Image

    from ahpa.data.listing import decode_all, list_source
    from ahpa.metrics.images import ImageFolder
    from ahpa.metrics.reference import reference_key

    rng = np.random.default_rng(9)
    for name, (h, w) in {"a/wide.png": (12, 20), "a/tall.jpg": (24, 10), "b/small.png": (5, 7), "b/square.png": (8, 8)}.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / name)
    (tmp_path / "b" / "broken.png").write_bytes(b"\x89PNG\r\n")
    with pytest.warns(UserWarning, match="broken.png"):
        got = np.concatenate(list(iter_image_batches(ImageFolder(tmp_path, 8), 2)))
    want, skipped = decode_all(list_source(tmp_path, "none"), 8)
    assert got.shape == (4, 8, 8, 3) and [name for name, _ in skipped] == ["b/broken.png"]
    np.testing.assert_array_equal(got, want)
    with pytest.warns(UserWarning, match="broken.png"):  # decoded by two worker processes: the same batches
        np.testing.assert_array_equal(np.concatenate(list(iter_image_batches(ImageFolder(tmp_path, 8, workers=2), 2))), got)
    (tmp_path / "b" / "broken.png").unlink()
    det = type("D", (), {"name": "FD-x", "spec": None})()
    keys = {reference_key(src, det) for src in (tmp_path, ImageFolder(tmp_path), ImageFolder(tmp_path, 8), ImageFolder(tmp_path, 16))}
    assert len(keys) == 3  # a plain path and ImageFolder(path) are one source


def test_folder_images_decode_as_prepare_decodes_them(tmp_path):
    """A 16-bit PNG is rescaled, not clipped to white, and transparency lies on white, as in the training data."""
    from PIL import Image

    grey16 = np.full((8, 8), 32896, dtype=np.uint16)  # 32896 / 257 = 128
    Image.fromarray(grey16).save(tmp_path / "a.png")
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)  # black, fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "b.png")
    from ahpa.metrics.images import ConvertedImagesWarning

    with pytest.warns(ConvertedImagesWarning, match=r"\(1 I;16->RGB, 1 RGBA\+alpha->RGB; the first: a.png\)"):
        a, b = np.concatenate(list(iter_image_batches(tmp_path, 2)))
    assert (a == 128).all() and (b == 255).all()


def test_a_damaged_npz_is_named(tmp_path):
    import zipfile

    # an array shorter than its header says (a writer that died mid-way, with the zip closed properly)
    member = io.BytesIO()
    np.lib.format.write_array_header_1_0(member, {"descr": "|u1", "fortran_order": False, "shape": (64, 8, 8, 3)})
    with zipfile.ZipFile(tmp_path / "short.npz", "w") as z:
        z.writestr("arr_0.npy", member.getvalue() + bytes(32 * 8 * 8 * 3))
    with pytest.raises(ValueError, match=r"short.npz': the array is shorter than its header says"):
        list(iter_image_batches(tmp_path / "short.npz", 16))
    # damaged bytes inside a stored member: the zip's CRC check fails at the end of the member
    np.savez(tmp_path / "full.npz", arr_0=np.zeros((64, 8, 8, 3), np.uint8))
    data = bytearray((tmp_path / "full.npz").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "flipped.npz").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"flipped.npz' is damaged .*CRC"):
        list(iter_image_batches(tmp_path / "flipped.npz", 16))


def test_evaluate_from_python_warns_what_the_command_says(tmp_path, tiny_detector_file):
    """ahpa.metrics.evaluate (a notebook) gives the command's caveats as EvaluationWarning: fewer images than asked
    for, a resolution gap, and a rank-deficient covariance on either side; none for a fair evaluation."""
    import warnings

    from ahpa.metrics import load_detector
    from ahpa.metrics import EvaluationWarning, evaluate

    rng = np.random.default_rng(3)
    small, big = tmp_path / "small.npz", tmp_path / "big.npz"
    np.savez(small, arr_0=rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8))
    np.savez(big, arr_0=rng.integers(0, 256, (10, 16, 16, 3), dtype=np.uint8))
    det = load_detector(f"torchscript:{tiny_detector_file}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        evaluate(small, big, det, num=50, batch_size=8)
    said = [str(w.message) for w in caught if w.category is EvaluationWarning]
    assert len(said) == 3 and said[0].startswith("50 samples asked for, but the samples gave 20 images")
    assert said[1].startswith(f"10 reference images for {det.dim} features") and "samples are 8x8 but" in said[2]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        evaluate(small, small, det, batch_size=8)
    assert not [w for w in caught if w.category is EvaluationWarning]


def test_eval_command_errors_and_size_warning(tmp_path, tiny_detector_file, capsys):
    from ahpa.cli import main

    rng = np.random.default_rng(9)
    small, big, garbage = tmp_path / "small.npz", tmp_path / "big.npz", tmp_path / "garbage.npz"
    np.savez(small, arr_0=rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8))
    np.savez(big, images=rng.integers(0, 256, (30, 16, 16, 3), dtype=np.uint8))
    garbage.write_text("notanpz\n")
    det = ["--detector", f"torchscript:{tiny_detector_file}", "--batch", "8"]
    # an unreadable .npz, as samples or as reference: one line naming it, not a traceback
    for samples, ref in ((garbage, big), (small, garbage)):
        assert main(["eval", str(samples), "--ref", str(ref), *det, "--no-ref-cache"]) == 2
        assert "garbage.npz' is not a readable .npz (zip) archive" in capsys.readouterr().err
    # a reference that is no image source (a model file, a file list) is refused before the samples are measured
    for name in ("model.safetensors", "list.txt"):
        (tmp_path / name).write_bytes(b"x")
        assert main(["eval", str(small), "--ref", str(tmp_path / name), *det, "--no-ref-cache"]) == 2
        err = capsys.readouterr().err
        assert "--ref " in err and "is neither a folder of images nor an .npz" in err and "img" not in err  # no bar began
    # folders that are no images, named before any sample is measured: a run, a prepared cache, no image files
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "config.yaml").write_text("{}")
    (tmp_path / "cache" / "shards").mkdir(parents=True)
    (tmp_path / "cache" / "manifest.json").write_text("{}")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    for folder, message in (("run", "is a training run, not images: sample it first (ahpa sample --run"),
                            ("cache", "is a prepared cache (latents), not images"), ("notes", "no images found under")):
        assert main(["eval", str(small), "--ref", str(tmp_path / folder), *det, "--no-ref-cache"]) == 2
        err = capsys.readouterr().err
        assert message in err and "img" not in err.replace("images", ""), err
    # the progress bar is closed before the error is printed, so that the error starts a line of its own
    np.savez(tmp_path / "nokey.npz", x=np.zeros(3))
    assert main(["eval", str(tmp_path / "nokey.npz"), "--ref", str(big), *det, "--no-ref-cache"]) == 2
    err = capsys.readouterr().err
    at = err.index("ahpa eval: error:")
    assert at == 0 or err[at - 1] in "\r\n", repr(err)
    # different sizes: one warning, also when the reference's statistics come from the cache
    argv = ["eval", str(small), "--ref", str(big), *det, "--ref-cache", str(tmp_path / "cache")]
    for _ in range(2):
        assert main(argv) == 0
        err = capsys.readouterr().err
        assert err.count("warning: samples are 8x8 but the reference is 16x16") == 1 and "ahpa eval --resolution 8" in err
    assert main(["eval", str(small), "--ref", str(small), *det, "--no-ref-cache"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert main(["eval", str(small), "--ref", str(small), *det, "--no-ref-cache", "--num", "50"]) == 0
    assert "warning: 50 samples asked for, but the samples gave " in capsys.readouterr().err
    # a reference folder of photos of several sizes: read at --resolution as prepare reads it, and no size warning
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    for i, (h, w) in enumerate([(10, 14), (16, 9), (8, 8), (30, 20)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(photos / f"{i}.png")
    from unittest import mock

    import ahpa.metrics.evaluation as evaluation

    with mock.patch.object(evaluation, "measure", side_effect=evaluation.measure) as samples_read:
        assert main(["eval", str(small), "--ref", str(photos), *det, "--no-ref-cache"]) == 2
    # which R: the samples' side (a user's first guess was the training images', which vary)
    assert "need a resolution to be read at (ahpa eval --resolution R, R the samples' side" in capsys.readouterr().err
    assert not samples_read.called  # refused before the samples' work (minutes for 50K in a real evaluation)
    assert main(["eval", str(small), "--ref", str(photos), *det, "--no-ref-cache", "--resolution", "8"]) == 0
    out, err = capsys.readouterr()
    # 4 reference photos for 12 features: a rank-deficient reference covariance is said as the samples' is
    assert "(20 samples vs 4 reference)" in out and err.count("warning") == 1
    assert "warning: 4 reference images for 12 features (FD-r32): the covariance is rank-deficient" in err
    # a file that cannot be decoded: skipped, and said in the command's own words (not a Python warning)
    (photos / "broken.png").write_bytes(b"not a png")
    assert main(["eval", str(photos), "--ref", str(small), *det, "--no-ref-cache", "--resolution", "8"]) == 0
    err = capsys.readouterr().err
    assert "ahpa eval: warning: " in err and "skipped 1 file(s) that cannot be decoded (broken.png" in err
    # as many samples as features or fewer: the covariance is rank-deficient, and the command says so
    assert "4 samples for 12 features (FD-r32): the covariance is rank-deficient" in err
    # when nothing could be decoded the command fails, and the warning that explains why is still said, first
    # (two files: one alone is refused before any is read, as too few for a covariance)
    (tmp_path / "all-broken").mkdir()
    for name in ("1.png", "2.png"):
        (tmp_path / "all-broken" / name).write_bytes(b"not a png")
    assert main(["eval", str(tmp_path / "all-broken"), "--ref", str(small), *det, "--no-ref-cache"]) == 2
    err = capsys.readouterr().err
    assert err.index("skipped 2 file(s) that cannot be decoded (1.png") < err.index("ahpa eval: error:")


@needs_shared
def test_resnet20_detector_features_and_accuracy():
    det = load_detector(f"torchscript:{R20}")
    assert det.name == "FD-r20" and det.has_logits
    with np.load(CIFAR_TEST) as f:
        labels = f["labels"][:400]
    (imgs,) = list(iter_image_batches(CIFAR_TEST, 400, max_images=400))
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2)
    feats = det.features(x)
    assert feats.shape == (400, 64) and feats.dtype == torch.float32 and torch.isfinite(feats).all()
    acc = (det.logits(x).argmax(1).numpy() == labels).mean()
    assert acc > 0.85, f"resnet20 accuracy {acc:.3f} on 400 CIFAR-10 test images (published 91.7% on all)"


@needs_shared
def test_fd_between_and_reference_stats(tmp_path):
    det = load_detector(f"torchscript:{R20}")
    (imgs,) = list(iter_image_batches(CIFAR_TEST, 300, max_images=300))
    np.savez(tmp_path / "ref.npz", images=imgs)
    same = fd_between(imgs, tmp_path / "ref.npz", det, batch_size=100)
    assert set(same) == {"FD-r20"} and same["FD-r20"] < 1e-6
    stats = compute_stats(imgs[:150], det)
    stats.save(tmp_path / "stats.npz")  # tagged FD-r20 by compute_stats
    assert reference_stats(tmp_path / "stats.npz", det).count == 150
    half = fd_between(imgs[150:], tmp_path / "stats.npz", det)["FD-r20"]
    assert 0 < half < 10
    FeatureStats.load(tmp_path / "stats.npz").save(tmp_path / "other.npz", detector="FD-r32")
    with pytest.raises(ValueError, match="FD-r32, not FD-r20"):
        reference_stats(tmp_path / "other.npz", det)


def test_a_detector_file_replaced_in_place_gets_a_new_reference_key(tmp_path):
    """the key holds the detector file's identity (size, mtime), not only its path: new weights under the
    same name must not reuse statistics measured with the old ones."""
    import os

    from ahpa.metrics.reference import reference_key

    ref = tmp_path / "ref.npz"
    np.savez(ref, images=np.zeros((2, 8, 8, 3), np.uint8))
    det_file = tmp_path / "net-resnet20.pt"
    det_file.write_bytes(b"old weights")
    det = type("D", (), {"name": "FD-r20", "spec": f"torchscript:{det_file}"})()
    first = reference_key(ref, det)
    assert reference_key(ref, det) == first
    st = det_file.stat()
    det_file.write_bytes(b"new weights")  # same size
    os.utime(det_file, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert reference_key(ref, det) != first


def test_a_reference_folder_is_listed_once_per_process_until_files_come_or_go(tmp_path, monkeypatch):
    """Keying a folder lists and stats every file (19 s for ImageNet's 1.28M): a run keys its reference twice per
    detector when it starts, so the listing is kept while the folder's and its sub-folders' times stay the same."""
    import os

    from PIL import Image

    from ahpa.metrics import reference

    (tmp_path / "ref" / "cats").mkdir(parents=True)
    for k in range(3):
        Image.fromarray(np.full((8, 8, 3), k, np.uint8)).save(tmp_path / "ref" / "cats" / f"{k}.png")
    listed = []
    monkeypatch.setattr(reference, "image_files", lambda p, real=reference.image_files: listed.append(p) or real(p))
    det = type("D", (), {"name": "FD-x", "spec": None})()
    first = reference.reference_key(tmp_path / "ref", det)
    assert reference.reference_key(tmp_path / "ref", det) == first and len(listed) == 1
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "ref" / "cats" / "3.png")
    st = os.stat(tmp_path / "ref" / "cats")  # a coarse clock could leave the folder's time as it was
    os.utime(tmp_path / "ref" / "cats", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert reference.reference_key(tmp_path / "ref", det) != first and len(listed) == 2


def test_ahpas_own_warnings_are_one_line_under_the_cli(capsys, monkeypatch):
    """Under the CLI a warning of ahpa's (a skipped file in a run's evaluation reference) is `ahpa: warning: ...`,
    not Python's file:line: Category: message plus a line of source; other libraries' keep Python's format."""
    import warnings

    from ahpa.cli import main
    from ahpa.metrics.images import SkippedFilesWarning

    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # restored after the test
    main(["compare", "/nonexistent"])  # any command sets the format
    capsys.readouterr()
    ours = warnings.formatwarning(SkippedFilesWarning("ref: skipped 1 file(s)"), SkippedFilesWarning, "m.py", 66)
    theirs = warnings.formatwarning(RuntimeWarning("from elsewhere"), RuntimeWarning, "x.py", 3, "")
    assert ours == "ahpa: warning: ref: skipped 1 file(s)\n" and theirs == "x.py:3: RuntimeWarning: from elsewhere\n"
    installed = warnings.formatwarning
    main(["compare", "/nonexistent"])  # again in this process (a notebook, a test suite): not wrapped once more per
    capsys.readouterr()  # call, which would nest without end and overflow the stack after ~1000 commands
    assert warnings.formatwarning is installed


def test_eval_options_are_checked_before_any_image_is_measured(tmp_path, tiny_detector_file, capsys, monkeypatch):
    """A bad --pr-num, --pr-k, --is-splits, --num or --batch is one line naming the option and the fix, said before the
    first image is read: it used to fail after the reference's pass (--is-splits 0, --pr-k 0), or with a traceback
    (--pr-num 0: "Could not infer dtype of NoneType"; -5: "'NoneType' object has no attribute 'cpu'")."""
    from ahpa.cli import main
    from ahpa.metrics import evaluate
    from ahpa.metrics import measurement

    rng = np.random.default_rng(4)
    data = tmp_path / "s.npz"
    np.savez(data, arr_0=rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8))
    monkeypatch.setattr(measurement, "iter_image_batches", lambda *a, **k: pytest.fail("an image was read"))
    base = ["eval", str(data), "--ref", str(data), "--detector", f"torchscript:{tiny_detector_file}", "--no-ref-cache"]
    cases = [(["--metrics", "pr", "--pr-num", "0"], "--pr-num must be larger than --pr-k (3): "),
             (["--metrics", "pr", "--pr-num", "-5"], "--pr-num must be larger than --pr-k (3): "),
             (["--metrics", "pr", "--pr-num", "3"], "--pr-num must be larger than --pr-k (3): "),
             (["--metrics", "pr", "--pr-k", "0"], "--pr-k must be at least 1 "),
             (["--metrics", "fd,is", "--is-splits", "0"], "--is-splits must be at least 1 "),
             (["--num", "0"], "--num must be at least 1 "),
             (["--num", "-1"], "--num must be at least 1 "),
             (["--batch", "0"], "--batch must be at least 1 "),
             # against the 12 samples the .npz's header counts: found after the samples' pass before
             (["--metrics", "pr", "--pr-k", "12"], "--pr-k 12 needs more than 12 samples (each needs 12 neighbours); "
                                                    "the samples hold 12"),
             (["--metrics", "is", "--is-splits", "13"], "--is-splits 13 needs at least that many samples; the samples hold 12"),
             (["--num", "1"], "a Fréchet distance needs at least 2 samples for a covariance; the samples hold 1")]
    for extra, message in cases:
        assert main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith(f"ahpa eval: error: {message}") and err.count("\n") == 1, err
    # a folder of samples is counted by its image files before any is decoded (it was counted only when read)
    from PIL import Image

    folder = tmp_path / "samples"
    folder.mkdir()
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    assert main(["eval", str(folder), *base[2:], "--metrics", "is", "--is-splits", "6"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ahpa eval: error: --is-splits 6 needs at least that many samples; the samples hold 5"), err
    # unused settings are not held against a call: --pr-num 0 without pr
    monkeypatch.undo()
    assert main([*base, "--pr-num", "0", "--is-splits", "0"]) == 0
    # from Python, under the parameters' own names, before any image is read
    monkeypatch.setattr(measurement, "iter_image_batches", lambda *a, **k: pytest.fail("an image was read"))
    det = load_detector(f"torchscript:{tiny_detector_file}")
    with pytest.raises(ValueError, match=r"^pr_num must be larger than pr_k \(3\)"):
        evaluate(data, data, det, ("fd", "pr"), pr_num=0)


def test_a_folder_with_undecodable_files_is_checked_again_against_the_images_that_decode(tmp_path, tiny_detector_file,
                                                                                          capsys):
    """A folder's files are counted before any is decoded; one that does not decode leaves fewer samples than that
    count, and --pr-k (or --is-splits) fitting the count but not the images failed with the math's own message ("need
    1 <= k < number of points; got k=4 with 4 points"), naming no option."""
    from PIL import Image

    from ahpa.cli import main

    rng = np.random.default_rng(5)
    folder = tmp_path / "samples"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "broken.png").write_text("not an image")
    base = ["eval", str(folder), "--ref", str(folder), "--detector", f"torchscript:{tiny_detector_file}",
            "--no-ref-cache", "--workers", "0"]
    assert main([*base, "--metrics", "pr", "--pr-k", "4"]) == 2
    err = capsys.readouterr().err
    assert "skipped 1 file(s) that cannot be decoded (broken.png" in err
    assert "ahpa eval: error: --pr-k 4 needs more than 4 samples (each needs 4 neighbours); the samples hold 4\n" in err


def test_nothing_to_measure_names_the_source_and_why(tmp_path, tiny_detector_file, capsys):
    """An empty .npz, an empty array or a folder none of whose files decodes used to end in "no features accumulated",
    which names neither the source nor the reason."""
    from ahpa.cli import main
    from ahpa.metrics import measure

    rng = np.random.default_rng(6)
    data, empty = tmp_path / "data.npz", tmp_path / "empty.npz"
    np.savez(data, arr_0=rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8))
    np.savez(empty, arr_0=np.zeros((0, 8, 8, 3), np.uint8))
    (tmp_path / "f32").mkdir()
    for i in range(2):
        from PIL import Image

        Image.fromarray(np.zeros((8, 8), np.float32), mode="F").save(tmp_path / "f32" / f"{i}.tif")
    det = ["--detector", f"torchscript:{tiny_detector_file}", "--no-ref-cache"]
    for samples, ref, message in ((empty, data, f"{str(empty)!r} holds 0 images: nothing to measure"),
                                  (data, empty, f"{str(empty)!r} holds 0 images: nothing to measure"),
                                  (tmp_path / "f32", data, f"no image of {tmp_path / 'f32'} could be decoded (2 skipped; "
                                                            "0.tif: 32-bit float image (mode F)")):
        assert main(["eval", str(samples), "--ref", str(ref), *det]) == 2
        err = capsys.readouterr().err
        assert f"ahpa eval: error: {message}" in err and "no features accumulated" not in err, err
    detector = load_detector(f"torchscript:{tiny_detector_file}")
    with pytest.raises(ValueError, match="^the image array held 0 images: nothing to measure"):
        measure(np.zeros((0, 8, 8, 3), np.uint8), detector)
    with pytest.raises(ValueError, match=r"^max_images=0: nothing to measure \(it must be at least 1\)"):
        measure(data, detector, max_images=0)


def test_a_folder_of_images_converted_to_rgb_is_counted_in_a_warning(tmp_path, tiny_detector_file, capsys):
    """A sample dump saved as grayscale (or palette) PNGs used to be converted to RGB without a word, and scored a
    much worse FD (43.5 against 37.3 for the same images in colour): the conversions are now counted, by kind."""
    from PIL import Image

    from ahpa.cli import main
    from ahpa.metrics.images import ConvertedImagesWarning

    rng = np.random.default_rng(8)
    data = tmp_path / "data.npz"
    np.savez(data, arr_0=rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8))
    folder = tmp_path / "dump"
    folder.mkdir()
    for i in range(5):
        rgb = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        (rgb.convert("L") if i in (1, 3) else rgb.convert("P") if i == 4 else rgb).save(folder / f"{i}.png")
    with pytest.warns(ConvertedImagesWarning, match=r"dump: 3 of 5 image\(s\) were not RGB and were converted "
                                                    r"\(2 L->RGB, 1 P->RGB; the first: 1.png\)"):
        list(iter_image_batches(folder, 2))
    det = ["--detector", f"torchscript:{tiny_detector_file}", "--no-ref-cache"]
    assert main(["eval", str(folder), "--ref", str(data), *det]) == 0
    assert capsys.readouterr().err.count(f"ahpa eval: warning: {folder}: 3 of 5 image(s) were not RGB") == 1
    for i in (1, 3, 4):  # the same folder in RGB: nothing to say
        Image.open(folder / f"{i}.png").convert("RGB").save(folder / f"{i}.png")
    assert main(["eval", str(folder), "--ref", str(data), *det]) == 0
    assert "were not RGB" not in capsys.readouterr().err
    # fully opaque RGBA (many tools write it): the same pixels as RGB, and no conversion to count
    before = np.concatenate(list(iter_image_batches(folder, 5)))
    for i in range(5):
        Image.open(folder / f"{i}.png").convert("RGBA").save(folder / f"{i}.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvertedImagesWarning)
        np.testing.assert_array_equal(np.concatenate(list(iter_image_batches(folder, 5))), before)


def test_the_rank_deficiency_caveat_holds_up_to_as_many_samples_as_features():
    """n samples give a covariance of rank at most n - 1: with exactly as many samples as the detector has features
    it is still singular (the FD biased upward), and the caveat is said; one more sample and it is not."""
    from types import SimpleNamespace

    from ahpa.metrics.evaluation import caveats

    det = SimpleNamespace(dim=16, name="tiny")

    def stats(count):
        return SimpleNamespace(count=count, image_size=(8, 8))

    assert caveats(stats(16), stats(100), det, None, fd=True) == [
        "16 samples for 16 features (tiny): the covariance is rank-deficient and the Fréchet distance biased upward; "
        "compare only figures of the same number of samples"]
    assert caveats(stats(17), stats(100), det, None, fd=True) == []
    assert caveats(stats(16), stats(100), det, None, fd=False) == []  # no Fréchet distance asked for


def test_a_warning_every_detector_gives_alike_is_said_once(tmp_path, tiny_detector_file, capsys):
    """With two detectors (FID and FD-DINOv2 in one call) the samples' size gap is the same for both: it is said once,
    not once per detector, so that one problem does not read as two."""
    import shutil

    from ahpa.cli import main

    rng = np.random.default_rng(0)
    small, big = tmp_path / "small.npz", tmp_path / "big.npz"
    np.savez(small, arr_0=rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8))
    np.savez(big, arr_0=rng.integers(0, 256, (20, 16, 16, 3), dtype=np.uint8))
    other = shutil.copy(tiny_detector_file, tmp_path / "cifar10-resnet20.pt")
    argv = ["eval", str(small), "--ref", str(big), "--detector", f"torchscript:{tiny_detector_file}",
            "--detector", f"torchscript:{other}", "--batch", "8", "--no-ref-cache"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "FD-r32" in out and "FD-r20" in out
    assert err.count("warning: samples are 8x8 but the reference is 16x16") == 1


def test_an_exif_turn_is_no_conversion_to_rgb(tmp_path):
    """Photos turned upright by their EXIF orientation are RGB as they are: only a conversion to RGB (grayscale,
    palette, alpha) is counted, and a turned grayscale image is counted by that conversion."""
    import warnings

    from PIL import Image

    from ahpa.metrics.images import ConvertedImagesWarning

    rng = np.random.default_rng(5)
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        img = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        exif = Image.Exif()
        exif[0x0112] = 6  # the Orientation tag: turned 90 degrees
        img.save(folder / f"{i}.jpg", exif=exif)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvertedImagesWarning)
        assert np.concatenate(list(iter_image_batches(folder, 3))).shape == (3, 8, 8, 3)
    Image.open(folder / "1.jpg").convert("L").save(folder / "1.jpg", exif=exif)
    with pytest.warns(ConvertedImagesWarning, match=r"1 of 3 image\(s\) were not RGB and were converted \(1 L->RGB;"):
        list(iter_image_batches(folder, 3))
