"""LAVIS's ``train.py`` and ``evaluate.py`` (which the wheel does not ship), with the plugin imported.

Same arguments (``--cfg-path``, ``--options k=v ...``), same set-up order (job id, config, distributed init, seeds,
logger, task, datasets, model, runner from ``run.runner``). Under torchrun on GPUs they behave as LAVIS's scripts;
with ``device: cpu, distributed: False`` they run in one CPU process. Two additions: the config is checked before
any work (one-line errors); a relative ``run.output_dir`` is taken relative to the working directory (LAVIS
joins it to its own package folder, i.e. into site-packages for a pip install); and ``env.cache_root`` in the
project yaml (the key of LAVIS's own ``configs/default.yaml``, which LAVIS reads only from that file) sets the
cache root where relative dataset paths and the caption ground truth (``coco_gt/``) are found.
"""
import argparse
import logging
import os
import random
from types import SimpleNamespace

import numpy as np
import torch
import torch.backends.cudnn as cudnn
import torch.distributed as dist
from omegaconf import OmegaConf

import lavis_accel  # noqa: F401  (registers the plugin, applies the guarded CPU fixes)
import lavis.common.optims  # noqa: F401  (registers LAVIS's lr schedulers, as LAVIS's scripts do)
import lavis.tasks as tasks
from lavis.common.config import Config
from lavis.common.dist_utils import get_rank, init_distributed_mode
from lavis.common.logger import setup_logger
from lavis.common.registry import registry
from lavis_accel import config_checks
from lavis_accel.data_checks import check_first_samples, checking_datasets
from lavis_accel.errors import TRACEBACK_VARIABLE, SettingError
from lavis_accel.datasets import set_cache_root
from lavis_accel.job_dirs import shared_job_id
from lavis_accel.models.blip2_opt_answers import check_lemmatizer
from lavis_accel.option_keys import check_option_keys
from lavis_accel.run_checks import check_run


def add_arguments(parser):
    parser.add_argument("--cfg-path", required=True, help="path to the LAVIS project yaml")
    parser.add_argument("--options", nargs="+", default=None,
                        help="override settings of the config, as key=value pairs (e.g. run.max_epoch=1)")
    return parser


def load_config(cfg_path, options=None, mode="train"):
    """The merged LAVIS ``Config`` of a project yaml plus ``--options``, checked before any work starts.

    ``mode`` (train or evaluate) decides which run settings are needed.
    """
    user = config_checks.load_yaml(cfg_path)
    merged = OmegaConf.merge(user, config_checks.parse_options(options))
    config_checks.check_project(merged)
    check_option_keys(options, user, merged)
    check_run(merged, mode)
    if merged.get("env", {}).get("cache_root"):
        set_cache_root(merged.env.cache_root)
    cfg = Config(SimpleNamespace(cfg_path=cfg_path, options=options))
    config_checks.check_reducer_block(cfg.model_cfg)
    check_lemmatizer(cfg.model_cfg)
    config_checks.check_processors(cfg.datasets_cfg)
    config_checks.check_dataset_paths(cfg.datasets_cfg)
    config_checks.check_checkpoint_files(cfg.config)
    if not os.path.isabs(cfg.run_cfg.output_dir):
        cfg.run_cfg.output_dir = os.path.abspath(cfg.run_cfg.output_dir)
    return cfg


def setup_seeds(cfg):
    seed = cfg.run_cfg.seed + get_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    cudnn.benchmark = False
    cudnn.deterministic = True


def setup_step(what, build):
    """``build()``, with a failure of LAVIS's own building code (a setting of a type it cannot use, say
    ``model.image_size: abc``) reported in one line naming ``what`` was being built, before any work."""
    try:
        return build()
    except SettingError:
        raise
    except Exception as err:  # noqa: BLE001  (any error of LAVIS's set-up code is a setting it could not use)
        message = " ".join(str(err).split())[:300]
        raise SettingError(f"{what}: building it failed with {type(err).__name__}: {message} (check its settings; "
                           f"{TRACEBACK_VARIABLE}=1 shows where)") from err


def build_runner(cfg_path, options=None, mode="train"):
    """Everything LAVIS's scripts do before ``runner.train()`` / ``runner.evaluate()``; returns the runner.

    One difference: the job folder gets a unique id and is created before any work (``job_dirs``).
    """
    cfg = load_config(cfg_path, options, mode)
    init_distributed_mode(cfg.run_cfg)
    job_id = shared_job_id(cfg.run_cfg.output_dir)
    setup_seeds(cfg)
    setup_logger()
    cfg.pretty_print()

    task = tasks.setup_task(cfg)
    evaluated = list(cfg.run_cfg.get("test_splits") or [])
    if mode == "train":
        evaluated += list(cfg.run_cfg.get("valid_splits") or [])
    with checking_datasets(cfg.run_cfg, os.path.join(cfg.run_cfg.output_dir, job_id), evaluated):
        datasets = setup_step("datasets", lambda: task.build_datasets(cfg))
    check_first_samples(datasets)
    with config_checks.checking_model_checkpoints(cfg.config):
        model = setup_step(f"model ({cfg.model_cfg.arch})", lambda: task.build_model(cfg))
    if torch.device(cfg.run_cfg.device).type == "cpu":
        model = model.float()  # as LAVIS's load_model does on CPU: BLIP-2 builds its ViT and OPT in fp16

    runner_cls = registry.get_runner_class(cfg.run_cfg.get("runner", "runner_base"))
    _forget_previous_job_paths()
    return runner_cls(cfg=cfg, job_id=job_id, task=task, model=model, datasets=datasets)


def _forget_previous_job_paths():
    """Let a second job run in this process: LAVIS's runner registers its output paths, and the registry refuses a
    name registered twice."""
    for name in ("output_dir", "result_dir"):
        registry.mapping["paths"].pop(name, None)


LEAVING_KEY = "lavis_accel/ranks_leaving"
ALL_LEFT_KEY = "lavis_accel/all_ranks_left"


def leave_process_group():
    """End a torchrun job cleanly: wait until every rank is done, then destroy the process group.

    The wait goes through the rendezvous store (torchrun's agent hosts it), not a gloo barrier: a rank that left a
    gloo barrier and tore its connections down could leave another rank waiting forever for the barrier's last
    message (seen once in about six two-process runs: rank 0 exited, rank 1 hung). A rank that exits while another
    still writes can otherwise abort in gloo's teardown ("terminate called without an active exception").
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    store = dist.distributed_c10d._get_default_store()
    if store.add(LEAVING_KEY, 1) == dist.get_world_size():
        store.set(ALL_LEFT_KEY, "1")
    store.wait([ALL_LEFT_KEY])
    dist.destroy_process_group()


def train(args):
    runner = build_runner(args.cfg_path, args.options)
    runner.train()
    logging.info("lavis-accel: checkpoints and logs in %s", runner.output_dir)
    leave_process_group()
    return 0


def evaluate(args):
    runner = build_runner(args.cfg_path, args.options, mode="evaluate")
    runner.evaluate(skip_reload=True)
    logging.info("lavis-accel: results and logs in %s", runner.output_dir)
    leave_process_group()
    return 0


def script_main(job, description):
    """Entry of ``python -m lavis_accel.train`` / ``.evaluate``: the same errors as the ``lavis-accel`` CLI."""
    from lavis_accel.cli import run_guarded

    parser = add_arguments(argparse.ArgumentParser(description=description))
    return run_guarded(job, parser.parse_args())
