#!/usr/bin/env bash
# Creates .venv beside the repository and installs ahpa (editable) with the tested torch.
# Idempotent: rerunning on a complete environment is quick.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -r requirements/pinned.txt
# dinov2 (transformers) and wandb too, so that the tests exercise the DINOv2 encoder and detector and W&B logging
.venv/bin/python -m pip install -q -e ".[dev,dinov2,wandb]"
