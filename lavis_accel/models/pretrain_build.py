"""Build a BLIP pre-training model (``BlipPretrain`` or a subclass) from its config without the hub.

LAVIS's ``BlipPretrain.from_config`` downloads ImageNet ViT weights and ``bert-base-uncased`` before any checkpoint
is loaded. DLIP needs the same model class twice without them: the student (ViT from DeiT-S, BERT from scratch) and
the teacher (all of its weights come from its own checkpoint). The config keys read are ``BlipPretrain``'s.
"""
from lavis.models.med import XBertEncoder, XBertLMHeadDecoder
from lavis.models.vit import VisionTransformerEncoder

from lavis_accel.models.vit_init import load_vit_pretrained


def build_pretrain_model(cls, cfg, **extra):
    """``cls(...)`` from ``cfg`` with random encoders, the ViT first started from ``vit_pretrained`` when the config
    has that key (before the momentum copy is made); ``extra`` are further constructor arguments of ``cls``."""
    image_encoder = VisionTransformerEncoder.from_config(cfg)
    if "vit_pretrained" in cfg:
        load_vit_pretrained(image_encoder, cfg.get("vit_pretrained"))
    model = cls(
        image_encoder=image_encoder,
        text_encoder=XBertEncoder.from_config(cfg),
        text_decoder=XBertLMHeadDecoder.from_config(cfg),
        embed_dim=cfg.get("embed_dim", 256),
        queue_size=cfg.get("queue_size", 57600),
        momentum=cfg.get("momentum", 0.995),
        alpha=cfg.get("alpha", 0.4),
        tie_enc_dec_weights=True,
        max_txt_len=cfg.get("max_txt_len", 30),
        **extra,
    )
    model.reset_queue_ptr()  # as LAVIS: the queue pointer starts at 0
    return model
