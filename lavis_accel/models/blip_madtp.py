"""BLIP task models with MADTP token pruning, registered as ``blip_<task>_madtp``.

Each is its LAVIS parent plus ``MadtpModel`` (codebook, saved tau, alignment loss): a stock LAVIS checkpoint loads
(the codebook starts fresh) and ``reducer.temperature: 0`` gives the parent's outputs. Vision is pruned in every ViT
block; text in every layer of the ``text_encoder`` (not the caption or answer decoders, as in MADTP). Where LAVIS's
task code assumes the stock token counts, the variant adapts it narrowly:

- retrieval evaluation (``compute_sim_matrix``): batches of images keep different numbers of tokens (K is a batch
  maximum); see ``padded_image_features``.
- VQA: LAVIS hands the answer decoder ``samples["tokenized_text"].attention_mask``, the unpruned question mask; the
  variant replaces it by the mask of the pruned question states (the reference reuses the unpruned one and breaks
  whenever text pruning fires).
"""
import contextlib

import torch
import torch.nn.functional as F
from lavis.models.blip_models.blip_caption import BlipCaption
from lavis.models.blip_models.blip_nlvr import BlipNLVR
from lavis.models.blip_models.blip_retrieval import BlipRetrieval
from lavis.models.blip_models.blip_vqa import BlipVQA
from transformers import BatchEncoding

from lavis_accel.configs import packaged_config
from lavis_accel.models.madtp_model import MadtpModel
from lavis_accel.patch import madtp as madtp_patch
from lavis_accel.patch import med as med_binding
from lavis_accel.patch import vit as vit_binding
from lavis_accel.registration import register_model


@contextlib.contextmanager
def padded_image_features(model):
    """While LAVIS's ``compute_sim_matrix`` runs: image features of every batch padded with zeros to the ViT's stock
    token count, and the padding masked (0) in the ITM cross-attention.

    LAVIS concatenates the features of all image batches and builds an all-ones encoder mask; pruned batches differ
    in length. Padding rows are exact zeros, which a real token (the output of the ViT's final LayerNorm) never is,
    so the ITM call recovers the mask from the rows themselves and trims the padding every row of the call has
    (one host synchronisation per ITM call): each image is scored as if run alone at its own length. The reference
    instead repeats the [CLS] vector with an all-ones mask, which lets the repeats take attention.
    """
    vit, text_encoder = model.visual_encoder, model.text_encoder
    stock_length = vit.patch_embed.num_patches + 1
    own = vit.__dict__.get("forward_features")
    forward_features = vit.forward_features

    def padded_forward_features(image, *args, **kwargs):
        features = forward_features(image, *args, **kwargs)
        return F.pad(features, (0, 0, 0, stock_length - features.shape[1]))

    vit.forward_features = padded_forward_features
    hook = text_encoder.register_forward_pre_hook(_mask_image_padding, with_kwargs=True)
    try:
        yield
    finally:
        hook.remove()
        del vit.forward_features
        if own is not None:
            vit.forward_features = own


def _mask_image_padding(module, args, kwargs):
    """Forward pre-hook of the text encoder: zero rows of ``encoder_hidden_states`` get a 0 encoder mask."""
    states = kwargs.get("encoder_hidden_states")
    if not torch.is_tensor(states):
        return None
    real = states.ne(0).any(dim=-1)
    length = int(real.sum(dim=1).max())  # real tokens come first: the longest image of the call
    given = kwargs.get("encoder_attention_mask")
    mask = real[:, :length].long() if given is None else given[:, :length] * real[:, :length]
    return args, {**kwargs, "encoder_hidden_states": states[:, :length], "encoder_attention_mask": mask}


@register_model("blip_retrieval_madtp")
class BlipRetrievalMadtp(MadtpModel, BlipRetrieval):
    """BLIP image-text retrieval with MADTP pruning of image and text tokens (tau 1.0 by default).

    The momentum towers prune too, each with its own step on the shared codebook and tau; the alignment loss is
    ``loss_fdt`` (ViT and ITC text pass) plus ``loss_fdt_m`` (momentum towers, computed under LAVIS's ``no_grad``:
    a value without gradient, as in MADTP).

    Supported model types:
        - coco: fine-tuned on COCO (LAVIS's ``blip_retrieval`` / ``coco`` checkpoint).
        - flickr: fine-tuned on Flickr30k.

    Usage:
        >>> from lavis.models import load_model
        >>> model = load_model("blip_retrieval_madtp", "coco")
    """

    PRETRAINED_MODEL_CONFIG_DICT = {
        "coco": packaged_config("blip_retrieval_madtp_coco.yaml"),
        "flickr": packaged_config("blip_retrieval_madtp_flickr.yaml"),
    }
    TEXT_PASS = "forward_text"  # the ITC pass, not the ITM ones that follow it
    MOMENTUM_TOWERS = (("visual_encoder_m", vit_binding), ("text_encoder_m", med_binding))

    def madtp_feature_pairs(self):
        momentum = (
            madtp_patch.code_features(vit_binding.current_step(self.visual_encoder_m), self.visual_encoder_m),
            madtp_patch.code_features(med_binding.current_step(self.text_encoder_m), self.text_encoder_m),
        )
        return super().madtp_feature_pairs() + [momentum]

    def madtp_task_loss(self, output):
        """At tau = 0 the reference's ``loss_fdt`` and ``loss_fdt_m`` both fall back to the ITC loss."""
        return 2 * output.loss_itc

    def compute_sim_matrix(self, data_loader, task_cfg):
        """LAVIS's two-stage retrieval scores; image batches may keep different token counts (see
        ``padded_image_features``)."""
        with padded_image_features(self):
            return super().compute_sim_matrix(data_loader, task_cfg)


@register_model("blip_caption_madtp")
class BlipCaptionMadtp(MadtpModel, BlipCaption):
    """BLIP captioning with MADTP pruning of image tokens (tau 1.0 by default).

    The decoder is not pruned (MADTP passes it no codebook), so there is no text side to align: as in MADTP,
    ``alignment_loss()`` is the LM loss of the last training forward. Beam search reads the pruned image tokens.

    Supported model types:
        - base_coco: ViT-B/16, fine-tuned on COCO captions.

    Usage:
        >>> from lavis.models import load_model
        >>> model = load_model("blip_caption_madtp", "base_coco")
    """

    PRETRAINED_MODEL_CONFIG_DICT = {"base_coco": packaged_config("blip_caption_madtp_base_coco.yaml")}


@register_model("blip_vqa_madtp")
class BlipVQAMadtp(MadtpModel, BlipVQA):
    """BLIP VQA with MADTP pruning of image and question tokens (tau 1.0 by default; 480 px).

    The answer decoder cross-attends to the pruned question states with their own mask, in training, rank answering
    and generation.

    Supported model types:
        - vqav2: fine-tuned on VQAv2.

    Usage:
        >>> from lavis.models import load_model
        >>> model = load_model("blip_vqa_madtp", "vqav2")
    """

    PRETRAINED_MODEL_CONFIG_DICT = {"vqav2": packaged_config("blip_vqa_madtp_vqav2.yaml")}
    TEXT_PASS = "forward_automask"  # the multimodal question encoding

    def forward_encoder(self, samples):
        """LAVIS's question encoding; ``samples["tokenized_text"]`` then carries the pruned question mask."""
        encoder_output, image_embeds = super().forward_encoder(samples)
        if med_binding.current_step(self.text_encoder) is not None:
            questions = samples["tokenized_text"]
            mask = med_binding.pruned_attention_mask(self.text_encoder)
            samples["tokenized_text"] = BatchEncoding({**questions, "attention_mask": mask})
        return encoder_output, image_embeds


@register_model("blip_nlvr_madtp")
class BlipNLVRMadtp(MadtpModel, BlipNLVR):
    """BLIP NLVR2 with MADTP pruning of image and text tokens (tau 1.0 by default).

    Both images of a pair run through the ViT as one batch, so they keep the same number of tokens; the text is
    pruned before its twin cross-attention. The alignment loss compares the text with the mean of the two images'
    pooled features, as in MADTP.

    Supported model types:
        - nlvr: fine-tuned on NLVR2.

    Usage:
        >>> from lavis.models import load_model
        >>> model = load_model("blip_nlvr_madtp", "nlvr")
    """

    PRETRAINED_MODEL_CONFIG_DICT = {"nlvr": packaged_config("blip_nlvr_madtp_nlvr.yaml")}
    TEXT_PASS = "forward"

    def madtp_feature_pairs(self):
        image0, image1 = madtp_patch.image_code_features(self).chunk(2, dim=0)
        return [((image0 + image1) / 2, self.text_pass_features())]
