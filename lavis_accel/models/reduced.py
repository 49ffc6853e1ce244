"""The one thing every token-reduction variant adds to its LAVIS parent: a reducer built from ``reducer:``."""
from importlib import resources

from lavis_accel.errors import SettingError


def packaged_config(filename):
    """Absolute path of a model yaml shipped in ``lavis_accel/configs/models`` (LAVIS keeps absolute paths as is)."""
    return str(resources.files("lavis_accel") / "configs" / "models" / filename)


class ReducedModel:
    """Mixin placed before a LAVIS model class: ``from_config`` builds the parent, then applies the reducer.

    The parent's ``from_config`` constructs ``cls(...)`` and loads its checkpoints, so the variant keeps the parent's
    config keys and checkpoint keys; the reducer patches the vision encoder in place and adds no parameters.
    """

    @classmethod
    def from_config(cls, cfg):
        from lavis_accel.processors.reducers import build_reducer

        reducer_cfg = cfg.get("reducer")
        if reducer_cfg is None:
            raise SettingError(f"model.reducer: {cls.__name__} needs a reducer block (name, r, ...)")
        reducer = build_reducer(reducer_cfg)  # bad settings fail here, before a checkpoint is fetched and loaded
        return reducer(super().from_config(cfg))
