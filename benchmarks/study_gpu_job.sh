#!/usr/bin/env bash
# One GPU job of the convergence study (docs/study.md). Run from the repository root on the device machine:
#
#     bash benchmarks/study_gpu_job.sh STEPS SEED EVAL_EVERY LANE [LANE ...]
#     bash benchmarks/study_gpu_job.sh 8000 0 2000 "--methods none" "--methods ahpa-soft" \
#         "--methods ahpa-soft --variant align.weight=1.5"
#
# Each LANE is the study.py flags of one process (its --methods run one after another); the lanes run at the same
# time on the one GPU. SiT-S/1 at batch 256 leaves much of an H200 idle (its step is bound by the host), so lanes
# side by side finish more steps in a job than one process would: three lanes compiled without CUDA graphs made
# ~1.6x the training steps per second of the same runs one after another (sixth
# session, docs/study.md). Every row records how many lanes shared the device: a lane's ms/step is measured
# under that contention.
# Runs are compiled with CUDA graphs (--compile on --compile-mode reduce-overhead): alone on an H200, SiT-S/1's
# step took 15.0 ms (ahpa-soft 19.3) against 27.9 (32.1) compiled without them (docs/study.md, sixth session).
# A lane whose run fails before its first evaluation is run again in the time left with torch.compile's default
# mode (and says so in the log), so that one CUDA-graph failure does not cost the whole job. Every lane's flags are
# split as a shell splits them (quotes allowed) and checked against the prepared cache (study.py --check) before any
# lane starts; the job exits 1 when a lane failed (a lane stopped by STUDY_LIMIT_S keeps its evaluations, not a failure).
# A lane may run a method an installed package registers ("--methods NAME", docs/study.md "A method of your own"): the
# package must be installed in the Python that runs the job, or --check refuses the name (with the valid ones).
#
# The machine has none of ../shared: copy the three inputs (54 MB) into an ignored folder first, here,
# and name it in the run's carry (the working tree that travels is limited to 64 MiB):
#     echo /.carry/ >> .git/info/exclude
#     mkdir -p .carry/detectors && cp ../shared/data/cifar10/train16k.npz .carry/ && cp -r ../shared/weights/taef2 .carry/ \
#         && cp ../shared/detectors/cifar10-resnet2*.pt ../shared/detectors/cifar10-resnet3*.pt .carry/detectors/
# What travels (tracked files + .carry) must stay under 64 MiB; it was 56 MiB in the sixth session once the docs'
# PNGs were paletted (study_report.py does that to every PNG it writes), 59 MiB in the twelfth once the pilots' rows
# were gzipped, 61.9 MiB in the twenty-eighth (10.6 MiB tracked + 51.3 MiB .carry, 2.1 MiB left, once the levels
# figures were written at 72 dpi, freeing 0.6 MB): each study job adds ~1 MB (three sample grids, plots), so commit
# the grids a report needs, not every one, or make room. Check before a call:
#     echo $(( ($(git ls-files -z | xargs -0 stat -c %s | paste -sd+ | bc) + $(du -sb .carry | cut -f1)) / 1048576 )) MiB
# The reference statistics of the full training set are committed (benchmarks/results/study/ref), so train.npz
# does not travel. What comes back in $OUT (at most 8 files): study.jsonl (every lane's rows: one per evaluation
# point, one per finished run), study.log (every lane's log, in lane order), env.txt and one sample grid per
# finished run. Append study.jsonl to docs/study/gpu/results.jsonl and rerun benchmarks/study_report.py.
#
# STUDY_LIMIT_S (default 530) is when every lane is stopped, counted from the job's start: keep it under the
# device call's timeout_s, with a few seconds for the merge. STUDY_FLAGS adds flags to every lane (argparse keeps the
# last), e.g. STUDY_FLAGS="--size smoke --device cpu --compile off" for a rehearsal on a CPU.
set -uo pipefail
OUT=${OUT:-/tmp/ahpa-study-out}
SRC=${STUDY_INPUTS:-.carry}
LIMIT_S=${STUDY_LIMIT_S:-530}
WORK=$(mktemp -d /tmp/ahpa-study-lanes.XXXX)
trap 'rm -rf "$WORK"' EXIT  # what comes back is copied to $OUT
mkdir -p "$OUT"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
steps=${1:?steps per run}
seed=${2:?seed}
every=${3:?evaluate every N steps}
shift 3
lanes=$#
(( lanes > 0 )) || { echo "no lane: give each process's study.py flags as one argument, e.g. \"--methods none\""; exit 2; }
read -ra extra <<< "${STUDY_FLAGS:-}"
common=(--size gpu --steps "$steps" --seed "$seed" --eval-every "$every"
        --data "$SRC/train16k.npz" --encoder "taef2:$SRC/taef2"
        --detectors "torchscript:$SRC/detectors/cifar10-resnet20.pt,torchscript:$SRC/detectors/cifar10-resnet32.pt"
        --ref-images /nonexistent --cache /tmp/ahpa-study-cache --workers 8 --compile on --compile-mode reduce-overhead --lanes "$lanes")
start=$(date +%s)
left() { echo $(( LIMIT_S - ($(date +%s) - start) )); }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null; nproc; \
  python3 -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0])"; } > "$OUT/env.txt" 2>&1
# the cache first, in one process: lanes started together would each prepare it
python3 benchmarks/study.py "${common[@]}" "${extra[@]}" --methods "" --results "$WORK/prep.jsonl" > "$WORK/lane0.log" 2>&1 \
    || { cat "$WORK/lane0.log"; cp "$WORK/lane0.log" "$OUT/study.log"; exit 1; }
threads=$(( $(nproc) / lanes )); (( threads > 0 )) || threads=1  # OMP_NUM_THREADS=0 is invalid
# a lane's flags as a shell would split them ('align.levels=[...]' quoted as in docs/study.md loses its quotes),
# without running anything in them
split() { python3 -c 'import shlex, sys; sys.stdout.write("".join(w + "\0" for w in shlex.split(sys.argv[1])))' "$1"; }
# every lane's methods and variants checked against the prepared cache before any lane trains: a typo would cost
# its lane (and be retried as if CUDA graphs had failed) while the others ran
i=0
for spec in "$@"; do
    i=$(( i + 1 ))
    mapfile -d '' -t flags < <(split "$spec")
    # (not the compile mode: a lane whose mode fails is run again with the default one, below)
    python3 benchmarks/study.py "${common[@]}" "${extra[@]}" "${flags[@]}" --compile-mode default --check \
        --results "$WORK/check.jsonl" \
        >> "$WORK/lane0.log" 2>&1 || { echo "lane $i ($spec) is refused:"; tail -3 "$WORK/lane0.log"; \
                                        cp "$WORK/lane0.log" "$OUT/study.log"; exit 2; }
done
lane() {  # lane() INDEX FLAGS: one process, and its rerun without CUDA graphs if it fails before any evaluation
    local i=$1 log="$WORK/lane$1.log" rows="$WORK/lane$1/study.jsonl" flags retry rc=0
    mapfile -d '' -t flags < <(split "$2")
    mkdir -p "$WORK/lane$i"
    echo "lane $i: $2" > "$log"
    for retry in "" "--compile-mode default"; do  # the rerun's flag comes last: argparse keeps it
        (( $(left) > 0 )) || { echo "lane $i: no time left" >> "$log"; break; }  # (timeout 0 would mean no limit)
        OMP_NUM_THREADS=$threads timeout "$(left)" python3 benchmarks/study.py "${common[@]}" "${extra[@]}" \
            --budget-s "$(left)" "${flags[@]}" $retry --results "$rows" >> "$log" 2>&1
        rc=$?
        (( rc != 0 && rc != 124 )) && ! grep -q '"kind": "eval"' "$rows" 2>/dev/null || break
        [ -z "$retry" ] && echo "lane $i: the run failed (exit $rc) before its first evaluation; again without CUDA graphs, $(left) s left" >> "$log"
    done
    echo "lane $i: exit $rc after $(( $(date +%s) - start )) s" >> "$log"
    return "$rc"
}
i=0
pids=()
for flags in "$@"; do
    i=$(( i + 1 ))
    lane "$i" "$flags" &
    pids+=($!)
done
failed=0
for pid in "${pids[@]}"; do  # 124 (stopped by STUDY_LIMIT_S) keeps its evaluations: not a failure
    wait "$pid"; rc=$?
    (( rc == 0 || rc == 124 )) || failed=$(( failed + 1 ))
done
cat "$WORK"/lane*/study.jsonl > "$OUT/study.jsonl" 2>/dev/null
cat "$WORK"/lane*.log > "$OUT/study.log"
cp "$WORK"/lane*/samples-*.png "$OUT/" 2>/dev/null
echo "study job: $lanes lanes, $(( $(date +%s) - start )) s" | tee -a "$OUT/study.log"
grep -h "step\|exit\|failed\|Error" "$WORK"/lane*.log | tail -40
(( failed == 0 )) || { echo "study job: $failed lane(s) failed (study.log says why)"; exit 1; }
