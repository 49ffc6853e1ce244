"""Job folders that never collide: a unique job id per run, its folder created exclusively before any work.

LAVIS names a run's folder ``<output_dir>/<job_id>`` with a job id of ten-minute resolution (``lavis.common.utils
.now``), so two runs started in the same ten minutes wrote into one folder: the second replaced the first's
checkpoints, appended to its logs and evaluated its ``checkpoint_best.pth``. Here the id is LAVIS's layout at
second resolution plus a random suffix, and the folder is made with ``exist_ok=False``: a folder that exists
belongs to another run and is never reused. Under torchrun, rank 0 picks the id and the other ranks receive it.
"""
import os
import secrets
import time

import torch.distributed as dist

from lavis_accel.errors import SettingError

_ATTEMPTS = 20


def new_job_id():
    """``YYYYmmddHHMMSS-xxxxxx``: sortable by start time, unique by its random suffix."""
    return f"{time.strftime('%Y%m%d%H%M%S')}-{secrets.token_hex(3)}"


def reserve_job_dir(output_dir):
    """Create a new, empty job folder under ``output_dir`` and return its job id."""
    for _ in range(_ATTEMPTS):
        job_id = new_job_id()
        try:
            os.makedirs(os.path.join(output_dir, job_id), exist_ok=False)
        except FileExistsError:
            continue
        except OSError as err:
            raise SettingError(f"run.output_dir: cannot create a job folder in {output_dir}: {err.strerror}") from None
        return job_id
    raise SettingError(f"run.output_dir: no free job folder name in {output_dir} after {_ATTEMPTS} attempts")


def shared_job_id(output_dir):
    """The job id of this run: reserved by rank 0 and broadcast to every rank when a process group exists.

    A failure on rank 0 is sent to the other ranks too, so that they stop with the same line instead of waiting.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return reserve_job_dir(output_dir)
    box = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = reserve_job_dir(output_dir)
        except SettingError as err:
            box[0] = err
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], SettingError):
        raise box[0]
    return box[0]
