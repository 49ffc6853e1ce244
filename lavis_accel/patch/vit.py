"""Binds a token-reduction step (``patch.steps``) to LAVIS's BLIP ViT (``lavis.models.vit``), per instance, removably.

Only instance attributes change: each ``Block`` and its ``Attention`` get an instance-level ``forward``; the
encoder gets one ``_lavis_accel`` state object holding the step. Classes, parameters and state-dict keys stay
LAVIS's. The block forward is the same for every method: the step says what it needs from attention and reduces
the tokens between the attention residual and the MLP.

Two LAVIS traps are handled:
- ``VisionTransformerEncoder.forward_features`` calls ``super().forward``, so a wrapper around the encoder's
  ``forward`` would be skipped. The per-forward state is therefore reset by block 0 itself, whichever path ran it.
- fairscale's ``checkpoint_wrapper`` (retrieval configs: ``vit_grad_ckpt``, ``vit_ckpt_layer``) stores a
  ``partial(_checkpointed_forward, Attention.forward, weakref, offload)`` on the instance. The patched attention is
  wrapped the same way, so those blocks keep their activation checkpointing in training.
"""
import functools
import logging
import types
import weakref
from typing import List, Optional

from fairscale.nn.checkpoint.checkpoint_activations import _checkpointed_forward
from lavis.models.vit import Attention, Block, VisionTransformer

from lavis_accel.errors import SettingError
from lavis_accel.patch.instance_patches import InstancePatches
from lavis_accel.patch.steps import AttentionNeeds, AttentionSeen, MergingStep
from lavis_accel.reduce.attention import attention, eager_attention
from lavis_accel.reduce.settings import ReducerSettings

STATE_ATTR = "_lavis_accel"
logger = logging.getLogger(__name__)


class ReductionState:
    """The step of one patched encoder and the token counts of its last forward.

    ``token_counts`` follows ``merge.token_schedule``: entry 0 enters block 0, entry ``i + 1`` leaves block ``i``'s
    reduction (plain ints read from shapes, no host sync).
    """

    def __init__(self, step, settings=None):
        self.patches = InstancePatches()
        self.configure(step, settings)
        self.token_counts = []

    def configure(self, step, settings=None):
        self.step = step
        self.settings = settings

    def start_forward(self):
        self.step.start_forward()
        self.token_counts = []


def find_vit(model) -> VisionTransformer:
    """The LAVIS ViT to patch: ``model`` itself, or a BLIP model's ``visual_encoder`` (never ``visual_encoder_m``)."""
    if isinstance(model, VisionTransformer):
        return model
    encoder = getattr(model, "visual_encoder", None)
    if isinstance(encoder, VisionTransformer):
        return encoder
    raise SettingError(
        f"{type(model).__name__} is not a LAVIS BLIP ViT (lavis.models.vit.VisionTransformer) "
        "and has no such visual_encoder"
    )


def apply_settings(model, settings: ReducerSettings):
    """Patch ``model``'s BLIP ViT in place with ToMe/Turbo ``settings`` and return ``model``."""
    vit = find_vit(model)
    return apply_step(model, MergingStep(settings, len(vit.blocks)), settings)


def apply_step(model, step, settings=None):
    """Patch ``model``'s BLIP ViT in place with a reduction ``step`` and return ``model``.

    Applying again only replaces the step (the same as applying once with the new one).
    """
    vit = find_vit(model)
    state = getattr(vit, STATE_ATTR, None)
    if state is not None:
        state.configure(step, settings)
    else:
        state = ReductionState(step, settings)
        for index, block in enumerate(vit.blocks):
            block._lavis_accel_slot = (state, index)
            state.patches.set(block, "forward", types.MethodType(_reducing_block_forward, block))
            state.patches.set(block.attn, "forward", _reducing_attention_callable(block.attn))
        setattr(vit, STATE_ATTR, state)
    logger.info("%s: %s", type(model).__name__, step.describe(vit.patch_embed.num_patches + 1))
    return model


def current_step(model):
    """The step a patched model's ViT runs, or ``None``."""
    state = getattr(find_vit(model), STATE_ATTR, None)
    return None if state is None else state.step


def remove(model):
    """Undo ``apply_settings``: restore every patched forward; a model that is not patched is returned as is."""
    vit = find_vit(model)
    state = getattr(vit, STATE_ATTR, None)
    if state is None:
        return model
    state.patches.restore()
    for block in vit.blocks:
        del block._lavis_accel_slot
    delattr(vit, STATE_ATTR)
    return model


def is_patched(model) -> bool:
    return getattr(find_vit(model), STATE_ATTR, None) is not None


def current_settings(model) -> Optional[ReducerSettings]:
    """The ToMe/Turbo settings a patched model runs with, or ``None``."""
    state = getattr(find_vit(model), STATE_ATTR, None)
    return None if state is None else state.settings


def token_counts(model) -> List[int]:
    """Token counts of the last forward of a patched model (see ``ReductionState``)."""
    state = getattr(find_vit(model), STATE_ATTR, None)
    if state is None:
        raise SettingError(f"{type(model).__name__} has no token reducer applied")
    return list(state.token_counts)



def _reducing_attention_callable(attn: Attention):
    """The patched attention forward for ``attn``, checkpointed like the original when fairscale wrapped it."""
    original = attn.__dict__.get("forward")
    if isinstance(original, functools.partial) and original.func is _checkpointed_forward:
        offload_to_cpu = original.args[2]
        return functools.partial(_checkpointed_forward, _reducing_attention_forward, weakref.ref(attn), offload_to_cpu)
    return types.MethodType(_reducing_attention_forward, attn)


def _reducing_attention_forward(attn: Attention, x, bias=None, need_cls_row=False, need_probs=False,
                                need_projections=False):
    """LAVIS ``Attention`` with an additive ``bias``, plus what the step asked for (``AttentionSeen`` fields).

    SDPA unless the full probabilities are needed. Returns a plain tuple ``(out, *AttentionSeen)`` (fairscale's
    checkpoint splits tuples only).
    """
    batch, tokens, channels = x.shape
    qkv = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, channels // attn.num_heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    dropout_p = attn.attn_drop.p if attn.training else 0.0
    probs = cls_probs = head_outputs = cls_row = queries = keys = None
    if need_projections:
        queries, keys = (qkv[:, :, i].reshape(batch, tokens, channels) for i in (0, 1))
    if need_probs:
        heads, probs, cls_probs = eager_attention(q, k, v, attn.scale, bias, dropout_p)
        head_outputs = heads
    else:
        heads, cls_row = attention(q, k, v, attn.scale, bias, dropout_p, need_cls_row)
    out = attn.proj_drop(attn.proj(heads.transpose(1, 2).reshape(batch, tokens, channels)))
    return out, k.mean(dim=1), cls_row, probs, cls_probs, head_outputs, queries, keys


def _reducing_block_forward(block: Block, x, register_hook=False):
    """LAVIS ``Block`` with the step between attention and MLP; ``register_hook`` (Grad-CAM) is accepted, unused."""
    state, index = block._lavis_accel_slot
    step = state.step
    if index == 0:
        state.start_forward()
    x, _ = step.enter(index, x)
    if index == 0:
        state.token_counts.append(x.shape[1])
    needs: AttentionNeeds = step.needs(index, x)
    out, *seen = block.attn(block.norm1(x), needs.bias, needs.cls_row, needs.probs, needs.projections)
    x = x + block.drop_path(out)
    x, _ = step.reduce(index, x, AttentionSeen(*seen))
    state.token_counts.append(x.shape[1])
    return x + block.drop_path(block.mlp(block.norm2(x)))
