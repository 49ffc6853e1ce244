"""One-line token reduction for a LAVIS BLIP model or bare BLIP ViT.

    model = lavis_accel.apply(model, "turbo", r=30, alpha=5)   # in place, per instance; returns model
    lavis_accel.remove(model)                                  # back to stock LAVIS
"""
from lavis_accel.patch.vit import current_settings, is_patched, remove, token_counts  # noqa: F401
from lavis_accel.patch.vit import apply_settings
from lavis_accel.reduce.settings import ReducerSettings


def apply(model, name: str, **settings):
    """Patch ``model`` (a BLIP model's ``visual_encoder``, or a bare ViT) with reducer ``name`` and return it.

    ``settings`` are those of a ``reducer:`` block (``r``, ``alpha``, ``beta``, ``gamma``, ``threshold``,
    ``prop_attn``); unset ones take the reducer's defaults. Applying again replaces all settings.
    """
    return apply_settings(model, ReducerSettings.from_config({"name": name, **settings}))
