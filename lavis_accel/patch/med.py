"""Binds a token-reduction step (``patch.steps``) to BLIP's text encoder BERT, per instance, removably.

Covered: ``lavis.models.med.BertModel`` (its subclass ``XBertEncoder``: retrieval's ``forward_text`` for ITC and the
multimodal ITM pass, VQA's ``forward_automask``) and the NLVR2 ``BertModel`` of
``lavis.models.blip_models.nlvr_encoder`` (twin cross-attention over two images).

Only instance attributes change, and only three kinds: each layer's self-attention block (``layer.attention``, a
``BertAttention``: attention, output dense, residual LayerNorm) gets an instance-level ``forward`` that runs the
attention the step asks for and then the step, the model's ``get_extended_attention_mask`` gets an
instance-level wrapper that opens each forward, and its ``encoder.forward`` one that starts the step when the
forward's ``mode`` is one the step reduces (``step.text_modes``). The layer's own LAVIS forward then carries on, unchanged, with its
cross-attention (one image, or NLVR2's two) and feed-forward on the reduced tokens: so the step sits after
self-attention and before cross-attention, and one forward serves both BERT flavours and every step. Classes,
parameters and state-dict keys stay LAVIS's.

The attention mask. LAVIS's ``BertEncoder`` hands every layer the same extended mask ``[B, 1, 1, L]``
(``(1 - mask) * -10000``). The binding keeps the current, pruned one in per-forward state: real tokens (``valid``)
are read from it once, the step prunes them with the tokens, and the mask of every later layer is rebuilt from
``valid`` with LAVIS's formula. ``pruned_attention_mask`` gives callers the 2-D mask matching the output hidden
states. The mask a layer receives identifies the forward (the very tensor opened by the wrapper), so a layer called
any other way runs stock. Cross-attention takes no query-side mask in LAVIS (``BertSelfAttention`` replaces
``attention_mask`` by the image mask there), so the stale argument the layer passes it is unused.

Never reduced (the layer runs stock, the step is not called): decoder use (``is_decoder``: a causal
``[B, 1, L, L]`` mask, ``past_key_value``/``use_cache``), a caller's 3-D mask, and a layer called outside a
``BertModel`` forward. LAVIS's text gradient checkpointing (``encoder.gradient_checkpointing`` in training) would
recompute a layer in backward and run the stateful step twice with the wrong mask: it is refused at the start of
the forward, in one line. Relative position embeddings are refused at apply time.

Attention is SDPA unless the step (or ``output_attentions``) needs the probabilities; then it is eager. What the
step sees follows the reference's text layers (double125/MADTP ``models/med.py``): the probabilities before
dropout, the [CLS] row of those same probabilities (the reference's text ``cls_attn`` is taken before dropout, its
ViT's after), per-head outputs after dropout and the head mask, before the output dense layer.
"""
import types
from typing import List

import torch
from lavis.models import med
from lavis.models.blip_models import nlvr_encoder

from lavis_accel.errors import SettingError
from lavis_accel.patch.instance_patches import InstancePatches
from lavis_accel.patch.steps import AttentionNeeds, AttentionSeen
from lavis_accel.reduce.attention import attention, cls_attention_row, eager_attention

STATE_ATTR = "_lavis_accel"
SLOT_ATTR = "_lavis_accel_slot"
MASK_METHOD = "get_extended_attention_mask"
TEXT_ENCODERS = (med.BertModel, nlvr_encoder.BertModel)
MASKED = -10000.0  # LAVIS's additive value for a masked key


class TextReductionState:
    """The step of one patched BERT and what its current forward has pruned so far.

    ``input_mask``: the caller's mask of the last forward; ``opened``: the extended mask LAVIS hands every layer of
    the forward being reduced (``None``: this forward is not reduced); ``mask``/``valid``: the current extended
    mask ``[B, 1, 1, L']`` and real-token mask ``[B, L']``; ``pruned``: whether the length changed;
    ``token_counts``: entry 0 enters layer 0, entry ``i + 1`` leaves layer ``i`` (ints read from shapes).
    """

    def __init__(self, step, encoder):
        self.step = step
        self.encoder = encoder
        self.patches = InstancePatches()
        self.close_forward()

    def close_forward(self):
        self.input_mask = self.opened = self.mask = self.valid = None
        self.pruned = False
        self.token_counts = []

    def open_forward(self, training: bool, input_mask: torch.Tensor, extended: torch.Tensor, is_decoder: bool):
        """Open a forward: it is reduced when it is an encoder pass with a 2-D padding mask (and ``start`` agrees)."""
        self.close_forward()
        self.input_mask = input_mask
        if is_decoder or input_mask.dim() != 2:
            return
        if self.encoder.gradient_checkpointing and training:
            raise SettingError("the text encoder's gradient checkpointing cannot run with a token-reduction step "
                               "(it would recompute a reducing layer): set encoder.gradient_checkpointing = False")
        self.opened = self.mask = extended
        self.valid = extended[:, 0, 0, :] == 0
        self.token_counts = []

    def start(self, mode: str):
        """The encoder of an opened forward starts: start the step, or run stock when it does not reduce ``mode``."""
        if self.opened is None:
            return
        modes = self.step.text_modes
        if modes is not None and mode not in modes:
            self.opened = None
            self.token_counts = []
            return
        self.step.start_forward()

    def reduces(self, attention_mask, past_key_value) -> bool:
        """Whether a layer called with these arguments belongs to the forward being reduced."""
        return self.opened is not None and attention_mask is self.opened and past_key_value is None

    def advance(self, tokens: torch.Tensor, valid: torch.Tensor):
        """Take a layer's reduced tokens' ``valid`` mask; rebuild the extended mask when the length changed."""
        self.take(tokens, valid)
        self.token_counts.append(tokens.shape[1])

    def take(self, tokens: torch.Tensor, valid: torch.Tensor):
        """The tokens' current ``valid`` mask; the extended mask is rebuilt when the length or the mask changed."""
        if valid.shape[1] != tokens.shape[1]:
            raise SettingError(f"step {type(self.step).__name__} changed the text length without its mask: "
                               "it cannot reduce text tokens")
        if valid is not self.valid:
            self.pruned = self.pruned or tokens.shape[1] != self.input_mask.shape[1]
            self.mask = (1.0 - valid[:, None, None, :].to(self.mask.dtype)) * MASKED
        self.valid = valid


def is_text_encoder(module) -> bool:
    """Whether ``module`` is a BERT this binding covers (BLIP's ``med`` or NLVR2's)."""
    return isinstance(module, TEXT_ENCODERS)


def apply_step(bert, step):
    """Patch every layer of ``bert`` (a ``med`` or NLVR2 ``BertModel``) with ``step``; return ``bert``.

    Applying again only replaces the step.
    """
    _check_text_encoder(bert)
    state = getattr(bert, STATE_ATTR, None)
    if state is not None:
        state.step = step
        state.close_forward()
        return bert
    state = TextReductionState(step, bert.encoder)
    state.patches.set(bert, MASK_METHOD, types.MethodType(_opening_extended_mask, bert))
    state.patches.set(bert.encoder, "forward", types.MethodType(_starting_encoder_forward, bert.encoder))
    setattr(bert.encoder, SLOT_ATTR, state)
    for index, layer in enumerate(bert.encoder.layer):
        setattr(layer.attention, SLOT_ATTR, (state, index))
        state.patches.set(layer.attention, "forward", types.MethodType(_reducing_self_attention, layer.attention))
    setattr(bert, STATE_ATTR, state)
    return bert


def remove(bert):
    """Undo ``apply_step``: restore every patched attribute; an unpatched ``bert`` is returned as is."""
    state = getattr(bert, STATE_ATTR, None)
    if state is None:
        return bert
    state.patches.restore()
    for module in (bert.encoder, *(layer.attention for layer in bert.encoder.layer)):
        delattr(module, SLOT_ATTR)
    delattr(bert, STATE_ATTR)
    return bert


def current_step(bert):
    """The step a patched ``bert`` runs, or ``None``."""
    state = getattr(bert, STATE_ATTR, None)
    return None if state is None else state.step


def pruned_attention_mask(bert) -> torch.Tensor:
    """The 2-D ``[B, L']`` 0/1 mask of the last forward's output hidden states, in the input mask's dtype/device.

    The input mask itself when nothing was pruned. A fused token is real when it holds at least one real token.
    """
    state = _state(bert)
    if state.input_mask is None:
        raise SettingError(f"{type(bert).__name__} has not run a forward since its token reducer was applied")
    if not state.pruned:
        return state.input_mask
    return state.valid.to(state.input_mask.dtype)


def token_counts(bert) -> List[int]:
    """Token counts of the last reduced forward (see ``TextReductionState``); empty when it was not reduced."""
    return list(_state(bert).token_counts)


def _state(bert) -> TextReductionState:
    state = getattr(bert, STATE_ATTR, None)
    if state is None:
        raise SettingError(f"{type(bert).__name__} has no token reducer applied")
    return state


def _check_text_encoder(bert):
    if not is_text_encoder(bert):
        raise SettingError(f"{type(bert).__name__} is not a BLIP text encoder (lavis.models.med.BertModel or "
                           "lavis.models.blip_models.nlvr_encoder.BertModel)")
    position_type = getattr(bert.config, "position_embedding_type", "absolute")
    if position_type != "absolute":
        raise SettingError(f"text encoder position_embedding_type '{position_type}' cannot be reduced: only "
                           "'absolute' is supported")



def _opening_extended_mask(bert, attention_mask, input_shape, device, is_decoder):
    """LAVIS's ``get_extended_attention_mask``, opening the forward (called once per ``BertModel.forward``)."""
    state = getattr(bert, STATE_ATTR)
    extended = state.patches.original(bert, MASK_METHOD)(attention_mask, input_shape, device, is_decoder)
    state.open_forward(bert.training, attention_mask, extended, is_decoder)
    return extended


def _starting_encoder_forward(encoder, *args, mode="multimodal", **kwargs):
    """LAVIS's ``BertEncoder.forward``, starting the step first when it reduces this forward's ``mode``."""
    state = getattr(encoder, SLOT_ATTR)
    state.start(mode)
    return state.patches.original(encoder, "forward")(*args, mode=mode, **kwargs)


def _reducing_self_attention(block, hidden_states, attention_mask=None, head_mask=None, encoder_hidden_states=None,
                             encoder_attention_mask=None, past_key_value=None, output_attentions=False):
    """A layer's self-attention ``BertAttention`` followed by the step; stock when the forward is not reduced.

    Returns LAVIS's tuple: ``(output, probabilities if output_attentions, (keys, values))``.
    """
    state, index = getattr(block, SLOT_ATTR)
    if not state.reduces(attention_mask, past_key_value):
        stock = state.patches.original(block, "forward")
        return stock(hidden_states, attention_mask, head_mask, encoder_hidden_states, encoder_attention_mask,
                     past_key_value, output_attentions)
    hidden_states, valid = state.step.enter(index, hidden_states, state.valid)
    state.take(hidden_states, valid)
    if index == 0:
        state.token_counts = [hidden_states.shape[1]]
    needs: AttentionNeeds = state.step.needs(index, hidden_states, state.valid)
    bias = state.mask if needs.bias is None else state.mask + needs.bias
    context, probs, seen, present = _self_attention(block.self, hidden_states, bias, head_mask, needs,
                                                    output_attentions)
    output = block.output(context, hidden_states)
    output, valid = state.step.reduce(index, output, seen, state.valid)
    state.advance(output, valid)
    return (output, probs, present) if output_attentions else (output, present)


def _self_attention(attn, hidden_states, bias, head_mask, needs: AttentionNeeds, output_attentions: bool):
    """``BertSelfAttention`` on ``hidden_states`` with the additive ``bias`` (mask), computing what ``needs`` asks.

    Returns ``(context [B, L, H * D], probabilities [B, H, L, L] or None, AttentionSeen, (keys, values))``, the
    probabilities (before dropout) computed only when the step or ``output_attentions`` asks for them.
    """
    projected = [linear(hidden_states) for linear in (attn.query, attn.key, attn.value)]
    q, k, v = (attn.transpose_for_scores(p) for p in projected)
    scale = attn.attention_head_size ** -0.5
    dropout_p = attn.dropout.p if attn.training else 0.0
    probs = cls_row = None
    if needs.probs or output_attentions:
        heads, probs, _ = eager_attention(q, k, v, scale, bias, dropout_p)
    else:
        heads, _ = attention(q, k, v, scale, bias, dropout_p)
    if needs.cls_row:
        cls_row = cls_attention_row(q, k, scale, bias)
    if head_mask is not None:
        heads = heads * head_mask
    batch, num_heads, length, head_size = heads.shape
    context = heads.transpose(1, 2).reshape(batch, length, num_heads * head_size)
    queries, keys = projected[:2] if needs.projections else (None, None)
    if needs.probs:
        seen = AttentionSeen(k.mean(dim=1), cls_row, probs, probs[:, :, 0], heads, queries, keys)
    else:
        seen = AttentionSeen(k.mean(dim=1), cls_row, queries=queries, projected_keys=keys)
    return context, probs, seen, (k, v)
