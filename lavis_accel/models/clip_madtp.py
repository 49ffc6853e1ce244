"""LAVIS's CLIP with MADTP pruning of image and text tokens, registered as ``clip_madtp``.

The variant is LAVIS's ``clip`` plus ``MadtpModel`` (codebook ``madtp_codebook [100, 768]``, tau in the buffer
``madtp_temperature``, the alignment loss) and MADTP's CLIP query projections: ``madtp_image_queries`` and
``madtp_text_queries``, one ``Linear(block width -> 768)`` per block of each tower (MADTP's
``visual.transformer.resblocks.{i}.query_model.q_map.0`` and ``transformer.resblocks.{i}.query_model.q_map.0``).
Both towers are pruned in every block (``patch.clip``); the text tower tracks its EOT through pruning.

Building. LAVIS's ``CLIP.from_config`` constructs the base ``CLIP`` itself (``create_model``; OpenAI weights are
rebuilt with QuickGELU), so the variant lets LAVIS build and load its parent as usual, then adopts that instance:
its class becomes the variant's and the variant's ``__init__`` adds the MADTP parameters, the parent's being
skipped. A stock LAVIS CLIP checkpoint (``pretrained``) therefore loads exactly as for ``clip``, the new parameters
starting fresh (codebook ``randn``, projections as ``nn.Linear``), as in MADTP. ``finetuned`` optionally names a
checkpoint of this variant (codebook, projections, tau), loaded over the parent's build.

The alignment loss is ``loss_fdt`` between the two towers' code-pooled features. MADTP's CLIP also adds
``loss_fdt_m`` from its momentum towers; LAVIS's CLIP has no momentum towers, so that term has no counterpart here
(it carried no gradient in MADTP either). At tau = 0 the reference's ``loss_fdt`` falls back to the ITC loss, here
LAVIS's CLIP loss.

Retrieval evaluation: LAVIS's ``compute_sim_matrix`` runs unchanged. Each tower pools one feature per sample (the
image [CLS], the text EOT), so batches pruned to different token counts concatenate as usual.
"""
from typing import List, Tuple

import torch
from torch import nn

from lavis_accel.configs import packaged_config
from lavis_accel.models.adopted_clip import AdoptedClip
from lavis_accel.models.clip_types import TINY_CLIP_TYPE
from lavis_accel.models.madtp_model import CODEBOOK, MadtpModel
from lavis_accel.patch import clip as clip_binding
from lavis_accel.patch import madtp as madtp_patch
from lavis_accel.registration import register_model

QUERY_PREFIXES = (f"{clip_binding.IMAGE_QUERIES_ATTR}.", f"{clip_binding.TEXT_QUERIES_ATTR}.")


@register_model("clip_madtp")
class ClipMadtp(MadtpModel, AdoptedClip):
    """CLIP image-text retrieval with MADTP pruning of image and text tokens (tau 1.0 by default).

    Supported model types:
        - ViT-L-14-336: CLIP ViT-L/14 at 336 px, the model MADTP compresses.
        - ViT-B-16: CLIP ViT-B/16 at 224 px.
        - ViT-Tiny-16: a tiny random CLIP for tests and the demo.

    Usage:
        >>> from lavis.models import load_model
        >>> model = load_model("clip_madtp", "ViT-L-14-336")
    """

    PRETRAINED_MODEL_CONFIG_DICT = {
        "ViT-L-14-336": packaged_config("clip_madtp_vit_large14_336.yaml"),
        "ViT-B-16": packaged_config("clip_madtp_vit_base16.yaml"),
        TINY_CLIP_TYPE: packaged_config("clip_madtp_vit_tiny16.yaml"),
    }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        like = {"dtype": self.madtp_codebook.dtype, "device": self.madtp_codebook.device}
        width = self.madtp_code_width()
        self.madtp_image_queries = _projections(self.visual.transformer, width, like)
        self.madtp_text_queries = _projections(self.transformer, width, like)
        # the exact names the plugin's checkpoint checks accept as unset: no stock file has a MADTP parameter
        self.PARAMETERS_STARTING_FRESH = (CODEBOOK, *(name for name, _ in self.named_parameters()
                                                      if name.startswith(QUERY_PREFIXES)))

    def madtp_code_width(self) -> int:
        """MADTP's CLIP codebook width (768), reached from each block's width by its projection."""
        return clip_binding.CODE_WIDTH

    def _is_patched(self) -> bool:
        return clip_binding.is_patched(self)

    def madtp_feature_pairs(self) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """The image and text towers' code-pooled features of the last forward (``loss_fdt``)."""
        steps = clip_binding.current_steps(self)
        return [(madtp_patch.code_features(steps.image, self.visual), madtp_patch.code_features(steps.text, self))]


def _projections(transformer, width: int, like) -> nn.ModuleList:
    return nn.ModuleList(nn.Linear(transformer.width, width, **like) for _ in transformer.resblocks)
