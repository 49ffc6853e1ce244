"""Config files shipped with the package (model default yamls, architecture jsons), found by absolute path.

LAVIS resolves a model's ``PRETRAINED_MODEL_CONFIG_DICT`` entries against its own package folder, but keeps an
absolute path as it is: that is how the plugin's yamls are found, wherever the package is installed.
"""
from importlib import resources


def packaged_config(filename):
    """Absolute path of ``lavis_accel/configs/models/<filename>``."""
    return str(resources.files("lavis_accel") / "configs" / "models" / filename)


def packaged_dataset_config(name):
    """Absolute path of ``lavis_accel/configs/datasets/<name>/defaults.yaml`` (a builder's default yaml)."""
    return str(resources.files("lavis_accel") / "configs" / "datasets" / name / "defaults.yaml")
