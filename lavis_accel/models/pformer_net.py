"""The P-Former network of BLIText (spec 6.1): a BERT that writes a sentence as prompts in a frozen LLM's input space.

The [CLS] state goes through ``cls_proj`` (width -> prompts x width), is cut into one vector per prompt, then
through ``pooler`` (Linear + Tanh) and the LLM projection (``opt_proj`` or ``t5_proj``: width -> the LLM's). Stage 0
also trains a self-contrastive head, ``text_proj`` (width -> 256) and the temperature ``temp``.

The parameters keep the reference's names and places (all under the BERT, which has no pooler of its own), so the
reference's stage-0 file and the plugin's load into each other. The BERT is transformers' ``BertModel``, as the
reference's ``modeling_bert`` copy of it. ``pooler`` sitting where BERT keeps its pooler means BERT's forward also
pools every position (``prompts x width x width`` multiply-adds, about 1 % of the BERT's own, unused): the price of
the reference's key layout.
"""
import logging

import torch
from lavis.common.dist_utils import download_cached_file
from lavis.common.utils import is_url
from torch import nn
from transformers import AutoConfig, BertConfig, BertModel

from lavis_accel.errors import SettingError
from lavis_accel.reduce.pformer import prompt_head

BERT_NAME = "bert-base-uncased"
LLM_PROJECTIONS = {"opt": "opt_proj", "t5": "t5_proj"}
CONTRASTIVE_DIM = 256
INITIAL_TEMPERATURE = 0.07
CONTRASTIVE_KEYS = ("text_proj.", "temp")  # stage 0's own head: not needed to give prompts


def build_pformer(num_prompts, llm_kind, llm_width, *, contrastive=False, bert_weights=True):
    """A P-Former giving ``num_prompts`` prompts of ``llm_width`` for an ``llm_kind`` ("opt" or "t5") LLM.

    ``bert_weights``: start the BERT from bert-base-uncased's weights (stage 0); False builds it from its config
    only (stages 1-2, whose P-Former is loaded from the stage-0 file). ``contrastive`` adds stage 0's head.
    """
    if bert_weights:
        bert = BertModel.from_pretrained(BERT_NAME, add_pooling_layer=False)
    else:
        bert = BertModel(BertConfig.from_pretrained(BERT_NAME), add_pooling_layer=False)
    width = bert.config.hidden_size
    bert.cls_proj = nn.Linear(width, num_prompts * width)
    bert.pooler = nn.Sequential(nn.Linear(width, width), nn.Tanh())
    setattr(bert, LLM_PROJECTIONS[llm_kind], nn.Linear(width, llm_width))
    if contrastive:
        bert.text_proj = nn.Linear(width, CONTRASTIVE_DIM)
        bert.temp = nn.Parameter(INITIAL_TEMPERATURE * torch.ones([]))
    return bert


def llm_projection(pformer):
    """The P-Former's projection into the LLM's input space (``opt_proj`` or ``t5_proj``)."""
    for name in LLM_PROJECTIONS.values():
        if hasattr(pformer, name):
            return getattr(pformer, name)
    raise AttributeError("P-Former: no opt_proj or t5_proj")


def encode(pformer, tokens):
    """The P-Former's last hidden states for BERT ``tokens`` (input_ids, attention_mask), ``[B, L, width]``."""
    return pformer(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                   return_dict=True).last_hidden_state


def prompts_from_states(pformer, states):
    """The reference prompts ``[B, P, llm_width]`` from the P-Former's hidden states (its [CLS] row)."""
    return prompt_head(states[:, 0], pformer.cls_proj, pformer.pooler, llm_projection(pformer))


def check_prompt_length(max_txt_len, num_query_token):
    """The P-Former cuts its [CLS] projection into as many prompts as the padded sentence has tokens (the
    reference's reshape takes its count from the sequence length), and the Q-Former's queries must match them."""
    if max_txt_len != num_query_token:
        raise SettingError(f"model.max_txt_len ({max_txt_len}) must equal model.num_query_token ({num_query_token}): "
                           "the P-Former gives one prompt per token of its padded sentence")


def llm_width(llm_kind, name):
    """The hidden size of the LLM ``name`` (a hub name or folder), read from its config only (no weights)."""
    config = AutoConfig.from_pretrained(name)
    return config.hidden_size if llm_kind == "opt" else config.d_model


def _checkpoint_state(path, where):
    if not path:
        raise SettingError(f"{where}: no file given")
    try:
        local = download_cached_file(path, check_hash=False, progress=True) if is_url(path) else path
        checkpoint = torch.load(local, map_location="cpu")
    except (OSError, RuntimeError) as err:
        raise SettingError(f"{where}: cannot read {path} ({err})") from None
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise SettingError(f"{where}: {path} holds no state dict (expected {{'model': state_dict}} or a state dict)")
    return state


def load_stage0(pformer, path, where="model.pretrained_stage0"):
    """Load the P-Former's weights (keys ``Pformer.*``) from the stage-0 checkpoint ``path``.

    Every parameter the P-Former has must be in the file with its shape (stage 0's contrastive head may be there
    or not); anything else refuses in one line naming ``where`` and the file, before any training.
    """
    state = _checkpoint_state(path, where)
    found = {key[len("Pformer."):]: value for key, value in state.items() if key.startswith("Pformer.")}
    if not found:
        raise SettingError(f"{where}: {path} has no P-Former weights (no 'Pformer.*' keys): not a stage-0 checkpoint")
    own = pformer.state_dict()
    missing = [key for key in own if key not in found]
    if missing:
        raise SettingError(f"{where}: {path} lacks {len(missing)} P-Former weights, e.g. Pformer.{missing[0]}")
    for key, value in own.items():
        if found[key].shape != value.shape:
            raise SettingError(f"{where}: {path} has Pformer.{key} of shape {tuple(found[key].shape)}, this model "
                               f"needs {tuple(value.shape)} (another BERT, prompt count or LLM width)")
    unused = [key for key in found if key not in own and not key.startswith(CONTRASTIVE_KEYS)]
    if unused:
        raise SettingError(f"{where}: {path} has P-Former weights this model does not use, e.g. Pformer.{unused[0]} "
                           "(a P-Former for another LLM family?)")
    pformer.load_state_dict({key: found[key] for key in own})
    logging.info("P-Former loaded from %s", path)


def freeze(pformer):
    """No gradients to the P-Former; the model keeps it in eval mode (``models.frozen_member``)."""
    return pformer.requires_grad_(False).eval()
