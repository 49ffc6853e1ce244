#!/usr/bin/env bash
# Create .venv at the repository root (if missing) and install lavis_accel into it, with the CPU stack
# measured to work with salesforce-lavis 1.0.2 (torch 2.13.0 CPU, torchvision 0.28.0, numpy<2).
# Idempotent: a second run only checks that everything is there.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[bootstrap] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
echo "[bootstrap] installing lavis_accel and its dependencies into .venv"
.venv/bin/pip install -q torch==2.13.0 torchvision==0.28.0 "numpy<2"
.venv/bin/pip install -q -e ".[test]"
