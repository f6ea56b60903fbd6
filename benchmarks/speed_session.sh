#!/usr/bin/env bash
# One GPU session of the speed campaign, run detached on the device machine so it may outlast one command:
#   1. installs the carried wheels and builds adam-atan2 (the references' optimizer);
#   2. GPU correctness: the kernel tests against float64 and the portable path, the whole-model GPU tests
#      (bf16 GPU vs fp32 CPU forward, compiled vs eager train step, a 16-step evaluation);
#   3. the kernels alone (benchmarks/bench_fused_ops.py: each against its PyTorch composition, eager and compiled);
#   4. with LEARN=DIR (a folder with train.csv/test.csv from dataset/generate_sudoku.py, seed 0, 1000 + 1000), the
#      learning check: benchmarks/trm_learning_run.sh trained until LEARN_POINTS evaluations (default 3) are in, then
#      stopped; its curve (trm_curve.jsonl) is for comparing with results/trm_learning_h200_2026-12-01.jsonl;
#      with HRM_LEARN=1 the same for HRM (benchmarks/sudoku_learning_run.sh, its first HRM_LEARN_POINTS evaluations,
#      hrm_learning.jsonl, against results/sudoku_learning_h100_2026-11-22.jsonl);
#   5. this library against the references' own code, shape after shape (benchmarks/compare_reference.py, with a
#      kernel profile of this library's run), for the shapes in SHAPES.
#
#   setsid nohup bash benchmarks/speed_session.sh run /tmp/speed > /tmp/speed.log 2>&1 &
#   bash benchmarks/speed_session.sh poll SECONDS /tmp/speed OUT   # wait up to SECONDS for the end; the JSON
#        lines and a tarball of the logs, kernel tables and trace summaries go to OUT
# Environment: SHAPES (default "trm_mlp sudoku trm arc"; none: no comparisons), STEPS (compare_reference.py timing flags),
# ROUNDS, VARIANTS (extra --variant flags for every shape), VARIANTS_<shape> (for that shape only), SKIP_TESTS=1,
# ADAM_ATAN2=0 (no adam-atan2 build: no reference timed), SKIP_KERNELS=1, KERNEL_ARGS (extra bench_fused_ops.py flags, e.g. --sweep-attention-tiles), TESTS (the GPU test
# files, default all of them), LEARN, LEARN_POINTS, LEARN_SECONDS (the learning check's time limit, default 600),
# HRM_LEARN=1 with HRM_LEARN_POINTS (default 2) and HRM_LEARN_SECONDS (default 900): HRM's learning check;
# LEARN_ENV="KEY=VALUE ..." (environment for the learning runs only, e.g. a kernel to check before it is a default).
# In the variants, @tiles@ stands for the attention launch choice that this session's --sweep-attention-tiles found
# fastest at that shape (e.g. VARIANTS_sudoku="--variant tiles=HRM_KERNELS=all,HRM_SHORT_ATTENTION_TILES=@tiles@"),
# and @gate_up@ for the CUTLASS gate/up + SwiGLU config the kernels stage timed fastest there (HRM_GATE_UP_CUTLASS_CONFIG).
set -uo pipefail
cmd=${1:?run|poll}
if [ "$cmd" = poll ]; then
  secs=$2; work=$3; out=$4
  for _ in $(seq "$secs"); do [ -f "$work/done" ] && break; sleep 1; done
  for f in "$work"/prof/*.json "$work"/prof/*/*.json; do
    [ -f "$f" ] && python3 benchmarks/trace_summary.py "$f" --steps 3 > "${f%.json}_summary.txt" 2>&1
  done
  cp "$work"/*.jsonl "$out"/ 2> /dev/null || true
  # Everything but the raw traces and the learning run's data, in one file (the device returns at most 8 files).
  tar -czf "$out/session.tgz" -C "$work" --exclude='*.json' --exclude=./learn --exclude=./hrm_learn . 2> /dev/null || true
  cat "$work/progress.log"
  [ -f "$work/done" ] && echo "session finished" || echo "session still running"
  exit 0
fi
work=${2:-/tmp/speed}
mkdir -p "$work/prof"
SHAPES=${SHAPES:-trm_mlp sudoku trm arc}
[ "$SHAPES" = none ] && SHAPES=""  # e.g. a session for the learning checks only
STEPS=${STEPS:---steps 20 --warmup 3 --eval-batches 2}
ROUNDS=${ROUNDS:-1}
VARIANTS=${VARIANTS:-}
note() { echo "$* $(date +%T)" >> "$work/progress.log"; }
note "start"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv > "$work/gpu.log" 2>&1
# adam-atan2 is built once a machine: a second session on the same warm machine reuses /tmp/site's build
adam=${ADAM_ATAN2:-1}; compgen -G "/tmp/site/adam_atan2*" > /dev/null && adam=0
ADAM_ATAN2=$adam source .whl/install.sh > "$work/install.log" 2>&1
note "installed: $(tail -1 "$work/install.log")"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  python3 -m pytest -q -p no:cacheprovider --durations=15 ${TESTS:-tests/test_short_attention.py tests/test_fused_ops.py tests/test_token_mix.py tests/test_swiglu_backward.py tests/test_gpu.py} \
    > "$work/gpu_tests.log" 2>&1
  note "gpu tests rc=$? $(tail -1 "$work/gpu_tests.log")"
fi
if [ "${SKIP_KERNELS:-0}" != 1 ]; then
  # shellcheck disable=SC2086  # KERNEL_ARGS is a flag list
  python3 benchmarks/bench_fused_ops.py --shapes sudoku,trm ${KERNEL_ARGS:-} --json-out "$work/kernels.jsonl" \
    > "$work/kernels.log" 2>&1
  note "kernels rc=$?"
fi
if [ -n "${LEARN:-}" ]; then
  # shellcheck disable=SC2086  # LEARN_ENV is a list of KEY=VALUE words
  env ${LEARN_ENV:-} SRC="$LEARN" bash benchmarks/trm_learning_run.sh start "$work/learn" > "$work/learn.log" 2>&1
  note "learning run started${LEARN_ENV:+ with $LEARN_ENV}"
  for _ in $(seq "${LEARN_SECONDS:-600}"); do
    points=$(cat "$work/learn/ckpt/metrics.jsonl" 2> /dev/null | grep -c '"all/exact_accuracy"')
    [ "$points" -ge "${LEARN_POINTS:-3}" ] && break
    kill -0 "$(cat "$work/learn/pid" 2> /dev/null)" 2> /dev/null || break  # the run ended (or never started)
    sleep 1
  done
  bash benchmarks/trm_learning_run.sh poll 0 "$work/learn" "$work" >> "$work/learn.log" 2>&1
  bash benchmarks/trm_learning_run.sh stop "$work/learn"
  note "learning: $(grep -E '^step ' "$work/learn.log" | tr '\n' ';')"
fi
if [ "${HRM_LEARN:-0}" = 1 ]; then
  # HRM's half of the learning check: benchmarks/sudoku_learning_run.sh (its data generated and built here) until
  # HRM_LEARN_POINTS evaluations (default 2) are in, for comparing with results/sudoku_learning_h100_2026-11-22.jsonl.
  # shellcheck disable=SC2086  # LEARN_ENV is a list of KEY=VALUE words
  env ${LEARN_ENV:-} bash benchmarks/sudoku_learning_run.sh start "$work/hrm_learn" > "$work/hrm_learn.log" 2>&1
  note "hrm learning run started"
  for _ in $(seq "${HRM_LEARN_SECONDS:-900}"); do
    points=$(cat "$work/hrm_learn/ckpt/metrics.jsonl" 2> /dev/null | grep -c '"all/exact_accuracy"')
    [ "$points" -ge "${HRM_LEARN_POINTS:-2}" ] && break
    kill -0 "$(cat "$work/hrm_learn/pid" 2> /dev/null)" 2> /dev/null || break  # the run ended (or never started)
    sleep 1
  done
  kill -- -"$(cat "$work/hrm_learn/pid")" 2> /dev/null  # its own session (setsid): the launcher and its workers
  cp "$work/hrm_learn/ckpt/metrics.jsonl" "$work/hrm_learning.jsonl" 2> /dev/null
  tail -c 2000 "$work/hrm_learn/run.log" > "$work/hrm_learn_tail.log" 2> /dev/null
  note "hrm learning: $(grep '"all/accuracy"' "$work/hrm_learning.jsonl" 2> /dev/null | cut -c1-90 | tr '\n' ';')"
fi
for shape in $SHAPES; do
  own_variants="VARIANTS_$shape"
  variants="$VARIANTS ${!own_variants:-}"
  if [[ $variants == *@tiles@* ]]; then  # the attention launch choice the kernels stage's sweep found fastest here
    tiles=$(python3 benchmarks/bench_fused_ops.py --best-tiles-from "$work/kernels.jsonl" --shapes "$shape" 2> /dev/null)
    note "$shape: fastest attention tiles of the sweep: ${tiles:-none, the defaults}"
    variants=${variants//@tiles@/$tiles}
  fi
  if [[ $variants == *@gate_up@* ]]; then  # the CUTLASS gate/up config the kernels stage timed fastest here
    gate_up=$(python3 benchmarks/bench_fused_ops.py --best-gate-up-config-from "$work/kernels.jsonl" --shapes "${shape%_mlp}" 2> /dev/null)  # trm_mlp: the trm rows
    note "$shape: fastest CUTLASS gate/up config of the kernels stage: ${gate_up:-none timed, the default}"
    variants=${variants//@gate_up@/$gate_up}  # empty: HRM_GATE_UP_CUTLASS_CONFIG= is the default
  fi
  # shellcheck disable=SC2086  # STEPS and the variants are flag lists
  python3 benchmarks/compare_reference.py --shapes "$shape" $STEPS --rounds "$ROUNDS" $variants \
    --profile-dir "$work/prof" --log "$work/compare_$shape.log" --json-out "$work/compare.jsonl" \
    > "$work/compare_${shape}_table.log" 2>&1
  note "compare $shape rc=$? $(tail -5 "$work/compare_${shape}_table.log" | tr '\n' ' ')"
done
touch "$work/done"
note "done"
