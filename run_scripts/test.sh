#!/usr/bin/env bash
# The whole test suite, on CPU: bootstraps .venv if needed, then runs pytest on two workers (pytest-xdist; each test
# module stays on one worker, but tests/test_dry_run.py's independent rehearsals spread over both: tests/conftest.py).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/run_scripts/bootstrap.sh"
cd "$root"
exec .venv/bin/python -m pytest tests -q -n 2 --dist loadgroup "$@"
