"""The dry-run's child process: ``python -m lavis_accel.dryrun.child COMMAND CFG_PATH`` (see ``job.py``).

It runs with the offline hub active, so it can build tiny BLIP models: it writes the tiny random teacher that the
tiny yaml's ``model.teacher.pretrained`` names (DLIP's ``dlip_pretrain``) and the tiny P-Former stage-0 file its
``model.pretrained_stage0`` names (P-Former's stages 1-2), then runs ``lavis-accel COMMAND
--cfg-path CFG_PATH`` through the CLI's own ``main``, in this process.
"""
import contextlib
import logging
import sys

from omegaconf import OmegaConf

from lavis_accel import cli
from lavis_accel.testing.tiny_models import write_tiny_stage0, write_tiny_teacher


@contextlib.contextmanager
def logging_left_unconfigured():
    """Remove the root handlers added meanwhile: a ``logging.info`` call before LAVIS configures logging installs a
    WARNING-level handler, and LAVIS's ``basicConfig`` would then leave its INFO lines (which the report reads)
    unprinted."""
    before = list(logging.root.handlers)
    try:
        yield
    finally:
        for handler in [h for h in logging.root.handlers if h not in before]:
            logging.root.removeHandler(handler)


def write_teacher(cfg_path):
    """Write the tiny teacher the yaml's ``model.teacher`` names to its ``pretrained`` path; None without a teacher."""
    teacher = OmegaConf.load(cfg_path).model.get("teacher")
    if not teacher:
        return None
    with logging_left_unconfigured():
        return write_tiny_teacher(teacher, teacher.pretrained)


def write_stage0(cfg_path):
    """Write the tiny P-Former stage-0 file the yaml's ``model.pretrained_stage0`` names; None without one."""
    model_cfg = OmegaConf.load(cfg_path).model
    if not model_cfg.get("pretrained_stage0"):
        return None
    with logging_left_unconfigured():
        return write_tiny_stage0(model_cfg, model_cfg.pretrained_stage0)


def main(argv):
    command, cfg_path = argv
    write_teacher(cfg_path)
    write_stage0(cfg_path)
    return cli.main([command, "--cfg-path", cfg_path])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
