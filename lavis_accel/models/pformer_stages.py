"""P-Former's stages 1 and 2 (BLIText, spec 6.3-6.4): BLIP-2 whose Q-Former queries learn a frozen P-Former's prompts.

Each arch is its LAVIS BLIP-2 parent with one more loss, so LAVIS's tasks, runners and checkpoints work as for BLIP-2:

- ``blip2_pformer`` (stage 1, ``Blip2Qformer``): ITC + ITM + LM + ``L_align``. The trainable projection of the query
  outputs into the LLM's input space is named as stage 2's (``opt_proj`` for OPT, ``t5_proj`` for Flan-T5), so stage
  2 starts from it; its width is read from the LLM's config (``opt_model`` or ``t5_model``, exactly one).
- ``blip2_pformer_opt`` (stage 2 and COCO captioning, ``Blip2OPT``): LM + ``L_align``; ``alignment_only: True`` is
  the reference's ``blip2_pformer_align`` (``L_align`` only, no LLM pass).
- ``blip2_pformer_t5`` (stage 2, ``Blip2T5``): each caption is cut at a random word into prefix (T5's encoder) and
  suffix (its target), then LM + ``L_align``.

``L_align = loss_weight * MSE(proj(query outputs), P-Former prompts)``, the prompts held fixed. The P-Former reads the
caption as its stage 0 did: with "\\n" appended in the OPT pipeline, the raw caption in the T5 one (the reference's
T5 stages 0 and 2; the reference's stage 1 is OPT only, and a T5 stage 1 here follows its stage 0). BERT's tokenizer
treats the "\\n" as whitespace, so the P-Former's tokens are the same either way.

The P-Former (``Pformer``) is built only when ``loss_weight > 0`` and its weights come only from the stage-0 file
``pretrained_stage0``; it is frozen, always in eval mode (the reference's targets had dropout once LAVIS's runner
called ``train()``), and left out of the state dict, so a stage-2 checkpoint loads into stock ``blip2_opt`` /
``blip2_t5``. With ``loss_weight: 0`` every arch computes exactly what its LAVIS parent does.
"""
import contextlib
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
from lavis.common.utils import is_url
from lavis.models.blip2_models.blip2_opt import Blip2OPT
from lavis.models.blip2_models.blip2_qformer import Blip2Qformer
from lavis.models.blip2_models.blip2_t5 import Blip2T5
from lavis.models.blip_models.blip_outputs import BlipOutput
from torch import nn

from lavis_accel.configs import packaged_config
from lavis_accel.errors import SettingError
from lavis_accel.models import pformer_net
from lavis_accel.models.frozen_member import FrozenMemberMixin
from lavis_accel.models.unpublished import random_start_if_unnamed, unnamed_checkpoint
from lavis_accel.reduce import pformer as maths
from lavis_accel.registration import register_model


DEFAULT_LOSS_WEIGHT = 1.0  # the reference's default when a config names none
PFORMER_TEXT_SUFFIX = {"opt": "\n", "t5": ""}  # what the P-Former's stage 0 appended to each sentence
LLM_NAME_KEYS = {"opt": "opt_model", "t5": "t5_model"}


@dataclass
class AlignmentSettings:
    """The config keys P-Former adds to its BLIP-2 parent, checked."""

    loss_weight: float
    pretrained_stage0: Optional[str]
    alignment_only: bool

    @property
    def aligns(self):
        return self.loss_weight > 0


def _stage0_problem(cfg, loss_weight):
    """Why ``pretrained_stage0`` cannot give the P-Former its weights, or None (only asked when it is needed)."""
    path = cfg.get("pretrained_stage0")
    if not path:
        return (f"model.pretrained_stage0: loss_weight is {loss_weight:g}, so the P-Former's weights are needed; "
                "name the stage-0 checkpoint (pformer_opt / pformer_t5), or set loss_weight: 0")
    if not is_url(str(path)) and not os.path.isfile(str(path)):
        return f"model.pretrained_stage0: checkpoint file not found: {path}"
    return None


def _loss_weight(cfg):
    value = cfg.get("loss_weight", DEFAULT_LOSS_WEIGHT)
    try:
        weight = float(value)
    except (TypeError, ValueError):
        weight = float("nan")
    if isinstance(value, bool) or not math.isfinite(weight) or weight < 0:
        raise SettingError(f"model.loss_weight: must be a finite number >= 0, got {value!r}")
    return weight


def alignment_settings(cfg, supports_alignment_only):
    """The alignment keys of the model config ``cfg``, refused in one line when they do not fit (checked before
    anything is built): ``loss_weight``, ``pretrained_stage0`` (needed when the weight is > 0),
    ``alignment_only`` (stage 2 only; needs a weight > 0), and ``max_txt_len == num_query_token``."""
    weight = _loss_weight(cfg)
    alignment_only = cfg.get("alignment_only", False)
    if not isinstance(alignment_only, bool):
        raise SettingError(f"model.alignment_only: must be true or false, got {alignment_only!r}")
    if alignment_only and not supports_alignment_only:
        raise SettingError("model.alignment_only: only stage 2 (blip2_pformer_opt, blip2_pformer_t5) trains on the "
                           "alignment loss alone")
    if alignment_only and weight == 0:
        raise SettingError("model.alignment_only: with loss_weight 0 there is no loss to train on")
    if weight > 0:
        problem = _stage0_problem(cfg, weight)
        if problem:
            raise SettingError(problem)
        pformer_net.check_prompt_length(cfg.get("max_txt_len", 32), cfg.get("num_query_token"))
    return AlignmentSettings(weight, cfg.get("pretrained_stage0") or None, alignment_only)


def unnamed_stage_checkpoint(arch, cfg, previous):
    """Why ``cfg`` asks LAVIS to load a checkpoint it does not name, or None. ``previous``: what the arch's own
    weights start from (no P-Former weights are published)."""
    return unnamed_checkpoint(
        arch, cfg, f"name a fine-tuned {arch} checkpoint, or set load_finetuned: False and model.pretrained to "
        f"{previous}", f"name {previous}, or set load_pretrained: False (random start)")


@contextlib.contextmanager
def recorded_query_states(qformer_bert):
    """Record the output states of the first query-only pass of the Q-Former's BERT (``query_embeds`` and no
    ``input_ids``) made inside the block: a one-item list, filled when the pass has run.

    That pass is the one whose states BLIP-2's parents project (stage 2) or contrast with the text (stage 1). A
    forward hook takes its very output tensor, inside the graph, so the parent's ``forward`` runs unchanged and
    nothing is computed twice; running the query pass again would cost a Q-Former pass and, in training, draw
    other dropout masks than the ones the parent's losses saw.
    """
    found = []

    def hook(module, args, kwargs, output):
        input_ids = args[0] if args else kwargs.get("input_ids")
        query_embeds = args[4] if len(args) > 4 else kwargs.get("query_embeds")
        if not found and input_ids is None and query_embeds is not None:
            found.append(output[0])

    handle = qformer_bert.register_forward_hook(hook, with_kwargs=True)
    try:
        yield found
    finally:
        handle.remove()


def _recorded(found):
    if not found:
        raise RuntimeError("P-Former: the parent's forward made no query-only Q-Former pass to align")
    return found[0]


class PformerAlignment(FrozenMemberMixin):
    """Mixin placed before a LAVIS BLIP-2 class: the frozen P-Former, ``L_align`` and the config keys.

    ``from_config`` checks the keys, then the parent's ``from_config`` constructs the model and calls
    ``load_checkpoint_from_config``; there, before LAVIS loads the checkpoint, the P-Former (and stage 1's
    projection) is added so that the checkpoint's projection loads into it; after, the P-Former's weights are loaded
    from ``pretrained_stage0``.
    """

    FROZEN_MEMBER = "Pformer"  # in eval mode, out of the state dict (models.frozen_member)
    TEXT_LENGTH_IS_QUERY_COUNT = True  # the P-Former gives one prompt per token of its padded sentence
    SUPPORTS_ALIGNMENT_ONLY = False
    ARCH = None
    PREVIOUS_STAGE = None  # what the arch's ``pretrained`` names, for messages
    loss_weight = 0.0  # no alignment unless the config asks for it (a model constructed directly: the parent's)
    alignment_only = False

    # --- building ---------------------------------------------------------------------------------------------------

    @classmethod
    def unnamed_weights(cls, cfg):
        """Why the model config ``cfg`` lacks weights it needs, or None (``config_checks`` refuses a CLI run on it)."""
        weight = _loss_weight(cfg)
        problem = _stage0_problem(cfg, weight) if weight > 0 else None
        return problem or unnamed_stage_checkpoint(cls.ARCH, cfg, cls.PREVIOUS_STAGE)

    @classmethod
    def from_config(cls, cfg):
        """The parent's ``from_config`` after the alignment keys are checked. A config that asks for a checkpoint
        it does not name builds a random model with a warning (LAVIS's ``load_model(..., checkpoint=path)`` then
        loads one's own file); a ``lavis-accel`` run refuses it before any work."""
        alignment_settings(cfg, cls.SUPPORTS_ALIGNMENT_ONLY)
        problem = unnamed_stage_checkpoint(cls.ARCH, cfg, cls.PREVIOUS_STAGE)
        return super().from_config(random_start_if_unnamed(cfg, problem))

    def load_checkpoint_from_config(self, cfg, **kwargs):
        """Add the alignment parts, let LAVIS load the checkpoint, then load the P-Former from its stage-0 file."""
        settings = alignment_settings(cfg, self.SUPPORTS_ALIGNMENT_ONLY)
        self.loss_weight, self.alignment_only = settings.loss_weight, settings.alignment_only
        if settings.aligns and getattr(self, "Pformer", None) is None:
            kind, width = self.alignment_target(cfg)
            self.add_projection(kind, width)
            self.Pformer = pformer_net.freeze(pformer_net.build_pformer(
                self.query_tokens.shape[1], kind, width, contrastive=False, bert_weights=False))
            self.pformer_suffix = PFORMER_TEXT_SUFFIX[kind]
        result = super().load_checkpoint_from_config(cfg, **kwargs)
        if settings.aligns:
            pformer_net.load_stage0(self.Pformer, settings.pretrained_stage0)
        return result

    def alignment_target(self, cfg):
        """``(llm_kind, llm_width)`` of the LLM whose prompts the queries learn."""
        raise NotImplementedError

    def add_projection(self, kind, width):
        """Stage 1 adds its projection of the query outputs; stage 2's parent has it."""

    def projection(self):
        """The projection of the query outputs into the LLM's input space (``opt_proj`` or ``t5_proj``)."""
        return pformer_net.llm_projection(self)

    # --- the loss ---------------------------------------------------------------------------------------------------

    def aligns(self):
        """Whether the model has a P-Former to align with (``loss_weight > 0``)."""
        return getattr(self, "Pformer", None) is not None

    @torch.no_grad()
    def reference_prompts(self, captions, device):
        """The frozen P-Former's prompts ``[B, P, D]`` for ``captions``, tokenised as the model's Q-Former text (the
        model's ``init_tokenizer``; its [DEC] never occurs in a caption) and padded to ``max_txt_len`` = P."""
        tokens = self.tokenizer([caption + self.pformer_suffix for caption in captions], padding="max_length",
                                truncation=True, max_length=self.max_txt_len, return_tensors="pt").to(device)
        return pformer_net.prompts_from_states(self.Pformer, pformer_net.encode(self.Pformer, tokens))

    def alignment_loss(self, query_states, captions):
        """``L_align`` of the Q-Former's query outputs ``[B, P, W]`` for ``captions``."""
        queries = self.projection()(query_states)
        prompts = self.reference_prompts(captions, query_states.device)
        return maths.alignment_loss(queries, prompts.to(queries.dtype), self.loss_weight)

    def query_states(self, image):
        """The Q-Former's query outputs for ``image``, as BLIP-2's stage-2 parents compute them (alignment only)."""
        with self.maybe_autocast():
            image_embeds = self.ln_vision(self.visual_encoder(image))
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image.device)
        query_tokens = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        return self.Qformer.bert(query_embeds=query_tokens, encoder_hidden_states=image_embeds,
                                 encoder_attention_mask=image_atts, return_dict=True).last_hidden_state

    def lm_with_alignment(self, samples, captions, lm_samples=None):
        """Stage 2's loss dict: the parent's LM loss on ``lm_samples`` (default ``samples``) plus ``L_align`` for
        ``captions``; with ``alignment_only``, ``L_align`` alone and no LLM pass. (``super()`` here is the LAVIS
        parent: the mixins come first in the arch's bases.)"""
        if self.alignment_only:
            loss_align = self.alignment_loss(self.query_states(samples["image"]), captions)
            return {"loss": loss_align, "loss_align": loss_align}
        with recorded_query_states(self.Qformer.bert) as found:
            loss_lm = super().forward(samples if lm_samples is None else lm_samples)["loss"]
        loss_align = self.alignment_loss(_recorded(found), captions)
        return {"loss": loss_lm + loss_align, "loss_lm": loss_lm, "loss_align": loss_align}


@dataclass
class PformerOutput(BlipOutput):
    """``BlipOutput`` plus ``loss_align`` (``loss`` includes it)."""

    loss_align: Optional[torch.FloatTensor] = None


def _stage1_llm(cfg):
    names = {kind: cfg.get(key) for kind, key in LLM_NAME_KEYS.items() if cfg.get(key)}
    if len(names) != 1:
        given = ", ".join(f"{LLM_NAME_KEYS[kind]}={name}" for kind, name in names.items()) or "neither"
        raise SettingError(f"model.opt_model / model.t5_model: blip2_pformer needs exactly one (the LLM whose "
                           f"prompts the queries learn), got {given}")
    ((kind, name),) = names.items()
    return kind, name


@register_model("blip2_pformer")
class Blip2Pformer(PformerAlignment, Blip2Qformer):
    """P-Former stage 1: BLIP-2's first stage (ITC, ITM, image-grounded LM) plus ``L_align`` (default weight 10).

    Supported model types (the LLM sizes the projection; stage 2 of that LLM starts from this checkpoint):
        - pretrain_pformer: OPT-2.7B (``opt_proj`` 768 -> 2560), the reference's.
        - pretrain_pformer_opt6.7b: OPT-6.7B (``opt_proj``).
        - pretrain_pformer_flant5xl, pretrain_pformer_flant5xxl: Flan-T5 (``t5_proj``).

    Config keys beyond ``blip2``'s: ``opt_model`` or ``t5_model`` (its config only is read), ``loss_weight``,
    ``pretrained_stage0``. The Q-Former starts from bert-base-uncased (``load_pretrained: False``), as the reference's.
    """

    ARCH = "blip2_pformer"
    PREVIOUS_STAGE = "a blip2_pformer checkpoint to continue from"
    PRETRAINED_MODEL_CONFIG_DICT = {
        "pretrain_pformer": packaged_config("blip2_pformer_stage1_opt2.7b.yaml"),
        "pretrain_pformer_opt6.7b": packaged_config("blip2_pformer_stage1_opt6.7b.yaml"),
        "pretrain_pformer_flant5xl": packaged_config("blip2_pformer_stage1_flant5xl.yaml"),
        "pretrain_pformer_flant5xxl": packaged_config("blip2_pformer_stage1_flant5xxl.yaml"),
    }

    def alignment_target(self, cfg):
        kind, name = _stage1_llm(cfg)
        return kind, pformer_net.llm_width(kind, name)

    def add_projection(self, kind, width):
        projection = nn.Linear(self.Qformer.config.hidden_size, width).to(self.query_tokens.device)
        setattr(self, pformer_net.LLM_PROJECTIONS[kind], projection)

    def forward(self, samples):
        if not self.aligns():
            return super().forward(samples)
        with recorded_query_states(self.Qformer.bert) as found:
            output = super().forward(samples)
        loss_align = self.alignment_loss(_recorded(found), samples["text_input"])
        fields = {name: getattr(output, name) for name in output.__dataclass_fields__}
        fields["loss"] = output.loss + loss_align
        return PformerOutput(**fields, loss_align=loss_align)


class Stage2Alignment(PformerAlignment):
    """What stages 2 share: the parent's LLM and projection; ``alignment_only``."""

    LLM_KIND = None
    SUPPORTS_ALIGNMENT_ONLY = True
    PREVIOUS_STAGE = "a blip2_pformer (stage 1) checkpoint"

    def alignment_target(self, cfg):
        return self.LLM_KIND, self.projection().out_features


@register_model("blip2_pformer_opt")
class Blip2PformerOPT(Stage2Alignment, Blip2OPT):
    """P-Former stage 2 with OPT: BLIP-2's LM loss on caption + "\\n" plus ``L_align`` (default weight 100; 1.0 for
    COCO captioning, as the reference's fine-tuning leaves it). ``alignment_only: True``: ``L_align`` alone.

    Supported model types:
        - pretrain_pformer_opt2.7b, pretrain_pformer_opt6.7b: stage 2 from a stage-1 checkpoint.
        - caption_coco_opt2.7b, caption_coco_opt6.7b: COCO caption fine-tuning from a stage-2 checkpoint.

    The trained weights load into stock ``blip2_opt`` (no P-Former key is saved).
    """

    ARCH = "blip2_pformer_opt"
    LLM_KIND = "opt"
    PRETRAINED_MODEL_CONFIG_DICT = {
        "pretrain_pformer_opt2.7b": packaged_config("blip2_pformer_opt_pretrain_opt2.7b.yaml"),
        "pretrain_pformer_opt6.7b": packaged_config("blip2_pformer_opt_pretrain_opt6.7b.yaml"),
        "caption_coco_opt2.7b": packaged_config("blip2_pformer_opt_caption_coco_opt2.7b.yaml"),
        "caption_coco_opt6.7b": packaged_config("blip2_pformer_opt_caption_coco_opt6.7b.yaml"),
    }

    def forward(self, samples):
        if not self.aligns():
            return super().forward(samples)
        return self.lm_with_alignment(samples, samples["text_input"])


@register_model("blip2_pformer_t5")
class Blip2PformerT5(Stage2Alignment, Blip2T5):
    """P-Former stage 2 with Flan-T5: each caption is cut at a random word (1 to ``max(1, n // 2)`` words of prefix,
    so a one-word caption is all prefix and its target is T5's end token), T5's encoder reads the prefix after the
    queries and its decoder learns the suffix; plus ``L_align`` on the whole caption (default weight 100).
    ``alignment_only: True``: ``L_align`` alone. The batch's ``text_output``, if any, is replaced by the suffixes
    (a caption dataset has none); the caller's ``samples`` are not changed.

    Supported model types:
        - pretrain_pformer_flant5xl, pretrain_pformer_flant5xxl: stage 2 from a stage-1 checkpoint.

    The trained weights load into stock ``blip2_t5`` (no P-Former key is saved).
    """

    ARCH = "blip2_pformer_t5"
    LLM_KIND = "t5"
    PRETRAINED_MODEL_CONFIG_DICT = {
        "pretrain_pformer_flant5xl": packaged_config("blip2_pformer_t5_pretrain_flant5xl.yaml"),
        "pretrain_pformer_flant5xxl": packaged_config("blip2_pformer_t5_pretrain_flant5xxl.yaml"),
    }

    def forward(self, samples):
        captions = samples["text_input"]
        if self.alignment_only and self.aligns():
            return self.lm_with_alignment(samples, captions)
        prefixes, suffixes = maths.split_for_prefix_lm(captions, maths.stage2_longest_prefix)
        lm_samples = {**samples, "text_input": prefixes, "text_output": suffixes}
        if not self.aligns():
            return super().forward(lm_samples)
        return self.lm_with_alignment(samples, captions, lm_samples)
