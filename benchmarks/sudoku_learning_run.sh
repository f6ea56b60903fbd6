#!/usr/bin/env bash
# End-to-end learning run on one GPU: generate hard Sudokus with the project's
# generator, build them with 1000 augmentations, and train the default architecture with the
# reference README's Sudoku hyper-parameters, evaluating every 2000 epochs (= 2604 steps here).
#
#   bash benchmarks/sudoku_learning_run.sh start [WORKDIR]   # starts the run detached (setsid)
#   bash benchmarks/sudoku_learning_run.sh poll SECONDS [WORKDIR] [OUTDIR]
#        waits up to SECONDS (returning early if the run ends), prints the eval curve so far and
#        copies metrics.jsonl and the log tail into OUTDIR.
set -euo pipefail
cmd=${1:?start|poll}
if [ "$cmd" = start ]; then
  work=${2:-/tmp/hrm-learning}
  mkdir -p "$work"
  setsid nohup bash -c "
    set -e
    cd '$PWD'
    date +%s > '$work/t_start'
    python3 dataset/generate_sudoku.py --output-dir '$work/src' --num-train 1000 --num-test 2000 --seed 0 --num-workers 16
    python3 dataset/build_sudoku_dataset.py --source-repo '$work/src' --output-dir '$work/sudoku-gen-1k-aug-1000' --num-aug 1000
    date +%s > '$work/t_train'
    OMP_NUM_THREADS=8 python3 pretrain.py data_path='$work/sudoku-gen-1k-aug-1000' epochs=20000 eval_interval=2000 \
      lr=1e-4 puzzle_emb_lr=1e-4 weight_decay=1.0 puzzle_emb_weight_decay=1.0 global_batch_size=768 \
      use_wandb=false checkpoint_path='$work/ckpt' project_name=sudoku-learning run_name=h100
  " > "$work/run.log" 2>&1 < /dev/null &
  echo $! > "$work/pid"
  echo "started in $work (pid $(cat "$work/pid"), log: $work/run.log)"
elif [ "$cmd" = poll ]; then
  seconds=${2:?seconds}; work=${3:-/tmp/hrm-learning}; out=${4:-${OUT:-/tmp}}
  end=$(( $(date +%s) + seconds ))
  while [ "$(date +%s)" -lt "$end" ] && kill -0 "$(cat "$work/pid")" 2> /dev/null; do
    sleep 10
  done
  [ -f "$work/ckpt/metrics.jsonl" ] && cp "$work/ckpt/metrics.jsonl" "$out/metrics.jsonl"
  tail -c 3000 "$work/run.log" | tr '\r' '\n' | tail -n 8 > "$out/run_tail.txt" || true
  cat "$out/run_tail.txt"
  python3 - "$work" <<'PY'
import json, os, sys, time
work = sys.argv[1]
path = os.path.join(work, "ckpt", "metrics.jsonl")
t0 = float(open(os.path.join(work, "t_train")).read()) if os.path.exists(os.path.join(work, "t_train")) else None
if os.path.exists(path):
    last = None
    for line in open(path):
        row = json.loads(line)
        if "all/exact_accuracy" in row:
            print(f"step {row['step']:6d}  test exact {100 * row['all/exact_accuracy']:5.1f}%  token {100 * row['all/accuracy']:5.1f}%  steps {row['all/steps']:.1f}")
        elif "train/accuracy" in row:
            last = row
    if last:
        print(f"last train step {last['step']}: lm_loss {last['train/lm_loss']:.4f} acc {100 * last['train/accuracy']:.1f}% exact {100 * last['train/exact_accuracy']:.1f}%")
if t0:
    print(f"{time.time() - t0:.0f} s since training started")
PY
fi
