"""A tiny CLIP model type, ``ViT-Tiny-16``, for tests and the demo.

LAVIS's ``clip`` arch builds its model from ``model_type``: the type names both a default yaml
(``CLIP.PRETRAINED_MODEL_CONFIG_DICT``) and an open_clip architecture json (``clip_models.model._MODEL_CONFIGS``).
This module adds one entry to each, from files shipped in ``lavis_accel/configs/models``; existing types are untouched.
"""
from lavis.models.clip_models import model as clip_model

from lavis_accel.configs import packaged_config

TINY_CLIP_TYPE = "ViT-Tiny-16"


def register_clip_type(name, architecture_json, default_yaml):
    """Make ``model_type: <name>`` of arch ``clip`` build the open_clip architecture in ``architecture_json``."""
    known_yaml = clip_model.CLIP.PRETRAINED_MODEL_CONFIG_DICT.get(name)
    if known_yaml is not None and known_yaml != default_yaml:
        raise ValueError(f"CLIP model_type '{name}' is already registered with {known_yaml}")
    if name not in clip_model.list_models():
        clip_model.add_model_config(architecture_json)
    clip_model.CLIP.PRETRAINED_MODEL_CONFIG_DICT[name] = default_yaml


register_clip_type(TINY_CLIP_TYPE, architecture_json=packaged_config(f"clip/{TINY_CLIP_TYPE}.json"),
                   default_yaml=packaged_config("clip_vit_tiny16.yaml"))
