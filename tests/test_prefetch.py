"""Prefetching a prepared cache's rows in a background thread: the same batches bitwise as without it (also
after a resume and with gradient accumulation), worker errors surface with their message, clean shutdown."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from ahpa import config as config_mod
from ahpa.data.cache import CacheSource, open_cache
from ahpa.data.order import process_requests
from ahpa.data.prefetch import Prefetcher
from ahpa.train.loop import Trainer
from tests.conftest import cache_cfg

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def cache(tiny_cache) -> Path:
    return tiny_cache


def _source(cache: Path, cfg: config_mod.Config, device: torch.device = CPU) -> CacheSource:
    from ahpa.priors.registry import load_encoder

    return open_cache(cfg, load_encoder("ahpa-vae:random"), ["stage1", "stage2", "stage3", "latent"], 4, device)


def _same_batch(a, b) -> bool:
    return (torch.equal(a.latent, b.latent) and torch.equal(a.labels, b.labels) and a.levels.keys() == b.levels.keys()
            and all(torch.equal(a.levels[k], b.levels[k]) for k in a.levels))


@pytest.mark.parametrize("accum", [1, 3])
def test_prefetched_batches_equal_synchronous_ones_also_after_a_resume(cache, accum):
    cfg = cache_cfg(cache)
    plain, ahead = _source(cache, cfg), _source(cache, cfg)
    n = len(plain)

    def plan(step):
        return process_requests(step, 12, n, seed=0, hflip=True, accum=accum)

    noise = torch.randn(12 // accum, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    flips = []
    for start, stop in ((0, 5), (3, 6)):  # 5 steps from the start (an epoch boundary at 40 images), then a resume at 3
        ahead.start_prefetch(plan, start)
        for step in range(start, stop):
            for idx, flip in plan(step):
                flips.append(flip)
                assert _same_batch(ahead.fetch(idx, flip, noise), plain.fetch(idx, flip, noise))
        assert (ahead.prefetcher.hits, ahead.prefetcher.misses) == ((stop - start) * accum, 0)
    assert 0 < torch.cat(flips).float().mean() < 1  # both stored variants were read
    ahead.close()
    assert ahead.prefetcher is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the copy stream exists only there")
def test_on_cuda_rows_copied_ahead_on_the_copy_stream_equal_synchronous_ones(cache):
    """The prefetch thread's copies run on a stream of their own; a missing wait or record_stream would show as a
    batch read before its copy finished (the copy stream is held back by a sleep kernel) or overwritten by a later
    one (the compute stream is kept busy after each fetch)."""
    cuda = torch.device("cuda")
    cfg = cache_cfg(cache)
    plain, ahead = _source(cache, cfg, cuda), _source(cache, cfg, cuda)
    plan = lambda step: process_requests(step, 12, len(plain), seed=0, hflip=True)  # noqa: E731
    ahead.copy_stream = torch.cuda.Stream(cuda)  # start_prefetch keeps it: the sleep below delays the first copies
    with torch.cuda.stream(ahead.copy_stream):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time
    ahead.start_prefetch(plan, 0)
    busy = torch.randn(2048, 2048, device=cuda)
    for step in range(12):
        (idx, flip), = plan(step)
        rows = ahead.prefetcher._queue[0][2].result()
        assert rows.ready is not None and rows.fields["latent_mean"].is_cuda
        got = ahead.fetch(idx, flip, None)
        for _ in range(4):  # work queued on the compute stream after the fetch, while the next copies start
            busy = (busy @ busy).tanh()
        want = plain.fetch(idx, flip, None)
        assert _same_batch(got, want)
    assert (ahead.prefetcher.hits, ahead.prefetcher.misses) == (12, 0)
    ahead.close()


def test_an_unplanned_request_is_served_and_stops_prefetching(cache):
    src, plain = _source(cache, cache_cfg(cache)), _source(cache, cache_cfg(cache))
    src.start_prefetch(lambda s: process_requests(s, 12, len(src), seed=0, hflip=True), 0)
    pf = src.prefetcher
    idx, flip = torch.tensor([1, 30, 7]), torch.tensor([True, False, False])
    assert _same_batch(src.fetch(idx, flip, None), plain.fetch(idx, flip, None))
    assert (pf.hits, pf.misses, pf.active) == (0, 1, False)
    assert not any(t.is_alive() for t in pf._pool._threads)


def test_training_with_prefetch_equals_training_without_it_across_a_resume(cache, tmp_path):
    straight = Trainer(cache_cfg(cache, "train.steps=4", "data.prefetch=false", "train.grad_accum=2"), tmp_path / "a")
    assert straight.parts.source.prefetcher is None
    straight.run()
    first = Trainer(cache_cfg(cache, "train.steps=2", "train.grad_accum=2"), tmp_path / "b")
    first.run()
    assert (first.parts.source.prefetcher.hits, first.parts.source.prefetcher.misses) == (4, 0)  # 2 steps x 2 micro
    second = Trainer(cache_cfg(cache, "train.steps=4", "train.grad_accum=2"), tmp_path / "b")  # prefetch may change on resume
    assert second.step == 2
    second.run()
    assert (second.parts.source.prefetcher.hits, second.parts.source.prefetcher.misses) == (4, 0)
    for name in ("model", "ema", "aligner"):
        a, b = getattr(straight.parts, name).state_dict(), getattr(second.parts, name).state_dict()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}.{k} differs"


def test_a_worker_exception_is_raised_by_take_with_its_message():
    def gather(idx, flip):
        if int(idx[0]) == 2:
            raise OSError(f"shard read failed at row {int(idx[0])}")
        return int(idx[0])

    pf = Prefetcher(gather, lambda s: [(torch.tensor([s]), torch.tensor([False]))], 0, CPU)
    assert pf.take(torch.tensor([0]), torch.tensor([False])) == 0
    assert pf.take(torch.tensor([1]), torch.tensor([False])) == 1
    with pytest.raises(OSError, match="shard read failed at row 2"):
        pf.take(torch.tensor([2]), torch.tensor([False]))
    pf.close()
    assert not any(t.is_alive() for t in pf._pool._threads)


def test_close_waits_for_the_gather_in_progress_and_cancels_the_rest():
    started = []

    def slow(idx, flip):
        started.append(int(idx[0]))
        time.sleep(0.3)
        return int(idx[0])

    pf = Prefetcher(slow, lambda s: [(torch.tensor([s]), None), (torch.tensor([s + 100]), None)], 0, CPU)
    time.sleep(0.05)
    t0 = time.perf_counter()
    pf.close()
    assert time.perf_counter() - t0 < 0.3 + 0.2  # one gather finished, the other was cancelled
    assert started == [0] and not any(t.is_alive() for t in pf._pool._threads)
    assert pf.take(torch.tensor([100]), None) is None


def test_a_process_exits_promptly_without_closing(cache):
    """An unclosed prefetcher must not hold the interpreter at exit (it ends after at most the gathers queued)."""
    script = textwrap.dedent(f"""
        import torch
        from ahpa.data.cache import open_cache
        from ahpa.data.order import process_requests
        from ahpa import config
        from ahpa.priors.registry import load_encoder
        cfg = config.load(None, ["data.source=cache", "data.path={cache}", "data.resolution=16", "prior.encoder=ahpa-vae:random"])
        src = open_cache(cfg, load_encoder("ahpa-vae:random"), ["stage1", "latent"], 4, torch.device("cpu"))
        src.start_prefetch(lambda s: process_requests(s, 12, len(src), seed=0, hflip=True, accum=3), 0)
        print("started", src.prefetcher.active)
    """)
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0 and "started True" in out.stdout, out.stderr[-2000:]
    assert time.perf_counter() - t0 < 30


def test_process_requests_partition_the_global_batch_in_fetch_order():
    from ahpa.data.order import batch_indices, flip_mask

    idx, flip = batch_indices(7, 24, 50, 3), flip_mask(7, 24, 3, True)
    parts = [r for rank in range(2) for r in process_requests(7, 24, 50, 3, True, rank=rank, world=2, accum=3)]
    assert [len(i) for i, _ in parts] == [4] * 6
    assert torch.equal(torch.cat([i for i, _ in parts]), idx) and torch.equal(torch.cat([f for _, f in parts]), flip)


def test_two_processes_with_prefetch_match_one(cache, tmp_path):
    """DDP over a prefetched cache (gloo, through torchrun): each process gathers its own slice of the
    next step in its worker thread; 2 processes x 6 equal 1 process x 12 to float rounding."""
    from ahpa.train.checkpoint import list_checkpoints, read_checkpoint

    args = ["model.preset=S/1", "model.hidden_size=32", "model.depth=2", "model.num_heads=2", "data.source=cache",
            f"data.path={cache}", "data.resolution=16", "prior.encoder=ahpa-vae:random", "align.depth=1",
            "align.projector_dim=32", "train.batch_size=12", "train.steps=3", "train.ckpt_every=1000",
            "train.sample_every=0", "data.prefetch=true"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    states = []
    for nproc in (1, 2):
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable]
        out = tmp_path / f"p{nproc}"
        res = subprocess.run([*launch, "-m", "ahpa.cli", "train", "--out", str(out), *args], env=env, capture_output=True,
                             text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        states.append(read_checkpoint(list_checkpoints(out / "checkpoints")[-1]))
    for part in ("model", "ema", "aligner"):
        a, b = states[0][part], states[1][part]
        assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 1e-5, part


def test_each_epoch_is_a_fresh_permutation_and_a_step_may_straddle_two():
    """every epoch visits each sample once, in an order of its own (not epoch 0's again)."""
    from ahpa.data.order import batch_indices, epoch_permutation

    n, B, seed = 50, 10, 3
    epoch0 = torch.cat([batch_indices(s, B, n, seed) for s in range(5)])
    epoch1 = torch.cat([batch_indices(s, B, n, seed) for s in range(5, 10)])
    assert torch.equal(epoch0.sort().values, torch.arange(n)) and torch.equal(epoch1.sort().values, torch.arange(n))
    assert not torch.equal(epoch0, epoch1)
    # positions 40..59 with B=20: the last 10 of epoch 0, then the first 10 of epoch 1
    mixed = batch_indices(2, 20, n, seed)
    assert torch.equal(mixed, torch.cat([epoch_permutation(n, seed, 0)[40:], epoch_permutation(n, seed, 1)[:10]]))


def test_half_the_samples_are_mirrored_and_none_without_hflip():
    """the flip probability is 1/2 (binomial: 51,200 draws, sd of the share 0.0022)."""
    from ahpa.data.order import flip_mask

    share = torch.cat([flip_mask(s, 256, 0, True) for s in range(200)]).float().mean().item()
    assert abs(share - 0.5) < 0.015, share
    assert not torch.cat([flip_mask(s, 256, 0, False) for s in range(4)]).any()
