#!/usr/bin/env bash
# run_all.sh -- the comparison grid of the local-learning papers, one JSON line per run in $RESULTS.
#
#   bash run_all.sh                     # every method chain x grid x dataset, each under its paper's protocol
#                                       # (160 epochs; MAN, MLAAN, AugLocal 400), 3 seeds: days on one GPU
#   QUICK=1 bash run_all.sh             # the same grid on small configurations, in one process: minutes on a CPU
#   METHODS="bp dgl" DATASETS=cifar10 SEEDS="0 1" EPOCHS=40 DEVICE=cuda bash run_all.sh
#   BENCH=1 bash run_all.sh             # the speed / memory / FLOPs grid (--bench), rendered with --report
#   BENCH=1 MEMTABLE=1 bash run_all.sh  # memory at the papers' batch and config, next to the papers' figures
#   GPU=1 bash run_all.sh               # the prepared GPU check (10 minutes on one GPU): see "GPU=1" below
#
# Environment overrides (defaults in brackets):
#   METHODS   [bp bp-checkpoint greedy dgl predsim infopro auglocal man+infopro man+dgl mlaan+greedy mlaan+dgl
#              mlaan+infopro sgr+infopro sgr+dgl]
#             method[+base] words; an add-on's base follows the first '+' (sgr+man+dgl = SGR on MAN on DGL);
#             bp-checkpoint = BP with activation checkpointing at the grid's K
#   DATASETS  [cifar10 svhn stl10]   GRID [resnet32:8 resnet32:16 resnet110:32 resnet110:55] (arch:K; bp runs K=1)
#   SEEDS [0 1 2]   EPOCHS [the protocol's]   DATA_DIR [./data]   DEVICE [auto]   RESULTS [results.jsonl]
#   EXTRA     []   extra flags passed to every run
#   QUICK=1   GRID resnet32:8, --subset 128 --test-subset 256 --epochs 1 --batch-size 64, one seed, every run in
#             one Python process, results in results_quick.jsonl (numbers meaningless: it checks the pipeline)
# BENCH=1: no training; every METHODS word x BENCH_GRID [resnet32:16 resnet110:55] x BENCH_COMPILE [eager default],
#   `--bench BENCH_ITERS [8] --batch-size BENCH_BATCH [128]` (+ BENCH_FLAGS, e.g. "--amp bf16"), appended to
#   RESULTS_BENCH [results_bench.jsonl]; with MEMTABLE=1 (the default on CUDA) also the papers' memory settings
#   (InfoPro's Table 3: ResNet-110 CIFAR-10 batch 1024 and STL-10 batch 128: BP, BP-checkpoint, InfoPro* K=2,3,4;
#   on CUDA also MAN's and InfoPro's ImageNet settings: ResNet-101/152 at 128 per GPU). Then --report.
# A run whose every resolved setting (the result line's "config": method, options, dataset, arch, K, seed, epochs,
# batch, lr, warm-up, subsets, ...) is already in $RESULTS is skipped, so the script can be re-run after an
# interruption; a change of EXTRA or of any default trains anew. Missing data stops it with the program's
# one-line message. Render the results with:  python local_learning.py --report results.jsonl [--plot grid.png]
set -euo pipefail
cd "$(dirname "$0")"

METHODS=${METHODS:-"bp bp-checkpoint greedy dgl predsim infopro auglocal man+infopro man+dgl mlaan+greedy mlaan+dgl mlaan+infopro sgr+infopro sgr+dgl"}
DATASETS=${DATASETS:-"cifar10 svhn stl10"}
GRID_GIVEN=${GRID:-}; GRID=${GRID:-"resnet32:8 resnet32:16 resnet110:32 resnet110:55"}
SEEDS=${SEEDS:-"0 1 2"}
DATA_DIR=${DATA_DIR:-./data}
RESULTS=${RESULTS:-results.jsonl}
EXTRA=${EXTRA:-}
PY=${PYTHON:-python}
FLAGS="${EPOCHS:+--epochs $EPOCHS} ${DEVICE:+--device $DEVICE}"
INPROC=0
if [ "${QUICK:-0}" = 1 ]; then
  GRID=${GRID_GIVEN:-resnet32:8}; SEEDS=${SEEDS_QUICK:-0}; RESULTS=${RESULTS_QUICK:-results_quick.jsonl}; INPROC=1
  FLAGS="--subset 128 --test-subset 256 --epochs 1 --batch-size 64 --mem-iters 1 ${DEVICE:+--device $DEVICE}"
fi

method_flags() {  # word K -> the flags of that method chain at K modules
  local word=$1 K=$2 method=${1%%+*}
  case $word in
    bp) echo "--method bp --K 1" ;;
    bp-checkpoint) echo "--method bp --checkpoint --K $K" ;;
    *+*) echo "--method $method --base ${word#*+} --K $K" ;;
    *) echo "--method $method --K $K" ;;
  esac
}

read -r -d '' RUN_LIST_PY <<'PY' || true
import json, subprocess, sys
import local_learning as L
results, inproc = sys.argv[1], sys.argv[2] == "1"
free = L.RESUME_FREE | {"sources", "warnings"}          # (where files are and how much is logged: not the run)
key = lambda config: json.dumps({k: v for k, v in config.items() if k not in free}, sort_keys=True, default=str)
done = set()
for line in open(results, "rb"):
    try:
        done.add(key(json.loads(line)["config"]))
    except (ValueError, KeyError, TypeError, AttributeError):
        pass
made = skipped = 0
for argv in [line.split() for line in sys.stdin.read().splitlines() if line.strip()]:
    try:
        args, _, opts = L.resolve_config(L.parse_args(argv))
    except L.UserError as e:
        sys.exit(f"error: {e}\nrun_all.sh: stopped at {' '.join(argv)} (see the error above)")
    want = key(L.resolved_values(args, opts))              # every resolved setting must match to skip a run
    if want in done:
        skipped += 1
        continue
    print("==", " ".join(argv), flush=True)
    ok = True
    if inproc:
        try:
            L.main(argv + ["--out", results])
        except SystemExit as e:
            ok = not e.code
    else:
        ok = subprocess.run([sys.executable, "local_learning.py", *argv, "--out", results]).returncode == 0
    if not ok:
        sys.exit(f"run_all.sh: stopped at {' '.join(argv)} (see the error above)")
    made += 1
    done.add(want)
print(f"run_all.sh: {made} run(s) made, {skipped} already in {results}")
PY
run_list() {  # results file, 1 = in this process; argv lines on stdin -> the runs not in the file yet
  touch "$1"
  $PY -c "$RUN_LIST_PY" "$@"
}

bench_grid() {  # results file -> the --bench lines of METHODS x BENCH_GRID x BENCH_COMPILE
  local out=$1 pair word mode cflag
  for pair in ${BENCH_GRID:-resnet32:16 resnet110:55}; do
    for word in $METHODS; do
      for mode in ${BENCH_COMPILE:-eager default}; do
        cflag=""; [ "$mode" != eager ] && cflag="--compile $mode"
        echo "$(method_flags "$word" "${pair##*:}") --arch ${pair%%:*} $cflag --bench ${BENCH_ITERS:-8} \
--batch-size ${BENCH_BATCH:-128} ${DEVICE:+--device $DEVICE} ${BENCH_FLAGS:-} $EXTRA"
      done
    done
  done | bench_list "$out"
}

read -r -d '' BENCH_LIST_PY <<'PY' || true
import subprocess, sys
import local_learning as L
for argv in [line.split() for line in sys.stdin.read().splitlines() if line.strip()]:
    print("== bench", " ".join(argv), flush=True)
    if sys.argv[2] == "1":
        try:
            L.main(argv + ["--out", sys.argv[1]])
            continue
        except SystemExit as e:
            if not e.code:
                continue
    elif subprocess.run([sys.executable, "local_learning.py", *argv, "--out", sys.argv[1]]).returncode == 0:
        continue
    sys.exit(f"run_all.sh: bench stopped at {' '.join(argv)} (see above)")
PY
bench_list() {  # results file; argv lines on stdin -> one --bench run each (in one process if INPROC=1)
  $PY -c "$BENCH_LIST_PY" "$1" "$INPROC"
}

memory_table() {  # results file, 1 for the ImageNet settings: the papers' memory settings (report_paper_memory)
  local out=$1 ds b m arch tail="--bench 3 --mem-iters 1 ${DEVICE:+--device $DEVICE} ${BENCH_FLAGS:-}"
  {
    for row in cifar10:1024 stl10:128; do                                # InfoPro's Table 3, ResNet-110
      ds=${row%%:*}; b=${row##*:}
      for m in "bp --K 1" "bp --checkpoint --K 4" "infopro --balanced-memory --K 2" "infopro --balanced-memory --K 3" \
               "infopro --balanced-memory --K 4"; do
        echo "--method $m --dataset $ds --arch resnet110 --batch-size $b $tail"
      done
    done
    if [ "$2" = 1 ]; then                                                 # InfoPro's Table 4, MAN's claims (per GPU)
      for arch in resnet101 resnet152; do
        for m in "bp --K 1" "infopro --K 2" "infopro --K 4" "man --base infopro --K 4"; do
          echo "--method $m --dataset imagenet --arch $arch --batch-size 128 $tail"
        done
      done
    fi
  } | bench_list "$out"
}

has_cuda() { $PY -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; }

if [ "${GPU:-0}" = 1 ]; then
  # The prepared check for a GPU machine, about 10 minutes (GPU_MINUTES) on one modern GPU, all files under GPU_OUT
  # [gpu_results]: (1) every method chain for one short epoch of the CIFAR-10 subset (GPU_DATA
  # [../shared/data/cifar10-subset]; copy it next to the checkout where ../shared is absent), a crash check;
  # (2) the --bench grid (ResNet-32 K=16) eager, and --compile for GPU_COMPILE_METHODS, under GPU_AMP [--amp bf16];
  # (3) the papers' memory settings with CUDA peaks; (4) as many full-schedule subset runs (bp dgl infopro
  # auglocal man mlaan sgr, each paper's protocol) as the time left allows, judged by the crash check's speed;
  # (5) the report (and the plot, with matplotlib). Every step runs in one Python process (no start-up per run).
  out=${GPU_OUT:-gpu_results}; data=${GPU_DATA:-../shared/data/cifar10-subset}; dev=${DEVICE:-cuda}
  amp=${GPU_AMP---amp bf16}; budget=$(( ${GPU_MINUTES:-10} * 60 )); start=$SECONDS; INPROC=1
  all="bp bp-checkpoint greedy dgl predsim infopro auglocal man+infopro man+dgl mlaan+greedy mlaan+dgl mlaan+infopro sgr+infopro sgr+dgl sgr+man+dgl"
  mkdir -p "$out"; : > "$out/crash.jsonl"; : > "$out/bench.jsonl"; touch "$out/runs.jsonl"
  sub="--dataset folder --data-dir $data --norm cifar10 --device $dev $amp"
  echo "== GPU check 1/5: every method chain, one epoch of 2048 subset images"
  for word in ${GPU_METHODS:-$all}; do echo "$(method_flags "$word" 16) $sub --subset 2048 --batch-size 256 --lr 0.1 --epochs 1"; done \
    | run_list "$out/crash.jsonl" 1
  echo "== GPU check 2/5: --bench, eager and compiled ($(( budget - SECONDS + start )) s left)"
  DEVICE=$dev METHODS=${GPU_METHODS:-$all} BENCH_GRID=${GPU_BENCH_GRID:-resnet32:16} BENCH_COMPILE=eager \
    BENCH_FLAGS="$amp ${BENCH_FLAGS:-}" bench_grid "$out/bench.jsonl"
  DEVICE=$dev METHODS=${GPU_COMPILE_METHODS-bp dgl infopro auglocal man+dgl} BENCH_GRID=${GPU_BENCH_GRID:-resnet32:16} \
    BENCH_COMPILE=default BENCH_FLAGS="$amp ${BENCH_FLAGS:-}" bench_grid "$out/bench.jsonl"
  echo "== GPU check 3/5: the papers' memory settings ($(( budget - SECONDS + start )) s left)"
  if [ "${GPU_MEMTABLE:-1}" = 1 ]; then
    DEVICE=$dev BENCH_FLAGS="$amp ${BENCH_FLAGS:-}" memory_table "$out/bench.jsonl" "$([ "$dev" = cpu ] && echo 0 || echo 1)"
  fi
  echo "== GPU check 4/5: full-schedule subset runs, as many as fit ($(( budget - SECONDS + start )) s left)"
  # shellcheck disable=SC2086
  $PY - "$out" "$(( budget - SECONDS + start ))" "$sub" ${GPU_FULL-bp dgl infopro auglocal man mlaan sgr} <<'PY'
import json, sys, time
import local_learning as L
out, left, sub, words = sys.argv[1], float(sys.argv[2]), sys.argv[3].split(), sys.argv[4:]
speed = {(r["method"], r["base"]): r["train_img_s"] for r in map(json.loads, open(f"{out}/crash.jsonl"))}
t0 = time.time()
for m in words:
    args = L.resolve_config(L.parse_args(["--method", m, *sub]))[0]
    img_s = speed.get((m, args.base))
    need = 1.5 * args.epochs * 6102 / img_s if img_s else float("inf")   # (train + test images, with a margin)
    if need > left - (time.time() - t0):
        print(f"  skipped {m}: ~{need:.0f} s at the crash check's {img_s or 0:.0f} img/s, "
              f"{left - (time.time() - t0):.0f} s left", flush=True)
        continue
    L.main(["--method", m, *sub, "--out", f"{out}/runs.jsonl"])
PY
  echo "== GPU check 5/5: report"
  cat "$out/crash.jsonl" "$out/bench.jsonl" "$out/runs.jsonl" > "$out/all.jsonl"
  plot=""; $PY -c "import matplotlib" 2>/dev/null && plot="--plot $out/plot.png"
  # shellcheck disable=SC2086
  $PY local_learning.py --report "$out/all.jsonl" $plot > "$out/report.md"
  echo "run_all.sh: GPU check done in $(( SECONDS - start )) s; files in $out (report.md, plot.png, *.jsonl)"
  exit 0
fi

if [ "${BENCH:-0}" = 1 ]; then
  RB=${RESULTS_BENCH:-results_bench.jsonl}
  touch "$RB"
  bench_grid "$RB"
  cuda=0; has_cuda && cuda=1
  if [ "${MEMTABLE:-$cuda}" = 1 ]; then memory_table "$RB" "$cuda"; fi
  $PY local_learning.py --report "$RB"
  exit 0
fi

touch "$RESULTS"
for dataset in $DATASETS; do
  for pair in $GRID; do
    for word in $METHODS; do
      for seed in $SEEDS; do
        echo "$(method_flags "$word" "${pair##*:}") --arch ${pair%%:*} --dataset $dataset --data-dir $DATA_DIR --seed $seed $FLAGS $EXTRA"
      done
    done
  done
done | run_list "$RESULTS" "$INPROC"
