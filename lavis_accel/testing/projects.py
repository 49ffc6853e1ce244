"""LAVIS project configs made runnable on one CPU in seconds: for end-to-end tests and trying a yaml offline.

``tiny_project`` keeps a project's arch, model type, task and run settings, and swaps in what a CPU needs: the tiny
model keys of ``tiny_models.tiny_model_config``, synthetic ``datasets:`` entries (``lavis_accel.datasets``), and
``device: cpu, distributed: False`` run settings. The result is an ordinary LAVIS project config.

A model with a teacher (DLIP's ``dlip_pretrain``) keeps the teacher its project names (the arch's default block,
then the project's keys; ``teacher: null`` stays without one), made tiny; its ``pretrained`` file is a tiny random
teacher that ``tiny_models.write_tiny_teacher`` writes. A P-Former stage-1/2 project's ``pretrained_stage0`` is a tiny
random stage-0 file (``tiny_models.write_tiny_stage0``).
"""
import os

from omegaconf import OmegaConf

from lavis_accel.testing.tiny_models import TINY_QUEUE_SIZE, parent_config, tiny_model_config, tiny_teacher_config

CPU_RUN = {"device": "cpu", "distributed": False, "world_size": 1, "num_workers": 0, "amp": False}


def project_teacher(model_cfg):
    """The teacher block a project's ``model:`` section gives its model (the arch's default ``teacher:`` block, then
    the project's keys), or None: no teacher in either, or ``teacher: null`` in the project."""
    if "teacher" in model_cfg and model_cfg.teacher is None:
        return None
    default = parent_config(model_cfg.arch, model_cfg.get("model_type")).get("teacher")
    if default is None and model_cfg.get("teacher") is None:
        return None
    return OmegaConf.merge(default or {}, model_cfg.get("teacher") or {})


def tiny_teacher(model_cfg, teacher_checkpoint=None):
    """``{"teacher": ...}``: the tiny version of the project's teacher (``pretrained``: ``teacher_checkpoint`` when
    given), or ``{}`` for a model without one. The teacher keys of ``tiny_model_config`` are the arch's default
    block's: a project's own teacher block wins here."""
    teacher = project_teacher(model_cfg)
    if teacher is None:
        return {"teacher": None} if "teacher" in model_cfg else {}
    # the teacher's queues are never used (its ITC targets use the student's), but built and saved at their size
    tiny = {**tiny_teacher_config(teacher), "queue_size": TINY_QUEUE_SIZE}
    if teacher_checkpoint is not None:
        tiny["pretrained"] = str(teacher_checkpoint)
    return {"teacher": tiny}


def tiny_stage0(model_cfg, stage0_checkpoint=None):
    """``{"pretrained_stage0": stage0_checkpoint}`` for a P-Former stage-1/2 project that names a stage-0 file (a
    file of ``tiny_models.write_tiny_stage0``), else ``{}``."""
    if stage0_checkpoint is None or not model_cfg.get("pretrained_stage0"):
        return {}
    return {"pretrained_stage0": str(stage0_checkpoint)}


def tiny_project(project, datasets, output_dir, *, model=None, run=None, cache_root=None, teacher_checkpoint=None,
                 stage0_checkpoint=None):
    """A CPU-sized version of ``project`` (a yaml path or a mapping), as an OmegaConf config.

    ``datasets`` maps each dataset the project uses to its synthetic entry (as the ``write_*`` functions return);
    ``model`` and ``run`` are extra overrides applied last; ``cache_root`` becomes ``env.cache_root`` (where the
    caption task finds ``coco_gt/``); ``teacher_checkpoint`` is the ``model.teacher.pretrained`` of a model with a
    teacher (a file of ``tiny_models.write_tiny_teacher``; None keeps the project's); ``stage0_checkpoint`` the
    ``model.pretrained_stage0`` of a P-Former project naming one (None keeps the project's).
    """
    cfg = OmegaConf.load(project) if isinstance(project, (str, os.PathLike)) else OmegaConf.create(project)
    missing = [name for name in cfg.datasets if name not in datasets]
    if missing:
        raise ValueError(f"datasets: no synthetic entry for {', '.join(missing)}")
    tiny_model = {**tiny_model_config(cfg.model.arch, cfg.model.get("model_type")),
                  **tiny_teacher(cfg.model, teacher_checkpoint), **tiny_stage0(cfg.model, stage0_checkpoint)}
    cfg.model = OmegaConf.merge(cfg.model, tiny_model, model or {})
    cfg.datasets = OmegaConf.merge(cfg.datasets, {name: datasets[name] for name in cfg.datasets})
    cfg.run = OmegaConf.merge(cfg.run, CPU_RUN, {"output_dir": str(output_dir)}, run or {})
    if cache_root is not None:
        cfg.env = {"cache_root": str(cache_root)}
    return cfg


def write_project(cfg, path):
    """Save a project config as yaml and return the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    OmegaConf.save(cfg, path)
    return str(path)
