"""P-Former stage 0 (BLIText, spec 6.2): train the P-Former on sentences alone against a frozen LLM.

``pformer_opt`` (types ``pformer_opt2.7b``, ``pformer_opt6.7b``) and ``pformer_t5`` (``pformer_flant5xl``,
``pformer_flant5xxl``) are LAVIS ``Blip2Base`` models with no vision side: a BERT P-Former
(:mod:`lavis_accel.models.pformer_net`) writes each sentence as ``num_query_token`` prompts in the frozen LLM's
input space, and learns from

- ``loss_c``, the self-contrastive loss of its [CLS] feature over the global batch (label smoothing 0.1);
- ``loss_vq`` (OPT only), MSE of every prompt to its nearest frozen OPT input embedding, read from the OPT itself
  (no copy of the vocabulary in the model's state, unlike the reference's ``opt_vocab_embeddings`` buffer);
- ``loss_lm``: the frozen LLM reconstructs the sentence from the prompts. OPT: the P-Former sees the sentence
  + "\\n" with 25 % of its tokens masked, OPT gets [prompts; the unmasked sentence + "\\n"] and is scored on the
  sentence. T5: the P-Former sees the raw sentence (no "\\n", as the reference), unmasked; the sentence is cut at a
  random word, T5's encoder gets [prompts; prefix] and its decoder predicts the suffix.

``loss`` is their sum. The P-Former's parameters keep the reference's names (``Pformer.cls_proj``,
``Pformer.pooler.0``, ``Pformer.opt_proj`` / ``t5_proj``, ``Pformer.text_proj``, ``Pformer.temp``), so stages 1-2
load it from this model's checkpoint (``pretrained_stage0``). The LLM is the config's ``opt_model`` / ``t5_model``
(the reference always loaded facebook/opt-2.7b), frozen, in the precision stock ``blip2_opt`` (fp16) and
``blip2_t5`` (bf16) give it. Nothing is loaded from a checkpoint by default: stage 0 starts from BERT and the LLM.

In one process without a process group, the contrastive loss's global batch is the local one, rank 0; as with the
reference's ``all_gather`` (which carries no gradient), the gradient flows through each row's own feature only.
"""
import logging

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lavis.models.base_model import concat_all_gather
from lavis.models.blip2_models.blip2 import Blip2Base
from lavis.models.blip2_models.modeling_opt import OPTForCausalLM
from lavis.models.blip2_models.modeling_t5 import T5Config, T5ForConditionalGeneration
from transformers import AutoTokenizer, BertTokenizer, T5TokenizerFast

from lavis_accel.configs import packaged_config
from lavis_accel.errors import SettingError
from lavis_accel.models.frozen_member import FrozenMemberMixin
from lavis_accel.models.pformer_net import (BERT_NAME, build_pformer, check_prompt_length, llm_width,
                                            prompts_from_states)
from lavis_accel.reduce.pformer import (mask_tokens, self_contrastive_loss, split_for_prefix_lm,
                                        stage0_longest_prefix, vq_loss)
from lavis_accel.registration import register_model

DEFAULT_NUM_QUERY_TOKEN = 32
DEFAULT_MAX_TXT_LEN = 32


def gather_features(feats):
    """``(features of the global batch, this rank)``: every rank's ``feats`` in rank order, without gradient, when a
    process group exists (LAVIS's ``concat_all_gather``); else the local ``feats`` detached, rank 0 (the same
    numbers and gradient as a one-rank group)."""
    if dist.is_available() and dist.is_initialized():
        return concat_all_gather(feats), dist.get_rank()
    return feats.detach(), 0


class PformerStage0(FrozenMemberMixin, Blip2Base):
    """What both stage-0 archs share: the P-Former, its BERT tokenizer, the contrastive loss and the prompts; the
    frozen LLM (``FROZEN_MEMBER``, the attribute ``LLM_KEY`` names) is never saved, and follows the model's train
    mode as the reference's did."""

    FROZEN_MEMBER_IN_EVAL = False

    TEXT_LENGTH_IS_QUERY_COUNT = True  # one prompt per token of the P-Former's padded sentence
    LLM_KIND = None  # "opt" or "t5" (pformer_net's llm_kind)
    LLM_KEY = None  # the config key naming the LLM
    PFORMER_SUFFIX = ""  # appended to each sentence the P-Former reads

    def __init__(self, num_query_token, llm_name, prompt="", max_txt_len=DEFAULT_MAX_TXT_LEN):
        super().__init__()
        self.Pformer = build_pformer(num_query_token, self.LLM_KIND, llm_width(self.LLM_KIND, llm_name),
                                     contrastive=True, bert_weights=True)
        self.tokenizer = BertTokenizer.from_pretrained(BERT_NAME)
        self.num_query_token = num_query_token
        self.max_txt_len = max_txt_len
        self.prompt = prompt

    def pformer_texts(self, samples):
        """The sentences as the P-Former reads them (a new list: ``samples`` is not changed)."""
        return [text + self.PFORMER_SUFFIX for text in samples["text_input"]]

    def pformer_states(self, texts, mask=False):
        """The P-Former's hidden states ``[B, max_txt_len, width]`` for ``texts`` (BERT tokens padded to
        ``max_txt_len``); ``mask``: 25 % of the tokens but padding and [CLS] replaced by [MASK] first."""
        tokens = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.max_txt_len,
                                return_tensors="pt").to(self.device)
        input_ids = tokens.input_ids
        if mask:
            input_ids = mask_tokens(input_ids, self.tokenizer.mask_token_id,
                                    (self.tokenizer.pad_token_id, self.tokenizer.cls_token_id))
        return self.Pformer(input_ids=input_ids, attention_mask=tokens.attention_mask,
                            return_dict=True).last_hidden_state

    def contrastive_loss(self, states):
        """L_c of the [CLS] states over the global batch."""
        feats = F.normalize(self.Pformer.text_proj(states[:, 0]), dim=-1)
        feats_all, rank = gather_features(feats)
        return self_contrastive_loss(feats, feats_all, self.Pformer.temp, rank)

    def prompts(self, states):
        """The prompts ``[B, num_query_token, llm width]`` from the P-Former's states."""
        return prompts_from_states(self.Pformer, states)

    @classmethod
    def config_args(cls, cfg):
        """The constructor's arguments from a model config, checked before anything is built."""
        num_query_token = cfg.get("num_query_token", DEFAULT_NUM_QUERY_TOKEN)
        max_txt_len = cfg.get("max_txt_len", DEFAULT_MAX_TXT_LEN)
        check_prompt_length(max_txt_len, num_query_token)
        llm_name = cfg.get(cls.LLM_KEY)
        if not llm_name:
            raise SettingError(f"model.{cls.LLM_KEY}: not set (the hub name or folder of the frozen LLM)")
        return {"num_query_token": num_query_token, "llm_name": llm_name, "prompt": cfg.get("prompt", ""),
                "max_txt_len": max_txt_len}

    @classmethod
    def from_config(cls, cfg):
        model = cls(**cls.config_args(cfg))
        model.load_checkpoint_from_config(cfg)  # nothing with the default yamls (load_pretrained: False)
        return model


@register_model("pformer_opt")
class PformerOPT(PformerStage0):
    """Stage 0 against a frozen OPT: ``loss = loss_c + loss_vq + loss_lm`` (module docstring)."""

    PRETRAINED_MODEL_CONFIG_DICT = {
        "pformer_opt2.7b": packaged_config("pformer_opt2.7b.yaml"),
        "pformer_opt6.7b": packaged_config("pformer_opt6.7b.yaml"),
    }
    LLM_KIND = "opt"
    LLM_KEY = FROZEN_MEMBER = "opt_model"  # never saved (LAVIS's runner would save the tied lm_head)
    PFORMER_SUFFIX = "\n"  # the P-Former and OPT read "sentence\n" in every stage

    def __init__(self, num_query_token=DEFAULT_NUM_QUERY_TOKEN, llm_name="facebook/opt-2.7b", prompt="",
                 max_txt_len=DEFAULT_MAX_TXT_LEN):
        super().__init__(num_query_token, llm_name, prompt, max_txt_len)
        self.opt_tokenizer = AutoTokenizer.from_pretrained(llm_name, use_fast=False)
        self.opt_tokenizer.padding_side = "right"
        self.opt_model = OPTForCausalLM.from_pretrained(llm_name, torch_dtype=torch.float16).requires_grad_(False)
        embed_width = self.opt_model.get_input_embeddings().weight.shape[1]
        if embed_width != self.opt_model.config.hidden_size:
            raise SettingError(f"model.opt_model: {llm_name} embeds tokens in {embed_width} dimensions, not its "
                               f"hidden size {self.opt_model.config.hidden_size}; the prompts need one width")
        self.eos_token_id = self.opt_tokenizer("\n", add_special_tokens=False).input_ids[0]
        self.prompt_length = int(self.opt_tokenizer(prompt, return_tensors="pt").attention_mask.sum())
        logging.info("pformer_opt: P-Former of %d prompts, frozen %s", num_query_token, llm_name)

    def forward(self, samples):
        texts = self.pformer_texts(samples)
        states = self.pformer_states(texts, mask=True)
        prompts = self.prompts(states)
        loss_c = self.contrastive_loss(states)
        loss_vq = vq_loss(prompts, self.opt_model.get_input_embeddings().weight)
        loss_lm = self.reconstruction_loss(prompts, texts)
        return {"loss": loss_c + loss_vq + loss_lm, "loss_c": loss_c, "loss_vq": loss_vq, "loss_lm": loss_lm}

    def reconstruction_loss(self, prompts, texts):
        """OPT's causal LM loss on ``texts`` (unmasked) read after the prompts; prompts, padding and the config's
        ``prompt`` tokens are not scored."""
        tokens = self.opt_tokenizer(texts, return_tensors="pt", padding="longest", truncation=True,
                                    max_length=self.max_txt_len).to(self.device)
        targets = tokens.input_ids.masked_fill(tokens.input_ids == self.opt_tokenizer.pad_token_id, -100)
        if self.prompt:
            targets[:, :self.prompt_length] = -100
        prompt_atts = torch.ones(prompts.shape[:2], dtype=torch.long, device=prompts.device)
        targets = torch.cat([torch.full_like(prompt_atts, -100), targets], dim=1)
        embeds = self.opt_model.get_input_embeddings()(tokens.input_ids)
        with self.maybe_autocast():
            outputs = self.opt_model(inputs_embeds=torch.cat([prompts, embeds], dim=1),
                                     attention_mask=torch.cat([prompt_atts, tokens.attention_mask], dim=1),
                                     return_dict=True, labels=targets)
        return outputs.loss

    @torch.no_grad()
    def generate(self, samples, use_nucleus_sampling=False, num_beams=5, max_length=30, min_length=1, top_p=0.9,
                 repetition_penalty=1.0, length_penalty=1.0, num_captions=1, temperature=1):
        """OPT's text from the prompts of ``samples["text_input"]`` (unmasked) and the prompt (``samples["prompt"]``
        or the config's): how well the prompts let the frozen LLM reconstruct each sentence."""
        with self.maybe_autocast():
            prompts = self.prompts(self.pformer_states(self.pformer_texts(samples)))
            prompt = [samples.get("prompt", self.prompt)] * prompts.shape[0]
            tokens = self.opt_tokenizer(prompt, return_tensors="pt").to(self.device)
            attention_mask = torch.cat([torch.ones(prompts.shape[:2], dtype=torch.long, device=self.device),
                                        tokens.attention_mask], dim=1)
            copies = num_captions if use_nucleus_sampling else num_beams
            outputs = self.opt_model.generate(
                input_ids=tokens.input_ids, query_embeds=prompts.repeat_interleave(copies, dim=0),
                attention_mask=attention_mask, do_sample=use_nucleus_sampling, top_p=top_p, temperature=temperature,
                num_beams=1 if use_nucleus_sampling else num_beams, max_new_tokens=max_length,
                min_length=min_length, eos_token_id=self.eos_token_id, repetition_penalty=repetition_penalty,
                length_penalty=length_penalty, num_return_sequences=num_captions)
        texts = self.opt_tokenizer.batch_decode(outputs[:, tokens.input_ids.shape[1]:], skip_special_tokens=True)
        return [text.strip() for text in texts]


@register_model("pformer_t5")
class PformerT5(PformerStage0):
    """Stage 0 against a frozen Flan-T5: ``loss = loss_c + loss_lm`` (module docstring)."""

    PRETRAINED_MODEL_CONFIG_DICT = {
        "pformer_flant5xl": packaged_config("pformer_flant5xl.yaml"),
        "pformer_flant5xxl": packaged_config("pformer_flant5xxl.yaml"),
    }
    LLM_KIND = "t5"
    LLM_KEY = FROZEN_MEMBER = "t5_model"
    PFORMER_SUFFIX = ""  # the reference's T5 stages feed the raw sentence to the P-Former

    def __init__(self, num_query_token=DEFAULT_NUM_QUERY_TOKEN, llm_name="google/flan-t5-xl", prompt="",
                 max_txt_len=DEFAULT_MAX_TXT_LEN):
        super().__init__(num_query_token, llm_name, prompt, max_txt_len)
        self.t5_tokenizer = T5TokenizerFast.from_pretrained(llm_name)
        t5_config = T5Config.from_pretrained(llm_name)
        t5_config.dense_act_fn = "gelu"  # as stock blip2_t5
        self.t5_model = T5ForConditionalGeneration.from_pretrained(llm_name, config=t5_config).requires_grad_(False)
        for param in self.t5_model.parameters():
            param.data = param.data.bfloat16()
        logging.info("pformer_t5: P-Former of %d prompts, frozen %s", num_query_token, llm_name)

    def forward(self, samples):
        states = self.pformer_states(self.pformer_texts(samples))
        prompts = self.prompts(states)
        loss_c = self.contrastive_loss(states)
        prefixes, suffixes = split_for_prefix_lm(samples["text_input"], stage0_longest_prefix)
        loss_lm = self.prefix_lm_loss(prompts, prefixes, suffixes)
        return {"loss": loss_c + loss_lm, "loss_c": loss_c, "loss_lm": loss_lm}

    def _t5_tokens(self, texts):
        return self.t5_tokenizer(texts, padding="longest", truncation=True, max_length=self.max_txt_len,
                                 return_tensors="pt").to(self.device)

    def prefix_lm_loss(self, prompts, prefixes, suffixes):
        """T5's loss on each suffix, its encoder reading [prompts; prefix] (padding not scored)."""
        prompt_atts = torch.ones(prompts.shape[:2], dtype=torch.long, device=prompts.device)
        with self.maybe_autocast(dtype=torch.bfloat16):
            inputs, outputs = self._t5_tokens(prefixes), self._t5_tokens(suffixes)
            targets = outputs.input_ids.masked_fill(outputs.input_ids == self.t5_tokenizer.pad_token_id, -100)
            embeds = self.t5_model.encoder.embed_tokens(inputs.input_ids)
            result = self.t5_model(inputs_embeds=torch.cat([prompts, embeds], dim=1),
                                   attention_mask=torch.cat([prompt_atts, inputs.attention_mask], dim=1),
                                   decoder_attention_mask=outputs.attention_mask, return_dict=True, labels=targets)
        return result.loss

    @torch.no_grad()
    def generate(self, samples, use_nucleus_sampling=False, num_beams=5, max_length=30, min_length=1, top_p=0.9,
                 repetition_penalty=1.0, length_penalty=1.0, num_captions=1, temperature=1):
        """T5's text from the prompts of ``samples["text_input"]``, its encoder also reading the prompt
        (``samples["prompt"]``, one or one per sentence, or the config's): e.g. a sentence's prefix, to see the
        suffix the prompts make T5 write."""
        prompts = self.prompts(self.pformer_states(self.pformer_texts(samples)))
        prompt = samples.get("prompt", self.prompt)
        prompt = [prompt] * prompts.shape[0] if isinstance(prompt, str) else list(prompt)
        if len(prompt) != prompts.shape[0]:
            raise SettingError(f"prompt: {len(prompt)} prompts for {prompts.shape[0]} sentences")
        tokens = self.t5_tokenizer(prompt, padding="longest", return_tensors="pt").to(self.device)
        attention_mask = torch.cat([torch.ones(prompts.shape[:2], dtype=torch.long, device=self.device),
                                    tokens.attention_mask], dim=1)
        with self.maybe_autocast(dtype=torch.bfloat16):
            embeds = self.t5_model.encoder.embed_tokens(tokens.input_ids)
            outputs = self.t5_model.generate(
                inputs_embeds=torch.cat([prompts, embeds], dim=1), attention_mask=attention_mask,
                do_sample=use_nucleus_sampling, top_p=top_p, temperature=temperature, num_beams=num_beams,
                max_new_tokens=max_length, min_length=min_length, repetition_penalty=repetition_penalty,
                length_penalty=length_penalty, num_return_sequences=num_captions)
        return self.t5_tokenizer.batch_decode(outputs, skip_special_tokens=True)
