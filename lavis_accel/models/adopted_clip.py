"""``AdoptedClip``: the base of the plugin's registered CLIP variants (``clip_madtp``, ``clip_crossget``).

LAVIS's ``CLIP.from_config`` constructs the base ``CLIP`` itself (``create_model``: OpenAI weights are rebuilt with
QuickGELU, an open_clip architecture json otherwise, a local ``pretrained`` file loaded strictly), so a subclass
cannot be constructed by it. A variant instead lets LAVIS build and load its parent as usual, then adopts that
instance: its class becomes the variant's, and the variant's ``__init__`` adds the variant's parameters, the
parent's ``__init__`` being skipped. A stock LAVIS CLIP checkpoint (``pretrained``) therefore loads exactly as for
``clip``, the new parameters starting fresh; ``finetuned`` optionally names a checkpoint of the variant, loaded over
the parent's build (LAVIS's ``load_checkpoint``: non-strict, the plugin's checks say what it leaves unset).
"""
from lavis.models.clip_models.model import CLIP


class AdoptedClip(CLIP):
    """LAVIS's ``CLIP`` whose subclasses take over the instance LAVIS builds (see the module docstring)."""

    def __init__(self, *args, adopted: bool = False, **kwargs):
        if not adopted:  # an adopted instance is a fully built CLIP already
            super().__init__(*args, **kwargs)

    @classmethod
    def from_config(cls, cfg=None):
        model = super().from_config(cfg)
        model.__class__ = cls
        cls.__init__(model, adopted=True)
        model.configure_adopted(cfg)
        if cfg.get("finetuned") and cfg.get("load_finetuned", True):
            model.load_checkpoint_from_config(cfg)
        return model

    def configure_adopted(self, cfg):
        """Apply the variant's own model config keys to the adopted instance, before a ``finetuned`` load.

        Nothing by default: a variant overrides it for keys LAVIS's ``CLIP.from_config`` does not read.
        """
