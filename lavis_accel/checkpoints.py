"""Checkpoint files for plugin-run jobs: one safe loader, atomic writes, and the complete state an exact resume needs.

- ``safe_load``: every checkpoint a plugin-run job reads (``model.finetuned``, ``model.pretrained``,
  ``run.resume_ckpt_path``, the best checkpoint) is read with ``weights_only=True``, whatever the torch version:
  a pickle that would import code is refused, as are text files and truncated files, each in one line.
- ``save_atomically``: written to a temporary file beside the target, then renamed into place; temporary files
  left by killed writers are removed.
- ``training_state``: what LAVIS's runner checkpoints leave out and an exact resume needs: the momentum encoders
  (frozen parameters that training changes: the second module of each of LAVIS's ``model_pairs``), the RNG states
  of torch, numpy and python (one per rank), and the best validation result so far.
"""
import contextlib
import glob
import os
import random
import re
import tempfile
import zipfile

import numpy as np
import torch

from lavis_accel.errors import SettingError

_TORCH_LOAD = torch.load  # the real one: ``loading_safely`` swaps ``torch.load`` for ``safe_load`` while it runs
_TMP_PREFIX = ".tmp-"
_TMP_NAME = re.compile(r"\.tmp-(\d+)-")


def _describe_load_failure(err):
    message = " ".join(str(err).split())
    unsupported = re.search(r"Unsupported global: GLOBAL ([\w.]+)", message)
    if unsupported:
        return (f"is refused: loading it would import {unsupported.group(1)} (checkpoints are read with "
                f"weights_only=True: tensors and plain data only)")
    if not isinstance(err, (RuntimeError, zipfile.BadZipFile)):
        return "is not a torch checkpoint (not a file written by torch.save, or cut short)"
    return f"is not a readable torch checkpoint (truncated or corrupt: {message[:120]})"


CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


def names_a_file(name):
    """Whether a setting that takes a file or a model name (e.g. a timm name) names a file."""
    name = str(name)
    return os.sep in name or name.endswith(CHECKPOINT_SUFFIXES) or os.path.exists(name)


def safe_load(path, setting, map_location="cpu"):
    """``torch.load(path, weights_only=True)``; a missing, hostile, text or truncated file fails in one line."""
    if not os.path.isfile(path):
        raise SettingError(f"{setting}: checkpoint file not found: {path}")
    try:
        return _TORCH_LOAD(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001  (the unpickler fails on garbage with any error: KeyError, struct.error)
        raise SettingError(f"{setting}: {path} {_describe_load_failure(err)}") from None


@contextlib.contextmanager
def loading_safely(settings, check=None):
    """While LAVIS loads checkpoints, route its ``torch.load`` calls through ``safe_load``.

    ``settings`` maps a file path to the setting that named it (for the error line); other files (a downloaded
    URL, a transformers weight file) are named "checkpoint". ``check(obj, setting, path)``, if given, sees each
    loaded object before LAVIS does. Yields the list of objects loaded, in order.
    """
    stock_load = torch.load
    loaded = []

    def load(f, map_location=None, **kwargs):
        if not isinstance(f, (str, os.PathLike)):
            return _TORCH_LOAD(f, map_location=map_location, **{**kwargs, "weights_only": True})
        path = os.fspath(f)
        setting = settings.get(path, "checkpoint")
        obj = safe_load(path, setting, map_location=map_location)
        if check is not None:
            check(obj, setting, path)
        loaded.append(obj)
        return obj

    torch.load = load
    try:
        yield loaded
    finally:
        torch.load = stock_load


def _current_umask():
    umask = os.umask(0)
    os.umask(umask)
    return umask


def remove_stale_temp_files(directory):
    """Remove the temporary files that writers killed mid-write left in ``directory`` (their process is gone)."""
    for path in glob.glob(os.path.join(glob.escape(directory), f"{_TMP_PREFIX}*.pth")):
        match = _TMP_NAME.match(os.path.basename(path))
        if match and _process_alive(int(match.group(1))):
            continue
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def save_atomically(stock_save):
    """``torch.save`` that writes to a temporary file beside the target, then renames it into place."""

    def save(obj, f, *args, **kwargs):
        if not isinstance(f, (str, os.PathLike)):
            return stock_save(obj, f, *args, **kwargs)
        directory = os.path.dirname(os.path.abspath(f))
        remove_stale_temp_files(directory)
        fd, tmp = tempfile.mkstemp(prefix=f"{_TMP_PREFIX}{os.getpid()}-", suffix=".pth", dir=directory)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp makes 0600; torch.save's file would follow the umask
        try:
            stock_save(obj, tmp, *args, **kwargs)
            os.replace(tmp, f)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    return save


def momentum_state(model):
    """The parameters of the momentum copies in LAVIS's ``model_pairs``: frozen, so LAVIS's runner does not save
    them, yet updated every step."""
    state = {}
    names = {id(module): name for name, module in model.named_modules()}
    for _, momentum in getattr(model, "model_pairs", []):
        prefix = names[id(momentum)]
        for name, param in momentum.named_parameters():
            state[f"{prefix}.{name}"] = param.detach().clone()
    return state


def rng_state():
    """The RNG states of torch (and CUDA), numpy and python of this process, as plain data and tensors."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    """Restore what ``rng_state`` returned."""
    torch.set_rng_state(state["torch"])
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gathered_rng_states():
    """Every rank's ``rng_state`` (rank order), gathered when a process group exists."""
    import torch.distributed as dist

    state = rng_state()
    if not (dist.is_available() and dist.is_initialized()):
        return [state]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


@contextlib.contextmanager
def saving(extra_model_state, extra_entries, to=None):
    """While LAVIS's runner saves a checkpoint, write it atomically with the training state it leaves out.

    ``extra_model_state`` joins the ``model`` state dict (e.g. ``momentum_state``), ``extra_entries`` the top level
    (``rng``, ``best``); ``to`` writes to that path instead of the one LAVIS chose (for ``checkpoint_last.pth``).
    """
    stock_save = torch.save
    atomic = save_atomically(stock_save)

    def save(obj, f, *args, **kwargs):
        obj = {**obj, "model": {**obj["model"], **extra_model_state}, **extra_entries}
        return atomic(obj, to or f, *args, **kwargs)

    torch.save = save
    try:
        yield
    finally:
        torch.save = stock_save
