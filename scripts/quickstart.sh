#!/usr/bin/env bash
# Quick start: generate a small Sudoku set offline, build it with augmentation, train the tiny HRM
# config, evaluate the checkpoint and print its accuracy. Needs only Python 3; uses the GPU when
# there is one (and then trains longer). About 3 minutes on an idle 2-core CPU, installs included.
#   VENV=path        virtual environment to use or create (default: .venv in the repository)
#   TORCH_SPEC=spec  what to install for torch (default: torch==2.13.0)
#   QS_EPOCHS=N      training epochs (default: 32 on CPU, 400 on GPU)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VENV:-.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
PYTHON="${PYTHON:-python3}"
RAW=data/sudoku-quickstart-raw
DATA=data/sudoku-quickstart
CKPT=checkpoints/quickstart

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
  echo "== generating 300 train + 200 test Sudoku puzzles (unique solution) into $RAW"
  "$PY" dataset/generate_sudoku.py --output-dir "$RAW" --num-train 300 --num-test 200 --seed 0 --min-rating 0
fi
if [ ! -f "$DATA/test/dataset.json" ]; then
  echo "== building $DATA (7 augmented copies of each training puzzle)"
  "$PY" dataset/build_sudoku_dataset.py --source-repo "$RAW" --output-dir "$DATA" --num-aug 7
fi

EPOCHS="${QS_EPOCHS:-$("$PY" -c 'import torch; print(400 if torch.cuda.is_available() else 32)')}"
echo "== training arch=hrm_tiny for $EPOCHS epochs"
rm -rf "$CKPT"
"$PY" pretrain.py arch=hrm_tiny data_path="$DATA" checkpoint_path="$CKPT" \
  epochs="$EPOCHS" eval_interval="$EPOCHS" global_batch_size=32 \
  lr=1e-3 puzzle_emb_lr=1e-3 lr_warmup_steps=30 weight_decay=0.1 puzzle_emb_weight_decay=0.1 use_wandb=false

WEIGHTS="$(ls "$CKPT"/step_* | grep -E '/step_[0-9]+$' | sort -t_ -k2 -n | tail -1)"
echo "== evaluating $WEIGHTS"
"$PY" evaluate.py checkpoint="$WEIGHTS" save_outputs=[inputs,labels,puzzle_identifiers,logits]
"$PY" scripts/quickstart_report.py "${WEIGHTS}_all_preds.0"
