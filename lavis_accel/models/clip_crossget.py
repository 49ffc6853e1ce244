"""LAVIS's CLIP with CrossGET's cross-guided token ensembling in both towers, registered as ``clip_crossget``.

The variant is LAVIS's ``clip`` plus ``CrossGetModel``: the learnable cross-token offsets
``visual.transformer.cross_image`` and ``transformer.cross_text`` (``[1, blocks, width]`` each, zero-initialised),
the names and shapes of the reference (sdc17/CrossGET ``CLIP/clip/model.py``), so its checkpoints map key for key.
The ``reducer:`` block (``name: crossget``, ``rv``, ``rl``, ``eot_guard``) patches both towers
(``patch.crossget``), which read these offsets.

Building. LAVIS builds and loads the parent (a stock checkpoint as ``pretrained``), then the variant adopts it
(``adopted_clip``) and adds the zero offsets; a stock checkpoint has none, so they start fresh
(``PARAMETERS_STARTING_FRESH``). ``finetuned`` optionally names a checkpoint with offsets (this variant's, or the
reference's), loaded over the parent's build; offsets of another shape in it are refused in one line.

Activation. OpenAI's weights, and the reference's checkpoints fine-tuned from them, were trained with QuickGELU.
LAVIS rebuilds QuickGELU only when ``pretrained`` is ``openai``: from a local file (e.g. a CLIP fine-tuned on
Flickr30k, CrossGET's start) it builds ``nn.GELU``, which changes every MLP's output. The model config key
``quick_gelu: True`` (the default yamls of ViT-B-16, ViT-L-14 and ViT-L-14-336) puts LAVIS's ``QuickGELU`` into
every MLP of both towers after LAVIS builds the model (the activation has no parameters, so nothing else changes);
``False`` keeps the activation LAVIS built.

The JS loss (``crossget_kd_loss``) pairs the towers' per-block cross tokens one to one (the reference's CLIP loss
needs equal depths too), so it needs as many image as text blocks: ViT-B-16 has 12 and 12; ViT-L-14 and
ViT-L-14-336 have 24 image and 12 text blocks, so they reduce and evaluate but cannot train with the loss (refused
in one line). The tiny ``ViT-Tiny-16`` is the plugin's shared tiny CLIP (4 image, 3 text blocks: stock tiny
checkpoints load); ``ViT-Tiny-16-Paired`` (4 and 4) is the tiny one that trains with the loss, named by
``TINY_MODEL_TYPE``.
"""
from typing import Tuple

import torch
from lavis.models.clip_models import model as clip_model
from lavis.models.clip_models.model import QuickGELU

from lavis_accel.configs import packaged_config
from lavis_accel.errors import SettingError
from lavis_accel.models.adopted_clip import AdoptedClip
from lavis_accel.models.clip_types import TINY_CLIP_TYPE
from lavis_accel.models.crossget_model import CrossGetModel, recorded_cross_tokens, zero_offsets
from lavis_accel.patch import clip as clip_binding
from lavis_accel.patch import crossget as crossget_patch
from lavis_accel.reduce.crossget import cross_features
from lavis_accel.registration import register_model

PAIRED_TINY_CLIP_TYPE = "ViT-Tiny-16-Paired"
IMAGE_OFFSETS = f"visual.transformer.{crossget_patch.CLIP_IMAGE_OFFSETS}"
TEXT_OFFSETS = f"transformer.{crossget_patch.CLIP_TEXT_OFFSETS}"


def register_paired_tiny_type():
    """Add the open_clip architecture of ``ViT-Tiny-16-Paired`` (``ViT-Tiny-16`` with a fourth text block)."""
    if PAIRED_TINY_CLIP_TYPE not in clip_model.list_models():
        clip_model.add_model_config(packaged_config(f"clip/{PAIRED_TINY_CLIP_TYPE}.json"))


register_paired_tiny_type()


@register_model("clip_crossget")
class ClipCrossget(CrossGetModel, AdoptedClip):
    """CLIP image-text retrieval with CrossGET in both towers (``rv`` merges per image block, ``rl`` per text block).

    Supported model types:
        - ViT-B-16: CLIP ViT-B/16 at 224 px, the model CrossGET's CLIP code compresses.
        - ViT-L-14: CLIP ViT-L/14 at 224 px (reduction and evaluation; the loss needs equal tower depths).
        - ViT-L-14-336: CLIP ViT-L/14 at 336 px (likewise).
        - ViT-Tiny-16: the plugin's tiny random CLIP (4 image, 3 text blocks) for tests.
        - ViT-Tiny-16-Paired: a tiny random CLIP with 4 blocks in each tower, which trains with the loss.

    Usage:
        >>> from lavis.models import load_model
        >>> model = load_model("clip_crossget", "ViT-B-16")
    """

    # the tiny type a tiny version of a clip_crossget project builds (``testing.tiny_models``): one the loss can train
    TINY_MODEL_TYPE = PAIRED_TINY_CLIP_TYPE
    PRETRAINED_MODEL_CONFIG_DICT = {
        "ViT-B-16": packaged_config("clip_crossget_vit_base16.yaml"),
        "ViT-L-14": packaged_config("clip_crossget_vit_large14.yaml"),
        "ViT-L-14-336": packaged_config("clip_crossget_vit_large14_336.yaml"),
        TINY_CLIP_TYPE: packaged_config("clip_crossget_vit_tiny16.yaml"),
        PAIRED_TINY_CLIP_TYPE: packaged_config("clip_crossget_vit_tiny16_paired.yaml"),
    }

    def add_cross_offsets(self):
        """Zero ``[1, blocks, width]`` offsets on each tower's transformer, as the reference keeps them."""
        for transformer, attr in ((self.visual.transformer, crossget_patch.CLIP_IMAGE_OFFSETS),
                                  (self.transformer, crossget_patch.CLIP_TEXT_OFFSETS)):
            like = transformer.resblocks[0].attn.in_proj_weight
            setattr(transformer, attr, zero_offsets(len(transformer.resblocks), transformer.width, like))

    def crossget_offset_names(self) -> Tuple[str, ...]:
        return IMAGE_OFFSETS, TEXT_OFFSETS

    def configure_adopted(self, cfg):
        """``quick_gelu`` (see the module docstring): checked, then QuickGELU in every MLP when True."""
        quick_gelu = cfg.get("quick_gelu", False)
        if not isinstance(quick_gelu, bool):
            raise SettingError(f"model.quick_gelu must be True or False, got {quick_gelu!r}")
        if quick_gelu:
            use_quick_gelu(self)

    def crossget_cross_features(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The towers' per-block cross tokens of the last forward, stacked ``[L * B, E]``: the image ones through
        ``visual.ln_pre`` and ``visual.proj``, the text ones through ``ln_final`` and ``text_projection`` (all
        detached), as in the reference."""
        self.check_paired_towers()
        steps = clip_binding.current_steps(self)
        image_tokens = recorded_cross_tokens(None if steps is None else steps.image, "image")
        text_tokens = recorded_cross_tokens(None if steps is None else steps.text, "text")
        return (cross_features(image_tokens, self.visual.ln_pre, self.visual.proj),
                cross_features(text_tokens, self.ln_final, self.text_projection))

    def check_paired_towers(self):
        """Refuse, in one line, a model whose towers differ in depth: the loss pairs their blocks one to one."""
        image_blocks, text_blocks = len(self.visual.transformer.resblocks), len(self.transformer.resblocks)
        if image_blocks != text_blocks:
            raise SettingError(f"CrossGET's loss pairs the towers' blocks one to one, but this {type(self).__name__} "
                               f"has {image_blocks} image and {text_blocks} text blocks: train a CLIP whose towers "
                               f"are as deep (ViT-B-16, {PAIRED_TINY_CLIP_TYPE})")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Before the stock load: offsets of another shape in the state dict are refused in one line (torch's own
        error is a multi-line list of every mismatch)."""
        for name in self.crossget_offset_names():
            tensor = state_dict.get(prefix + name)
            expected = tuple(self.get_parameter(name).shape)
            if torch.is_tensor(tensor) and tuple(tensor.shape) != expected:
                raise SettingError(f"checkpoint: {prefix + name} has shape {list(tensor.shape)}, but "
                                   f"{type(self).__name__} needs {list(expected)} (one offset per block of that tower)")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def use_quick_gelu(model):
    """Make the activation of every MLP in both towers LAVIS's ``QuickGELU`` (``x * sigmoid(1.702 x)``)."""
    for block in (*model.visual.transformer.resblocks, *model.transformer.resblocks):
        if not isinstance(block.mlp.gelu, QuickGELU):
            block.mlp.gelu = QuickGELU()
