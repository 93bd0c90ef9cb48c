#!/usr/bin/env bash
# One GPU job of the throughput benchmark (docs/benchmarks.md). Run from the repository root on the device
# machine, which has torch but neither diffusers nor any of ../shared; this job needs none of them:
#
#     bash benchmarks/gpu_job.sh            # core: none, ahpa-cached, repa; compiled; B/2 (batch 256) and
#                                           # XL/2 (batch 128); then sampling. Estimated 7-8 min; guards at
#                                           # 7.5 min (training) and 8.5 min (sampling). Run with timeout_s 600.
#     bash benchmarks/gpu_job.sh eager      # the same three methods, eager, no sampling (~3 min estimated)
#     bash benchmarks/gpu_job.sh xl256      # XL/2 at batch 256, none and ahpa-cached, compiled, with activation
#                                           # checkpointing of every block, then without (memory check: 80 GB;
#                                           # an out-of-memory run is recorded as an error). ~7-8 min estimated
#     bash benchmarks/gpu_job.sh prefetch   # B/2 batch 256, none and ahpa-cached, compiled, cache prefetch on
#                                           # and off (~3 min estimated)
#     bash benchmarks/gpu_job.sh core --budget-s 360 --warmup 3   # any job, with throughput.py flags overridden
#     bash benchmarks/gpu_job.sh diagnose   # the CUDA-only test of the copy stream; B/2 none vs ahpa-cached again
#                                           # (the B/2 gap after the copy-stream change); a kernel profile of XL/2 and
#                                           # B/2 vanilla steps with GEMM and attention rates (~6 min estimated)
#     bash benchmarks/gpu_job.sh profile    # the kernel profile of XL/2 and B/2 vanilla steps alone (diagnose's last part;
#                                           # ~3 min estimated: two compiles, then a few profiled steps and shape rates)
#     bash benchmarks/gpu_job.sh sampling   # sampling only, B/2 and XL/2, eager then compiled (sample.compile), side
#                                           # by side (~3-4 min estimated: two compiles of the forward)
#     bash benchmarks/gpu_job.sh on-the-fly # none and ahpa-on-the-fly, eager and compiled, B/2 and XL/2: needs
#                                           # the diffusers wheel carried in .whl/ (see below)
#     bash benchmarks/gpu_job.sh cudagraphs # B/2 none and ahpa-cached compiled in the default mode, then with CUDA
#                                           # graphs (reduce-overhead), side by side; SiT-S/1 gained 1.7-1.9x from them
#                                           # (docs/study.md), B/2 is the size whose targets are unmet (~4 min estimated)
#     bash benchmarks/gpu_job.sh tuning     # XL/2 and B/2 none compiled, then the same with inductor's coordinate-descent
#                                           # tuning of its Triton kernels (TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1), side
#                                           # by side: the profile put 28% (XL/2) and 39% (B/2) of the step in those
#                                           # kernels (~6-7 min estimated: four compiles, two of them tuning; B/2 alone,
#                                           # `tuning --models B/2`, ~4 min)
#     bash benchmarks/gpu_job.sh fp16       # B/2 none and ahpa-cached compiled, bf16 then fp16 with its loss scale (the
#                                           # precision older GPUs train in), side by side: the cost of the scale's
#                                           # unscaling pass and a check of fp16 on a GPU (~3-4 min estimated); first the
#                                           # CUDA-only tests (the copy stream, the stop vote under NCCL; ~20 s)
#     bash benchmarks/gpu_job.sh tokens     # B/2 and XL/2, none and ahpa-cached compiled, the heads on every token
#                                           # and on a quarter of them (align.token_fraction=0.25), side by side
#                                           # (~6 min estimated: six compiled measurements)
#     bash benchmarks/gpu_job.sh in512      # ImageNet 512 (1,024 tokens): B/2 and XL/2, none and ahpa-cached compiled,
#                                           # batch 64 per GPU (REPA's 256 over 8 GPUs is 32), a 256-image synthetic cache
#                                           # of SD-VAE's 512 level shapes (~2 GB with stored flips); ~5-6 min estimated
#     bash benchmarks/gpu_job.sh posthoc    # XL/2 then B/2, none and ahpa-cached compiled, without and with EDM2's post-hoc
#                                           # EMAs (train.posthoc_ema=[0.05,0.10]: two more EMA updates a step), side by
#                                           # side; eight compiled measurements, ~9-10 min estimated if no compile is
#                                           # reused (XL/2 ~90 s each, B/2 ~40-65 s), guarded at 7.5 min like the core
#                                           # job (B/2's last may be skipped; then `posthoc --models B/2`, ~4 min)
#     bash benchmarks/gpu_job.sh ema        # the EMA update alone, XL/2's, B/2's and S/1's parameters: the foreach lerp against
#                                           # the three passes it replaced, with a keep tensor (training's call: one lerp
#                                           # kernel per parameter on CUDA) and a float (the post-hoc EMAs'), side by side
#                                           # (benchmarks/ema_update.py; no compile, under a minute estimated)
#
# For on-the-fly, here first (diffusers is pure Python; its other needs are on the machine already):
#     echo /.whl/ >> .git/info/exclude
#     python3 -m pip download --no-deps --only-binary=:all: -d .whl diffusers==0.42.1
# and name .whl in the run's carry.
#
# Every figure goes to $OUT (JSON + log); the command line, device, torch version, batch, precision and
# compile flag are inside every record. The estimate behind the core job's guard is in docs/benchmarks.md.
set -uo pipefail
OUT=${OUT:-/tmp/ahpa-bench-out}
mkdir -p "$OUT"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
job=${1:-core}
shift $(( $# > 0 ? 1 : 0 ))  # the rest overrides the job's flags (argparse keeps the last), e.g. --budget-s 360
if ls .whl/diffusers-*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
start=$(date +%s)
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; \
  python3 -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0], torch.cuda.get_device_name())"; \
} 2>&1 | tee "$OUT/env_$job.txt"
bench() { python3 benchmarks/throughput.py --size gpu --work-dir /tmp/ahpa-bench --out "$OUT/throughput_$job${TAG:+_$TAG}.json" \
              "$@" "${EXTRA[@]}" 2>&1 | tee -a "$OUT/throughput_$job.log"; }
EXTRA=("$@")
profile() { python3 benchmarks/profile_step.py --size gpu --models XL/2,B/2 --methods none --work-dir /tmp/ahpa-bench \
                --out "$OUT/profile_step.json" 2>&1 | tee "$OUT/profile_step.log"; }
case "$job" in
    # the guards: no training measurement starts after 450 s (the slowest, XL/2 compile + steps, was estimated at
    # ~100 s) and no sampling one after 510 s (XL/2's, export + 50 Heun + 250 Euler-Maruyama, estimated at ~50 s)
    core) bench --models B/2,XL/2 --methods none,ahpa-cached,repa --compile compiled --budget-s 450 --sampling-budget-s 510 ;;
    eager) bench --models B/2,XL/2 --methods none,ahpa-cached,repa --compile eager --sampling off --budget-s 450 ;;
    xl256) bench --models XL/2 --batch 256 --methods none,ahpa-cached --compile compiled --activation-checkpointing all,0 \
                 --sampling off --budget-s 450 ;;
    prefetch) bench --models B/2 --methods none,ahpa-cached --compile compiled --prefetch both --sampling off --budget-s 450 ;;
    diagnose) python3 -m pytest -q -p no:cacheprovider tests/test_prefetch.py tests/test_distributed.py -k cuda 2>&1 | tee "$OUT/pytest_cuda.log"
              bench --models B/2 --methods none,ahpa-cached --compile compiled --sampling off --warmup 3 --steps 15
              profile ;;
    profile) profile ;;
    sampling) bench --models B/2,XL/2 --methods "" --sampling-compile both ;;
    cudagraphs) TAG=default bench --models B/2 --methods none,ahpa-cached --compile compiled --sampling off --budget-s 150
                TAG=reduce-overhead bench --models B/2 --methods none,ahpa-cached --compile compiled --compile-mode reduce-overhead \
                    --sampling off --budget-s 150 ;;
    fp16) python3 -m pytest -q -p no:cacheprovider tests/test_prefetch.py tests/test_distributed.py -k cuda 2>&1 \
              | tee "$OUT/pytest_cuda.log"  # the CUDA-only tests (~20 s): the copy stream, the stop vote
          TAG=bf16 bench --models B/2 --methods none,ahpa-cached --compile compiled --sampling off --budget-s 150 --precision bf16
          TAG=fp16 bench --models B/2 --methods none,ahpa-cached --compile compiled --sampling off --budget-s 150 --precision fp16 ;;
    tuning) TAG=default bench --models XL/2,B/2 --methods none --compile compiled --sampling off --budget-s 200
            TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1 TAG=coordinate-descent bench --models XL/2,B/2 --methods none \
                --compile compiled --sampling off --budget-s 250 ;;
    tokens) bench --models B/2,XL/2 --methods none,ahpa-cached --compile compiled --token-fractions 1,0.25 --sampling off \
                --warmup 3 --steps 15 --budget-s 450 ;;
    on-the-fly) bench --models B/2,XL/2 --methods none,ahpa-on-the-fly --compile both --sampling off --budget-s 450 ;;
    in512) bench --models B/2,XL/2 --methods none,ahpa-cached --resolution 512 --batch 64 --cache-images 256 --compile compiled \
               --sampling off --budget-s 420 ;;
    # XL/2 first: its ~4 ms of a 231 ms step (two foreach lerps, estimated) is the larger share, B/2's ~1 ms of 99 barely;
    # each pair's second run compiles the same graphs (the EMAs update outside them), from inductor's disk cache
    posthoc) bench --models XL/2,B/2 --methods none,ahpa-cached --compile compiled --posthoc-ema off,0.05:0.10 \
                 --sampling off --budget-s 450 ;;
    ema) for model in XL/2 B/2 S/1; do  # S/1: the study's host-bound model, where one kernel per parameter may show
             python3 benchmarks/ema_update.py --device cuda --model $model --repeats 21 \
                 --out "$OUT/ema_update_${model/\//}.json" 2>&1 | tee -a "$OUT/ema_update.log"
         done ;;
    *) echo "unknown job $job (core | eager | xl256 | prefetch | diagnose | profile | sampling | on-the-fly | cudagraphs | tuning | fp16 | tokens | in512 | posthoc | ema)"; exit 2 ;;
esac
echo "job $job took $(( $(date +%s) - start )) s" | tee -a "$OUT/throughput_$job.log"
