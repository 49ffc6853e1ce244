"""Checks of a project's ``run:`` section before any work starts, each failing with one line naming the setting.

LAVIS reads these settings only when it needs them: a batch size of 0 fails inside the DataLoader, ``max_epoch: 0``
after the model is built (``cur_epoch`` is never set), ``device: cuda`` on a machine without CUDA when the model is
moved, a misspelt runner with ``'NoneType' object is not callable``. ``mode`` is ``train`` or ``evaluate``.
"""
import os

import torch
from omegaconf import DictConfig, ListConfig

from lavis.common.registry import registry
from lavis_accel.errors import SettingError

ON_BAD_SAMPLE = ("error", "skip")


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    """A number, or a string LAVIS's ``float()`` reads as one (a quoted ``"2e-5"``)."""
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return False
        return True
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_int(run, key, minimum, required=False):
    if key not in run or run[key] is None:
        if required:
            raise SettingError(f"run.{key} is not set")
        return
    value = run[key]
    if not _is_int(value) or value < minimum:
        raise SettingError(f"run.{key} must be an integer of at least {minimum}, not {value!r}")


def _check_whole_number(run, key):
    """A count LAVIS reads with ``int()``: at least 1, and whole (LAVIS's yamls write ``max_iters: 2e4``, a float)."""
    value = run.get(key)
    if not (_is_number(value) and not isinstance(value, str) and value >= 1 and int(value) == value):
        raise SettingError(f"run.{key} must be a whole number of at least 1 for run.runner runner_iter, not {value!r}")


def _check_number(run, key):
    if key in run and run[key] is not None and not _is_number(run[key]):
        raise SettingError(f"run.{key} must be a number, not {run[key]!r}")


def _check_bool(run, key):
    if key in run and run[key] is not None and not isinstance(run[key], bool):
        raise SettingError(f"run.{key} must be True or False, not {run[key]!r}")


def check_device(run):
    """``run.device`` must name a device torch knows and this machine has."""
    name = run.get("device", "cuda")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise SettingError(f"run.device '{name}' is not a torch device: use cuda or cpu") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SettingError(f"run.device '{name}': this machine has no CUDA device (set run.device=cpu)")
    if device.type not in ("cpu", "cuda") and not getattr(torch, device.type, None):
        raise SettingError(f"run.device '{name}' is not available on this machine: use cuda or cpu")


def check_output_dir(run):
    """``run.output_dir`` must be set and be, or be creatable as, a folder this process can write in.

    Nothing is created here: the nearest existing folder on the path must be a writable folder.
    """
    output_dir = run.get("output_dir")
    if not isinstance(output_dir, str) or not output_dir:
        raise SettingError("run.output_dir is not set: name the folder where job folders are written")
    existing = os.path.abspath(output_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise SettingError(f"run.output_dir: {output_dir} is not a folder ({existing} is a file)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SettingError(f"run.output_dir: {existing} is not writable")


def _split_names(run, key):
    names = run.get(key, [])
    if names is None:
        return []
    if not isinstance(names, (list, ListConfig)) or not all(isinstance(n, str) for n in names):
        raise SettingError(f"run.{key} must be a list of split names such as [val], not {names!r}")
    return list(names)


def check_splits(run, datasets_cfg):
    """Every split named in ``train_splits``/``valid_splits``/``test_splits`` must be a split of some dataset."""
    available = set()
    for dataset in datasets_cfg.values():
        annotations = dataset.get("build_info", {}).get("annotations", {}) if isinstance(dataset, DictConfig) else {}
        available.update(annotations.keys())
    for key in ("train_splits", "valid_splits", "test_splits"):
        for name in _split_names(run, key):
            if available and name not in available:
                raise SettingError(f"run.{key}: no dataset has a '{name}' split (they have: "
                                   f"{', '.join(sorted(available))})")


def check_streamed_datasets(runner, datasets_cfg):
    """A dataset streamed without end (a builder with ``STREAMED = True``, e.g. ``image_text_shards``) has no length:
    only LAVIS's ``runner_iter`` trains on it (``runner_base`` needs the length of an epoch)."""
    for name in datasets_cfg:
        if runner != "runner_iter" and getattr(registry.get_builder_class(name), "STREAMED", False):
            raise SettingError(f"datasets.{name} is streamed, without a length: train it with run.runner: runner_iter "
                               f"(and run.max_iters, run.iters_per_inner_epoch), not {runner}")


def check_run(cfg, mode):
    """Check the ``run:`` settings of a merged project config for ``mode`` (train or evaluate)."""
    run = cfg.run
    runner = run.get("runner", "runner_base")
    if registry.get_runner_class(runner) is None:
        known = ", ".join(registry.mapping["runner_name_mapping"])
        raise SettingError(f"run.runner '{runner}' is not registered: use one of {known}")
    lr_sched = run.get("lr_sched")
    if lr_sched is not None and registry.get_lr_scheduler_class(lr_sched) is None:
        known = ", ".join(registry.mapping["lr_scheduler_name_mapping"])
        raise SettingError(f"run.lr_sched '{lr_sched}' is not registered: use one of {known}")
    check_device(run)
    for key in ("distributed", "amp", "evaluate"):
        _check_bool(run, key)
    _check_int(run, "seed", 0, required=True)
    _check_int(run, "num_workers", 0)
    _check_int(run, "batch_size_eval", 1)
    _check_int(run, "k_test", 1)
    _check_int(run, "accum_grad_iters", 1)
    _check_int(run, "warmup_steps", 0)
    for key in ("init_lr", "min_lr", "warmup_lr", "weight_decay", "lr_decay_rate"):
        _check_number(run, key)
    training = mode == "train" and not run.get("evaluate", False)
    if training:
        _check_int(run, "batch_size_train", 1, required=True)
        if runner == "runner_base":
            _check_int(run, "max_epoch", 1, required=True)
        if runner == "runner_iter":
            for key in ("max_iters", "iters_per_inner_epoch"):
                _check_whole_number(run, key)
        check_streamed_datasets(runner, cfg.datasets)
    on_bad_sample = run.get("on_bad_sample", "error")
    if on_bad_sample not in ON_BAD_SAMPLE:
        raise SettingError(f"run.on_bad_sample must be one of {', '.join(ON_BAD_SAMPLE)}, not {on_bad_sample!r}")
    check_splits(run, cfg.datasets)
    check_output_dir(run)
    check_task_settings(run, training)


def check_task_settings(run, training):
    """The plugin's tasks check their own ``run:`` settings (e.g. ``run.madtp``) here, before the job folder exists:
    a registered task class may define ``check_run_settings(run_cfg, training)``."""
    task_class = registry.get_task_class(run.get("task"))
    check = getattr(task_class, "check_run_settings", None)
    if check is not None:
        check(run, training)
