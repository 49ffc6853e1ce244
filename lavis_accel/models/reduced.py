"""The one thing every token-reduction variant adds to its LAVIS parent: a reducer built from ``reducer:``."""
import urllib.error

from lavis.common.utils import is_url
from lavis_accel.errors import SettingError
from lavis_accel.reduce.settings import plain_config


def checkpoint_url(cfg):
    """The checkpoint URL ``from_config`` downloads (``finetuned``, else ``pretrained``), or None."""
    key = "finetuned" if cfg.get("load_finetuned", True) else "pretrained"
    url = cfg.get(key)
    return (key, url) if isinstance(url, str) and is_url(url) else (key, None)


class ReducedModel:
    """Mixin placed before a LAVIS model class: ``from_config`` builds the parent, then applies the reducer.

    The parent's ``from_config`` constructs ``cls(...)`` and loads its checkpoints, so the variant keeps the parent's
    config keys and checkpoint keys; the reducer patches the vision encoder in place and adds no parameters.
    """

    REDUCER_NAME = None  # a method's variant (MADTP, CrossGET) runs that reducer's block only
    REDUCER_BLOCK = ""  # that block's keys, for the error

    @classmethod
    def from_config(cls, cfg):
        from lavis_accel.processors.reducers import build_reducer

        reducer_cfg = cfg.get("reducer")
        name = None if reducer_cfg is None else plain_config(reducer_cfg).get("name")
        if cls.REDUCER_NAME is not None and reducer_cfg is not None and name != cls.REDUCER_NAME:
            raise SettingError(f"model.reducer: {cls.__name__} takes a {cls.REDUCER_NAME} block "
                               f"({cls.REDUCER_BLOCK}), not {name!r}")
        if reducer_cfg is None:
            raise SettingError(f"model.reducer: {cls.__name__} needs a reducer block (name, r, ...)")
        reducer = build_reducer(reducer_cfg)  # bad settings fail here, before a checkpoint is fetched and loaded
        try:
            model = super().from_config(cfg)
        except urllib.error.URLError as err:
            key, url = checkpoint_url(cfg)
            if url is None:
                raise
            raise SettingError(f"model.{key}: cannot download {url} ({err.reason}); offline, fetch it elsewhere and "
                               f"point model.{key} at the local file (in a yaml, or --options model.{key}=PATH)"
                               ) from None
        return reducer(model)
