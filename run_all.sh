#!/usr/bin/env bash
# run_all.sh -- the comparison grid of the local-learning papers, one JSON line per run in $RESULTS.
#
#   bash run_all.sh                               # full protocol (160 epochs, 3 seeds): days on one GPU
#   QUICK=1 bash run_all.sh                       # whole grid in minutes on a CPU: 256 images, 1 epoch
#   METHODS="bp dgl" DATASETS=cifar10 SEEDS="0 1" EPOCHS=40 DEVICE=cuda bash run_all.sh
#   BENCH=1 bash run_all.sh                       # the speed/memory grid (--bench), rendered with --report
#
# Environment overrides (defaults in brackets):
#   METHODS   [bp greedy dgl predsim infopro auglocal man+infopro man+dgl mlaan+infopro mlaan+dgl mlaan+greedy
#              sgr+infopro sgr+dgl]
#             method[+base] words; an add-on's base follows the first '+' (sgr+man+dgl = SGR on MAN on DGL)
#   DATASETS  [cifar10 svhn stl10]                datasets (files in $DATA_DIR, downloaded if missing)
#   GRID      [resnet32:8 resnet32:16 resnet110:32 resnet110:55]   arch:K pairs (bp always runs K=1)
#   SEEDS     [0 1 2]   EPOCHS [160]   DATA_DIR [./data]   DEVICE [auto]   RESULTS [results.jsonl]
#   EXTRA     []                                  extra flags passed to every run
#   QUICK=1   tiny budget: --subset 128 --test-subset 256 --epochs 1 --batch-size 64, one seed, results in
#             results_quick.jsonl -- the whole pipeline in minutes on a CPU (numbers meaningless)
# BENCH=1: no training; for every METHODS word x BENCH_GRID [resnet32:16 resnet110:55] x BENCH_COMPILE
#   [eager default] (eager and --compile modes), `--bench BENCH_ITERS [8] --batch-size BENCH_BATCH [128]`
#   (+ BENCH_FLAGS, e.g. "--amp bf16"), appended to RESULTS_BENCH [results_bench.jsonl]; on CUDA (or with
#   MEMTABLE=1) also BP and InfoPro* (--balanced-memory) K=2,3,4 on ResNet-110 at batch MEMTABLE_BATCH [1024]:
#   InfoPro's memory table. Then `--report` renders the tables.
# AugLocal runs with --pyramid 0.5 (its official commands; aux depth 3). Every method uses the same EPOCHS
# (the InfoPro protocol, 160); MAN, MLAAN and AugLocal published 400-epoch numbers: EPOCHS=400 for those.
# Render the results with:  python local_learning.py --report results.jsonl
#
# A run already present in $RESULTS (same method, dataset, arch, K, seed, epochs) is skipped, so the script can
# be re-run after an interruption. Missing data stops the script with local_learning.py's one-line message.
set -euo pipefail
cd "$(dirname "$0")"

METHODS=${METHODS:-"bp greedy dgl predsim infopro auglocal man+infopro man+dgl mlaan+infopro mlaan+dgl mlaan+greedy sgr+infopro sgr+dgl"}
DATASETS=${DATASETS:-"cifar10 svhn stl10"}
GRID=${GRID:-"resnet32:8 resnet32:16 resnet110:32 resnet110:55"}
SEEDS=${SEEDS:-"0 1 2"}
EPOCHS=${EPOCHS:-160}
DATA_DIR=${DATA_DIR:-./data}
RESULTS=${RESULTS:-results.jsonl}
EXTRA=${EXTRA:-}
FLAGS=""
if [ "${QUICK:-0}" = 1 ]; then
  SEEDS=${SEEDS_QUICK:-0}; EPOCHS=1; RESULTS=${RESULTS_QUICK:-results_quick.jsonl}
  FLAGS="--subset 128 --test-subset 256 --batch-size 64 --mem-iters 1"
fi
[ -n "${DEVICE:-}" ] && FLAGS="$FLAGS --device $DEVICE"
PY=${PYTHON:-python}

if [ "${BENCH:-0}" = 1 ]; then
  RB=${RESULTS_BENCH:-results_bench.jsonl}
  touch "$RB"
  bench() {  # label, then local_learning.py flags
    echo "== bench $1"; shift
    # shellcheck disable=SC2086
    $PY local_learning.py "$@" --out "$RB" $EXTRA || { echo "run_all.sh: bench stopped (see above)" >&2; exit 1; }
  }
  for pair in ${BENCH_GRID:-resnet32:16 resnet110:55}; do
    arch=${pair%%:*}; k=${pair##*:}
    for word in $METHODS; do
      method=${word%%+*}; base=""; [ "$word" != "$method" ] && base="--base ${word#*+}"
      K=$k; [ "$method" = bp ] && K=1
      MFLAGS=""; [ "$method" = auglocal ] && MFLAGS="--pyramid 0.5"
      for mode in ${BENCH_COMPILE:-eager default}; do
        CFLAGS=""; [ "$mode" != eager ] && CFLAGS="--compile $mode"
        # shellcheck disable=SC2086
        bench "$word $arch K=$K $mode" --method "$method" $base --arch "$arch" --K "$K" $MFLAGS $CFLAGS \
          --bench "${BENCH_ITERS:-8}" --batch-size "${BENCH_BATCH:-128}" ${DEVICE:+--device $DEVICE} ${BENCH_FLAGS:-}
      done
    done
  done
  if [ "${MEMTABLE:-}" = 1 ] || { [ -z "${MEMTABLE:-}" ] && $PY -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; }; then
    for K in 1 2 3 4; do
      if [ "$K" = 1 ]; then M="--method bp"; else M="--method infopro --balanced-memory"; fi
      # shellcheck disable=SC2086
      bench "memory table K=$K" $M --arch resnet110 --K "$K" --bench 3 --batch-size "${MEMTABLE_BATCH:-1024}" \
        ${DEVICE:+--device $DEVICE} ${BENCH_FLAGS:-}
    done
  fi
  $PY local_learning.py --report "$RB"
  exit 0
fi
touch "$RESULTS"

done_already() {  # method dataset arch K seed base-json: is this run in $RESULTS?
  grep -F "\"method\": \"$1\", \"dataset\": \"$2\", \"arch\": \"$3\", \"K\": $4," "$RESULTS" \
    | grep -F "\"seed\": $5, \"epochs\": $EPOCHS, \"base\": $6," > /dev/null || return 1
}

n_run=0; n_skip=0
for dataset in $DATASETS; do
  for pair in $GRID; do
    arch=${pair%%:*}; k=${pair##*:}
    for word in $METHODS; do
      method=${word%%+*}; base=""; [ "$word" != "$method" ] && base=${word#*+}
      K=$k; [ "$method" = bp ] && K=1
      base_json=null; BASE_FLAG=""
      if [ -n "$base" ]; then base_json="\"$base\""; BASE_FLAG="--base $base"; fi
      MFLAGS=""; [ "$method" = auglocal ] && MFLAGS="--pyramid 0.5"
      for seed in $SEEDS; do
        if done_already "$method" "$dataset" "$arch" "$K" "$seed" "$base_json"; then n_skip=$((n_skip + 1)); continue; fi
        echo "== $word $dataset $arch K=$K seed=$seed epochs=$EPOCHS"
        # shellcheck disable=SC2086
        if ! $PY local_learning.py --method "$method" $BASE_FLAG --dataset "$dataset" --data-dir "$DATA_DIR" \
             --arch "$arch" --K "$K" --seed "$seed" --epochs "$EPOCHS" --out "$RESULTS" $MFLAGS $FLAGS $EXTRA; then
          echo "run_all.sh: stopped at $word $dataset $arch K=$K seed=$seed (see the error above)" >&2
          exit 1
        fi
        n_run=$((n_run + 1))
      done
    done
  done
done
echo "run_all.sh: $n_run run(s) made, $n_skip already in $RESULTS"
