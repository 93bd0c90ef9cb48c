"""Inception Score, precision/recall, the Inception and DINOv2 detectors, and `ahpa eval` with its cache."""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ahpa.metrics import compute_stats, inception_score, load_detector, precision_recall
from ahpa.metrics.precision_recall import knn_radii
from tests.conftest import SHARED

# --- Inception Score: closed forms ----------------------------------------------------------------


def test_inception_score_closed_forms():
    k = 8
    confident = torch.eye(k).repeat(25, 1)  # every class equally often, each image certain: IS = K
    mean, std = inception_score(confident, splits=5)
    assert mean == pytest.approx(k, rel=1e-12) and std == pytest.approx(0, abs=1e-12)
    undecided = torch.full((200, k), 1.0 / k)  # every image says "any class": IS = 1
    assert inception_score(undecided, splits=4)[0] == pytest.approx(1.0, rel=1e-12)
    # splits are contiguous parts in stored order: a confident half (IS 4) then an undecided half (IS 1)
    half = torch.cat([torch.eye(4).repeat(10, 1), torch.full((40, 4), 0.25)])
    mean, std = inception_score(half, splits=2)
    assert mean == pytest.approx(2.5) and std == pytest.approx(1.5)
    # one class collapsing onto another halves the score of a 2-class confident model
    assert inception_score(torch.tensor([[1.0, 0.0]] * 10), splits=1)[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="splits"):
        inception_score(torch.eye(3), splits=10)


# --- precision / recall ---------------------------------------------------------------------------


def test_knn_radii_by_hand():
    pts = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    assert knn_radii(pts, k=1).tolist() == [1.0, 1.0, 2.0, 4.0]
    assert knn_radii(pts, k=2, block=3).tolist() == [3.0, 2.0, 3.0, 6.0]
    with pytest.raises(ValueError, match="k=4"):
        knn_radii(pts, k=4)


def test_precision_recall_modes():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 16, generator=g)
    b = torch.randn(400, 16, generator=g) + 40.0  # a second, far-away mode
    real = torch.cat([a, b])
    assert precision_recall(real, real) == (1.0, 1.0)
    # samples from one of the two modes only: all realistic, half the data covered
    p, r = precision_recall(real, a + 0.01, block=128)
    assert p == 1.0 and r == 0.5
    # samples nowhere near the data: neither realistic nor covering
    assert precision_recall(real, torch.randn(300, 16, generator=g) - 40.0) == (0.0, 0.0)
    with pytest.raises(ValueError, match="dimensions differ"):
        precision_recall(real, torch.zeros(10, 8))


# --- detectors ------------------------------------------------------------------------------------


class FakeInception(nn.Module):
    """The interface of NVIDIA's TorchScript Inception-v3: uint8-range images of any size in, pool
    features (2048) with return_features, softmax probabilities (1008) otherwise."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.feat = nn.Linear(3, 2048)
        self.out = nn.Linear(2048, 1008)

    def pool_features(self, img: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(img.to(torch.float32), size=(299, 299), mode="bilinear", align_corners=False)
        return torch.tanh(self.feat(x.mean(dim=(2, 3)) / 128.0 - 1.0))  # [N, 2048]

    def forward(self, img: torch.Tensor, return_features: bool = False, use_fp16: bool = False,
                no_output_bias: bool = False) -> torch.Tensor:
        f = self.pool_features(img)
        if return_features:
            return f
        logits = f @ self.out.weight.t()
        if not no_output_bias:
            logits = logits + self.out.bias
        return torch.softmax(logits, dim=1)


def _script(module: nn.Module, path: Path) -> Path:
    with warnings.catch_warnings():  # torch >= 2.10 deprecates TorchScript authoring; the files stay valid
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(module.eval()).save(str(path))
    return path


def test_inception_detector_interface(tmp_path):
    det = load_detector(f"inception:{_script(FakeInception(), tmp_path / 'inception-2015-12-05.pt')}")
    assert det.name == "FID" and det.dim == 2048 and det.has_classes
    imgs = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    feats, probs = det.features(imgs), det.class_probs(imgs)
    assert feats.shape == (5, 2048) and probs.shape == (5, 1008)
    torch.testing.assert_close(probs.sum(1), torch.ones(5))
    # the probabilities are the ones without the output bias (as the original Inception Score code)
    ref = FakeInception()
    torch.testing.assert_close(probs, ref(imgs, no_output_bias=True))
    assert not torch.allclose(probs, ref(imgs))
    torch.save(ref.state_dict(), tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    with pytest.raises(ValueError, match="inception-2015-12-05.pt"):
        load_detector(f"inception:{tmp_path / 'pt_inception-2015-12-05-6726825d.pth'}")


def test_dinov2_detector(tmp_path):
    transformers = pytest.importorskip("transformers", reason="FD-DINOv2 needs the optional extra ahpa[dinov2]")
    torch.manual_seed(0)
    cfg = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                    patch_size=14, image_size=224)
    model = transformers.Dinov2Model(cfg).eval()
    model.save_pretrained(tmp_path / "dino")
    det = load_detector(f"dinov2:{tmp_path / 'dino'}")
    assert det.name == "FD-DINOv2" and det.dim == 32 and not det.has_classes
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    # upsampled from 64, and shrunk from ImageNet's 256 with an antialiased bicubic as the PIL reference pipeline does
    # (where antialiasing matters: going up it changes nothing)
    for side in (256, 64):
        imgs = torch.randint(0, 256, (3, 3, side, side), dtype=torch.uint8)
        x = F.interpolate(imgs.float() / 255, size=(224, 224), mode="bicubic", align_corners=False, antialias=True)
        with torch.no_grad():
            out = model(pixel_values=(x.clamp(0, 1) - mean) / std)
        # the CLS token of the final (layer-normed) sequence, as the DINOv2 hub model's forward returns it
        torch.testing.assert_close(det.features(imgs), out.last_hidden_state[:, 0])
    # the REPA encoder loads the same folder through the same loader
    from ahpa.priors.external import load_external

    tokens = load_external(f"dinov2:{tmp_path / 'dino'}")(imgs.float() / 255, grid=4)
    assert tokens.shape == (3, 16, 32)


INCEPTION = Path(os.environ.get("AHPA_INCEPTION", SHARED / "detectors" / "inception-2015-12-05.pt"))


@pytest.mark.slow
@pytest.mark.skipif(not INCEPTION.is_file(), reason=f"needs the Inception-v3 TorchScript file {INCEPTION} "
                    "(set AHPA_INCEPTION); not available offline here")
def test_inception_parity_with_tensorflow_numbers():
    # The Inception Score of real CIFAR-10 images is 11.24 +- 0.12 in the original TensorFlow code
    # (Salimans et al. 2016, 10 splits of 5,000); one split of 5,000 training images lands near it.
    det = load_detector(f"inception:{INCEPTION}")
    cifar = SHARED / "data" / "cifar10" / "train.npz"
    from ahpa.metrics import measure

    got = measure(cifar, det, 100, probs=True, max_images=5000)
    mean, _ = inception_score(got.probs, splits=1)
    assert got.stats.dim == 2048 and abs(mean - 11.24) < 0.5, f"IS {mean:.2f} of 5,000 CIFAR-10 images, expected ~11.24"


# --- ahpa eval ------------------------------------------------------------------------------------


class TinyClassifier(nn.Module):
    """A CIFAR-detector-shaped TorchScript module: features [N, 6] and logits [N, 4]."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, 6, 3, stride=2)
        self.head = nn.Linear(6, 4)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(images.float() / 255.0)).mean(dim=(2, 3))

    @torch.jit.export
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward(images))


def test_eval_command_all_metrics_and_reference_cache(tmp_path, monkeypatch, capsys):
    from ahpa.cli import main
    from ahpa.metrics import measurement as measure_mod
    from ahpa.metrics import reference as reference_mod

    det_file = _script(TinyClassifier(), tmp_path / "toy-resnet20.pt")
    rng = np.random.default_rng(0)
    samples, ref = tmp_path / "samples.npz", tmp_path / "ref.npz"
    np.savez(samples, arr_0=rng.integers(0, 256, (60, 16, 16, 3), dtype=np.uint8), arr_1=np.arange(60) % 10)
    np.savez(ref, images=rng.integers(0, 256, (80, 16, 16, 3), dtype=np.uint8))
    argv = ["eval", str(samples), "--ref", str(ref), "--detector", f"torchscript:{det_file}", "--metrics", "fd,is,pr",
            "--is-splits", "3", "--pr-num", "40", "--batch", "16", "--ref-cache", str(tmp_path / "cache")]
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(first) == {"FD-r20", "IS-r20", "IS-r20-std", "precision-r20", "recall-r20"}
    det = load_detector(f"torchscript:{det_file}")
    assert first["FD-r20"] == pytest.approx(compute_stats(samples, det).frechet_distance(compute_stats(ref, det)), rel=1e-9)
    assert 1.0 <= first["IS-r20"] <= 4.0 and 0 <= first["precision-r20"] <= 1 and 0 <= first["recall-r20"] <= 1
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(cached) == 2 and cached[0].endswith("-first40.npy") and cached[1].endswith(".npz")

    # a second call reads the reference from the cache: measuring it again would fail here
    real_measure = measure_mod.measure

    def samples_only(source, *a, **k):
        assert Path(source) == samples, "the reference was measured again despite the cache"
        return real_measure(source, *a, **k)

    monkeypatch.setattr(reference_mod, "measure", samples_only)
    monkeypatch.setattr(reference_mod, "reference_stats", samples_only)
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == first
    monkeypatch.undo()

    # --save-ref-stats writes the statistics the evaluation measured: without a cache the reference is read once
    calls = []

    def counted(real):
        def call(*a, **k):
            calls.append(a[0])
            return real(*a, **k)

        return call

    monkeypatch.setattr(reference_mod, "reference_stats", counted(reference_mod.reference_stats))
    monkeypatch.setattr(reference_mod, "measure", counted(reference_mod.measure))
    assert main(["eval", str(samples), "--ref", str(ref), "--detector", f"torchscript:{det_file}", "--no-ref-cache", "--batch", "16",
                 "--save-ref-stats", str(tmp_path / "saved.npz")]) == 0
    monkeypatch.undo()
    assert len(calls) == 1 and (tmp_path / "saved.npz").is_file()
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["FD-r20"] == first["FD-r20"]

    # errors name what to change
    assert main([*argv[:7], "fd,bogus"]) == 2
    assert "bogus" in capsys.readouterr().err
    det_file_plain = tmp_path / "plain.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(nn.Flatten()).save(str(det_file_plain))
    assert main(["eval", str(samples), "--ref", str(ref), "--detector", f"torchscript:{det_file_plain}", "--metrics", "is"]) == 2
    assert "classifier head" in capsys.readouterr().err
    stats = tmp_path / "stats.npz"
    compute_stats(ref, det).save(stats)
    assert main(["eval", str(samples), "--ref", str(stats), "--detector", f"torchscript:{det_file}", "--metrics", "pr"]) == 2
    assert "needs reference images" in capsys.readouterr().err
    assert math.isfinite(first["IS-r20-std"])


def test_adm_reference_batch_gives_stored_fid_and_images_for_precision_recall(tmp_path):
    from ahpa.metrics.evaluation import evaluate

    det = load_detector(f"inception:{_script(FakeInception(), tmp_path / 'inception-2015-12-05.pt')}")
    rng = np.random.default_rng(3)
    imgs = rng.integers(0, 256, (30, 8, 8, 3), dtype=np.uint8)
    stats = compute_stats(imgs[:20], det)
    # ADM's reference batches: images under arr_0 and untagged statistics of the full dataset
    np.savez(tmp_path / "VIRTUAL_ref.npz", arr_0=imgs, mu=stats.mean, sigma=stats.cov)
    np.savez(tmp_path / "samples.npz", arr_0=imgs[:20])
    from ahpa.metrics.evaluation import EvaluationWarning

    with pytest.warns(EvaluationWarning, match="20 samples for 2048 features"):  # the samples' FD is biased: said
        got, stats = evaluate(tmp_path / "samples.npz", tmp_path / "VIRTUAL_ref.npz", det, ("fd", "pr"), pr_num=10,
                               cache_dir=tmp_path / "cache")
    assert got["FID"] < 1e-6  # the stored statistics, not the 30 images
    assert got["precision"] == 1.0 and not stats["reference"].count  # samples 0..9 are reference images 0..9


def test_inception_score_is_the_exp_of_the_mean_kl_with_each_splits_own_marginal():
    """exp(mean KL), not mean(exp KL): half the images certain of one of 2 classes, half undecided, gives
    exp(log(2) / 2) = sqrt 2 (1.5 the other way). each split's own marginal: split 1 all class 0, split 2 all
    class 1 scores 1 in each (a global marginal gives 2)."""
    from ahpa.metrics import inception_score

    certain = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).repeat(10, 1)
    mixed = torch.cat([certain, torch.full((20, 2), 0.5)])
    assert inception_score(mixed, splits=1)[0] == pytest.approx(2 ** 0.5, rel=1e-12)
    one_class_each = torch.cat([torch.tensor([[1.0, 0.0]]).repeat(10, 1), torch.tensor([[0.0, 1.0]]).repeat(10, 1)])
    assert inception_score(one_class_each, splits=2) == pytest.approx((1.0, 0.0))


def test_precision_recall_default_k_is_3_everywhere(tmp_path, monkeypatch):
    """k = 3 (Kynkaenniemi et al., ADM's evaluator) by default in precision_recall, evaluate and `ahpa eval`.
    Reals on a line spaced 1: an inner point's 3rd neighbour is at 2, its 5th at 3; fakes 2.5 off the line lie outside
    every 3-NN ball and inside the 5-NN ones."""
    import inspect

    from ahpa.metrics import evaluation, precision_recall

    real = torch.arange(10.0)[:, None] * torch.tensor([[1.0, 0.0]])
    fake = torch.tensor([[4.0 + 0.5 * i, 2.5] for i in range(6)])
    assert precision_recall(real, fake)[0] == 0.0 and precision_recall(real, fake, k=5)[0] == 1.0
    assert inspect.signature(evaluation.evaluate).parameters["pr_k"].default == 3


class _ColourClassifier(torch.nn.Module):
    """A TorchScript detector whose classes are the dominant colour (confident): features are the mean brightness and
    the three channel means."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0
        return torch.cat([x.mean(dim=(1, 2, 3))[:, None], x.mean(dim=(2, 3))], dim=1)

    @torch.jit.export
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return 100.0 * self.forward(images)[:, 1:]


def test_evaluate_passes_its_sets_and_splits_to_the_metrics(tmp_path):
    """evaluate's precision is the share of samples on the reference manifold (not the other way round),
    and its Inception Score uses is_splits. Half the samples are darkened (off the reference manifold), so precision !=
    recall; the samples come red, then green, then blue, so 3 splits score ~1 and one split ~3. test_scores only
    checks that these values lie in [0, 1] and [1, K]."""
    from ahpa.metrics import inception_score, load_detector, precision_recall
    from ahpa.metrics.evaluation import evaluate

    det = load_detector(f"torchscript:{_script(_ColourClassifier(), tmp_path / 'toy-resnet20.pt')}")
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 100, (80, 16, 16, 3), dtype=np.uint8)
    for i in range(80):
        ref[i, :, :, i % 3] = 200
    samples = rng.integers(0, 100, (60, 16, 16, 3), dtype=np.uint8)
    for i in range(60):
        samples[i, :, :, i // 20] = 200  # red, green, blue thirds
    samples[::2] //= 2
    np.savez(tmp_path / "samples.npz", arr_0=samples)
    np.savez(tmp_path / "ref.npz", images=ref)
    got, _ = evaluate(tmp_path / "samples.npz", tmp_path / "ref.npz", det, ("is", "pr"), is_splits=3, pr_num=40,
                      batch_size=16)
    as_t = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()  # noqa: E731
    p, r = precision_recall(det.features(as_t(ref[:40])), det.features(as_t(samples[:40])))
    assert p != r and (got["precision-r20"], got["recall-r20"]) == pytest.approx((p, r))
    probs = det.class_probs(as_t(samples))
    assert inception_score(probs, 3)[0] < 1.1 and inception_score(probs, 1)[0] > 2.5
    assert got["IS-r20"] == pytest.approx(inception_score(probs, 3)[0], rel=1e-6)


class _Colours(torch.nn.Module):
    """_ColourClassifier's features without its classifier head (as DINOv2 has none)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0
        return torch.cat([x.mean(dim=(1, 2, 3))[:, None], x.mean(dim=(2, 3))], dim=1)


def test_eval_computes_is_under_the_detectors_with_a_head_and_checks_every_detector_before_measuring(
        tmp_path, capsys, monkeypatch):
    """`--detector inception:... --detector dinov2:... --metrics fd,is` (FID, IS and FD-DINOv2, the usual ImageNet
    row) gives IS under the detector with a classifier head and says it was skipped for the other: it used to measure
    the first detector completely, then refuse the second, without the JSON line. What no detector can give, and
    stored statistics of another detector, are refused before any image is read."""
    from ahpa.cli import main
    from ahpa.metrics import measurement

    head = f"torchscript:{_script(_ColourClassifier(), tmp_path / 'toy-resnet20.pt')}"
    plain = f"torchscript:{_script(_Colours(), tmp_path / 'plain.pt')}"
    rng = np.random.default_rng(2)
    data = tmp_path / "s.npz"
    np.savez(data, arr_0=rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8))
    base = ["eval", str(data), "--ref", str(data), "--no-ref-cache", "--is-splits", "2"]
    assert main([*base, "--detector", head, "--detector", plain, "--metrics", "fd,is"]) == 0
    out, err = capsys.readouterr()
    assert set(json.loads(out.splitlines()[-1])) == {"FD-r20", "IS-r20", "IS-r20-std", "FD-plain"}
    assert ("ahpa eval: note: the Inception Score is computed with FD-r20 only; skipped for the detector(s) without a "
            f"classifier head: FD-plain ({plain})") in err
    # `is` alone: the detector without a head has nothing to measure, and is not run
    assert main([*base, "--detector", plain, "--detector", head, "--metrics", "is"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out.splitlines()[-1]).keys() == {"IS-r20", "IS-r20-std"} and len(out.splitlines()) == 2
    assert f"FD-plain ({plain}; no other metric asked: not evaluated)" in err
    monkeypatch.setattr(measurement, "iter_image_batches", lambda *a, **k: pytest.fail("an image was read"))
    assert main([*base, "--detector", plain, "--metrics", "fd,is"]) == 2
    assert f"the Inception Score needs a classifier head, which detector '{plain}' lacks" in capsys.readouterr().err
    # statistics of the first detector as the reference: the second is refused before the first one's pass
    stats = tmp_path / "stats.npz"
    np.savez(stats, mu=np.zeros(4), sigma=np.eye(4), detector="FD-r20")
    assert main(["eval", str(data), "--ref", str(stats), "--detector", head, "--detector", plain]) == 2
    assert f"were computed for FD-r20, not FD-plain ({plain}): give the reference images" in capsys.readouterr().err


def test_eval_result_line_and_resolution_say_what_was_used(tmp_path, capsys):
    """`--metrics is` reads no reference, and its line used to say "(12 samples vs stored reference)"; --resolution
    does nothing to .npz files, and said nothing when both inputs were .npz files."""
    from ahpa.cli import main
    from PIL import Image

    det = ["--detector", f"torchscript:{_script(_ColourClassifier(), tmp_path / 'toy-resnet20.pt')}", "--no-ref-cache"]
    rng = np.random.default_rng(5)
    data = tmp_path / "s.npz"
    np.savez(data, arr_0=rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8))
    assert main(["eval", str(data), "--ref", str(data), *det, "--metrics", "is", "--is-splits", "2"]) == 0
    assert "(12 samples; no reference needed)" in capsys.readouterr().out
    assert main(["eval", str(data), "--ref", str(data), *det, "--metrics", "fd,is", "--is-splits", "2"]) == 0
    assert "(12 samples vs 12 reference)" in capsys.readouterr().out
    assert main(["eval", str(data), "--ref", str(data), *det, "--resolution", "16"]) == 0
    assert ("ahpa eval: note: --resolution 16 applies to image folders only; SAMPLES and --ref are .npz files"
            in capsys.readouterr().err)
    (tmp_path / "folder").mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(tmp_path / "folder" / f"{i}.png")
    assert main(["eval", str(data), "--ref", str(tmp_path / "folder"), *det, "--resolution", "8"]) == 0
    assert "--resolution" not in capsys.readouterr().err  # it applies to the reference folder


def test_precision_recall_of_sets_of_unequal_size_is_warned_about(tmp_path, capsys):
    """The default --pr-num 10000 compared 200 samples with 1,000 reference images without a word, though the sizes
    move both figures. The warning names both conventions: Kynkäänniemi et al.'s equal sets, and ADM's evaluator's
    50,000 samples against its batch's 10,000 images (it said ADM compared equal sizes, which would have had a user
    quote 10K-vs-10K figures beside the papers' 50K-vs-10K ones)."""
    from ahpa.cli import main
    from ahpa.metrics import EvaluationWarning, evaluate

    det_file = _script(_ColourClassifier(), tmp_path / "toy-resnet20.pt")
    rng = np.random.default_rng(7)
    samples, ref = tmp_path / "s.npz", tmp_path / "r.npz"
    np.savez(samples, arr_0=rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8))
    np.savez(ref, images=rng.integers(0, 256, (30, 8, 8, 3), dtype=np.uint8))
    said = "precision/recall compares 20 samples with 30 reference images, and the sizes move both figures"
    with pytest.warns(EvaluationWarning, match=said) as caught:
        evaluate(samples, ref, load_detector(f"torchscript:{det_file}"), ("fd", "pr"))
    message = str(caught[0].message)
    assert "Kynkäänniemi et al. compare sets of equal size (pr_num, ahpa eval --pr-num, 20)" in message
    assert "ADM's evaluator" in message and "all 50,000 samples with its reference batch's 10,000 images" in message
    argv = ["eval", str(samples), "--ref", str(ref), "--detector", f"torchscript:{det_file}", "--no-ref-cache",
            "--metrics", "pr"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert err.count(f"ahpa eval: warning: {said}") == 1
    assert "(20 samples vs 30 reference; precision/recall: the first 20 vs 30)" in out  # what PR compared, not FD's sets
    assert main([*argv, "--pr-num", "20"]) == 0  # 20 and 20: nothing to say
    assert "warning" not in capsys.readouterr().err
    assert main([*argv[:-1], "fd"]) == 0  # no precision/recall: nothing to say either
    assert "warning" not in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:precision/recall compares")  # unequal sets on purpose
def test_another_pr_num_reuses_the_cached_reference(tmp_path, monkeypatch):
    """A cached reference serves every --pr-num: fewer points come from the kept features, more from its first images
    alone. Each other --pr-num measured the whole reference again (150 s instead of 10 s for CIFAR-10's 50,000; hours
    for an ImageNet folder), though its statistics and the points asked for were in the cache."""
    from ahpa.metrics import measurement as measure_mod
    from ahpa.metrics import reference as reference_mod
    from ahpa.metrics.evaluation import evaluate

    det = load_detector(f"torchscript:{_script(TinyClassifier(), tmp_path / 'toy-resnet20.pt')}")
    rng = np.random.default_rng(11)
    samples, ref = tmp_path / "samples.npz", tmp_path / "ref.npz"
    np.savez(samples, arr_0=rng.integers(0, 256, (30, 16, 16, 3), dtype=np.uint8))
    np.savez(ref, images=rng.integers(0, 256, (80, 16, 16, 3), dtype=np.uint8))
    cache = tmp_path / "cache"
    expected = {n: evaluate(samples, ref, det, ("fd", "pr"), pr_num=n, batch_size=16)[0] for n in (20, 30, 50, 90)}
    evaluate(samples, ref, det, ("fd", "pr"), pr_num=40, batch_size=16, cache_dir=cache)  # keeps the first 40

    read = []  # the reference images each measurement of the reference read
    real_measure = measure_mod.measure

    def counted(source, *a, **k):
        got = real_measure(source, *a, **k)
        if Path(source) == ref:
            read.append(got.stats.count)
        return got

    monkeypatch.setattr(reference_mod, "measure", counted)
    monkeypatch.setattr(reference_mod, "reference_stats", lambda *a, **k: pytest.fail("statistics measured again"))
    for n in (20, 30):  # fewer than the 40 kept: nothing measured
        assert evaluate(samples, ref, det, ("fd", "pr"), pr_num=n, batch_size=16, cache_dir=cache)[0] == \
            pytest.approx(expected[n], rel=1e-6)
    assert read == []
    # more than kept: the first 50 images, not the 80
    assert evaluate(samples, ref, det, ("fd", "pr"), pr_num=50, batch_size=16, cache_dir=cache)[0] == \
        pytest.approx(expected[50], rel=1e-6)
    assert read == [50]
    # more than the reference holds: all 80, once; then the file of all 80 serves any larger number
    for _ in range(2):
        assert evaluate(samples, ref, det, ("fd", "pr"), pr_num=90, batch_size=16, cache_dir=cache)[0] == \
            pytest.approx(expected[90], rel=1e-6)
    assert read == [50, 80]
    evaluate(samples, ref, det, ("pr",), pr_num=200, batch_size=16, cache_dir=cache)
    assert read == [50, 80]
