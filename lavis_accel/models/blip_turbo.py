"""BLIP task models with Turbo (or ToMe) token merging in the ViT, registered as ``blip_<task>_turbo``.

Each is its LAVIS parent plus the reducer of the config's ``reducer:`` block: a stock LAVIS checkpoint loads
unchanged, and ``reducer.r: 0`` gives the parent's outputs (up to float rounding: attention runs through SDPA).
"""
from lavis.models.blip_models.blip_caption import BlipCaption
from lavis.models.blip_models.blip_nlvr import BlipNLVR
from lavis.models.blip_models.blip_retrieval import BlipRetrieval
from lavis.models.blip_models.blip_vqa import BlipVQA

from lavis_accel.configs import packaged_config
from lavis_accel.models.reduced import ReducedModel
from lavis_accel.registration import register_model


@register_model("blip_retrieval_turbo")
class BlipRetrievalTurbo(ReducedModel, BlipRetrieval):
    """BLIP image-text retrieval with Turbo token merging (r=30, alpha=5, threshold=100 by default).

    Supported model types:
        - coco: fine-tuned on COCO (LAVIS's ``blip_retrieval`` / ``coco`` checkpoint).
        - flickr: fine-tuned on Flickr30k.

    Usage:
        >>> from lavis.models import load_model
        >>> model = load_model("blip_retrieval_turbo", "coco")
    """

    PRETRAINED_MODEL_CONFIG_DICT = {
        "coco": packaged_config("blip_retrieval_turbo_coco.yaml"),
        "flickr": packaged_config("blip_retrieval_turbo_flickr.yaml"),
    }


@register_model("blip_caption_turbo")
class BlipCaptionTurbo(ReducedModel, BlipCaption):
    """BLIP captioning with Turbo token merging (r=30, alpha=5, threshold=40 by default).

    Supported model types:
        - base_coco: ViT-B/16, fine-tuned on COCO captions.
        - large_coco: ViT-L/16, fine-tuned on COCO captions.

    Usage:
        >>> from lavis.models import load_model
        >>> model = load_model("blip_caption_turbo", "base_coco")
    """

    PRETRAINED_MODEL_CONFIG_DICT = {
        "base_coco": packaged_config("blip_caption_turbo_base_coco.yaml"),
        "large_coco": packaged_config("blip_caption_turbo_large_coco.yaml"),
    }


@register_model("blip_vqa_turbo")
class BlipVQATurbo(ReducedModel, BlipVQA):
    """BLIP VQA with Turbo token merging (r=40, alpha=5, threshold=40 by default; 480 px, 901 tokens).

    Supported model types:
        - vqav2: fine-tuned on VQAv2.

    Usage:
        >>> from lavis.models import load_model
        >>> model = load_model("blip_vqa_turbo", "vqav2")
    """

    PRETRAINED_MODEL_CONFIG_DICT = {"vqav2": packaged_config("blip_vqa_turbo_vqav2.yaml")}


@register_model("blip_nlvr_turbo")
class BlipNLVRTurbo(ReducedModel, BlipNLVR):
    """BLIP NLVR2 with Turbo token merging (r=30, alpha=5, threshold=40 by default).

    Both images of a pair run through the ViT as one batch, so they keep the same number of tokens.

    Supported model types:
        - nlvr: fine-tuned on NLVR2.

    Usage:
        >>> from lavis.models import load_model
        >>> model = load_model("blip_nlvr_turbo", "nlvr")
    """

    PRETRAINED_MODEL_CONFIG_DICT = {"nlvr": packaged_config("blip_nlvr_turbo_nlvr.yaml")}
