#!/usr/bin/env bash
# Quick start: generate small (6x6) Sudokus offline, build them with augmentation, train a tiny TRM with TRM's
# Sudoku recipe (token-mixing MLP instead of attention, no positional encoding), evaluate the checkpoint on the
# held-out puzzles with twice the ACT steps it was trained with, and print its accuracy beside a no-learning
# baseline and one solved puzzle. Needs only Python 3; uses the GPU when there is one. About 3 minutes of training
# and evaluation on an idle 2-core CPU, plus the installs.
#   VENV=path        virtual environment to use or create (default: .venv in the repository)
#   TORCH_SPEC=spec  what to install for torch (default: torch==2.13.0)
#   QS_EPOCHS=N      training epochs (default 88: 1375 steps of 64 puzzles)
#   QS_OUT=folder    where data/ and checkpoints/ go (default: the repository)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VENV:-.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
PYTHON="${PYTHON:-python3}"
EPOCHS="${QS_EPOCHS:-88}"
QS_OUT="${QS_OUT:-.}"
RAW="$QS_OUT/data/sudoku6-quickstart-raw"
DATA="$QS_OUT/data/sudoku6-quickstart"
CKPT="$QS_OUT/checkpoints/quickstart"

if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
echo "== installing torch ($TORCH_SPEC) and the project"
"$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
"$VENV/bin/python" -m pip install -q -e .
PY="$VENV/bin/python"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc 2>/dev/null || echo 2)}"

if [ ! -f "$RAW/test.csv" ]; then
  echo "== generating 1000 train + 500 test 6x6 Sudokus (2x3 boxes, unique solution, minimal) into $RAW"
  "$PY" dataset/generate_sudoku.py --output-dir "$RAW" --size 6 --num-train 1000 --num-test 500 --seed 0 --min-rating 0
fi
if [ ! -f "$DATA/test/dataset.json" ]; then
  echo "== building $DATA (7 augmented copies of each training puzzle; the test puzzles stay as generated)"
  "$PY" dataset/build_sudoku_dataset.py --source-repo "$RAW" --output-dir "$DATA" --size 6 --num-aug 7
fi

start=$(date +%s)
echo "== training arch=trm_tiny (mlp_t, no positions, 4 ACT steps) for $EPOCHS epochs"
rm -rf "$CKPT"
"$PY" pretrain.py arch=trm_tiny arch.mlp_t=true arch.pos_encodings=none data_path="$DATA" checkpoint_path="$CKPT" \
  epochs="$EPOCHS" eval_interval="$EPOCHS" global_batch_size=64 lr=2e-3 puzzle_emb_lr=2e-3 lr_warmup_steps=30 \
  weight_decay=0.1 puzzle_emb_weight_decay=0.1 evaluators="[]" use_wandb=false

WEIGHTS="$(ls "$CKPT"/step_* | grep -E '/step_[0-9]+$' | sort -t_ -k2 -n | tail -1)"
echo "== evaluating $WEIGHTS on the held-out puzzles with 8 ACT steps (trained with 4)"
"$PY" evaluate.py checkpoint="$WEIGHTS" arch.halt_max_steps=8 step_accuracy=true \
  save_outputs=[inputs,labels,puzzle_identifiers,logits]
echo "== training and evaluation took $(( $(date +%s) - start )) s"
"$PY" scripts/quickstart_report.py "${WEIGHTS}_all_preds.0"
