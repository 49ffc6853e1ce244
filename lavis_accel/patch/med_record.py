"""Record what the last layer of a LAVIS ``med`` BERT computes in each pass: its self- and cross-attention
probabilities and its output states (DLIP's distillation compares them between teacher and student).

LAVIS's ``med`` returns self-attention maps on request but drops the cross-attention maps (its encoder keeps
``layer_outputs[1]`` only), and BLIP's models call their BERTs without asking for either. The recorder therefore
hooks the last layer for the duration of a ``with`` block: it asks that layer's two attention modules for their
probabilities (their ``output_attentions`` argument), keeps them, and leaves every output of the model unchanged.
Each pass is recorded with the ``encoder_hidden_states`` it attended to, so a caller can pick one pass out of the
several a BLIP forward makes (the positive ITM pass is the one that attends to the image embeddings themselves).
"""
import contextlib
from dataclasses import dataclass
from typing import Optional

import torch

OUTPUT_ATTENTIONS_ARG = 6  # BertSelfAttention.forward(hidden, mask, head_mask, enc_states, enc_mask, past, output_attentions)
ENCODER_STATES_ARG = 3  # BertLayer.forward(hidden, mask, head_mask, encoder_hidden_states, ...)


@dataclass
class LayerPass:
    """One call of the recorded layer."""

    context: Optional[torch.Tensor]  # the encoder_hidden_states of the call (None for a text-only pass)
    self_attention: Optional[torch.Tensor] = None  # [B, heads, L, L]
    cross_attention: Optional[torch.Tensor] = None  # [B, heads, L, image tokens]
    states: Optional[torch.Tensor] = None  # the layer's output = the model's last hidden state [B, L, width]


def _asking_for_probabilities(module, args, kwargs):
    if len(args) > OUTPUT_ATTENTIONS_ARG:
        args = args[:OUTPUT_ATTENTIONS_ARG] + (True,) + args[OUTPUT_ATTENTIONS_ARG + 1:]
    else:
        kwargs = {**kwargs, "output_attentions": True}
    return args, kwargs


class LastLayerRecorder:
    """The passes of ``bert``'s last layer (a ``med`` ``BertModel``) made inside :meth:`recording`."""

    def __init__(self, bert):
        self.layer = bert.encoder.layer[-1]
        self.passes = []

    def pass_attending_to(self, context):
        """The single recorded pass whose ``encoder_hidden_states`` is the tensor ``context`` itself."""
        found = [p for p in self.passes if p.context is context]
        if len(found) != 1:
            raise RuntimeError(f"expected one pass of the recorded layer attending to the given states, found "
                               f"{len(found)}")
        return found[0]

    def _start_pass(self, module, args, kwargs):
        context = args[ENCODER_STATES_ARG] if len(args) > ENCODER_STATES_ARG else kwargs.get("encoder_hidden_states")
        self.passes.append(LayerPass(context=context))

    def _end_pass(self, module, args, output):
        self.passes[-1].states = output[0]

    def _keeper(self, field):
        def keep(module, args, output):
            setattr(self.passes[-1], field, output[1])
        return keep

    @contextlib.contextmanager
    def recording(self):
        """Record every pass through the last layer while the block runs; the hooks are removed after."""
        self.passes = []
        handles = [self.layer.register_forward_pre_hook(self._start_pass, with_kwargs=True),
                   self.layer.register_forward_hook(self._end_pass)]
        for module, field in ((self.layer.attention, "self_attention"),
                              (getattr(self.layer, "crossattention", None), "cross_attention")):
            if module is None:
                continue
            inner = module.self
            handles.append(inner.register_forward_pre_hook(_asking_for_probabilities, with_kwargs=True))
            handles.append(inner.register_forward_hook(self._keeper(field)))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
