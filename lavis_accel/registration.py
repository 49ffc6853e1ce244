"""Idempotent registration into LAVIS's registry.

LAVIS's ``registry.register_*`` decorators raise ``KeyError`` on a name that is already taken, so a second
import (or a reload) of a plugin module would crash. These wrappers register a class only when its name is free
and refuse, in one line, a name that LAVIS or another plugin already uses for a different class.
"""
from lavis.common.registry import registry

_KINDS = {
    "model": ("model_name_mapping", registry.register_model),
    "processor": ("processor_name_mapping", registry.register_processor),
    "task": ("task_name_mapping", registry.register_task),
    "builder": ("builder_name_mapping", registry.register_builder),
}


def _register_once(kind, name):
    mapping_key, register = _KINDS[kind]

    def wrap(cls):
        existing = registry.mapping[mapping_key].get(name)
        if existing is None:
            return register(name)(cls)
        if existing.__module__ == cls.__module__ and existing.__qualname__ == cls.__qualname__:
            return cls  # the same class imported again (reload): nothing to do
        raise KeyError(f"lavis_accel: {kind} name '{name}' is already registered by {existing.__module__}")

    return wrap


def register_model(name):
    return _register_once("model", name)


def register_processor(name):
    return _register_once("processor", name)


def register_task(name):
    return _register_once("task", name)


def register_builder(name):
    return _register_once("builder", name)


def refresh_model_zoo():
    """Rebuild ``lavis.models.model_zoo`` so ``print(model_zoo)`` lists the plugin's archs and types too.

    LAVIS builds the zoo once, at import, from the registry as it was then.
    """
    import lavis.models

    lavis.models.model_zoo.__init__()
