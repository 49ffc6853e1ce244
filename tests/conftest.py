"""Shared test setup: every test runs offline, against a tiny Hugging Face hub written for this session.

transformers reads its cache location and offline switch once, when it is imported, and ``import lavis_accel``
imports it (through LAVIS). So the variables of ``lavis_accel.testing.hub.offline_env`` are put in ``os.environ``
here, before anything imports lavis_accel; ``activate_offline_hub`` then checks that transformers took them. CLI
subprocesses started by tests inherit the same environment.

Tests run torch on one thread (``OMP_NUM_THREADS=1`` unless already set, inherited by subprocesses): tiny models
gain nothing from intra-op threads, and on a shared 2-core machine OpenMP's spin-waiting made each small op up to a
thousand times slower (12 ms instead of 17 us per 64x128 linear, measured while other jobs ran).

Fixtures:
- ``offline_hub_dir``: the root of the session's offline hub (its ``hub/`` folder is the HF cache).
- ``single_process_group``: a one-process gloo ``torch.distributed`` group for the test's duration, for LAVIS code
  that calls ``dist.get_rank()``/``get_world_size()`` unconditionally (CLIP's loss, BLIP-2's Q-Former forward).

On two workers (``pytest -n 2 --dist loadfile``, as ``run_scripts/test.sh`` runs it), every test module stays on one
worker, so its module-scoped fixtures (trained tiny models, chains of CLI jobs) are built once. Each worker is its
own process with its own offline hub.
"""
import atexit
import os
import shutil
import tempfile

import pytest

_HUB_ROOT = tempfile.mkdtemp(prefix="lavis-accel-hub-")
atexit.register(shutil.rmtree, _HUB_ROOT, ignore_errors=True)
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.update({
    "HF_HOME": _HUB_ROOT,
    "HF_HUB_CACHE": os.path.join(_HUB_ROOT, "hub"),
    "HUGGINGFACE_HUB_CACHE": os.path.join(_HUB_ROOT, "hub"),
    "TRANSFORMERS_CACHE": os.path.join(_HUB_ROOT, "hub"),
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
})

from lavis_accel.testing import hub  # noqa: E402  (imports transformers: only after the environment is set)

hub.activate_offline_hub(_HUB_ROOT)
hub.write_offline_hub(_HUB_ROOT)


@pytest.fixture(scope="session")
def offline_hub_dir():
    return _HUB_ROOT


@pytest.fixture
def single_process_group(tmp_path):
    import torch.distributed as dist

    if dist.is_initialized():
        raise RuntimeError("single_process_group: a process group is already initialised")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'process_group'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
