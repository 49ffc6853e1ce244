"""BLIP task models with CrossGET (arXiv 2305.17455), registered as ``blip_<task>_crossget``.

CrossGET's released code covers CLIP only; this BLIP adaptation is a *derived design* (spec §4.7), not reference
code. Each variant is its LAVIS parent plus ``CrossGetModel``, with the reducer of the ``reducer:`` block
(``name: crossget``, ``rv`` merges per ViT block, ``rl`` per text layer; ``patch.crossget``):

- Offsets. ``crossget_cross_image`` ``[1, ViT depth, ViT width]`` on every variant, and ``crossget_cross_text``
  ``[1, BERT layers, hidden]`` on retrieval, zero-initialised. They are parameters of the model, not of the
  encoders: BLIP's momentum update pairs the parameters of each encoder with its momentum copy one to one. A stock
  LAVIS checkpoint has none: they start at zero (CrossGET applied without training); a wrong shape in a checkpoint
  is refused in one line.
- ViT. A copy of [CLS] is appended as the cross token after the position embeddings; every token sees it as a key
  (so even ``rv = 0`` changes the output, as in the reference's image tower); its query guides the merges; it is
  dropped after the last block, so ``image_embeds`` keep [CLS] at 0 and only the merged tokens reach ITC, ITM,
  the caption and answer decoders. Every image of a batch keeps the same number of tokens (the schedule depends on
  the token count only): retrieval's ``compute_sim_matrix`` concatenates image batches unchanged, and NLVR2's two
  images, one ViT batch, match.
- Text (retrieval only). The unimodal ``text`` passes of ``text_encoder`` (ITC, ``compute_sim_matrix``'s text
  features) carry a cross token, a copy of [CLS] refreshed from [CLS] before each layer; [CLS]'s query guides the
  merges; the cross token is masked as a key, so ``rl = 0`` leaves the text output unchanged; real tokens and
  padding never merge. The multimodal passes (ITM) and every other variant's text (caption and answer decoders,
  VQA's question encoder, NLVR2's twin cross-attention) are not reduced: ``rl`` must be 0 there.
- Momentum towers (retrieval) stay stock, unreduced and without cross tokens: they give ITC its soft targets and
  are an EMA of the encoders, which the offsets are not part of (CrossGET's CLIP has no momentum model to follow).
- The loss (``crossget_kd_loss``, retrieval only; task ``crossget_retrieval``): CrossGET's JS-style loss between the
  per-block cross tokens of the ViT and of the ITC text pass of the last forward. The reference norms CLIP's image
  cross tokens with ``ln_pre`` and its text ones with ``ln_final``; BLIP's ViT has only a final norm and its
  post-norm BERT only an input norm, so each tower uses the one standalone LayerNorm it has, then its ITC
  projection, both detached: the image's ``visual_encoder.norm`` and ``vision_proj``, the text's
  ``text_encoder.embeddings.LayerNorm`` and ``text_proj``. It needs as many ViT blocks as text layers (12 and 12
  in BLIP ViT-B). Captioning, VQA and NLVR2 have no unimodal text pass to pair with: they refuse the loss and
  train with their LAVIS task's loss alone (the image offsets learn through the cross token's key).
"""
import torch
from lavis.models.blip_models.blip_caption import BlipCaption
from lavis.models.blip_models.blip_nlvr import BlipNLVR
from lavis.models.blip_models.blip_retrieval import BlipRetrieval
from lavis.models.blip_models.blip_vqa import BlipVQA

from lavis_accel.configs import packaged_config
from lavis_accel.errors import SettingError
from lavis_accel.models.crossget_model import CrossGetModel, recorded_cross_tokens, zero_offsets
from lavis_accel.patch import med as med_binding
from lavis_accel.patch import vit as vit_binding
from lavis_accel.patch.crossget import BLIP_IMAGE_OFFSETS, BLIP_TEXT_OFFSETS
from lavis_accel.reduce.crossget import cross_features
from lavis_accel.registration import register_model


class BlipCrossGet(CrossGetModel):
    """What the BLIP variants share: the ViT's offsets, their checkpoint check, no loss without a text pass."""

    def add_cross_offsets(self):
        vit = self.visual_encoder
        self.crossget_cross_image = zero_offsets(len(vit.blocks), vit.embed_dim, next(self.parameters()))

    def crossget_offset_names(self):
        return (BLIP_IMAGE_OFFSETS,)  # crossget_cross_image, the name patch.crossget reads

    def crossget_cross_features(self):
        raise SettingError(f"CrossGET's loss pairs the ViT's cross tokens with a unimodal text pass's, and "
                           f"{type(self).__name__} runs none: train it with its LAVIS task's loss (run.task "
                           "crossget_retrieval is for blip_retrieval_crossget)")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Refuse an offset of another shape in one line (torch's size-mismatch report spans many lines)."""
        for name in self.crossget_offset_names():
            given = state_dict.get(prefix + name)
            expected = getattr(self, name).shape
            if torch.is_tensor(given) and given.shape != expected:
                raise SettingError(f"checkpoint: {prefix + name} has shape {list(given.shape)}, but "
                                   f"{type(self).__name__} needs {list(expected)} (one offset per block)")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


@register_model("blip_retrieval_crossget")
class BlipRetrievalCrossGet(BlipCrossGet, BlipRetrieval):
    """BLIP image-text retrieval with CrossGET in the ViT and the unimodal text passes (rv=16, rl=0 by default).

    Fine-tune with ``run.task: crossget_retrieval`` (ITC + ITM and the JS loss of the cross tokens). The momentum
    towers stay stock (see the module docstring).

    Supported model types:
        - coco: fine-tuned on COCO (LAVIS's ``blip_retrieval`` / ``coco`` checkpoint).
        - flickr: fine-tuned on Flickr30k.

    Usage:
        >>> from lavis.models import load_model
        >>> model = load_model("blip_retrieval_crossget", "coco")
    """

    PRETRAINED_MODEL_CONFIG_DICT = {
        "coco": packaged_config("blip_retrieval_crossget_coco.yaml"),
        "flickr": packaged_config("blip_retrieval_crossget_flickr.yaml"),
    }

    def add_cross_offsets(self):
        super().add_cross_offsets()
        text = self.text_encoder
        self.crossget_cross_text = zero_offsets(len(text.encoder.layer), text.config.hidden_size,
                                                next(self.parameters()))

    def crossget_offset_names(self):
        return (BLIP_IMAGE_OFFSETS, BLIP_TEXT_OFFSETS)  # crossget_cross_image, crossget_cross_text

    def crossget_cross_features(self):
        """The ViT's and the last ITC text pass's per-block cross tokens, normed and projected into ITC's space."""
        image = recorded_cross_tokens(vit_binding.current_step(self), "image")
        text = recorded_cross_tokens(med_binding.current_step(self.text_encoder), "text")
        if len(image) != len(text):
            raise SettingError(f"CrossGET's loss needs as many ViT blocks as text layers, {type(self).__name__} has "
                               f"{len(image)} and {len(text)}")
        return (cross_features(image, self.visual_encoder.norm, self.vision_proj),
                cross_features(text, self.text_encoder.embeddings.LayerNorm, self.text_proj))

    def forward(self, samples):
        """LAVIS's forward; in training the loss also holds ``0 x`` the text offsets, which only the JS loss uses:
        trained with LAVIS's plain ``retrieval`` task under DDP (no ``find_unused_parameters``), a parameter
        without a gradient would fail the step. The value and every gradient are unchanged."""
        output = super().forward(samples)
        if self.training:
            output.loss = output.loss + 0.0 * self.crossget_cross_text.sum()
        return output


@register_model("blip_caption_crossget")
class BlipCaptionCrossGet(BlipCrossGet, BlipCaption):
    """BLIP captioning with CrossGET in the ViT (rv=16 by default; ``rl`` must be 0: the decoder is not merged).

    Beam search reads the merged image tokens.

    Supported model types:
        - base_coco: ViT-B/16, fine-tuned on COCO captions.

    Usage:
        >>> from lavis.models import load_model
        >>> model = load_model("blip_caption_crossget", "base_coco")
    """

    PRETRAINED_MODEL_CONFIG_DICT = {"base_coco": packaged_config("blip_caption_crossget_base_coco.yaml")}


@register_model("blip_vqa_crossget")
class BlipVQACrossGet(BlipCrossGet, BlipVQA):
    """BLIP VQA with CrossGET in the ViT (rv=16 by default, 480 px; ``rl`` must be 0: the question is encoded with
    cross-attention, and the answer decoder is not merged).

    Supported model types:
        - vqav2: fine-tuned on VQAv2.

    Usage:
        >>> from lavis.models import load_model
        >>> model = load_model("blip_vqa_crossget", "vqav2")
    """

    PRETRAINED_MODEL_CONFIG_DICT = {"vqav2": packaged_config("blip_vqa_crossget_vqav2.yaml")}


@register_model("blip_nlvr_crossget")
class BlipNLVRCrossGet(BlipCrossGet, BlipNLVR):
    """BLIP NLVR2 with CrossGET in the ViT (rv=16 by default; ``rl`` must be 0: the text runs with cross-attention).

    Both images of a pair run through the ViT as one batch and keep the same number of tokens.

    Supported model types:
        - nlvr: fine-tuned on NLVR2.

    Usage:
        >>> from lavis.models import load_model
        >>> model = load_model("blip_nlvr_crossget", "nlvr")
    """

    PRETRAINED_MODEL_CONFIG_DICT = {"nlvr": packaged_config("blip_nlvr_crossget_nlvr.yaml")}
