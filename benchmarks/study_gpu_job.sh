#!/usr/bin/env bash
# One GPU job of the convergence study (docs/study.md). Run from the repository root on the device machine:
#
#     bash benchmarks/study_gpu_job.sh METHODS STEPS [SEED] [EVAL_EVERY] [study.py flags...]
#     bash benchmarks/study_gpu_job.sh none,ahpa-soft 8000 0 2000      # the first comparison (docs/study.md)
#
# Runs are compiled (--compile on): eager, SiT-S/1's step was bound by the host (45.9 ms on an H200 for ~2.2 TFLOP).
#
# The machine has none of ../shared: copy the three inputs (54 MB) into an ignored folder first, here,
# and name it in the run's carry (the working tree that travels is limited to 64 MiB):
#     echo /.carry/ >> .git/info/exclude
#     mkdir -p .carry/detectors && cp ../shared/data/cifar10/train16k.npz .carry/ && cp -r ../shared/weights/taef2 .carry/ \
#         && cp ../shared/detectors/cifar10-resnet2*.pt ../shared/detectors/cifar10-resnet3*.pt .carry/detectors/
# The reference statistics of the full training set are committed (benchmarks/results/study/ref), so train.npz
# does not travel. Results (one JSON line per evaluation point, a sample grid per method, the log) go to $OUT;
# commit the .jsonl under benchmarks/results/study/ and rerun benchmarks/study_report.py.
set -uo pipefail
OUT=${OUT:-/tmp/ahpa-study-out}
SRC=${STUDY_INPUTS:-.carry}
mkdir -p "$OUT"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
methods=${1:?methods, e.g. none,ahpa-soft}
steps=${2:?steps per method}
seed=${3:-0}
every=${4:-2000}
shift $(( $# < 4 ? $# : 4 ))  # the rest goes to study.py (argparse keeps the last), e.g. --eval-num 5000
tag="${methods//,/_}-s${steps}-seed${seed}"
start=$(date +%s)
python3 benchmarks/study.py --size gpu --methods "$methods" --steps "$steps" --seed "$seed" --eval-every "$every" \
    --data "$SRC/train16k.npz" --encoder "taef2:$SRC/taef2" \
    --detectors "torchscript:$SRC/detectors/cifar10-resnet20.pt,torchscript:$SRC/detectors/cifar10-resnet32.pt" \
    --ref-images /nonexistent --cache /tmp/ahpa-study-cache --workers 8 --budget-s 540 --compile on \
    --results "$OUT/study-$tag.jsonl" "$@" 2>&1 | tee "$OUT/study-$tag.log"
echo "study job took $(( $(date +%s) - start )) s" | tee -a "$OUT/study-$tag.log"
