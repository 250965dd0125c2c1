#!/usr/bin/env bash
# run_all.sh -- the comparison grid of the local-learning papers, one JSON line per run in $RESULTS.
#
#   bash run_all.sh                               # full protocol (160 epochs, 3 seeds): days on one GPU
#   QUICK=1 bash run_all.sh                       # whole grid in minutes on a CPU: 256 images, 1 epoch
#   METHODS="bp dgl" DATASETS=cifar10 SEEDS="0 1" EPOCHS=40 DEVICE=cuda bash run_all.sh
#
# Environment overrides (defaults in brackets):
#   METHODS   [bp greedy dgl]                     methods to run
#   DATASETS  [cifar10 svhn stl10]                datasets (files in $DATA_DIR, downloaded if missing)
#   GRID      [resnet32:8 resnet32:16 resnet110:32 resnet110:55]   arch:K pairs (bp always runs K=1)
#   SEEDS     [0 1 2]   EPOCHS [160]   DATA_DIR [./data]   DEVICE [auto]   RESULTS [results.jsonl]
#   EXTRA     []                                  extra flags passed to every run
#   QUICK=1   tiny budget: --subset 256 --epochs 1 --batch-size 64, one seed, results in results_quick.jsonl
#
# A run already present in $RESULTS (same method, dataset, arch, K, seed, epochs) is skipped, so the script can
# be re-run after an interruption. Missing data stops the script with local_learning.py's one-line message.
set -euo pipefail
cd "$(dirname "$0")"

METHODS=${METHODS:-"bp greedy dgl"}
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
  FLAGS="--subset 256 --batch-size 64 --mem-iters 1"
fi
[ -n "${DEVICE:-}" ] && FLAGS="$FLAGS --device $DEVICE"
PY=${PYTHON:-python}
touch "$RESULTS"

done_already() {  # method dataset arch K seed: is this run in $RESULTS?
  grep -F "\"method\": \"$1\", \"dataset\": \"$2\", \"arch\": \"$3\", \"K\": $4," "$RESULTS" \
    | grep -qF "\"seed\": $5, \"epochs\": $EPOCHS," || return 1
}

n_run=0; n_skip=0
for dataset in $DATASETS; do
  for pair in $GRID; do
    arch=${pair%%:*}; k=${pair##*:}
    for method in $METHODS; do
      K=$k; [ "$method" = bp ] && K=1
      for seed in $SEEDS; do
        if done_already "$method" "$dataset" "$arch" "$K" "$seed"; then n_skip=$((n_skip + 1)); continue; fi
        echo "== $method $dataset $arch K=$K seed=$seed epochs=$EPOCHS"
        # shellcheck disable=SC2086
        if ! $PY local_learning.py --method "$method" --dataset "$dataset" --data-dir "$DATA_DIR" --arch "$arch" \
             --K "$K" --seed "$seed" --epochs "$EPOCHS" --out "$RESULTS" $FLAGS $EXTRA; then
          echo "run_all.sh: stopped at $method $dataset $arch K=$K seed=$seed (see the error above)" >&2
          exit 1
        fi
        n_run=$((n_run + 1))
      done
    done
  done
done
echo "run_all.sh: $n_run run(s) made, $n_skip already in $RESULTS"
