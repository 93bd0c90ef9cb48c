"""Prepared caches of CIFAR-10 through TAEF2 at 64x64: reader parity with on-the-fly encoding, training from
a cache, resume after an interruption (byte-identical), no-op reruns, and refusals that name the field."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ahpa import config as config_mod
from ahpa.data.batches import OnTheFly
from ahpa.data.cache import CacheSource, open_cache, read_manifest
from ahpa.data.prepare import PrepareError, PrepareOptions, prepare
from ahpa.data.sources import ImageSet, load_npz_images
from ahpa.data.shard_store import CacheError

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CIFAR_TEST = SHARED / "data" / "cifar10" / "test.npz"
TAEF2 = SHARED / "weights" / "taef2"
LEVELS = ["stage1", "stage2", "stage3", "stage4", "latent"]


@pytest.fixture(scope="module")
def taef2():
    if not (CIFAR_TEST.is_file() and (TAEF2 / "taef2_encoder.pth").is_file()):
        pytest.skip(f"needs {CIFAR_TEST} and {TAEF2} (the shared/ directory beside the repository)")
    from ahpa.priors.registry import load_encoder

    return load_encoder(f"taef2:{TAEF2}")


def _opts(out: Path, **kw) -> PrepareOptions:
    base = dict(images=str(CIFAR_TEST), vae=f"taef2:{TAEF2}", resolution=64, out=str(out), grid=8, limit=24,
                shard_size=8, batch=8, workers=0, flips="generated")
    return PrepareOptions(**(base | kw))


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def stored_cache(taef2, tmp_path_factory) -> Path:
    """24 CIFAR test images with stored flips (exact mirror-image encodings), grid 8 (the study's patch 1)."""
    out = tmp_path_factory.mktemp("cifar") / "cache"
    res = prepare(_opts(out, flips="stored", shard_size=16, batch=16), encoder=taef2)
    assert res.complete and res.images == 24 and not res.skipped
    return out


@pytest.fixture(scope="module")
def reference_cache(taef2, tmp_path_factory) -> Path:
    """An uninterrupted run: the byte-for-byte reference for the interrupted ones."""
    out = tmp_path_factory.mktemp("ref") / "cache"
    prepare(_opts(out), encoder=taef2)
    return out


def _cfg(cache: Path, **over) -> config_mod.Config:
    d = {
        "model": {"preset": "S/1", "hidden_size": 32, "depth": 2, "num_heads": 2},
        "data": {"source": "cache", "path": str(cache), "resolution": 64},
        "prior": {"encoder": f"taef2:{TAEF2}"},
        "align": {"method": "ahpa", "depth": 1, "projector_dim": 32},
        "train": {"steps": 3, "batch_size": 8, "log_every": 1, "ckpt_every": 3, "sample_every": 0, "device": "cpu"},
    }
    for key, value in over.items():
        section, _, name = key.partition(".")
        d.setdefault(section, {})[name] = value
    return config_mod.from_dict(d)


def test_cache_matches_on_the_fly_encoding(stored_cache, taef2):
    images, labels = load_npz_images(CIFAR_TEST)
    data = ImageSet(torch.from_numpy(images[:24]), torch.from_numpy(labels[:24]), 10)
    manifest = read_manifest(stored_cache)
    idx = torch.tensor([3, 23, 0, 17, 16, 5])  # across both shards, out of order
    flip = torch.tensor([False, True, True, False, True, False])
    for grid in (8, 4):  # 4: the cache grid is pooled by 2 at read time
        cache = CacheSource(stored_cache, manifest, LEVELS, grid, torch.device("cpu"))
        onthefly = OnTheFly(data, taef2, LEVELS, grid, 64, torch.device("cpu"))
        a, b = cache.fetch(idx, flip, None), onthefly.fetch(idx, flip, None)
        assert torch.equal(a.labels, b.labels) and a.latent.shape == b.latent.shape == (6, 32, 8, 8)
        assert torch.allclose(a.latent, b.latent, atol=2e-3 * b.latent.abs().max())  # fp16 rounding only
        for name in LEVELS:
            assert a.levels[name].shape == b.levels[name].shape == (6, grid * grid, taef2.level(name).channels)
            assert torch.allclose(a.levels[name], b.levels[name], atol=2e-3 * b.levels[name].abs().max()), name
        ours = cache.measure_stats(0, torch.Generator())
        theirs = onthefly.measure_stats(24, torch.Generator())
        assert torch.allclose(ours.latent.std, theirs.latent.std, rtol=1e-3)
        for name in LEVELS:
            assert torch.allclose(ours.levels[name].mean, theirs.levels[name].mean, atol=1e-3)
            assert torch.allclose(ours.levels[name].std, theirs.levels[name].std, rtol=1e-3), name


def test_generated_flips_mirror_token_maps(reference_cache):
    cache = CacheSource(reference_cache, read_manifest(reference_cache), LEVELS, 8, torch.device("cpu"))
    idx = torch.tensor([5, 5])
    a = cache.fetch(idx, torch.tensor([False, True]), None)
    assert torch.equal(a.latent[1], a.latent[0].flip(-1))
    grid = a.levels["stage2"].reshape(2, 8, 8, 64)  # [B, rows, cols, C]
    assert torch.equal(grid[1], grid[0].flip(1))


def test_training_round_trip_from_cache(stored_cache, tmp_path):
    from ahpa.train.loop import Trainer

    trainer = Trainer(_cfg(stored_cache), tmp_path / "run")
    assert isinstance(trainer.parts.source, CacheSource) and trainer.parts.levels == LEVELS
    assert trainer.parts.model.cfg.num_classes == 10
    last = trainer.run()
    assert trainer.step == 3 and torch.isfinite(torch.tensor(last["loss/flow"])) and (tmp_path / "run" / "DONE").exists()
    # exact resume needs only (seed, step): the reader is a pure function of the indices
    src, idx, flip = trainer.parts.source, torch.tensor([7, 2, 19]), torch.tensor([True, False, True])
    a, b = src.fetch(idx, flip, None), src.fetch(idx, flip, None)
    assert torch.equal(a.latent, b.latent) and all(torch.equal(a.levels[n], b.levels[n]) for n in LEVELS)


def test_a_run_resumes_from_its_cache_staged_to_another_path(stored_cache, tmp_path):
    """The cluster case: a run's cache copied to node-local scratch is the same cache (its manifest, byte for byte)."""
    import shutil

    from ahpa.train.loop import Trainer

    shutil.copytree(stored_cache, tmp_path / "shared-fs")
    Trainer(_cfg(tmp_path / "shared-fs", **{"train.steps": 2, "train.ckpt_every": 2}), tmp_path / "run").run()
    shutil.move(tmp_path / "shared-fs", tmp_path / "scratch")
    again = Trainer(_cfg(tmp_path / "scratch"), tmp_path / "run")
    assert again.step == 2 and any(m.startswith("data.path moved") for m in again.messages)
    again.run()
    assert again.step == 3


def test_cache_stops_reading_levels_when_alignment_stops(stored_cache, tmp_path):
    """align.stop_step: from the stop on, the cache (prefetching in its thread) gathers the latent alone, and
    the latent it serves is the same as before."""
    from ahpa.train.loop import Trainer

    trainer = Trainer(_cfg(stored_cache, **{"align.stop_step": 2, "train.steps": 4}), tmp_path / "run")
    src, idx, flip = trainer.parts.source, torch.tensor([7, 2, 19]), torch.tensor([True, False, True])
    before = src.fetch(idx, flip, None)
    trainer.run()
    assert src.levels == [] and src.fields == ["latent_mean"]
    after = src.fetch(idx, flip, None)
    assert after.levels == {} and torch.equal(after.latent, before.latent)
    assert trainer.parts.levels == LEVELS  # the run's levels (logs, router plots) are unchanged


def test_open_cache_refuses_mismatches_naming_the_field(stored_cache, taef2):
    from ahpa.align import get_method
    from ahpa.data.cache import cache_overview
    from ahpa.priors.kl_vae import KLVAE

    cpu = torch.device("cpu")
    with pytest.raises(CacheError, match="resolution.*64.*32"):
        open_cache(_cfg(stored_cache, **{"data.resolution": 32}), taef2, LEVELS, 8, cpu)
    with pytest.raises(CacheError, match="grid.*8.*3"):
        open_cache(_cfg(stored_cache), taef2, LEVELS, 3, cpu)
    with pytest.raises(CacheError, match="encoder.spec"):
        open_cache(_cfg(stored_cache, **{"prior.encoder": "ahpa-vae:random"}), KLVAE.random(), ["latent"], 8, cpu)
    with pytest.raises(CacheError, match="repa aligns to an external encoder that reads the images.*--store-images"):
        cache_overview(_cfg(stored_cache, **{"align.method": "repa"}), taef2, get_method("repa"))


def test_missing_level_and_flips_none_are_refused(taef2, tmp_path):
    out = tmp_path / "subset"
    res = prepare(_opts(out, limit=8, levels=["stage4"], flips="none", dtype="bf16", grid=4), encoder=taef2)
    assert res.images == 8 and read_manifest(out)["levels"][0]["name"] == "stage4"
    cpu = torch.device("cpu")
    with pytest.raises(CacheError, match="levels.*missing \\['stage1'\\]"):
        open_cache(_cfg(out, **{"data.hflip": False}), taef2, ["stage1", "stage4"], 4, cpu)
    with pytest.raises(CacheError, match="flips"):
        open_cache(_cfg(out), taef2, ["stage4"], 4, cpu)
    src = open_cache(_cfg(out, **{"data.hflip": False}), taef2, ["stage4", "latent"], 2, cpu)  # bf16, pooled 4 -> 2
    b = src.fetch(torch.arange(8), None, None)
    assert b.levels["stage4"].shape == (8, 4, 64) and b.levels["stage4"].dtype == torch.float32


def test_interrupted_run_resumes_to_identical_files(taef2, reference_cache, tmp_path):
    out = tmp_path / "cache"

    def stop_after_one_shard(p):
        if p.shards_done == 1:
            raise KeyboardInterrupt  # what Ctrl-C does mid-run

    with pytest.raises(KeyboardInterrupt):
        prepare(_opts(out), on_progress=stop_after_one_shard, encoder=taef2)
    assert read_manifest_raises(out)  # a partial cache never looks complete
    assert any(p.name.endswith(".tmp") for p in (out / "shards").iterdir())  # the unfinished shard's temp files
    # the finished shard's record means whole files: a resume checks sizes (a bit flipped on the disk since goes
    # unseen, and costs no hashing of the finished shards), --repair hashes them and encodes the damaged one again
    flipped = out / "shards" / "shard-00000.latent_mean.bin"
    good = flipped.read_bytes()
    flipped.write_bytes(bytes([good[0] ^ 1]) + good[1:])
    def stop_after_two_shards(p):
        if p.shards_done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare(_opts(out), on_progress=stop_after_two_shards, encoder=taef2)  # one more shard, the flip kept
    assert flipped.read_bytes() != good
    kept = []
    res = prepare(_opts(out, repair=True), on_progress=lambda p: kept.append(p.shards_done), encoder=taef2)
    assert res.shards_reused == 1 and res.shards_written == 2 and kept[0] == 1  # shard 1 kept, shards 0 and 2 encoded
    assert _files(out) == _files(reference_cache)


def test_repair_encodes_only_the_damaged_shards_again(taef2, reference_cache, tmp_path):
    """A bit flipped in one shard (same size: only a checksum sees it) and another shard truncated: --repair finds
    both, encodes them again and keeps the third; the cache ends byte for byte as it was."""
    import shutil

    out = tmp_path / "cache"
    shutil.copytree(reference_cache, out)
    flipped = out / "shards" / "shard-00000.latent_mean.bin"
    data = bytearray(flipped.read_bytes())
    data[100] ^= 0x01
    flipped.write_bytes(bytes(data))
    truncated = out / "shards" / "shard-00002.level.stage3.bin"
    truncated.write_bytes(truncated.read_bytes()[:-2])
    with pytest.raises(CacheError, match="shard-00002.level.stage3.bin is missing or of the wrong size; rerun the "
                       "ahpa prepare command with --repair"):
        prepare(_opts(out), encoder=taef2)
    res = prepare(_opts(out, repair=True), encoder=taef2)
    assert res.complete and not res.noop and res.shards_written == 2 and res.shards_reused == 1
    assert res.repaired == {"shard-00000": "shard-00000.latent_mean.bin fails its sha256 checksum",
                            "shard-00002": "shard-00002.level.stage3.bin missing or of the wrong size"}
    assert _files(out) == _files(reference_cache)
    again = prepare(_opts(out, repair=True), encoder=taef2)
    assert again.noop and again.checked and _files(out) == _files(reference_cache)


def read_manifest_raises(out: Path) -> bool:
    with pytest.raises(CacheError, match="incomplete"):
        read_manifest(out)
    return True


def test_rerun_is_a_noop_and_other_settings_are_refused(taef2, reference_cache):
    before = _files(reference_cache)
    t0 = time.perf_counter()
    res = prepare(_opts(reference_cache), encoder=taef2)
    assert res.noop and res.images == 24 and time.perf_counter() - t0 < 5
    assert _files(reference_cache) == before
    with pytest.raises(PrepareError, match="grid: cache has 8, this command gives 4"):
        prepare(_opts(reference_cache, grid=4), encoder=taef2)
    with pytest.raises(PrepareError, match="source.count: cache has 24, this command gives 16"):
        prepare(_opts(reference_cache, limit=16), encoder=taef2)
    assert _files(reference_cache) == before


def test_two_processes_write_interleaved_shards(taef2, reference_cache, tmp_path):
    """rank r writes shards r, r+2, ...; rank 0 merges after the barrier: the same bytes as one process."""
    out = tmp_path / "cache"

    def two_ranks(**kw):
        barrier = threading.Barrier(2, timeout=120)
        results, errors = {}, []

        def run(rank):
            try:
                results[rank] = prepare(_opts(out, rank=rank, world=2, **kw), barrier=barrier.wait, encoder=taef2)
            except BaseException as e:  # pragma: no cover - surfaced below
                errors.append(e)
                barrier.abort()

        threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert not errors, errors
        return results

    results = two_ranks()
    assert results[0].complete and results[0].shards_written == 2 and results[1].shards_written == 1
    assert _files(out) == _files(reference_cache)
    (out / "shards" / "shard-00001.labels.bin").unlink()  # rank 1's shard: rank 0 finds it, rank 1 encodes it
    results = two_ranks(repair=True)
    assert list(results[0].repaired) == ["shard-00001"] and results[1].shards_written == 1
    assert results[0].shards_written == 0 and results[0].complete
    assert _files(out) == _files(reference_cache)


@pytest.mark.slow
def test_killed_process_resumes_to_identical_files(reference_cache, tmp_path):
    out = tmp_path / "cache"
    cmd = [sys.executable, "-m", "ahpa.cli", "prepare", "--images", str(CIFAR_TEST), "--vae", f"taef2:{TAEF2}",
           "--resolution", "64", "--out", str(out), "--grid", "8", "--limit", "24", "--shard-size", "8", "--batch", "8",
           "--workers", "0", "--flips", "generated"]
    # one thread, as the reference was encoded (conftest): on some CPUs (an AMD EPYC here) oneDNN's convolutions
    # round differently with 2 threads than with 1, so the files compared would differ in their last bits
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 60
    while not (out / "shards" / "shard-00000.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert read_manifest_raises(out)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env | {"PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stderr
    assert _files(out) == _files(reference_cache)


def test_channel_reduction_stores_pca_coefficients_and_rebuilds_channels(taef2, reference_cache, tmp_path):
    out = tmp_path / "pca"
    prepare(_opts(out, reduce=16, reduce_images=16), encoder=taef2)
    m = read_manifest(out)
    assert m["fields"]["level.stage1"]["shape"] == [64, 16] and m["fields"]["latent_mean"]["shape"] == [32, 8, 8]
    assert (out / "reduce.safetensors").is_file() and m["reduce"]["dim"] == 16
    kept = m["reduce"]["variance_kept"]
    assert set(kept) == {"stage1", "stage2", "stage3", "stage4"} and all(0.5 < k <= 1 for k in kept.values())
    names = ["stage1", "stage4", "latent"]
    reduced = CacheSource(out, m, names, 8, torch.device("cpu"))
    full = CacheSource(reference_cache, read_manifest(reference_cache), names, 8, torch.device("cpu"))
    idx = torch.arange(24)
    a, b = reduced.fetch(idx, None, None), full.fetch(idx, None, None)
    assert torch.equal(a.latent, b.latent)  # the latent is never reduced
    for name in ("stage1", "stage4"):
        assert a.levels[name].shape == b.levels[name].shape == (24, 64, 64)  # the aligner still sees 64 channels
        mean, std = b.levels[name].mean((0, 1)), b.levels[name].std((0, 1))  # the loss sees standardised tokens
        err = (((a.levels[name] - b.levels[name]) / std).norm() / ((b.levels[name] - mean) / std).norm()) ** 2
        assert err < 1.5 * (1 - kept[name]) + 0.02, (name, float(err), kept[name])
    stats = reduced.measure_stats(0, torch.Generator())  # measured on the rebuilt tokens, as training reads them
    for name in ("stage1", "stage4"):
        assert torch.allclose(stats.levels[name].mean, a.levels[name].mean((0, 1)), atol=1e-3)
        assert torch.allclose(stats.levels[name].std, a.levels[name].std((0, 1), unbiased=False), rtol=1e-3, atol=1e-4)
    assert prepare(_opts(out, reduce=16, reduce_images=16), encoder=taef2).noop
    with pytest.raises(PrepareError, match="reduce: cache has"):
        prepare(_opts(out, reduce=8, reduce_images=16), encoder=taef2)


@pytest.mark.parametrize("flips", ["stored", "generated"])
def test_repa_trains_from_a_cache_that_stores_the_images(tmp_path, flips):
    """REPA's external encoder reads pixels: with --store-images the cache holds the crops (never flipped, mirrored
    exactly when read), the batches carry the same images as on-the-fly training from the .npz, and a run trains."""
    import numpy as np

    from ahpa.data.procedural import make_shapes
    from ahpa.priors.kl_vae import KLVAE
    from ahpa.train.loop import Trainer
    from tests.conftest import cache_cfg
    from tests.test_train import tiny_external

    images, labels = make_shapes(24, 16, seed=1)
    np.savez(tmp_path / "set.npz", images=images, labels=labels)
    kw = dict(images=str(tmp_path / "set.npz"), vae="ahpa-vae:random", resolution=16, grid=4, shard_size=16, batch=16,
              workers=0, device="cpu", flips=flips)
    prepare(PrepareOptions(**kw, out=str(tmp_path / "plain")))
    with pytest.raises(CacheError, match="holds latents and VAE levels only: prepare a cache with --store-images"):
        Trainer(cache_cfg(tmp_path / "plain", "align.method=repa"), tmp_path / "r0", external=tiny_external())
    res = prepare(PrepareOptions(**kw, out=str(tmp_path / "cache"), store_images=True, levels=["latent"]))  # REPA's own
    assert res.complete and read_manifest(tmp_path / "cache")["fields"]["image"] == {"dtype": "uint8", "shape": [16, 16, 3]}
    source = open_cache(cache_cfg(tmp_path / "cache", "align.method=repa"), KLVAE.random(), ["external"], 4, torch.device("cpu"))
    idx, flip = torch.tensor([0, 17, 5, 23]), torch.tensor([False, True, True, False])
    got = source.fetch(idx, flip, None).images  # [4, 3, 16, 16]
    want = torch.from_numpy(images[idx.numpy()]).permute(0, 3, 1, 2).float() / 255  # the npz at R: what OnTheFly gives
    want = torch.where(flip[:, None, None, None], want.flip(-1), want)
    assert torch.equal(got, want)
    trainer = Trainer(cache_cfg(tmp_path / "cache", "align.method=repa", "train.steps=2"), tmp_path / "run",
                      external=tiny_external())
    assert np.isfinite(trainer.run()["loss/align"])
    # once alignment stops, the images are no longer read (196 KB a sample at 256)
    trainer = Trainer(cache_cfg(tmp_path / "cache", "align.method=repa", "align.stop_step=1", "train.steps=2"),
                      tmp_path / "stops", external=tiny_external())
    trainer.run()
    assert "image" not in trainer.parts.source.fields and not trainer.parts.source.reads_priors


def test_posterior_sample_has_std_exp_half_logvar():
    """mean + exp(logvar / 2) * noise (logvar = log 4: std 2)."""
    from ahpa.priors.base import posterior_sample

    mean, logvar, noise = torch.full((2, 3), 1.0), torch.full((2, 3), float(np.log(4.0))), torch.full((2, 3), 1.5)
    assert torch.allclose(posterior_sample(mean, logvar, noise), torch.full((2, 3), 4.0))
    assert torch.equal(posterior_sample(mean, logvar, None), mean)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_a_stochastic_cache_serves_what_on_the_fly_encoding_gives_with_the_same_noise(tiny_cache, tmp_path, dtype):
    """the cache of a KL-VAE (a posterior) against encoding the same images on the fly, with the same
    posterior noise and flips: the sampled latent, the "latent" level pooled from that sample, the other levels, and
    the labels. test_cache's parity test uses TAEF2 (no posterior) and noise None, so none of that is checked there;
    and a bf16 cache was only checked for shapes and dtype."""
    from ahpa.data.cache import CacheSource, read_manifest
    from ahpa.data.batches import OnTheFly
    from ahpa.data.prepare import PrepareOptions, prepare
    from ahpa.data.sources import ImageSet, load_npz_images
    from ahpa.priors.kl_vae import KLVAE

    cache = tiny_cache
    if dtype == "bf16":  # the same 40 images, stored in bf16
        cache = tmp_path / "bf16"
        prepare(PrepareOptions(images=str(tiny_cache.parent / "shapes.npz"), vae="ahpa-vae:random", resolution=16,
                               out=str(cache), grid=4, shard_size=16, batch=16, workers=0, device="cpu", flips="stored",
                               dtype="bf16"))
    images, labels = load_npz_images(tiny_cache.parent / "shapes.npz")
    vae = KLVAE.random()
    levels = ["stage1", "stage3", "latent"]
    src = CacheSource(cache, read_manifest(cache), levels, 2, torch.device("cpu"))  # cache grid 4 pooled to 2
    fly = OnTheFly(ImageSet(torch.from_numpy(images), torch.from_numpy(labels), 8), vae, levels, 2, 16, torch.device("cpu"))
    idx, flip = torch.tensor([3, 39, 0, 17, 16, 5]), torch.tensor([False, True, True, False, True, False])
    noise = torch.randn(6, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    a, b = src.fetch(idx, flip, noise), fly.fetch(idx, flip, noise)
    tol = 2e-2 if dtype == "bf16" else 3e-3  # the stored rounding only
    assert torch.equal(a.labels, b.labels)
    assert not torch.allclose(a.latent, src.fetch(idx, flip, None).latent)  # the noise is used at all
    assert torch.allclose(a.latent, b.latent, atol=tol * b.latent.abs().max()), (a.latent - b.latent).abs().max()
    for name in levels:
        assert torch.allclose(a.levels[name], b.levels[name], atol=tol * b.levels[name].abs().max()), name


def test_pca_basis_is_the_correlation_pca_of_centred_tokens():
    """the kept share is that of the correlation matrix of the centred data (np.corrcoef), and with all
    directions kept, project -> reconstruct is the identity, whatever the data's offset."""
    from ahpa.data.reduce import CovarianceSums, project, reconstruct

    g = torch.Generator().manual_seed(0)
    mix = torch.randn(6, 6, generator=g, dtype=torch.float64)
    x = (torch.randn(4000, 6, generator=g, dtype=torch.float64) * torch.tensor([3.0, 2, 1, 0.5, 0.2, 0.1]) @ mix) + 50
    sums = CovarianceSums()
    for part in x.split(1000):
        sums.update(part[None])  # [1, M, C] tokens
    mean, p, q, kept = sums.basis(2)
    vals = np.sort(np.linalg.eigvalsh(np.corrcoef(x.numpy(), rowvar=False)))[::-1]
    assert kept == pytest.approx(vals[:2].sum() / vals.sum(), abs=1e-5)
    full = sums.basis(6)
    tokens = x[:100].float()[None]
    back = reconstruct(project(tokens, *map(torch.from_numpy, full[:3])), *map(torch.from_numpy, full[:3]))
    assert torch.allclose(back, tokens, atol=1e-3)


def test_a_cache_of_many_shards_opens_under_a_low_open_file_limit(tiny_cache, tmp_path):
    """Every mapped field of every shard holds a file descriptor: an ImageNet cache maps thousands, past the soft
    limit of 1,024 common on Linux. Here 40 images in shards of 2 (20 shards, ~200 maps) under a soft limit of 64:
    the limit is raised within the hard one; with a hard limit of 64 the error names the fixes."""
    pytest.importorskip("resource")
    prepare(PrepareOptions(images=str(tiny_cache.parent / "shapes.npz"), vae="ahpa-vae:random", resolution=16,
                           out=str(tmp_path / "c"), grid=4, shard_size=2, batch=16, workers=0, device="cpu", flips="stored"))
    code = f"""
import resource, sys, torch
from ahpa.data.cache import CacheSource, read_manifest
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64 if sys.argv[1] == "hard" else hard))
src = CacheSource({str(tmp_path / "c")!r}, read_manifest({str(tmp_path / "c")!r}), ["stage1", "stage3", "latent"], 2, "cpu")
print(len(src), resource.getrlimit(resource.RLIMIT_NOFILE)[0])
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ok = subprocess.run([sys.executable, "-c", code, "soft"], capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0 and int(ok.stdout.split()[0]) == 40 and int(ok.stdout.split()[1]) > 64, ok.stderr[-2000:]
    low = subprocess.run([sys.executable, "-c", code, "hard"], capture_output=True, text=True, env=env, timeout=120)
    assert low.returncode != 0 and "may open at most 64" in low.stderr and "--shard-size" in low.stderr, low.stderr[-2000:]


def test_a_folder_of_images_as_data_path_is_told_to_be_prepared_elsewhere(tmp_path):
    """data.source=cache data.path=PHOTOS said "create it with `ahpa prepare ... --out PHOTOS`": an --out inside the
    images, which prepare refuses. The message says the images are prepare's source and the cache another folder."""
    from PIL import Image

    from ahpa.data.cache import read_manifest

    (tmp_path / "photos" / "cats").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "photos" / "cats" / "a.png")
    with pytest.raises(Exception) as e:
        read_manifest(tmp_path / "photos")
    assert str(e.value) == (f"{tmp_path / 'photos'} has no manifest.json: not a prepared cache; `ahpa prepare --images "
                            "SRC ... --out DIR` makes one in DIR (a folder of images is the SRC, and DIR a folder outside "
                            "it), then data.path=DIR")


def test_methods_that_read_no_level_take_a_cache_whose_grid_the_model_does_not_share(taef2, tmp_path):
    """The cache's grid is where its levels were pooled: vanilla SiT (and REPA, which reads the crops) reads none of
    them, so a cache prepared for a patch-2 model (grid 4) trains a patch-1 SiT without them; a method that aligns
    the levels is refused, naming the grid (it was refused for every method)."""
    from ahpa.train.loop import Trainer

    out = tmp_path / "grid4"
    prepare(_opts(out, grid=4, limit=8, shard_size=8), encoder=taef2)
    with pytest.raises(CacheError, match="field grid: the cache grid 4 is not a multiple of the model grid 8"):
        Trainer(_cfg(out), tmp_path / "ahpa")
    tr = Trainer(_cfg(out, **{"align.method": "none", "train.steps": 2}), tmp_path / "none")
    tr.run()
    assert tr.step == 2 and (tmp_path / "none" / "DONE").exists()
