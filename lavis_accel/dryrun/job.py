"""The dry-run's LAVIS job: ``lavis-accel train|evaluate`` in a child process pointed at an offline hub.

transformers reads its cache location and offline switch when it is imported, so the job runs in a new process
whose environment holds ``testing.hub.offline_env`` from the start. Its output goes to a log file, which is what
the report reads.

The child is ``python -m lavis_accel.dryrun.child COMMAND CFG_PATH`` (``child.py``): it first writes what only a
model built on the offline hub can make (the tiny random teacher a DLIP ``model.teacher.pretrained`` names), then
runs the CLI's ``main`` (``lavis-accel COMMAND --cfg-path CFG_PATH``).
"""
import os
import subprocess
import sys

from lavis_accel.testing.hub import offline_env


def run_cli_job(command, cfg_path, hub_root, log_path):
    """Run the child for ``lavis-accel <command> --cfg-path <cfg_path>``, stdout and stderr to ``log_path``; return
    its exit status."""
    env = {**os.environ, **offline_env(hub_root)}
    # one thread: a tiny model gains nothing from intra-op threads, and OpenMP's spinning slows it on busy cores
    env.setdefault("OMP_NUM_THREADS", "1")
    argv = [sys.executable, "-m", "lavis_accel.dryrun.child", command, cfg_path]
    with open(log_path, "w", encoding="utf-8") as log:
        return subprocess.run(argv, env=env, stdout=log, stderr=subprocess.STDOUT).returncode


def last_error_line(log_text):
    """The line a failed job ended on: the exception of a traceback, or the CLI's one-line error."""
    lines = [line.strip() for line in log_text.splitlines() if line.strip()]
    return lines[-1] if lines else "(the job printed nothing)"
