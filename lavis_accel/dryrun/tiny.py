"""The project a dry-run runs: the user's yaml parsed and checked as the CLI does, then shrunk to seconds on a CPU.

``testing.projects.tiny_project`` keeps the arch, model type, task and run settings and swaps in the tiny model,
the synthetic datasets and CPU run settings; here the run is cut to one short epoch and the settings that size
the evaluation are capped (never raised) to fit the synthetic splits.
"""
import tempfile

from omegaconf import OmegaConf

from lavis_accel import config_checks
from lavis_accel.dryrun.data import SIZES, check_writers
from lavis_accel.errors import SettingError
from lavis_accel.option_keys import check_option_keys
from lavis_accel.run_checks import check_run
from lavis_accel.testing.projects import tiny_project
from lavis_accel.testing.tiny_models import tiny_model_config

SHORT_RUN = {"max_epoch": 1, "batch_size_train": 8, "batch_size_eval": 8, "resume_ckpt_path": None}
SHORT_ITERS = 5  # runner_iter: one inner epoch of this many iterations
CAPS = {
    "k_test": min(SIZES["n_val"], SIZES["n_test"]),  # ITM re-ranks k_test candidates: at most the gallery's images
    "max_len": 8,  # generated tokens (captioning, VQA generation)
    "min_len": 2,
    "num_beams": 2,
    "num_ans_candidates": 8,  # VQA rank answering; the synthetic answer list holds more
}


def load_project(cfg_path, options=None):
    """The yaml merged with ``--options``, checked as ``lavis-accel train`` checks it (its device and output folder
    are the cluster's, so they are not checked here), and runnable by a dry-run."""
    user = config_checks.load_yaml(cfg_path)
    cfg = OmegaConf.merge(user, config_checks.parse_options(options))
    config_checks.check_project(cfg)
    check_option_keys(options, user, cfg)
    check_run(OmegaConf.merge(cfg, {"run": {"device": "cpu", "output_dir": tempfile.gettempdir()}}),
              "evaluate" if not is_training(cfg) else "train")
    check_tiny_version(cfg.model)
    check_writers(list(cfg.datasets))
    return cfg


def check_tiny_version(model_cfg):
    """Refuse, in one line, an arch whose family has no tiny configuration (BLIP, BLIP-2 and CLIP have one)."""
    try:
        tiny_model_config(model_cfg.arch, model_cfg.get("model_type"))
    except ValueError as err:  # "arch: no tiny configuration for <class>"
        raise SettingError(f"model.{err}") from None


def is_training(cfg):
    """A training yaml trains then evaluates (``lavis-accel train``); ``run.evaluate: True`` only evaluates."""
    return not cfg.run.get("evaluate", False)


def short_run(run_cfg):
    """The run settings a dry-run overrides: one (inner) epoch of small batches, evaluation sizes capped."""
    run = dict(SHORT_RUN)
    if run_cfg.get("runner") == "runner_iter":
        run.update(max_iters=SHORT_ITERS, iters_per_inner_epoch=SHORT_ITERS)
    run.update({key: min(run_cfg[key], cap) for key, cap in CAPS.items() if run_cfg.get(key) is not None})
    return run


def tiny_config(cfg, datasets, output_dir, cache_root, teacher_checkpoint=None, stage0_checkpoint=None):
    """The CPU-sized project config: tiny model, ``datasets`` entries, short run, outputs under ``output_dir``; a
    model with a teacher (DLIP) reads its tiny teacher from ``teacher_checkpoint``, a P-Former stage-1/2 model its
    tiny stage-0 P-Former from ``stage0_checkpoint``."""
    return tiny_project(cfg, datasets, output_dir, run=short_run(cfg.run), cache_root=cache_root,
                        teacher_checkpoint=teacher_checkpoint, stage0_checkpoint=stage0_checkpoint)
