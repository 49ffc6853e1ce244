"""LAVIS project configs made runnable on one CPU in seconds: for end-to-end tests and trying a yaml offline.

``tiny_project`` keeps a project's arch, model type, task and run settings, and swaps in what a CPU needs: the tiny
model keys of ``tiny_models.tiny_model_config``, synthetic ``datasets:`` entries (``lavis_accel.datasets``), and
``device: cpu, distributed: False`` run settings. The result is an ordinary LAVIS project config.
"""
import os

from omegaconf import OmegaConf

from lavis_accel.testing.tiny_models import tiny_model_config

CPU_RUN = {"device": "cpu", "distributed": False, "world_size": 1, "num_workers": 0, "amp": False}


def tiny_project(project, datasets, output_dir, *, model=None, run=None, cache_root=None):
    """A CPU-sized version of ``project`` (a yaml path or a mapping), as an OmegaConf config.

    ``datasets`` maps each dataset the project uses to its synthetic entry (as the ``write_*`` functions return);
    ``model`` and ``run`` are extra overrides applied last; ``cache_root`` becomes ``env.cache_root`` (where the
    caption task finds ``coco_gt/``).
    """
    cfg = OmegaConf.load(project) if isinstance(project, (str, os.PathLike)) else OmegaConf.create(project)
    missing = [name for name in cfg.datasets if name not in datasets]
    if missing:
        raise ValueError(f"datasets: no synthetic entry for {', '.join(missing)}")
    tiny_model = tiny_model_config(cfg.model.arch, cfg.model.get("model_type"))
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
