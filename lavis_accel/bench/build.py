"""Build a registered arch's LAVIS parent model at its real size with random weights (nothing is downloaded).

An accelerated arch is its LAVIS parent class plus a reducer; the bench builds the parent from the arch's own
model yaml (same sizes, same image size) and applies each reducer setting to that one instance in turn.
"""
from dataclasses import dataclass
from typing import Optional

from lavis.common.registry import registry
from lavis.models.base_model import BaseModel
from lavis.models.clip_models.model import CLIP
from omegaconf import OmegaConf

from lavis_accel.errors import SettingError


@dataclass
class ArchSpec:
    """What the bench needs to know about an arch before building it."""

    arch: str
    model_type: str
    parent_class: type
    config: object  # the ``model:`` block of the arch's yaml, without ``reducer``
    reducer_config: Optional[dict]  # the arch's ``reducer:`` block, if it has one
    eval_image_size: Optional[int] = None  # the yaml's evaluation processor's image size (CLIP has no model key)

    @property
    def image_size(self) -> int:
        if "image_size" in self.config:
            return int(self.config.image_size)
        if self.eval_image_size is None:
            raise SettingError(f"{self.arch} / {self.model_type}: the model yaml has no image_size")
        return int(self.eval_image_size)


def plugin_archs():
    """The archs this plugin registers (their classes live in ``lavis_accel``), sorted."""
    mapping = registry.mapping["model_name_mapping"]
    return sorted(name for name, cls in mapping.items() if cls.__module__.startswith("lavis_accel."))


def parent_class(arch_cls):
    """The LAVIS model class an arch extends: the first class in its MRO that LAVIS itself defines."""
    for cls in arch_cls.__mro__:
        if cls.__module__.startswith("lavis.models.") and issubclass(cls, BaseModel) and cls is not BaseModel:
            return cls
    raise SettingError(f"arch class {arch_cls.__name__} does not extend a LAVIS model class")


def arch_class(arch):
    cls = registry.get_model_class(arch)
    if cls is None:
        known = ", ".join(plugin_archs()) or "none"
        raise SettingError(f"--arch {arch!r} is not a registered LAVIS model; this plugin's archs: {known}")
    return cls


def default_yaml(arch_cls, arch, model_type):
    """The arch's default yaml for ``model_type``."""
    if model_type not in arch_cls.PRETRAINED_MODEL_CONFIG_DICT:
        known = ", ".join(arch_cls.PRETRAINED_MODEL_CONFIG_DICT)
        raise SettingError(f"--model-type {model_type!r} is not known for {arch}: use one of {known}")
    return OmegaConf.load(arch_cls.default_config_path(model_type))


def arch_spec(arch, model_type) -> ArchSpec:
    cls = arch_class(arch)
    yaml = default_yaml(cls, arch, model_type)
    config = yaml.model
    reducer_config = config.pop("reducer", None)
    reducer = OmegaConf.to_container(reducer_config, resolve=True) if reducer_config is not None else None
    eval_size = OmegaConf.select(yaml, "preprocess.vis_processor.eval.image_size")
    return ArchSpec(arch, model_type, parent_class(cls), config, reducer, eval_size)


def build_parent(spec: ArchSpec) -> BaseModel:
    """The arch's LAVIS parent at the arch's real size, randomly initialised (no checkpoint), in eval mode."""
    no_checkpoint = {"load_finetuned": False, "load_pretrained": False}
    if issubclass(spec.parent_class, CLIP):
        no_checkpoint = {"pretrained": ""}  # LAVIS's CLIP loads OpenAI weights for "openai", none for ""
    config = OmegaConf.merge(spec.config, no_checkpoint)
    return spec.parent_class.from_config(config).eval()
