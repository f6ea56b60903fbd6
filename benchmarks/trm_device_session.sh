#!/usr/bin/env bash
# One GPU session for TRM (speed and learning), run detached on the device machine:
#   1. installs the carried wheels and builds adam-atan2 (the reference's optimizer);
#   2. generates and builds the Sudoku data on the CPU while the GPU tests run (tests/test_gpu.py: HRM and TRM,
#      bf16 against fp32, fused against unfused, compiled against eager; tests/test_fused_ops.py);
#   3. times this library (benchmarks/bench_hrm.py) and TRM's own code (benchmarks/bench_reference.py, from the
#      carried, git-ignored copy .ref/trm) on the trm, trm_mlp and trm_arc shapes, one after the other;
#   4. starts the TRM learning run (benchmarks/trm_learning_run.sh), which runs until stopped.
#
#   setsid nohup bash benchmarks/trm_device_session.sh /tmp/session > /tmp/session.log 2>&1 &
#   bash benchmarks/trm_device_session.sh collect /tmp/session "$OUT"   # copy what exists so far into OUT
set -uo pipefail
if [ "${1:-}" = collect ]; then
  work=$2; out=$3
  cp "$work"/*.jsonl "$work"/*.log "$out"/ 2> /dev/null || true
  [ -f "$work/learning/pid" ] && bash benchmarks/trm_learning_run.sh poll 0 "$work/learning" "$out"
  exit 0
fi
work=${1:-/tmp/session}
mkdir -p "$work"
steps="--steps 20 --warmup 3 --eval-batches 2"
ADAM_ATAN2=1 source .whl/install.sh > "$work/install.log" 2>&1
echo "installed $(date +%T)" >> "$work/progress.log"
bash benchmarks/trm_learning_run.sh prepare "$work/learning" > "$work/prepare.log" 2>&1 &
prep=$!
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_fused_ops.py > "$work/gpu_tests.log" 2>&1
echo "gpu tests rc=$? $(date +%T)" >> "$work/progress.log"
python3 benchmarks/bench_hrm.py --shapes trm,trm_mlp,trm_arc $steps --json-out "$work/bench_trm.jsonl" \
  > "$work/bench_ours.log" 2>&1
echo "bench ours rc=$? $(date +%T)" >> "$work/progress.log"
python3 benchmarks/bench_reference.py --ref-dir .ref/trm --label "TRM (e7b6871)" --shapes trm,trm_mlp,trm_arc $steps \
  --json-out "$work/bench_trm.jsonl" > "$work/bench_ref.log" 2>&1
echo "bench reference rc=$? $(date +%T)" >> "$work/progress.log"
wait $prep
echo "data rc=$? $(date +%T)" >> "$work/progress.log"
bash benchmarks/trm_learning_run.sh start "$work/learning" >> "$work/progress.log" 2>&1
echo "learning started $(date +%T)" >> "$work/progress.log"
