"""``load_pretrained: False`` in a model config: build the model without loading any checkpoint.

LAVIS 1.0.2's ``BaseModel.load_checkpoint_from_config`` always loads ``pretrained`` when ``load_finetuned`` is false,
so a model cannot be built randomly initialised from its config. Later LAVIS versions read a ``load_pretrained`` key
(default true) for this; this module adds the same switch. Configs without the key behave exactly as before.
"""
import logging

from lavis.models.base_model import BaseModel

logger = logging.getLogger(__name__)


def honour_load_pretrained():
    """Wrap ``BaseModel.load_checkpoint_from_config`` once so that ``load_pretrained: False`` loads nothing."""
    if getattr(BaseModel, "_lavis_accel_load_pretrained", False):
        return
    stock_load_checkpoint_from_config = BaseModel.load_checkpoint_from_config

    def load_checkpoint_from_config(self, cfg, **kwargs):
        if not cfg.get("load_finetuned", True) and not cfg.get("load_pretrained", True):
            logger.info("%s: load_pretrained is False, keeping the random initialisation", type(self).__name__)
            return None
        return stock_load_checkpoint_from_config(self, cfg, **kwargs)

    load_checkpoint_from_config.__doc__ = stock_load_checkpoint_from_config.__doc__
    BaseModel.load_checkpoint_from_config = load_checkpoint_from_config
    BaseModel._lavis_accel_load_pretrained = True


honour_load_pretrained()
