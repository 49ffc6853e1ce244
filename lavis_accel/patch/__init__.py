"""One-line token reduction for a LAVIS model or bare BLIP ViT (``madtp`` and ``crossget`` also on LAVIS's CLIP).

    model = lavis_accel.apply(model, "turbo", r=30, alpha=5)                 # in place, per instance; returns model
    model = lavis_accel.apply(model, "madtp", temperature=1.0, codebook=C)   # C optional: [codes, width]
    model = lavis_accel.apply(model, "crossget", rv=16, rl=0)                # merges per image / text block
    lavis_accel.remove(model)                                                # back to stock LAVIS
"""
from lavis_accel.patch import clip, crossget, madtp
from lavis_accel.patch.med import remove as remove_med
from lavis_accel.patch.vit import current_settings, is_patched, token_counts  # noqa: F401
from lavis_accel.patch.vit import apply_settings
from lavis_accel.patch.vit import remove as remove_vit
from lavis_accel.reduce.settings import ReducerSettings


def apply(model, name: str, **settings):
    """Patch ``model`` with reducer ``name`` and return it.

    ``tome``/``turbo``: the settings of a ``reducer:`` block (``r``, ``alpha``, ``beta``, ``gamma``, ``threshold``,
    ``prop_attn``), unset ones taking the reducer's defaults. ``madtp``: ``temperature`` (0 prunes nothing) and an
    optional ``codebook``. ``crossget``: ``rv``, ``rl``, ``eot_guard``. Applying again replaces all settings.
    """
    if name == "madtp":
        return madtp.apply(model, **settings)
    if name == "crossget":
        return crossget.apply(model, **settings)
    model = apply_settings(model, ReducerSettings.from_config({"name": name, **settings}))
    _remove_text(model)  # ToMe/Turbo reduce the ViT only
    return model


def remove(model):
    """Undo ``apply``: every patched tower of ``model`` is stock LAVIS again."""
    if clip.is_clip(model):
        return clip.remove(model)
    _remove_text(model)
    return remove_vit(model)


def _remove_text(model):
    text = madtp.text_encoder(model)
    if text is not None:
        remove_med(text)
