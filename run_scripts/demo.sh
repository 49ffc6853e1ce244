#!/usr/bin/env bash
# Set up .venv and run the main job on its embedded default: `lavis-accel demo`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/run_scripts/bootstrap.sh"
cd "$root"
exec .venv/bin/lavis-accel demo "$@"
