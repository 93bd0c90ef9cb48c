"""The throughput, profiling and gradient benchmarks at their smallest sizes (CPU, a few seconds each)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import run_script as _run

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def test_throughput_tiny_writes_complete_records(tmp_path):
    out = tmp_path / "tp.json"
    _run(["benchmarks/throughput.py", "--size", "tiny", "--models", "B/2", "--methods", "none,ahpa-cached,repa",
          "--token-fractions", "1,0.25", "--steps", "1", "--warmup", "1", "--sample-n", "2", "--work-dir", str(tmp_path),
          "--out", str(out)])
    result = json.loads(out.read_text())
    train = [r for r in result["records"] if r["kind"] == "train"]
    assert [(r["method"], r["token_fraction"]) for r in train] == [
        ("none", 1), ("ahpa-cached", 1), ("ahpa-cached", 0.25), ("repa", 1), ("repa", 0.25)]
    # the heads see a quarter of the 16 tokens of the tiny grid: a quarter of their FLOPs
    assert train[2]["heads_gflop_per_img"] == pytest.approx(train[1]["heads_gflop_per_img"] / 4, rel=1e-3)
    for r in result["records"]:
        for key in ("device", "torch", "batch", "precision", "compile", "command", "img_per_s"):
            assert key in r, (key, r)
    cached = train[1]
    # the SD-VAE level shapes: 5 levels (128/256/512/512/512 ch) on the 4x4 tiny grid + latent moments 2 x 4x8x8, fp16
    assert cached["levels"] == ["down0", "down1", "down2", "down3", "mid", "latent"]
    assert cached["cache_bytes_per_sample"] == 2 * (16 * 1920 + 2 * 4 * 8 * 8)
    assert all(r["finite"] for r in train) and cached["heads_gflop_per_img"] > 0
    assert set(result["ratios"]) == {"B/2 eager ahpa-cached/none", "B/2 eager repa/none",
                                     "B/2 eager ahpa-cached/none (token_fraction 0.25)", "B/2 eager repa/none (token_fraction 0.25)"}
    assert [r["solver"] for r in result["records"] if r["kind"] == "sample"] == ["heun", "euler-maruyama"]


def test_throughput_at_another_resolution_scales_the_grid_and_repas_input(tmp_path, monkeypatch):
    """--resolution (ImageNet 512's 1,024 tokens): the runs train at that side, REPA's ViT input scales as REPA's
    (224 at 256 -> 448 at 512, whole patches), and a side the latent grid cannot tile is refused."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import throughput

    gpu = throughput.at_resolution(throughput.SIZES["gpu"], 512)
    assert gpu["resolution"] == 512 and gpu["vit"]["image_size"] == 448 and throughput.SIZES["gpu"]["vit"]["image_size"] == 224
    assert throughput.at_resolution(throughput.SIZES["gpu"], None) is throughput.SIZES["gpu"]
    with pytest.raises(SystemExit, match="multiple of 16"):
        throughput.at_resolution(throughput.SIZES["gpu"], 500)
    out = tmp_path / "tp.json"
    _run(["benchmarks/throughput.py", "--size", "tiny", "--models", "B/2", "--methods", "none,repa", "--resolution", "128",
          "--steps", "1", "--warmup", "1", "--sampling", "off", "--work-dir", str(tmp_path), "--out", str(out)])
    train = [r for r in json.loads(out.read_text())["records"] if r["kind"] == "train"]
    assert [r["resolution"] for r in train] == [128, 128] and all(r["finite"] for r in train)
    assert "'image_size': 224" in train[1]["note"]


def test_throughput_measures_repa_reading_its_images_from_a_cache(tmp_path):
    """repa-cached: REPA's own cache (latent moments + uint8 crops): the loader reads the image once and the latent
    variant, and the external encoder runs in the step as for in-memory images."""
    out = tmp_path / "tp.json"
    _run(["benchmarks/throughput.py", "--size", "tiny", "--models", "B/2", "--methods", "none,repa-cached", "--steps", "1",
          "--warmup", "1", "--sampling", "off", "--work-dir", str(tmp_path), "--out", str(out)])
    result = json.loads(out.read_text())
    rec = next(r for r in result["records"] if r["method"] == "repa-cached")
    # 64x64x3 uint8 image + latent mean and logvar 2 x 4x8x8 fp16 (labels excluded, as for the other methods)
    assert rec["finite"] and rec["levels"] == ["external"] and rec["cache_bytes_per_sample"] == 64 * 64 * 3 + 2 * 4 * 8 * 8 * 2
    assert result["cache_images"]["bytes_per_image_read"] == 64 * 64 * 3 + 2 * 4 * 8 * 8 * 2 + 16
    assert "B/2 eager repa-cached/none" in result["ratios"]


def test_throughput_tiny_records_checkpointing_prefetch_and_precision(tmp_path, monkeypatch):
    out = tmp_path / "tp.json"
    _run(["benchmarks/throughput.py", "--size", "tiny", "--models", "B/2", "--methods", "none,ahpa-cached,repa",
          "--prefetch", "both", "--activation-checkpointing", "all", "--steps", "1", "--warmup", "1", "--sampling", "off",
          "--precision", "fp16", "--work-dir", str(tmp_path), "--out", str(out)])
    result = json.loads(out.read_text())
    # --precision reaches the runs (fp16 autocast with its loss scale on the CPU too) and their records
    assert {r["precision"] for r in result["records"]} == {"fp16 autocast"}
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import throughput

    args = SimpleNamespace(size="tiny", batch=0, compile_mode="default", precision="fp16")
    cfg = throughput.run_config(throughput.SIZES["tiny"], args, "B/2", "none", False, {"levels": tmp_path}, torch.device("cpu"))
    assert cfg.train.precision == "fp16"
    train = [(r["method"], r["prefetch"], r["checkpointed_blocks"], r.get("prefetch_hits"), r.get("prefetch_misses"))
             for r in result["records"]]
    # tiny B/2 has 4 blocks; 2 steps (1 warm-up + 1 timed), each fetched from the prefetch thread
    assert train == [("none", True, 4, 2, 0), ("none", False, 4, None, None), ("ahpa-cached", True, 4, 2, 0),
                     ("ahpa-cached", False, 4, None, None), ("repa", None, 4, None, None)]
    assert all(r["finite"] and r["activation_checkpointing"] == -1 for r in result["records"])
    mode = "B/2 eager, checkpointing all"
    assert set(result["ratios"]) == {f"{mode} ahpa-cached/none", f"{mode} ahpa-cached/none (prefetch off)",
                                     f"{mode} repa/none", f"{mode} none prefetch on/off", f"{mode} ahpa-cached prefetch on/off"}


@pytest.mark.skipif(not (SHARED / "data/cifar10/train16k.npz").is_file(), reason="needs ../shared (CIFAR-10, TAEF2)")
def test_level_gradients_smoke(tmp_path):
    _run(["benchmarks/level_gradients.py", "--size", "smoke", "--steps", "0,2", "--t", "0.2,0.8", "--batch", "8",
          "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "lg")])
    result = json.loads((tmp_path / "lg" / "gradients.json").read_text())
    first, trained = result["rows"][0]["by_t"]["0.2"], result["rows"][1]["by_t"]["0.8"]
    assert first["names"] == ["flow", "stage1", "stage2", "stage3", "stage4", "latent"]
    assert first["norm"][0] == 0 and min(first["norm"][1:]) > 0  # adaLN-Zero: at step 0 the flow loss reaches no block
    cos = trained["cos"]
    assert all(abs(cos[i][i] - 1) < 1e-5 for i in range(6)) and all(abs(cos[i][j] - cos[j][i]) < 1e-5
                                                                  for i in range(6) for j in range(6))
    assert trained["norm"][0] > 0 and (tmp_path / "lg" / "gradients.png").is_file()


def test_torchrun_failures_counts_how_a_refused_launch_ends(tmp_path):
    """One 2-process launch refused (its run directory held): it ends, prints the message once and torchrun's
    summary names it (once or twice: torchrun may stop the second process as it ends too)."""
    _run(["benchmarks/torchrun_failures.py", "--launches", "1", "--out", str(tmp_path / "f.json")])
    out = json.loads((tmp_path / "f.json").read_text())
    (row,) = out["launch_rows"]
    assert out["hung"] == 0 and out["message_not_printed"] == 0 and not row["hung"] and row["exit"] != 0
    assert row["printed"] == 1 and row["in_summary"] in (1, 2)
    assert out["clean"] + out["summary_names_one_process"] == 1 and out["torch"] == torch.__version__


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="it compares fork and the fork server, Linux's")
def test_worker_start_times_each_method_in_its_own_process(tmp_path):
    """benchmarks/worker_start.py (docs/data.md's table of start methods): each method's three loaders timed in a
    fresh process, and the fork server's later loaders reuse it (far below its first, which starts the server)."""
    _run(["benchmarks/worker_start.py", "--workers", "1", "--repeats", "1", "--methods", "fork,forkserver",
          "--out", str(tmp_path / "w.json")])
    out = json.loads((tmp_path / "w.json").read_text())
    assert set(out["runs"]) == {"fork", "forkserver"} and all(len(r[0]["later_s"]) == 2 for r in out["runs"].values())
    assert out["median_later_start_s"]["forkserver"] < out["median_first_start_s"]["forkserver"] / 2
    # fork is measured as itself (ahpa would start a fork server): no server to start, far below its first start
    assert out["median_first_start_s"]["fork"] < out["median_first_start_s"]["forkserver"] / 2


def test_profile_step_smoke(tmp_path):
    """The kernel-profile tool of the MFU analysis at tiny size on the CPU: its table adds up (the times themselves are
    CPU operator times, not GPU figures)."""
    out = tmp_path / "profile.json"
    _run(["benchmarks/profile_step.py", "--size", "tiny", "--models", "B/2", "--methods", "none,ahpa-cached",
          "--steps", "2", "--warmup", "1", "--work-dir", str(tmp_path), "--out", str(out)])
    result = json.loads(out.read_text())
    assert {p["precision"] for p in result["profiles"]} == {"fp32"}  # auto on the CPU
    assert [p["method"] for p in result["profiles"]] == ["none", "ahpa-cached"]
    for p in result["profiles"]:
        assert p["wall_ms_per_step"] >= p["busy_ms_per_step"] > 0
        assert sum(p["categories_ms_per_step"].values()) == pytest.approx(p["kernel_ms_per_step"], rel=1e-2)
        assert p["top"] and p["launches_per_step"] > 0
    # alignment adds operators to the step: more of them with ahpa-cached than without
    assert result["profiles"][1]["launches_per_step"] > result["profiles"][0]["launches_per_step"]


def test_profile_step_sorts_the_kernel_names_of_an_h200_profile(monkeypatch):
    """Names as the twelfth session's H200 profile recorded them. Inductor's fused kernels ("triton_red_fused_...")
    are not the optimizer's, though their names hold "_fused_" (that run counted them as such), and the profiler's
    range around the optimizer's kernels is no kernel: counted, it counted those kernels twice."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from types import SimpleNamespace

    from profile_step import category, is_annotation
    names = {
        "triton_red_fused__to_copy_add_mul_native_layer_norm_backward_split_unsqueeze_view_14": "triton",
        "triton_poi_fused_gelu_gelu_backward_view_10": "triton",
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::"
        "FusedOptimizerTensorListMetadata<4>, at::native::(anonymous": "optimizer",
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::"
        "TensorListMetadata<3>, at::native::(anonymous namespace)::B": "optimizer",
        "nvjet_sm90_tst_192x192_64x3_2x1_v_bz_coopB_NNN": "gemm",
        "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x128_1x4x1_cga1x1x1_kernel0_0": "attention",
        "Memcpy HtoD (Pinned -> Device)": "copy",
    }
    assert {n: category(n) for n in names} == names
    assert is_annotation(SimpleNamespace(name="Optimizer.step#AdamW.step", is_user_annotation=True))
    assert not is_annotation(SimpleNamespace(name="triton_poi_fused_gelu_view_17", is_user_annotation=False))
    assert is_annotation(SimpleNamespace(name="Optimizer.step#AdamW.step"))  # a torch without the flag


def test_host_syncs_names_the_python_stack_of_each_sync(monkeypatch):
    """On a GPU, CUDA's sync debug mode warns at each host sync; the count keeps the stack at each warning, so a
    sync inside a library function (torch's `synchronize`, say) is traced to the line of ours that called it, and
    counts another thread's syncs apart from the step's."""
    import threading
    import warnings

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import benchlib

    modes = []
    monkeypatch.setattr(benchlib.torch.cuda, "set_sync_debug_mode", modes.append)

    def library_sync():
        warnings.warn("called a synchronizing CUDA operation", UserWarning)

    class Step:
        n = 0

        def train_step(self):
            self.n += 1
            if self.n % 2:
                library_sync()
            warnings.warn("something else", UserWarning)  # not a sync: not counted

    class Prefetching(Step):  # a background thread that syncs once per step, as a loader thread might
        def train_step(self):
            t = threading.Thread(target=library_sync, name="prefetch")
            t.start()
            t.join()
            super().train_step()

    with pytest.warns(UserWarning, match="something else"):  # other warnings still reach the user
        result = benchlib.host_syncs(Step().train_step, 4)
    assert modes == ["warn", "default"] and result["host_syncs_per_step"] == 0.5
    assert result["host_syncs_other_threads_per_step"] == 0
    [(site, count)] = result["host_sync_sites"].items()
    assert count == 2 and site.startswith("test_benchmarks.py:") and "library_sync <- test_benchmarks.py:" in site
    assert " train_step <- benchlib.py:" in site
    with pytest.warns(UserWarning):
        result = benchlib.host_syncs(Prefetching().train_step, 4)
    assert result["host_syncs_per_step"] == 0.5 and result["host_syncs_other_threads_per_step"] == 1.0
    assert sum(1 for site in result["host_sync_sites"] if site.startswith("[prefetch] ")) == 1


def test_records_name_the_compiler_settings_given_by_environment(monkeypatch):
    """`gpu_job.sh tuning` sets TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1 for its second measurement: the records say
    so, or the two would read alike."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import benchlib
    import torch
    for k in [k for k in os.environ if k.startswith("TORCHINDUCTOR_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/tmp/x")  # what inductor sets itself after compiling: no setting
    assert "inductor_env" not in benchlib.device_info(torch.device("cpu"))
    monkeypatch.setenv("TORCHINDUCTOR_COORDINATE_DESCENT_TUNING", "1")
    assert benchlib.device_info(torch.device("cpu"))["inductor_env"] == {"TORCHINDUCTOR_COORDINATE_DESCENT_TUNING": "1"}


def test_throughput_times_synced_windows_after_warmup_and_computes_mfu(monkeypatch, tmp_path):
    """img/s = timed steps x batch / their time (warm-up excluded: it agrees with the per-window rates),
    every window ends with a device sync, model FLOPs = 3 x an independent forward count, MFU = img/s x model
    FLOPs / peak (heads only in mfu_with_heads)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import benchlib
    import throughput
    from ahpa.train.loop import Trainer

    events = []
    real_step, real_sync, real_info = Trainer.train_step, benchlib.sync, benchlib.device_info
    flops = {}

    def step(self):
        events.append("step")
        if "fwd" not in flops:
            m, B = self.parts.model, 2
            s = m.cfg.input_size
            from torch.nn.attention import SDPBackend, sdpa_kernel
            with sdpa_kernel(SDPBackend.MATH):  # counted as matmuls (the CPU's fused kernel is not counted)
                flops["fwd"] = benchlib.count_flops(lambda: m(torch.randn(B, m.cfg.in_channels, s, s), torch.rand(B),
                                                              torch.zeros(B, dtype=torch.long))) / B
        if len([e for e in events if e == "step"]) <= 2:
            time.sleep(0.5)  # slow warm-up steps (compilation)
        return real_step(self)

    monkeypatch.setattr(Trainer, "train_step", step)
    monkeypatch.setattr(benchlib, "sync", lambda device: (events.append("sync"), real_sync(device)))
    monkeypatch.setattr(benchlib, "device_info", lambda device: {**real_info(device), "peak_bf16_tflops": 1e-3})
    out = tmp_path / "tp.json"
    monkeypatch.setattr(sys, "argv", ["throughput.py", "--size", "tiny", "--models", "B/2", "--methods", "ahpa-cached",
                                      "--steps", "4", "--warmup", "2", "--sampling", "off", "--work-dir", str(tmp_path),
                                      "--out", str(out)])
    throughput.main()
    rec = json.loads(out.read_text())["records"][0]
    assert events == ["step", "step", "sync"] + ["step", "sync"] * 4  # window = steps // 4 = 1 step
    # the timed rate agrees with its windows' (a warm-up inside it would halve it here)
    per_window_s = sum(rec["batch"] / w for w in rec["window_img_per_s"])
    assert rec["img_per_s"] == pytest.approx(4 * rec["batch"] / per_window_s, rel=0.05)
    assert rec["model_gflop_per_img"] == pytest.approx(3 * flops["fwd"] / 1e9, rel=0.05)  # adaLN, embedders left out
    assert rec["mfu"] == pytest.approx(rec["img_per_s"] * rec["model_gflop_per_img"] / 1.0, rel=1e-3)
    assert rec["mfu_with_heads"] == pytest.approx(
        rec["img_per_s"] * (rec["model_gflop_per_img"] + rec["heads_gflop_per_img"]), rel=1e-3)


@pytest.mark.parametrize("name, peak", [("NVIDIA H200", 989.0), ("NVIDIA H100 80GB HBM3", 989.0),
                                        ("NVIDIA H100 PCIe", 756.0), ("NVIDIA A100-SXM4-80GB", 312.0)])
def test_mfu_peak_by_device_name(monkeypatch, name, peak):
    """the MFU denominator by the name torch reports (the PCIe H100 is not an SXM one)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import benchlib

    monkeypatch.setattr(benchlib.torch.cuda, "get_device_name", lambda device=None: name)
    assert benchlib.device_info(torch.device("cuda", 0))["peak_bf16_tflops"] == peak


def test_a_training_log_row_has_the_mfu_of_a_listed_gpu_in_16_bit(monkeypatch, tmp_path):
    """metrics.jsonl's `mfu` (and the bar's): the SiT's training FLOPs (3 x its forward, the heads left out) per
    second per process over the GPU's dense 16-bit peak, the benchmarks' own MFU; none in fp32 or on a GPU not
    listed (no guessed peak). The same table as the benchmarks' (ahpa.device.PEAK_BF16_TFLOPS)."""
    import time

    from ahpa import config
    from ahpa.device import peak_tflops
    from ahpa.train import schedule
    from ahpa.train.loop import Trainer
    from tests.conftest import TINY

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert peak_tflops(torch.device("cuda", 0)) == 756.0 and peak_tflops(torch.device("cpu")) is None
    tr = Trainer(config.load(None, [*TINY, "train.steps=2"]), tmp_path / "run")
    sums = tr.train_step()
    peaks = {"cpu": 2e-6}
    monkeypatch.setattr(schedule, "peak_tflops", lambda device: peaks.get(torch.device(device).type))
    assert "mfu" not in schedule.log_row(tr, sums, 1, time.perf_counter() - 1, 1)  # fp32: no MFU
    monkeypatch.setattr(tr.parts, "amp", torch.bfloat16)
    row = schedule.log_row(tr, sums, 1, time.perf_counter() - 1, 1)
    assert row["mfu"] == pytest.approx(row["img_per_s"] * 3 * tr.parts.model.flops_per_image() / 2e6, rel=1e-9)
    assert "mfu" not in schedule.log_row(tr, sums, 1, time.perf_counter() - 1, 0)  # a launch's first step alone
    peaks.clear()  # a GPU not listed
    assert "mfu" not in schedule.log_row(tr, sums, 1, time.perf_counter() - 1, 1)


def test_sampling_mfu_counts_the_solvers_network_evaluations(monkeypatch, tmp_path):
    """the sampling record's NFE (MFU's numerator) is the number of network calls the solver makes."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import benchlib
    import throughput
    from ahpa.models.sit import SiT

    calls = []
    real_fwd = SiT.forward
    monkeypatch.setattr(SiT, "forward", lambda self, *a, **k: (calls.append(1), real_fwd(self, *a, **k))[1])
    args = SimpleNamespace(size="tiny", sample_n=2)
    size = dict(throughput.SIZES["tiny"])
    synthetic = benchlib.SyntheticSDVAE()
    info = {"peak_bf16_tflops": None, "device": "cpu"}
    counted = []
    real_generate = throughput.generate

    def generate(bundle, idx, labels, seed, cfg):
        calls.clear()
        out = real_generate(bundle, idx, labels, seed, cfg)
        counted.append((cfg.solver, cfg.steps, len(calls)))
        return out

    monkeypatch.setattr(throughput, "generate", generate)
    recs = throughput.measure_sampling("B/2", size, args, synthetic, torch.device("cpu"), tmp_path, info)
    timed = {(s, n): c for s, n, c in counted if n > 2}  # not the 2-step warm-ups
    for r in recs:
        assert r["nfe"] == timed[(r["solver"], r["steps"])], r


def test_head_flops_table_is_three_times_the_heads_forward(capsys, monkeypatch):
    """benchmarks/head_flops.py's 'shared trunk + heads' column (docs/method.md) is 3 x the heads' forward FLOPs."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import head_flops
    from benchlib import count_flops
    from ahpa.align.projector import Projector

    head_flops.main()
    line = next(l for l in capsys.readouterr().out.splitlines() if "| S/1 |" in l)
    shared = float(line.split("|")[4])
    proj = Projector(384, [64, 64, 64, 64, 32], 2048, shared_trunk=True)
    fwd_per_token = count_flops(lambda: proj(torch.randn(1, 1, 384)))
    assert shared == pytest.approx(3 * fwd_per_token * 64 / 1e9, abs=0.05)


def test_throughput_measures_posthoc_ema_off_and_on_side_by_side(monkeypatch, tmp_path):
    """--posthoc-ema off,0.05:0.1: each method with and without the power-function EMAs, in turn; the tracked run's
    every step (warm-up and timed) updates both copies from the trained weights, the other's none; records say
    which, ratios pair them, and no snapshot is written (train_step never writes one; the spacing is the run's)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import throughput
    from ahpa.train import posthoc_track

    calls, fresh = [], []
    real_update = posthoc_track.PowerEMAs.update

    def update(self, t):
        real_update(self, t)
        calls.append((tuple(self.sigmas), t))
        if t == 1:  # beta_1 = 0: each copy is then exactly the weights after the first step
            fresh.append(all(torch.equal(a, b) for averaged, trained in self._pairs for a, b in zip(averaged, trained)))

    monkeypatch.setattr(posthoc_track.PowerEMAs, "update", update)
    out = tmp_path / "tp.json"
    monkeypatch.setattr(sys, "argv", ["throughput.py", "--size", "tiny", "--models", "B/2", "--methods", "none,ahpa-cached",
                                      "--posthoc-ema", "off,0.05:0.1", "--steps", "2", "--warmup", "1", "--sampling",
                                      "off", "--work-dir", str(tmp_path), "--out", str(out)])
    throughput.main()
    result = json.loads(out.read_text())
    assert [(r["method"], r["posthoc_ema"]) for r in result["records"]] == [
        ("none", []), ("none", [0.05, 0.1]), ("ahpa-cached", []), ("ahpa-cached", [0.05, 0.1])]
    assert all(r["finite"] for r in result["records"])
    assert calls == [((0.05, 0.1), t) for t in (1, 2, 3)] * 2 and fresh == [True, True]
    assert list(tmp_path.glob("runs/*/posthoc/*")) == []
    assert {"B/2 eager none posthoc_ema 0.05:0.1 on/off", "B/2 eager ahpa-cached posthoc_ema 0.05:0.1 on/off",
            "B/2 eager ahpa-cached/none", "B/2 eager ahpa-cached/none (posthoc_ema 0.05:0.1)"} == set(result["ratios"])
    on, off = result["records"][1], result["records"][0]
    assert result["ratios"]["B/2 eager none posthoc_ema 0.05:0.1 on/off"] == round(on["img_per_s"] / off["img_per_s"], 3)
    # the spacing is the run's length: the free-space check counts one snapshot step, not 16
    args = SimpleNamespace(size="gpu", batch=0, compile_mode="default", precision="auto")
    cfg = throughput.run_config(throughput.SIZES["gpu"], args, "XL/2", "none", True, {"levels": tmp_path},
                                torch.device("cpu"), posthoc=(0.05, 0.1))
    assert cfg.train.posthoc_ema == [0.05, 0.1] and posthoc_track.steps_to_write(cfg.train, 0) == 1
    for bad in ("0.05,0.3", "0.05:0.05", "on", ""):
        with pytest.raises(SystemExit, match="--posthoc-ema"):
            throughput.posthoc_settings(bad)


def test_ema_update_benchmark_measures_both_ways_side_by_side(tmp_path):
    """benchmarks/ema_update.py at S/2 (~20 s): each way timed under both calls, the ratios of their medians, and the
    three passes' temporary (a copy of the parameters) in the extra memory, which the library's lerp does not take."""
    from ahpa.models.sit import SiT, SiTConfig

    out = tmp_path / "ema.json"
    _run(["benchmarks/ema_update.py", "--model", "S/2", "--repeats", "2", "--out", str(out)])
    r = json.loads(out.read_text())
    with torch.device("meta"):
        params = list(SiT(SiTConfig.preset("S/2")).parameters())
    assert (r["params"], r["tensors"], r["dtype"], r["torch"]) == (sum(p.numel() for p in params), len(params), "fp32",
                                                                    torch.__version__)
    ways = {f"{way} {call}" for way in ("three-pass", "lerp") for call in ("keep", "float")}
    assert set(r["time"]) == set(r["extra_mb"]) == ways and all(len(t["ms"]) == 2 for t in r["time"].values())
    for call in ("keep", "float"):
        slow, fast = r["time"][f"three-pass {call}"]["median_ms"], r["time"][f"lerp {call}"]["median_ms"]
        assert r["ratios"][f"three-pass/lerp {call} time"] == round(slow / fast, 2)
        copy_mb = r["params"] * 4 / 2**20
        assert r["extra_mb"][f"three-pass {call}"] > 0.9 * copy_mb > 10 * r["extra_mb"][f"lerp {call}"]


def test_step_ops_counts_each_methods_operators_by_phase_beside_a_baseline_library(tmp_path):
    """benchmarks/step_ops.py at its tiny size, this checkout measured beside itself as --baseline-src (the before/after
    path): every operator has its phase (a line of Trainer.train_step the benchmark's table does not name shows as
    "other: ..."), the totals add up, and only alignment runs an aligner and running means."""
    out = tmp_path / "ops.json"
    _run(["benchmarks/step_ops.py", "--size", "tiny", "--methods", "none,ahpa-soft", "--steps", "2", "--rounds", "1",
          "--count-steps", "1", "--baseline-src", "src", "--work-dir", str(tmp_path), "--out", str(out)])
    r = json.loads(out.read_text())
    assert (r["torch"], r["levels"], r["size"]) == (torch.__version__, 5, "tiny") and "step_ops.py" in r["command"]
    assert set(r["libraries"]) == {"this", "baseline"} and set(r["this_over_baseline"]) == {"none", "ahpa-soft"}
    for lib in r["libraries"].values():
        assert lib["finite"] and set(lib["cpu_ratios_to_none"]) == set(lib["wall_ratios_to_none"]) == {"ahpa-soft"}
        assert all(len(ms) == 1 and ms[0] > 0 for ms in lib["round_median_cpu_ms"].values())
        none, ahpa = lib["counts"]["none"], lib["counts"]["ahpa-soft"]
        for rec in (none, ahpa):
            assert not [p for p in rec["phases"] if p.startswith(("other", "unknown"))], list(rec["phases"])
            eager = [v for p, v in rec["phases"].items() if p.split(" ")[0] not in ("SiT", "aligner")]
            assert rec["totals"]["eager"]["ops"] == pytest.approx(sum(v["ops"] for v in eager))
            assert all(v["ops"] == sum(v["by_op"].values()) >= v["launches"] for v in rec["phases"].values())
        assert {"SiT forward", "SiT backward", "fetch", "optimizer", "EMA", "window sums"} <= set(none["phases"])
        assert {"aligner forward", "aligner backward", "running means"} <= set(ahpa["phases"]) - set(none["phases"])
        assert ahpa["totals"]["eager"]["launches"] > none["totals"]["eager"]["launches"] and ahpa["levels"] == [
            "down0", "down1", "down2", "mid", "latent"]
    # the same library on both sides: the same counts
    assert r["libraries"]["this"]["counts"] == r["libraries"]["baseline"]["counts"]
