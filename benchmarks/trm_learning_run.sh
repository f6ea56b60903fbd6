#!/usr/bin/env bash
# TRM learning run on one GPU: generated hard Sudokus (1000 train x 1000 augmentations,
# 1000 test, the generator and builder of this project, as benchmarks/sudoku_learning_run.sh for HRM), trained
# with TRM's README Sudoku recipe (mlp_t, no positions, EMA, lr 1e-4, weight decay 1.0, batch 768,
# 50,000 epochs), evaluating every EVAL_INTERVAL epochs (default 500: 651 steps, so every fourth point is one of
# the HRM curve's 2604-step points) until it is stopped.
#
#   bash benchmarks/trm_learning_run.sh prepare [WORKDIR]    # generate and build the data (CPU only)
#   bash benchmarks/trm_learning_run.sh start [WORKDIR]      # prepare if needed, then train, detached (setsid)
#   bash benchmarks/trm_learning_run.sh poll SECONDS [WORKDIR] [OUTDIR]
#        waits up to SECONDS (returning early if the run ends), prints the eval curve so far with wall time,
#        and copies metrics.jsonl, the curve (curve.jsonl) and the log tail into OUTDIR.
#   bash benchmarks/trm_learning_run.sh stop [WORKDIR]       # end the run
# Environment: EVAL_INTERVAL; SRC (a folder with train.csv/test.csv already generated with the same flags, e.g.
# carried to the GPU machine, to skip generating); for a quick check on a CPU: NUM_TRAIN, NUM_TEST, NUM_AUG,
# EXTRA (more overrides).
set -euo pipefail
NUM_TRAIN=${NUM_TRAIN:-1000}; NUM_TEST=${NUM_TEST:-1000}; NUM_AUG=${NUM_AUG:-1000}; EXTRA=${EXTRA:-}
EVAL_INTERVAL=${EVAL_INTERVAL:-500}; SRC=${SRC:-}
cmd=${1:?prepare|start|poll|stop}
prepare() {
  local work=$1
  mkdir -p "$work"
  if [ ! -f "$work/data_ready" ]; then
    if [ -n "$SRC" ]; then
      mkdir -p "$work/src" && cp "$SRC/train.csv" "$SRC/test.csv" "$work/src/"
    else
      python3 dataset/generate_sudoku.py --output-dir "$work/src" --num-train "$NUM_TRAIN" --num-test "$NUM_TEST" \
        --seed 0 --num-workers 16
    fi
    python3 dataset/build_sudoku_dataset.py --source-repo "$work/src" --output-dir "$work/sudoku-gen-1k-aug-1000" \
      --num-aug "$NUM_AUG"
    touch "$work/data_ready"
  fi
}
if [ "$cmd" = prepare ]; then
  prepare "${2:-/tmp/trm-learning}"
elif [ "$cmd" = start ]; then
  work=${2:-/tmp/trm-learning}
  mkdir -p "$work"
  setsid nohup bash -c "
    set -e
    cd '$PWD'
    NUM_TRAIN=$NUM_TRAIN NUM_TEST=$NUM_TEST NUM_AUG=$NUM_AUG SRC='$SRC'
    $(declare -f prepare)
    prepare '$work'
    date +%s > '$work/t_train'
    OMP_NUM_THREADS=8 python3 pretrain.py arch=trm data_paths=\"[$work/sudoku-gen-1k-aug-1000]\" evaluators=\"[]\" \
      epochs=50000 eval_interval=$EVAL_INTERVAL lr=1e-4 puzzle_emb_lr=1e-4 weight_decay=1.0 puzzle_emb_weight_decay=1.0 \
      arch.mlp_t=True arch.pos_encodings=none arch.L_layers=2 arch.H_cycles=3 arch.L_cycles=6 \
      +run_name=pretrain_mlp_t_sudoku ema=True use_wandb=false checkpoint_every_eval=false \
      checkpoint_path='$work/ckpt' $EXTRA
  " > "$work/run.log" 2>&1 < /dev/null &
  echo $! > "$work/pid"
  # Sidecar: wall-clock time at which each evaluation line appears in metrics.jsonl (5 s resolution).
  setsid nohup python3 - "$work" > /dev/null 2>&1 < /dev/null <<'PY' &
import json, os, sys, time
work = sys.argv[1]
path, seen = os.path.join(work, "ckpt", "metrics.jsonl"), set()
pid = int(open(os.path.join(work, "pid")).read())
while True:
    if os.path.exists(path):
        for line in open(path):
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if "all/exact_accuracy" in row and row["step"] not in seen:
                seen.add(row["step"])
                with open(os.path.join(work, "eval_times.jsonl"), "a") as f:
                    f.write(json.dumps({"step": row["step"], "time": time.time()}) + "\n")
    try:
        os.kill(pid, 0)
    except OSError:
        break
    time.sleep(5)
PY
  echo "started in $work (pid $(cat "$work/pid"), log: $work/run.log)"
elif [ "$cmd" = stop ]; then
  work=${2:-/tmp/trm-learning}
  kill -- -"$(cat "$work/pid")" 2> /dev/null || true
elif [ "$cmd" = poll ]; then
  seconds=${2:?seconds}; work=${3:-/tmp/trm-learning}; out=${4:-${OUT:-/tmp}}
  end=$(( $(date +%s) + seconds ))
  while [ "$(date +%s)" -lt "$end" ] && kill -0 "$(cat "$work/pid")" 2> /dev/null; do
    sleep 10
  done
  [ -f "$work/ckpt/metrics.jsonl" ] && cp "$work/ckpt/metrics.jsonl" "$out/trm_metrics.jsonl"
  tail -c 3000 "$work/run.log" | tr '\r' '\n' | tail -n 8 > "$out/trm_run_tail.txt" || true
  cat "$out/trm_run_tail.txt"
  python3 - "$work" "$out" <<'PY'
import json, os, sys, time
work, out = sys.argv[1], sys.argv[2]
path = os.path.join(work, "ckpt", "metrics.jsonl")
t0 = float(open(os.path.join(work, "t_train")).read()) if os.path.exists(os.path.join(work, "t_train")) else None
times = {}
if os.path.exists(os.path.join(work, "eval_times.jsonl")):
    for line in open(os.path.join(work, "eval_times.jsonl")):
        row = json.loads(line)
        times[row["step"]] = row["time"]
curve, last = [], None
if os.path.exists(path):
    for line in open(path):
        row = json.loads(line)
        if "all/exact_accuracy" in row:
            curve.append({"step": row["step"], "test_exact_accuracy": row["all/exact_accuracy"],
                          "test_token_accuracy": row["all/accuracy"], "steps": row["all/steps"],
                          "wall_s": round(times[row["step"]] - t0, 1) if t0 and row["step"] in times else None})
        elif "train/accuracy" in row:
            last = row
with open(os.path.join(out, "trm_curve.jsonl"), "w") as f:
    for point in curve:
        f.write(json.dumps(point) + "\n")
for p in curve:
    print(f"step {p['step']:6d}  wall {p['wall_s']} s  test exact {100 * p['test_exact_accuracy']:5.1f}%  token {100 * p['test_token_accuracy']:5.1f}%")
if last:
    print(f"last train step {last['step']}: lm_loss {last['train/lm_loss']:.4f} acc {100 * last['train/accuracy']:.1f}% exact {100 * last['train/exact_accuracy']:.1f}%")
if t0:
    print(f"{time.time() - t0:.0f} s since training started")
PY
fi
