"""Helpers shared by the tests that run ``lavis_accel.cli`` jobs and read what LAVIS's runner wrote."""
import glob
import json
import os
import signal
import subprocess
import sys

CLI = [sys.executable, "-m", "lavis_accel.cli"]


def run_cli(*argv, launcher=(), env=None, timeout=None):
    """Run ``lavis_accel.cli ARGV`` (under ``launcher``, e.g. torchrun), assert it succeeded; its output.

    ``timeout`` (seconds): a job still running then is killed with all its processes and the test fails with its
    output, instead of hanging the suite.
    """
    command = [*launcher, *CLI[1:]] if launcher else CLI
    process = subprocess.Popen([*command, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise AssertionError(f"{' '.join(argv)} still ran after {timeout} s:\n{stdout[-3000:]}{stderr[-3000:]}")
    assert process.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return stdout + stderr


def job_dir(output_dir):
    """The one job folder LAVIS's runner made under ``output_dir``."""
    (directory,) = [d for d in glob.glob(os.path.join(output_dir, "*")) if os.path.isdir(d)]
    return directory


def metrics_lines(directory):
    """The lines of LAVIS's ``evaluate.txt``: one JSON object per evaluation, in the order they ran."""
    with open(os.path.join(directory, "evaluate.txt"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def train_stats(directory):
    """The training statistics lines of LAVIS's ``log.txt``."""
    with open(os.path.join(directory, "log.txt"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.startswith('{"train')]
