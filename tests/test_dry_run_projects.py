"""``lavis-accel dry-run`` rehearses every project yaml shipped under ``projects/`` (but those that the DLIP and
P-Former end-to-end tests run through the real CLI). A module of its own so that pytest-xdist runs it beside
``tests/test_dry_run.py`` (LAVIS's own yamls and the dry-run's behaviour), which has the helpers."""
import pytest

from test_dry_run import SHIPPED_CASES, check_dry_run


@pytest.mark.parametrize("cfg_path", SHIPPED_CASES)
def test_dry_run_passes(cfg_path, capsys, tmp_path, monkeypatch):
    check_dry_run(cfg_path, capsys, tmp_path, monkeypatch)
