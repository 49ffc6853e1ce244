"""Instance-level attributes a binding sets on LAVIS modules, remembered so that removing restores them exactly."""
import types


class InstancePatches:
    """``set`` replaces ``module.name`` on the instance only (the class is untouched); ``restore`` puts back what
    the instance had (or deletes the attribute, so the class's method shows through again)."""

    def __init__(self):
        self._originals = {}  # (module, name) -> the instance-level value before patching, None if there was none

    def set(self, module, name: str, value):
        self._originals[(module, name)] = module.__dict__.get(name)
        setattr(module, name, value)

    def original(self, module, name: str):
        """``module.name`` as it was before patching (instance-level, else the class's, bound to ``module``)."""
        original = self._originals[(module, name)]
        return original if original is not None else types.MethodType(getattr(type(module), name), module)

    def restore(self):
        for (module, name), original in self._originals.items():
            if original is None:
                delattr(module, name)
            else:
                setattr(module, name, original)
        self._originals.clear()
