"""DLIP's teacher: a frozen BLIP model built from its own config and checkpoint, and what it shows the student.

The ``teacher:`` block of a ``dlip_pretrain`` config names a LAVIS BLIP arch and model type (default
``blip_pretrain`` / ``base``, as the reference), its checkpoint (``pretrained``: a file or a URL) and any other keys
of that arch's config. The teacher is built without the hub, loaded (every weight it teaches with must be set:
ViT, text encoder, text decoder if the arch has one, projections), stripped of what it never uses (momentum
encoders and queues: the teacher's ITC targets use the student's queue), frozen and kept in eval mode.

A teacher without a text decoder (e.g. ``blip_retrieval``) teaches the six terms that need none.
"""
import logging
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from lavis.common.dist_utils import download_cached_file
from lavis.common.registry import registry
from lavis.common.utils import is_url
from lavis.models.blip_models.blip import BlipBase
from lavis.models.blip_models.blip_pretrain import BlipPretrain
from lavis.models.vit import interpolate_pos_embed
from omegaconf import OmegaConf

from lavis_accel.checkpoints import safe_load
from lavis_accel.config_checks import state_dict_misfit
from lavis_accel.errors import SettingError
from lavis_accel.models.pretrain_build import build_pretrain_model
from lavis_accel.patch.med_record import LastLayerRecorder

logger = logging.getLogger(__name__)

SETTING = "model.teacher"
TEACHING_MODULES = ("visual_encoder", "text_encoder", "text_decoder", "vision_proj", "text_proj")
QUEUE_BUFFERS = ("image_queue", "text_queue", "idx_queue", "queue_ptr", "ptr_queue")


def teacher_class_and_config(teacher_cfg):
    """The teacher's model class and its full config: the arch's default yaml for the model type, then the block."""
    arch = teacher_cfg.get("arch", "blip_pretrain")
    cls = registry.get_model_class(arch)
    if cls is None or not issubclass(cls, BlipBase):
        raise SettingError(f"{SETTING}.arch: '{arch}' is not a registered LAVIS BLIP model (e.g. blip_pretrain)")
    model_type = teacher_cfg.get("model_type") or next(iter(cls.PRETRAINED_MODEL_CONFIG_DICT))
    if model_type not in cls.PRETRAINED_MODEL_CONFIG_DICT:
        raise SettingError(f"{SETTING}.model_type: '{model_type}' is not a type of {arch} "
                           f"(known: {', '.join(cls.PRETRAINED_MODEL_CONFIG_DICT)})")
    overrides = {key: value for key, value in teacher_cfg.items() if key not in ("arch", "model_type")}
    cfg = OmegaConf.merge(OmegaConf.load(cls.default_config_path(model_type)).model, overrides)
    cfg.arch, cfg.model_type = arch, model_type
    return cls, cfg


def _build_random(cls, cfg):
    if issubclass(cls, BlipPretrain):
        return build_pretrain_model(cls, cfg)
    return cls.from_config(OmegaConf.merge(cfg, {"load_finetuned": False, "load_pretrained": False}))


def _local_checkpoint(path):
    setting = f"{SETTING}.pretrained"
    if not path:
        raise SettingError(f"{setting}: not set; name the teacher's BLIP checkpoint (a file or a URL), or set "
                           f"model.teacher: null to train the student on its task losses only")
    if not is_url(path):
        return str(path)
    try:
        return download_cached_file(path, check_hash=False, progress=False)
    except Exception as err:  # noqa: BLE001  (offline: URLError, OSError, ...)
        reason = " ".join(str(err).split())[:120]
        raise SettingError(f"{setting}: cannot download {path} ({reason}); point it at a local copy") from None


def load_teacher_checkpoint(teacher, cfg):
    """Load the weights ``teacher`` teaches with from ``cfg.pretrained`` (other entries, e.g. momentum encoders, are
    not read); refuse a file that does not fit or leaves one of them unset."""
    setting, path = f"{SETTING}.pretrained", _local_checkpoint(cfg.get("pretrained"))
    loaded = safe_load(path, setting)
    state_dict = loaded.get("model", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state_dict, dict):
        raise SettingError(f"{setting}: {path} holds no state dict")
    state_dict = {name: tensor for name, tensor in state_dict.items() if name.split(".")[0] in TEACHING_MODULES}
    own_pos_embed = teacher.visual_encoder.pos_embed
    pos_embed = state_dict.get("visual_encoder.pos_embed")
    if torch.is_tensor(pos_embed) and pos_embed.shape != own_pos_embed.shape and pos_embed.dim() == 3:
        state_dict = {**state_dict, "visual_encoder.pos_embed": interpolate_pos_embed(pos_embed, teacher.visual_encoder)}
    problem = state_dict_misfit(teacher, state_dict)
    if problem:
        raise SettingError(f"{setting}: {path} {problem} (the teacher is {cfg.arch} {cfg.model_type})")
    missing = teacher.load_state_dict(state_dict, strict=False).missing_keys
    unset = [name for name in missing if name.split(".")[0] in TEACHING_MODULES]
    if unset:
        raise SettingError(f"{setting}: {path} leaves {len(unset)} weights of the teacher ({cfg.arch} "
                           f"{cfg.model_type}) unset, e.g. {unset[0]}")


def strip_for_teaching(teacher):
    """Drop the momentum encoders and queues (the teacher's ITC targets use the student's queue), then freeze."""
    momentum = {id(pair[1]) for pair in getattr(teacher, "model_pairs", [])}
    for name, child in list(teacher.named_children()):
        if id(child) in momentum:
            delattr(teacher, name)
    teacher.model_pairs = []
    for name in QUEUE_BUFFERS:
        if name in teacher._buffers:
            delattr(teacher, name)
    teacher.requires_grad_(False)
    return teacher.eval()


def build_teacher(teacher_cfg):
    """The frozen, loaded teacher that ``teacher_cfg`` (a ``model.teacher`` block) describes."""
    cls, cfg = teacher_class_and_config(teacher_cfg)
    teacher = strip_for_teaching(_build_random(cls, cfg))
    load_teacher_checkpoint(teacher, cfg)
    if not hasattr(teacher, "text_decoder"):
        logger.info("%s: %s has no text decoder; the decoder terms of the distillation are left out", SETTING, cfg.arch)
    return teacher


def check_pairing(student, teacher, max_txt_len, teacher_max_txt_len=None):
    """Refuse, in one line, a teacher whose maps or token ids cannot be paired with the student's.

    ``teacher_max_txt_len`` is a ``max_txt_len`` the teacher block sets, if any: the teacher reads the student's text.
    """
    s_vit, t_vit = student.visual_encoder, teacher.visual_encoder
    s_tokens, t_tokens = s_vit.patch_embed.num_patches + 1, t_vit.patch_embed.num_patches + 1
    if s_tokens != t_tokens:
        raise SettingError(
            f"{SETTING}.image_size: the teacher sees {t_tokens} image tokens ({t_vit.patch_embed.img_size[0]} px, "
            f"patch {t_vit.patch_embed.patch_size[0]}), the student {s_tokens} ({s_vit.patch_embed.img_size[0]} px, "
            f"patch {s_vit.patch_embed.patch_size[0]}): both must see the same image at the same resolution and "
            f"patch size (the cross-attention distillation pairs the image tokens one to one)")
    s_cfg, t_cfg = student.text_encoder.config, teacher.text_encoder.config
    if s_cfg.num_attention_heads != t_cfg.num_attention_heads:
        raise SettingError(
            f"{SETTING}: the teacher's BERT has {t_cfg.num_attention_heads} attention heads, the student's "
            f"{s_cfg.num_attention_heads}: the attention distillation pairs the heads one to one (med_config_path)")
    if s_cfg.vocab_size != t_cfg.vocab_size:
        raise SettingError(f"{SETTING}: the teacher's vocabulary has {t_cfg.vocab_size} tokens, the student's "
                           f"{s_cfg.vocab_size}: the teacher reads the student's token ids")
    if teacher_max_txt_len is not None and int(teacher_max_txt_len) != int(max_txt_len):
        raise SettingError(
            f"{SETTING}.max_txt_len: {teacher_max_txt_len} differs from model.max_txt_len {max_txt_len}: the teacher reads the "
            f"student's text, padded to model.max_txt_len (the length of the attention distillation)")
    longest = min(s_cfg.max_position_embeddings, t_cfg.max_position_embeddings)
    if int(max_txt_len) > longest:
        raise SettingError(f"model.max_txt_len: {max_txt_len} is longer than the {longest} positions of the "
                           f"teacher's or student's BERT")


@dataclass
class TeacherView:
    """What the teacher computes for one batch (all without gradients)."""

    image_feat: torch.Tensor  # normalised ITC image feature [B, E]
    text_feat: torch.Tensor  # normalised ITC text feature [B, E]
    fused_feature: torch.Tensor  # text_proj of the positive ITM pass's [CLS] [B, E]
    text_attention: torch.Tensor  # last-layer self-attention of that pass [B, H, L, L]
    cross_attention: torch.Tensor  # its last-layer cross-attention [B, H, L, image tokens]
    decoder_feature: Optional[torch.Tensor] = None  # text_proj of the decoder's last state at position 0 [B, E]
    decoder_logits: Optional[torch.Tensor] = None  # [B, L, vocab]
    decoder_attention: Optional[torch.Tensor] = None  # last-layer decoder self-attention [B, H, L, L]


@torch.no_grad()
def teach(teacher, image, text, encoder_input_ids, decoder_input_ids):
    """Run the teacher on the student's batch: the same image, the same tokens ([ENC] / [DEC] first as BLIP)."""
    image_embeds = teacher.visual_encoder.forward_features(image)
    image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image.device)
    image_feat = F.normalize(teacher.vision_proj(image_embeds[:, 0, :]), dim=-1)
    text_states = teacher.text_encoder.forward_text(text).last_hidden_state
    text_feat = F.normalize(teacher.text_proj(text_states[:, 0, :]), dim=-1)
    context = {"encoder_hidden_states": image_embeds, "encoder_attention_mask": image_atts, "return_dict": True}
    with LastLayerRecorder(teacher.text_encoder).recording() as fused:
        fused_states = teacher.text_encoder(encoder_input_ids, attention_mask=text.attention_mask,
                                            **context).last_hidden_state
    fused_pass = fused.pass_attending_to(image_embeds)
    view = TeacherView(image_feat=image_feat, text_feat=text_feat,
                       fused_feature=teacher.text_proj(fused_states[:, 0, :]),
                       text_attention=fused_pass.self_attention, cross_attention=fused_pass.cross_attention)
    if hasattr(teacher, "text_decoder"):
        with LastLayerRecorder(teacher.text_decoder.bert).recording() as decoder:
            logits = teacher.text_decoder(decoder_input_ids, attention_mask=text.attention_mask, **context).logits
        decoder_pass = decoder.pass_attending_to(image_embeds)
        view.decoder_feature = teacher.text_proj(decoder_pass.states[:, 0, :])
        view.decoder_logits = logits
        view.decoder_attention = decoder_pass.self_attention
    return view
