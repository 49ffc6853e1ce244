#!/usr/bin/env bash
# The whole test suite, on CPU: bootstraps .venv if needed, then runs pytest on two workers (pytest-xdist; each test
# module stays on one worker, so its module-scoped fixtures are built once).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/run_scripts/bootstrap.sh"
cd "$root"
exec .venv/bin/python -m pytest tests -q -n 2 --dist loadfile "$@"
