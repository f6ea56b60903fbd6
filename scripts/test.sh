#!/usr/bin/env bash
# Run the test suite: create the virtual environment if absent, install torch and the project with its
# dev, viz and tensorboard extras, then `python -m pytest -q` (extra arguments are passed to pytest).
#   VENV=path        virtual environment to use or create (default: .venv in the repository)
#   TORCH_SPEC=spec  what to install for torch (default: torch==2.13.0)
#   PYTHON=python3   interpreter that creates the environment
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VENV:-.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
# torch first and pinned, so resolving the project's dependencies never pulls another build.
"$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
"$VENV/bin/python" -m pip install -q -e ".[dev,viz,tensorboard]"
exec "$VENV/bin/python" -m pytest -q "$@"
