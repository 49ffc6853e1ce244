"""DLIP: a small BLIP student (ViT-S/16 + a 6-layer, 384-wide BERT) distilled from a frozen BLIP teacher.

Each arch is its LAVIS BLIP parent built at the student's size, so LAVIS's tasks, runners and checkpoints work as
for BLIP: ``dlip_pretrain`` (``BlipPretrain``: ITA with momentum distillation and queues, ITM with hard negatives,
LM, encoder and decoder tied except self-attention; plus the teacher's nine distillation terms),
``dlip_retrieval``, ``dlip_caption`` and ``dlip_feature_extractor``. When a config names no ``med_config_path``
the student's BERT is the package's bert-small (``med_config_small.json``); ``vit_type: small`` is ViT-S/16.

Pretraining (spec section 5.3): ``L = ITA + ITM + LM + loss_dist``, ``loss_dist`` the unweighted sum of
:data:`DISTILLATION_TERMS` (:mod:`lavis_accel.reduce.dlip`). The student's maps come from the very passes that give
its task losses (recorded with :mod:`lavis_accel.patch.med_record`); the teacher sees the same image and tokens.
As in the reference, the teacher's ITC targets use the student's queue (already holding this batch's momentum
features) and temperature, and alpha follows BLIP's ramp over the first two epochs.
"""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from lavis.models.blip_models.blip_caption import BlipCaption
from lavis.models.blip_models.blip_feature_extractor import BlipFeatureExtractor
from lavis.models.blip_models.blip_outputs import BlipOutput
from lavis.models.blip_models.blip_pretrain import BlipPretrain
from lavis.models.blip_models.blip_retrieval import BlipRetrieval
from omegaconf import OmegaConf

from lavis_accel.configs import packaged_config
from lavis_accel.errors import SettingError
from lavis_accel.models import dlip_teacher
from lavis_accel.models.frozen_member import FrozenMemberMixin
from lavis_accel.models.unpublished import random_start_if_unnamed, unnamed_checkpoint
from lavis_accel.models.pretrain_build import build_pretrain_model
from lavis_accel.patch.med_record import LastLayerRecorder
from lavis_accel.reduce import dlip as terms
from lavis_accel.registration import register_model


STUDENT_MED_CONFIG = packaged_config("med_config_small.json")
ITC_LOSSES = ("softmax", "sigmoid")
DISTILLATION_TERMS = ("image_feature", "text_feature", "fused_feature", "decoder_feature", "itc", "lm_logits",
                      "text_attention", "cross_attention", "decoder_attention")
SIGLIP_SCALE_INIT, SIGLIP_BIAS_INIT = 2.302585092994046, -10.0  # log(10), -10: SigLIP's initialisation


def student_config(cfg):
    """``cfg`` with the student's BERT (bert-small) when it names none."""
    if cfg.get("med_config_path"):
        return cfg
    return OmegaConf.merge(cfg, {"med_config_path": STUDENT_MED_CONFIG})


def unnamed_weights(arch, cfg, loads_finetuned=True):
    """Why ``cfg`` asks LAVIS to load weights without naming them, or None (no DLIP weights are published).

    ``loads_finetuned``: whether the arch reads ``finetuned`` at all (the feature extractor reads ``pretrained`` only).
    """
    return unnamed_checkpoint(
        arch, cfg, "name a fine-tuned DLIP checkpoint, or set load_finetuned: False and model.pretrained to a "
        "dlip_pretrain checkpoint", "name a DLIP checkpoint (projects/dlip/train/pretrain.yaml writes one), or set "
        "load_pretrained: False", loads_finetuned)


@dataclass
class DlipOutput(BlipOutput):
    """``BlipOutput`` plus the distillation loss and its terms (``loss`` includes ``loss_dist``)."""

    loss_dist: Optional[torch.FloatTensor] = None
    distillation_terms: Optional[dict] = None


@register_model("dlip_pretrain")
class DlipPretrain(FrozenMemberMixin, BlipPretrain):
    """DLIP student pretraining: BLIP's three task losses plus distillation from a frozen BLIP teacher.

    Supported model types:
        - base: ViT-S/16 (from DeiT-S) + bert-small (from scratch), teacher BLIP ViT-B ``blip_pretrain``.

    Config keys beyond ``blip_pretrain``'s: ``vit_pretrained`` (DeiT-S weights: a file or timm name),
    ``teacher`` (a block: arch, model_type, pretrained, other keys of that arch's config; null: no teacher),
    ``itc_loss`` (softmax: BLIP's ITA; sigmoid: the SigLIP-style option), ``attention_temperature`` (0.05).
    """

    PRETRAINED_MODEL_CONFIG_DICT = {"base": packaged_config("dlip_pretrain_base.yaml")}
    FROZEN_MEMBER = "teacher"  # in eval mode, out of the state dict (models.frozen_member)

    def __init__(self, *args, teacher=None, itc_loss="softmax", attention_temperature=0.05,
                 teacher_max_txt_len=None, **kwargs):
        super().__init__(*args, **kwargs)
        if itc_loss not in ITC_LOSSES:
            raise SettingError(f"model.itc_loss: '{itc_loss}' is not one of {', '.join(ITC_LOSSES)}")
        self.itc_loss = itc_loss
        self.attention_temperature = float(attention_temperature)
        if itc_loss == "sigmoid":
            self.logit_scale = nn.Parameter(torch.tensor(SIGLIP_SCALE_INIT))
            self.logit_bias = nn.Parameter(torch.tensor(SIGLIP_BIAS_INIT))
        if teacher is not None:
            dlip_teacher.check_pairing(self, teacher, self.max_txt_len, teacher_max_txt_len)
        self.teacher = teacher

    def forward(self, samples):
        if self.teacher is None and self.itc_loss == "softmax":
            return super().forward(samples)
        fused, decoder = LastLayerRecorder(self.text_encoder), LastLayerRecorder(self.text_decoder.bert)
        with fused.recording(), decoder.recording():
            output = super().forward(samples)
        loss_itc = output.loss_itc if self.itc_loss == "softmax" else self._sigmoid_itc(output)
        found = {}
        if self.teacher is not None:
            found = self.distillation_terms(samples, output, fused, decoder)
        loss_dist = sum(found.values()) if found else None
        loss = loss_itc + output.loss_itm + output.loss_lm + (loss_dist if found else 0)
        return DlipOutput(loss=loss, loss_itc=loss_itc, loss_itm=output.loss_itm, loss_lm=output.loss_lm,
                          loss_dist=loss_dist, distillation_terms=found, sims=output.sims,
                          intermediate_output=output.intermediate_output)

    def _student_features(self, output):
        inter = output.intermediate_output
        image_feat = F.normalize(self.vision_proj(inter.image_embeds[:, 0, :]), dim=-1)
        text_feat = F.normalize(self.text_proj(inter.text_embeds[:, 0, :]), dim=-1)
        return image_feat, text_feat

    def _sigmoid_itc(self, output):
        image_feat, text_feat = self._student_features(output)
        return terms.sigmoid_contrastive_loss(image_feat, text_feat, self.logit_scale, self.logit_bias)

    def _tokens(self, samples, device):
        """The student's tokens of the batch, as ``BlipPretrain.forward`` makes them, with its ITM and LM inputs."""
        text = self.tokenizer(samples["text_input"], padding="max_length", truncation=True,
                              max_length=self.max_txt_len, return_tensors="pt").to(device)
        encoder_input_ids = text.input_ids.clone()
        encoder_input_ids[:, 0] = self.tokenizer.enc_token_id
        decoder_input_ids = text.input_ids.clone()
        decoder_input_ids[:, 0] = self.tokenizer.bos_token_id
        return text, encoder_input_ids, decoder_input_ids

    def _alpha(self, samples):
        return self.alpha * self._rampup_factor(epoch=samples["epoch"], iters=samples["iters"],
                                                num_iters_per_epoch=samples["num_iters_per_epoch"])

    def distillation_terms(self, samples, output, fused, decoder):
        """The nine terms (a dict by :data:`DISTILLATION_TERMS` name; the decoder's three only if the teacher has
        a decoder), from the student's ``output`` and recorded passes and the teacher's view of the same batch."""
        image = samples["image"]
        inter = output.intermediate_output
        teacher = dlip_teacher.teach(self.teacher, image, *self._tokens(samples, image.device))
        fused_pass = fused.pass_attending_to(inter.image_embeds)
        image_feat, text_feat = self._student_features(output)
        found = {
            "image_feature": terms.cosine_feature_loss(image_feat, teacher.image_feat),
            "text_feature": terms.cosine_feature_loss(text_feat, teacher.text_feat),
            "fused_feature": terms.cosine_feature_loss(self.text_proj(fused_pass.states[:, 0, :]),
                                                       teacher.fused_feature),
            "itc": self._itc_distillation(image_feat, text_feat, teacher, samples),
            "text_attention": terms.attention_distillation_loss(
                fused_pass.self_attention, teacher.text_attention, self.attention_temperature),
            "cross_attention": terms.attention_distillation_loss(
                fused_pass.cross_attention, teacher.cross_attention, self.attention_temperature),
        }
        if teacher.decoder_logits is not None:
            decoder_pass = decoder.pass_attending_to(inter.image_embeds)
            found["decoder_feature"] = terms.cosine_feature_loss(self.text_proj(decoder_pass.states[:, 0, :]),
                                                                 teacher.decoder_feature)
            found["lm_logits"] = terms.logit_distillation_loss(inter.decoder_output.logits, teacher.decoder_logits)
            found["decoder_attention"] = terms.attention_distillation_loss(
                decoder_pass.self_attention, teacher.decoder_attention, self.attention_temperature)
        return {name: found[name] for name in DISTILLATION_TERMS if name in found}

    def _itc_distillation(self, image_feat, text_feat, teacher, samples):
        if self.itc_loss == "sigmoid":
            return terms.sigmoid_distillation_loss(image_feat, text_feat, teacher.image_feat, teacher.text_feat,
                                                   self.logit_scale, self.logit_bias)
        return terms.itc_distillation_loss(image_feat, text_feat, teacher.image_feat, teacher.text_feat,
                                           self.image_queue, self.text_queue, self.temp, self._alpha(samples))

    @classmethod
    def from_config(cls, cfg=None):
        cfg = student_config(cfg)
        teacher_cfg = cfg.get("teacher")
        teacher = dlip_teacher.build_teacher(teacher_cfg) if teacher_cfg else None
        return build_pretrain_model(
            cls, cfg, teacher=teacher, itc_loss=cfg.get("itc_loss", "softmax"),
            attention_temperature=cfg.get("attention_temperature", 0.05),
            teacher_max_txt_len=teacher_cfg.get("max_txt_len") if teacher_cfg else None)


class DlipStudent:
    """What a fine-tuning or inference DLIP arch adds to its BLIP parent: the student's BERT by default, and no
    download of weights that do not exist.

    A config that names no weights builds a random model with a warning, so that LAVIS's
    ``load_model(arch, type, checkpoint=path)`` and ``load_model_and_preprocess`` work with one's own checkpoint;
    a ``lavis-accel`` run refuses such a config before any work (``config_checks.check_checkpoint_files``).
    """

    LOADS_FINETUNED = True

    @classmethod
    def unnamed_weights(cls, cfg):
        return unnamed_weights(cls.ARCH, cfg, cls.LOADS_FINETUNED)

    @classmethod
    def from_config(cls, cfg=None):
        cfg = student_config(cfg)
        return super().from_config(random_start_if_unnamed(cfg, cls.unnamed_weights(cfg)))


@register_model("dlip_retrieval")
class DlipRetrieval(DlipStudent, BlipRetrieval):
    """DLIP student for image-text retrieval (ITA + ITM, as ``blip_retrieval``).

    Supported model types:
        - flickr: fine-tuned on Flickr30k (384 px).
        - coco: fine-tuned on COCO (384 px).
    """

    ARCH = "dlip_retrieval"
    PARENT_MODEL_TYPES = {"flickr": "flickr", "coco": "coco"}  # the BLIP it replaces (lavis-accel bench's parent row)
    PRETRAINED_MODEL_CONFIG_DICT = {
        "flickr": packaged_config("dlip_retrieval_flickr.yaml"),
        "coco": packaged_config("dlip_retrieval_coco.yaml"),
    }


@register_model("dlip_caption")
class DlipCaption(DlipStudent, BlipCaption):
    """DLIP student for captioning (LM, as ``blip_caption``).

    ``generate`` defaults to the reference's serving settings: nucleus sampling with top-p 0.75, max 30, min 10 and
    repetition penalty 1.1 after the prompt "a picture of ". Beam search (as LAVIS's caption task asks for) keeps
    BLIP's repetition penalty of 1.0 unless one is given.

    Supported model types:
        - flickr: fine-tuned on Flickr30k (384 px).
        - coco: fine-tuned on COCO (384 px).
    """

    ARCH = "dlip_caption"
    PARENT_MODEL_TYPES = {"flickr": "base_coco", "coco": "base_coco"}  # LAVIS has no blip_caption flickr
    PRETRAINED_MODEL_CONFIG_DICT = {
        "flickr": packaged_config("dlip_caption_flickr.yaml"),
        "coco": packaged_config("dlip_caption_coco.yaml"),
    }
    SAMPLING_REPETITION_PENALTY = 1.1

    def generate(self, samples, use_nucleus_sampling=True, num_beams=3, max_length=30, min_length=10, top_p=0.75,
                 repetition_penalty=None, num_captions=1):
        if repetition_penalty is None:
            repetition_penalty = self.SAMPLING_REPETITION_PENALTY if use_nucleus_sampling else 1.0
        return super().generate(samples, use_nucleus_sampling=use_nucleus_sampling, num_beams=num_beams,
                                max_length=max_length, min_length=min_length, top_p=top_p,
                                repetition_penalty=repetition_penalty, num_captions=num_captions)


@register_model("dlip_feature_extractor")
class DlipFeatureExtractor(DlipStudent, BlipFeatureExtractor):
    """DLIP student as a feature extractor: ``extract_features`` gives normalised 256-d image and text features
    (``image_embeds_proj[:, 0]``, ``text_embeds_proj[:, 0]``), as ``blip_feature_extractor``.

    Supported model types:
        - base: a DLIP checkpoint named by ``pretrained``.
    """

    ARCH = "dlip_feature_extractor"
    LOADS_FINETUNED = False
    PRETRAINED_MODEL_CONFIG_DICT = {"base": packaged_config("dlip_feature_extractor_base.yaml")}
