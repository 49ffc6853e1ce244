"""The one thing every token-reduction variant adds to its LAVIS parent: a reducer built from ``reducer:``."""
from lavis_accel.errors import SettingError


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
