#!/usr/bin/env bash
# Multi-GPU scaling of the Sudoku train step: for each variant, the benchmark on one GPU
# and then under `torchrun --nproc-per-node N` at the same global batch (768), one after the other so
# the runs never share the machine. Detached (setsid), so it outlives the command that starts it.
#
#   bash benchmarks/scaling_run.sh start [WORKDIR] [NPROC] [VARIANT ...]
#        a VARIANT is a comma-separated list of Hydra overrides, "default" for none
#        (default variants: default compile_mode=reduce-overhead)
#   bash benchmarks/scaling_run.sh poll SECONDS [WORKDIR] [OUTDIR]
#        waits up to SECONDS (returning early when done), prints the speed-ups so far and copies
#        results.jsonl and the logs into OUTDIR.
set -euo pipefail
cmd=${1:?start|poll}
if [ "$cmd" = start ]; then
  work=${2:-/tmp/hrm-scaling}; nproc=${3:-2}
  shift $(( $# < 3 ? $# : 3 ))
  variants=("$@")
  [ ${#variants[@]} -gt 0 ] || variants=(default compile_mode=reduce-overhead)
  mkdir -p "$work"
  runs=""
  for v in "${variants[@]}"; do
    ov=""; [ "$v" = default ] || ov=${v//,/ }
    tag=${v//[^A-Za-z0-9_-]/_}
    bench="benchmarks/bench_hrm.py --shapes sudoku --steps 40 --warmup 6 --eval-batches 0 --json-out '$work/results.jsonl'"
    runs+="python3 $bench $ov > '$work/1gpu_$tag.log' 2>&1 || echo '1gpu $tag failed' >> '$work/failures';"
    runs+="torchrun --standalone --nproc-per-node $nproc $bench $ov > '$work/${nproc}gpu_$tag.log' 2>&1 || echo '${nproc}gpu $tag failed' >> '$work/failures';"
  done
  setsid nohup bash -c "cd '$PWD'; $runs touch '$work/done'" > "$work/run.log" 2>&1 < /dev/null &
  echo $! > "$work/pid"
  echo "started in $work (pid $(cat "$work/pid")): ${variants[*]}"
elif [ "$cmd" = poll ]; then
  seconds=${2:?seconds}; work=${3:-/tmp/hrm-scaling}; out=${4:-${OUT:-/tmp}}
  end=$(( $(date +%s) + seconds ))
  while [ "$(date +%s)" -lt "$end" ] && [ ! -f "$work/done" ]; do
    sleep 5
  done
  cp "$work"/*.log "$out/" 2> /dev/null || true
  [ -f "$work/results.jsonl" ] && cp "$work/results.jsonl" "$out/results.jsonl"
  [ -f "$work/failures" ] && cat "$work/failures"
  [ -f "$work/done" ] && echo "all runs done" || echo "still running"
  python3 - "$work/results.jsonl" <<'PY'
import json, os, sys
path = sys.argv[1]
rows = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
single = {}
for r in rows:
    key = tuple(r["overrides"])
    if r["world_size"] == 1:
        single[key] = r
    line = (f"{' '.join(key) or 'default':32} gpus {r['world_size']}  {r['train_ms_per_step']:7.2f} ms  "
            f"host {r.get('train_host_ms_per_step', float('nan')):7.2f} ms  {r['train_examples_per_s']:9.1f} ex/s")
    if r["world_size"] > 1 and key in single:
        line += f"  speed-up {r['train_examples_per_s'] / single[key]['train_examples_per_s']:.3f}x"
        line += f"  replicas identical {r['replicas_identical']}"
    print(line)
PY
fi
