#!/usr/bin/env bash
# The whole test suite, on CPU: bootstraps .venv if needed, then runs pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/run_scripts/bootstrap.sh"
cd "$root"
exec .venv/bin/python -m pytest tests -q "$@"
