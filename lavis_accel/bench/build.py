"""Build a registered arch's LAVIS parent model at its real size with random weights (nothing is downloaded).

An accelerated arch is its LAVIS parent class plus a reducer; the bench builds the parent from the arch's own
model yaml (same sizes, same image size) and applies each reducer setting to that one instance in turn.

A distilled student arch (DLIP: ``dlip_retrieval``, ``dlip_caption``) is its LAVIS parent class built at a smaller
size: the bench builds two models, the full-size LAVIS parent from that arch's own yaml and the student from its
yaml. The parent arch is the registered name of the student's LAVIS class (``BlipRetrieval``: ``blip_retrieval``);
its model type comes from :func:`parent_model_types`.
"""
from dataclasses import dataclass
from typing import Dict, Optional

from lavis.common.registry import registry
from lavis.models.base_model import BaseModel
from lavis.models.clip_models.model import CLIP
from omegaconf import OmegaConf

from lavis_accel.bench.settings import PARENT, STUDENT
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
    arch_class: Optional[type] = None  # the registered class (a student is built as itself, not as its parent)
    parent: Optional["ArchSpec"] = None  # a distilled student's full-size LAVIS parent (its own arch and type)
    parent_note: str = ""  # why the parent's model type is not the student's, when it is not

    @property
    def is_student(self) -> bool:
        """Whether the arch is a smaller model of its own (compared with a full-size parent), not a reducer."""
        return self.parent is not None

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


def parent_model_types(arch_cls, arch) -> Optional[Dict[str, str]]:
    """A distilled student's table {its model type: its full-size LAVIS parent's model type}, from
    ``PARENT_MODEL_TYPES`` on its class, or None for an arch that is its parent plus a reducer."""
    table = getattr(arch_cls, "PARENT_MODEL_TYPES", None)
    return dict(table) if table is not None else None


def registered_name(cls) -> str:
    """The name LAVIS registers model class ``cls`` under (its first, for a class registered twice)."""
    mapping = registry.mapping["model_name_mapping"]
    names = [name for name, registered in mapping.items() if registered is cls]
    if not names:
        raise SettingError(f"{cls.__name__} is not a registered LAVIS model")
    return names[0]


def student_parent(arch_cls, arch, model_type):
    """``(parent arch, parent model type, note)`` of a distilled student arch, or None for a reducer arch. The
    parent arch is the registered name of the student's LAVIS class; the note says why the types differ."""
    table = parent_model_types(arch_cls, arch)
    if table is None:
        return None
    parent_arch = registered_name(parent_class(arch_cls))
    if model_type not in table:
        raise SettingError(f"--model-type {model_type!r}: {arch} has no full-size {parent_arch} to compare with; "
                           f"use one of {', '.join(table)}")
    parent_type = table[model_type]
    note = ""
    if parent_type != model_type and model_type not in parent_class(arch_cls).PRETRAINED_MODEL_CONFIG_DICT:
        note = f"LAVIS has no {parent_arch} {model_type}"
    return parent_arch, parent_type, note


def arch_spec(arch, model_type) -> ArchSpec:
    cls = arch_class(arch)
    yaml = default_yaml(cls, arch, model_type)
    config = yaml.model
    reducer_config = config.pop("reducer", None)
    reducer = OmegaConf.to_container(reducer_config, resolve=True) if reducer_config is not None else None
    eval_size = OmegaConf.select(yaml, "preprocess.vis_processor.eval.image_size")
    spec = ArchSpec(arch, model_type, parent_class(cls), config, reducer, eval_size, arch_class=cls)
    found = student_parent(cls, arch, model_type)
    if found is not None:
        parent_arch, parent_type, spec.parent_note = found
        spec.parent = arch_spec(parent_arch, parent_type)
    return spec


def build_parent(spec: ArchSpec) -> BaseModel:
    """The arch's LAVIS parent at the arch's real size, randomly initialised (no checkpoint), in eval mode."""
    no_checkpoint = {"load_finetuned": False, "load_pretrained": False}
    if issubclass(spec.parent_class, CLIP):
        no_checkpoint = {"pretrained": ""}  # LAVIS's CLIP loads OpenAI weights for "openai", none for ""
    config = OmegaConf.merge(spec.config, no_checkpoint)
    return spec.parent_class.from_config(config).eval()


def build_student(spec: ArchSpec) -> BaseModel:
    """A distilled student arch as itself (its own class and yaml), randomly initialised, in eval mode."""
    config = OmegaConf.merge(spec.config, {"load_finetuned": False, "load_pretrained": False})
    return spec.arch_class.from_config(config).eval()


def build_models(spec: ArchSpec):
    """What the bench measures: the arch's LAVIS parent (every setting patches it in turn), or, for a distilled
    student, ``{"parent": the full-size LAVIS parent, "student": the student}``."""
    if not spec.is_student:
        return build_parent(spec)
    return {PARENT: build_parent(spec.parent), STUDENT: build_student(spec)}


def parent_label(spec: ArchSpec) -> str:
    """``blip_retrieval / flickr``: the parent a student is compared with, and why, when its type differs."""
    note = f"; {spec.parent_note}" if spec.parent_note else ""
    return f"{spec.parent.arch} / {spec.parent.model_type}{note}"
