"""``lavis-accel demo``: the whole plugin on one CPU in under half an hour (two cores), offline.

Generates a synthetic retrieval dataset (scenes of coloured shapes at named positions, captions that describe
them), fine-tunes a small BLIP retrieval model on it through LAVIS's runner, compresses it with MADTP and fine-tunes
it with CrossGET (its JS loss), trains a smaller DLIP student twice (distilled from it, and on the task losses only),
evaluates it through LAVIS's retrieval task unreduced, with ToMe, Turbo and Turbo with ``scale_alpha`` at several r,
with MADTP and with CrossGET, and the two students, and prints recall@1/5/10 next to parameters, counted GFLOPs and
the measured speed-up. ``--methods`` picks the methods (``tome turbo`` alone is the quickest run).
Everything runs in a child process (``python -m lavis_accel.demo.worker``) whose environment points transformers at
a local offline hub before transformers is imported.
"""
import os
import subprocess
import sys

from lavis_accel.demo.settings import DemoSettings, add_arguments  # noqa: F401


def run_offline_worker(module, argv, workdir, tag, extra_env=None) -> int:
    """Write the offline tokenizer hub under ``workdir`` and run ``python -m module ARGV`` with the environment that
    points transformers at it (set before transformers is imported); the child's exit status."""
    from lavis_accel.testing.hub import offline_env, write_offline_hub

    hub_root = os.path.join(workdir, "hub")
    print(f"[{tag}] writing the offline tokenizer hub to {hub_root}", flush=True)
    write_offline_hub(hub_root)
    env = {**(extra_env or {}), **os.environ, **offline_env(hub_root)}
    return subprocess.run([sys.executable, "-m", module] + list(argv), env=env).returncode


def run(args) -> int:
    settings = DemoSettings.from_args(args)
    return run_offline_worker("lavis_accel.demo.worker", settings.argv(), settings.workdir, "demo")
