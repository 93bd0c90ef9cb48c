"""The totals progress bars get: every pass over images says how many it will read before its first batch, so that a
50,000-image FID pass shows an end and an ETA (`ahpa eval`, a run's measurement of eval.ref)."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch

from ahpa.metrics import compute_stats, iter_image_batches, load_detector, reference_measurement
from tests.test_metrics import _Pool


@pytest.fixture
def det(tmp_path):
    path = tmp_path / "cifar10-resnet32.pt"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+.* is deprecated")
        torch.jit.script(_Pool()).save(str(path))
    return load_detector(f"torchscript:{path}")


class Bars:
    """A progress factory that records each bar it is asked for: [total, images counted]."""

    def __init__(self):
        self.bars = []

    def __call__(self, total):
        self.bars.append([total, 0])
        return lambda n: self.bars[-1].__setitem__(1, self.bars[-1][1] + n)


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)


def test_a_pass_tells_its_bar_how_many_images_it_reads(tmp_path, det):
    """An .npz, a folder and an array, whole, capped at max_images, and one rank's share of two: the total is the
    number of images the pass then counts. Only a caller's own iterable of batches has no known length."""
    from PIL import Image

    imgs = _images(23)
    np.savez(tmp_path / "adm.npz", arr_0=imgs)
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(folder / f"{i:03d}.png")
    # batches of 5: [0, 5) [10, 15) [20, 23) are rank 0's (13 images), [5, 10) [15, 20) rank 1's (10)
    cases = [({}, 23), ({"max_images": 12}, 12), ({"rank": 1, "world_size": 2}, 10), ({"rank": 0, "world_size": 2}, 13),
             ({"rank": 1, "world_size": 2, "max_images": 12}, 5), ({"max_images": 0}, 0)]
    for source in (tmp_path / "adm.npz", folder, imgs):
        for kwargs, total in cases:
            assert iter_image_batches(source, 5, **kwargs).total == total, (source, kwargs)
            if total:
                bars = Bars()
                compute_stats(source, det, 5, progress=bars, **kwargs)
                assert bars.bars == [[total, total]], (source, kwargs)
    bars = Bars()
    compute_stats(iter([imgs[:10], imgs[10:]]), det, 5, progress=bars, max_images=15)
    assert bars.bars == [[None, 15]]


def test_a_folders_total_counts_its_undecodable_files_the_bar_ends_below_it(tmp_path, det):
    """A folder's total is its listed files, known before decoding: an undecodable one is skipped (and warned
    about), so its bar ends that many images short."""
    from PIL import Image

    for i, im in enumerate(_images(6)):
        Image.fromarray(im).save(tmp_path / f"{i}.png")
    jpeg = io.BytesIO()
    Image.fromarray(_images(1)[0]).save(jpeg, "JPEG")
    (tmp_path / "7.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    bars = Bars()
    with pytest.warns(UserWarning, match="skipped 1 file"):
        compute_stats(tmp_path, det, 4, progress=bars)
    assert bars.bars == [[7, 6]]


def test_a_reference_opens_a_bar_for_the_pass_it_runs_with_that_passs_total(tmp_path, det):
    """Measured: all its images; cached: no bar; its statistics cached and precision/recall's points not: the first
    `keep`; stored statistics with images beside them (ADM's reference batches): the first `keep` too."""
    ref, cache = tmp_path / "ref.npz", tmp_path / "cache"
    imgs = _images(40, seed=1)
    np.savez(ref, images=imgs)
    for keep, bars_seen in ((0, [[40, 40]]), (0, []), (10, [[10, 10]]), (10, []), (50, [[40, 40]])):
        bars = Bars()
        reference_measurement(ref, det, cache, 16, keep=keep, progress=bars)
        assert bars.bars == bars_seen, keep
    stats = compute_stats(imgs, det)
    # statistics with images beside them, as ADM's reference batches (tagged: these are no Inception's)
    np.savez(tmp_path / "stats.npz", arr_0=imgs, mu=stats.mean, sigma=stats.cov, detector=det.name)
    bars = Bars()
    reference_measurement(tmp_path / "stats.npz", det, None, 16, keep=12, progress=bars)
    assert bars.bars == [[12, 12]]


def test_eval_commands_bars_get_the_totals_of_their_passes(tmp_path, det, monkeypatch, capsys):
    """`ahpa eval`'s bars: the reference's (its images; none when cached) and the samples' (--num of them); a bar
    without a total showed `50000img [01:26, 442.73img/s]`, with no ETA."""
    import tqdm

    from ahpa.cli import main

    opened = []

    class Recorded:  # what the command asks tqdm for, not how tqdm draws it
        def __init__(self, *args, total=None, desc=None, **kwargs):
            self.desc, self.n = desc, 0
            opened.append([desc, total, self])

        def update(self, n):
            self.n += n

        def close(self):
            pass

    monkeypatch.setattr(tqdm, "tqdm", Recorded)
    np.savez(tmp_path / "samples.npz", arr_0=_images(30, seed=2))
    np.savez(tmp_path / "ref.npz", images=_images(40, seed=3))
    argv = ["eval", str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "ref.npz"), "--detector", det.spec,
            "--batch", "8", "--num", "25", "--ref-cache", str(tmp_path / "cache")]
    for ref_bar in ([[f"reference [{det.name}]", 40, 40]], []):  # then from the cache: no bar
        opened.clear()
        assert main(argv) == 0, capsys.readouterr().err
        assert [[d, t, b.n] for d, t, b in opened] == [*ref_bar, [f"samples [{det.name}]", 25, 25]]
