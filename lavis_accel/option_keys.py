"""``--options`` keys that no part of the config knows: refused with a "did you mean", instead of ignored.

OmegaConf merges any dotted key into the config, and LAVIS reads its settings with ``cfg.get(key, default)``, so a
misspelt ``--options run.max_epochs=1`` used to run with the default silently. A key is known when it is in the
merged config (the project yaml, the model's and datasets' default yamls), or when some LAVIS or plugin code reads
it: the run settings of LAVIS's runner validator and the keys its runners, tasks and models read, found once in
their sources.
"""
import dataclasses
import difflib
import functools
import os
import re

from omegaconf import DictConfig, OmegaConf

from lavis.common.config import Config, create_runner_config_validator
from lavis.common.registry import registry
from lavis_accel.errors import SettingError

# Keys LAVIS reads with another variable name than ``cfg``/``run_cfg`` (distributed set-up) and the plugin's own.
EXTRA_RUN_KEYS = {"dist_url", "world_size", "gpu", "rank", "distributed", "runner", "on_bad_sample",
                  "check_images", "save_last"}
EXTRA_MODEL_KEYS = {"reducer", "load_pretrained", "load_strict", "vit_width", "vit_depth", "vit_num_heads",
                    "vit_patch_size"}
_RUN_READ = re.compile(r"run_cfg(?:\.get\(\s*[\"'](\w+)|\.(\w+)|\[[\"'](\w+))")
_MODEL_READ = re.compile(r"\bcfg(?:\.get\(\s*[\"'](\w+)|\[[\"'](\w+)[\"']\])")


def _keys_read_in(folders, pattern):
    keys = set()
    for folder in folders:
        for directory, _, files in os.walk(folder):
            for name in files:
                if name.endswith(".py"):
                    with open(os.path.join(directory, name), encoding="utf-8") as f:
                        for match in pattern.finditer(f.read()):
                            keys.update(group for group in match.groups() if group)
    return keys


def _package_folders(*names):
    library_root = registry.get_path("library_root")
    return [os.path.join(library_root, name) for name in names]


@functools.lru_cache(maxsize=None)
def known_run_keys():
    """Run settings LAVIS's runners and tasks (or the plugin) read."""
    read = _keys_read_in(_package_folders("runners", "tasks", "common"), _RUN_READ)
    return frozenset(read | set(create_runner_config_validator().arguments) | EXTRA_RUN_KEYS) - {"get"}


@functools.lru_cache(maxsize=None)
def known_model_keys():
    """Model settings some LAVIS model's ``from_config`` (or the plugin) reads."""
    plugin = os.path.dirname(os.path.abspath(__file__))
    return frozenset(_keys_read_in(_package_folders("models") + [plugin], _MODEL_READ) | EXTRA_MODEL_KEYS)


def _known_at(cfg, path):
    """The keys known at ``path`` (a list of key parts, the last one being checked), and whether any key is."""
    node = cfg
    for part in path[:-1]:
        if not isinstance(node, DictConfig) or part not in node:
            return None  # a new sub-block: its keys are for the code that reads it to check
        node = node[part]
    known = set(node.keys()) if isinstance(node, DictConfig) else set()
    if len(path) == 2 and path[0] == "run":
        known |= known_run_keys()
    elif len(path) == 2 and path[0] == "model":
        known |= known_model_keys()
    elif path[:2] == ["model", "reducer"] and len(path) == 3:
        known |= known_reducer_keys()
    return known


def known_reducer_keys():
    """Every setting a ``reducer:`` block can hold, whichever reducer it names (the reducer checks its own)."""
    from lavis_accel.patch.crossget import KNOWN_SETTINGS as CROSSGET_SETTINGS
    from lavis_accel.patch.madtp import KNOWN_SETTINGS as MADTP_SETTINGS
    from lavis_accel.reduce.settings import ReducerSettings

    return ({field.name for field in dataclasses.fields(ReducerSettings)} | set(MADTP_SETTINGS)
            | set(CROSSGET_SETTINGS))


def config_without_options(user, merged):
    """The project config as LAVIS builds it (defaults below the yaml) before ``--options`` are merged in.

    The arch and model type are the merged ones, so that an option that changes them picks the defaults they use.
    """
    user = OmegaConf.merge(user, {"model": {"arch": merged.model.arch, "model_type": merged.model.model_type}})
    return OmegaConf.merge(Config.build_runner_config(user), Config.build_model_config(user),
                           Config.build_dataset_config(user))


def check_option_keys(options, user, merged):
    """Refuse each ``--options`` key that neither the project config (``user`` yaml with its defaults, before the
    options) nor the code reading it knows; ``merged`` is the yaml with the options merged in."""
    if not options:
        return
    cfg = config_without_options(user, merged)
    for option in options:
        key = option.split("=", 1)[0]
        path = key.split(".")
        if path[0] not in ("model", "run", "datasets"):
            continue
        if len(path) < 2:
            raise SettingError(f"--options {key}: name a setting inside {path[0]}, e.g. {path[0]}.<key>=<value>")
        known = _known_at(cfg, path)
        if known is None or path[-1] in known:
            continue
        close = difflib.get_close_matches(path[-1], sorted(known), n=3)
        hint = f" (did you mean {', '.join('.'.join(path[:-1] + [c]) for c in close)}?)" if close else ""
        raise SettingError(f"--options {key}: no such setting{hint}")
