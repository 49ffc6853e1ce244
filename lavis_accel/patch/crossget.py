"""``apply(model, "crossget", rv=16, rl=0)``: CrossGET's steps on every tower of a model (``patch.crossget_steps``).

``rv`` merges per image block, ``rl`` per text block (the reference's flags and defaults). The cross-token offsets
are the model's own when it has them, else fresh zeros held by the steps (not the model's parameters: neither
trained nor saved), which is CrossGET applied without training:

- LAVIS's CLIP: ``visual.transformer.cross_image`` and ``transformer.cross_text`` (``[1, blocks, width]``, the
  reference's names, so its checkpoints map key for key); both towers are reduced.
- a BLIP task model: ``crossget_cross_image`` and ``crossget_cross_text`` on the model (not on the encoders: BLIP's
  momentum update pairs the encoders' parameters one to one); its ViT and, when it runs unimodal text passes (it has
  ``text_proj``: retrieval, feature extraction), the text encoder's ``text`` passes. Captioning, VQA and NLVR2 have
  none (their text runs with cross-attention, which CrossGET's design does not merge): ``rl`` must be 0 there. A
  bare LAVIS ViT: itself.
"""
import numbers
from typing import Optional

import torch

from lavis_accel.errors import SettingError
from lavis_accel.patch import clip as clip_binding
from lavis_accel.patch import med as med_binding
from lavis_accel.patch import vit as vit_binding
from lavis_accel.patch.crossget_steps import BertCrossGetStep, CrossGetStep, EotCrossGetStep
from lavis_accel.patch.madtp import text_encoder

KNOWN_SETTINGS = ("rv", "rl", "eot_guard")
CLIP_IMAGE_OFFSETS = "cross_image"  # on model.visual.transformer
CLIP_TEXT_OFFSETS = "cross_text"  # on model.transformer
BLIP_IMAGE_OFFSETS = "crossget_cross_image"  # on the model
BLIP_TEXT_OFFSETS = "crossget_cross_text"


def apply(model, rv: int = 16, rl: int = 0, eot_guard: bool = False, **unknown):
    """Patch every tower of ``model`` that has a CrossGET binding and return ``model``; settings are checked first.

    ``eot_guard`` (CLIP's text only): tokens before and after the EOT never merge (``EotCrossGetStep``).
    """
    if unknown:
        raise SettingError(f"reducer setting {sorted(unknown)[0]!r} is not known for 'crossget': use "
                           f"{', '.join(KNOWN_SETTINGS)}")
    if not isinstance(eot_guard, bool):
        raise SettingError(f"reducer setting 'eot_guard' of 'crossget' must be true or false, got {eot_guard!r}")
    if clip_binding.is_clip(model):
        return _apply_clip(model, rv, rl, eot_guard)
    if eot_guard:
        raise SettingError("reducer setting 'eot_guard' of 'crossget' applies to CLIP's text only (BLIP's text "
                           "never merges real tokens with padding)")
    vit = vit_binding.find_vit(model)
    text = unimodal_text_encoder(model)
    rv = checked_r("rv", rv, vit.patch_embed.num_patches + 2, protected=2)
    if text is None and rl != 0:
        raise SettingError(f"reducer setting 'rl' of 'crossget' must be 0: {type(model).__name__} has no "
                           "unimodal text pass to reduce")
    if text is not None:
        rl = checked_r("rl", rl, text.config.max_position_embeddings + 1, protected=2)
        text_offsets = offsets(model, BLIP_TEXT_OFFSETS, len(text.encoder.layer), text.config.hidden_size)
    image_offsets = offsets(model, BLIP_IMAGE_OFFSETS, len(vit.blocks), vit.embed_dim)
    vit_binding.apply_step(model, CrossGetStep(image_offsets, rv))
    if text is not None:
        med_binding.apply_step(text, BertCrossGetStep(text_offsets, rl))
    elif text_encoder(model) is not None:
        med_binding.remove(text_encoder(model))  # another method's text step does not stay behind
    return model


def _apply_clip(model, rv, rl, eot_guard: bool):
    clip_binding.check_clip(model)
    visual, text = model.visual.transformer, model.transformer
    rv = checked_r("rv", rv, model.visual.positional_embedding.shape[0] + 1, protected=2)
    rl = checked_r("rl", rl, model.positional_embedding.shape[0] + 1, protected=3)
    image_offsets = offsets(visual, CLIP_IMAGE_OFFSETS, len(visual.resblocks), visual.width)
    text_offsets = offsets(text, CLIP_TEXT_OFFSETS, len(text.resblocks), text.width)
    return clip_binding.apply_steps(model, CrossGetStep(image_offsets, rv),
                                    EotCrossGetStep(text_offsets, rl, eot_guard))


def unimodal_text_encoder(model):
    """A BLIP model's ``text_encoder`` when it runs unimodal text passes (it has ``text_proj``), else ``None``."""
    return text_encoder(model) if hasattr(model, "text_proj") else None


def checked_r(name: str, value, num_tokens: int, protected: int) -> int:
    """``rv``/``rl`` as an int in ``[0, (tokens - protected) // 2]``, refused in one line otherwise; ``num_tokens``
    counts the cross token."""
    limit = (num_tokens - protected) // 2
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or not 0 <= value <= limit:
        raise SettingError(f"reducer setting {name!r} of 'crossget' must be an integer from 0 to {limit} (half the "
                           f"tower's {num_tokens - protected} unprotected tokens), got {value!r}")
    return int(value)


def offsets(owner, attr: str, depth: int, width: int) -> torch.Tensor:
    """``owner.<attr>`` checked to be ``[1, depth, width]``, or fresh zeros like the owner's parameters."""
    own: Optional[torch.Tensor] = getattr(owner, attr, None)
    if own is None:
        reference = next(owner.parameters())
        return torch.zeros(1, depth, width, dtype=reference.dtype, device=reference.device)
    if tuple(own.shape) != (1, depth, width):
        raise SettingError(f"{type(owner).__name__}.{attr} has shape {tuple(own.shape)}, but CrossGET needs "
                           f"[1, {depth}, {width}] (one offset per block)")
    return own
