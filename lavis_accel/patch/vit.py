"""Binds ToMe/Turbo to LAVIS's BLIP ViT (``lavis.models.vit``), per instance and removably.

Only instance attributes change: each ``Block`` and its ``Attention`` get an instance-level ``forward``; the
encoder gets one ``_lavis_accel`` state object. Classes, parameters and state-dict keys stay LAVIS's.

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
from lavis_accel.reduce.attention import attention
from lavis_accel.reduce.merge import effective_r, merge_wavg, parse_r, proportional_bias, token_schedule
from lavis_accel.reduce.settings import ReducerSettings
from lavis_accel.reduce.turbo import informativity_matching

STATE_ATTR = "_lavis_accel"
logger = logging.getLogger(__name__)


class ReductionState:
    """Settings and per-forward state shared by the blocks of one patched encoder.

    ``token_counts`` of the last forward follows ``merge.token_schedule``: entry 0 enters block 0, entry ``i + 1``
    leaves block ``i``'s merge (plain ints read from shapes, no host sync).
    """

    def __init__(self, settings: ReducerSettings, depth: int):
        self.originals = {}  # module -> its instance-level forward before patching (None if it had none)
        self.configure(settings, depth)
        self.start_forward(0)

    def configure(self, settings: ReducerSettings, depth: int):
        self.settings = settings
        self.r_per_block = parse_r(depth, settings.r)

    def start_forward(self, num_tokens: int):
        self.size = None
        self.merge_layer = 0
        self.token_counts = [num_tokens]


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
    """Patch ``model``'s BLIP ViT in place with ``settings`` and return ``model``.

    Applying again only replaces the settings (the same as applying once with the new ones).
    """
    vit = find_vit(model)
    state = getattr(vit, STATE_ATTR, None)
    if state is not None:
        state.configure(settings, len(vit.blocks))
    else:
        state = ReductionState(settings, len(vit.blocks))
        for index, block in enumerate(vit.blocks):
            block._lavis_accel_slot = (state, index)
            _set_forward(state, block, types.MethodType(_reducing_block_forward, block))
            _set_forward(state, block.attn, _reducing_attention_callable(block.attn))
        setattr(vit, STATE_ATTR, state)
    _log_schedule(model, vit, state)
    return model


def _log_schedule(model, vit, state):
    """Say once, at patch time, how many tokens each block keeps at the model's image size."""
    settings = state.settings
    counts = token_schedule(vit.patch_embed.num_patches + 1, state.r_per_block, settings.threshold)
    logger.info("%s: %s (r=%s, alpha=%g, threshold=%d) keeps ViT tokens %s", type(model).__name__, settings.name,
                settings.r, settings.alpha, settings.threshold, " -> ".join(map(str, counts)))


def remove(model):
    """Undo ``apply_settings``: restore every patched forward; a model that is not patched is returned as is."""
    vit = find_vit(model)
    state = getattr(vit, STATE_ATTR, None)
    if state is None:
        return model
    for module, original in state.originals.items():
        if original is None:
            del module.forward
        else:
            module.forward = original
    for block in vit.blocks:
        del block._lavis_accel_slot
    delattr(vit, STATE_ATTR)
    return model


def is_patched(model) -> bool:
    return getattr(find_vit(model), STATE_ATTR, None) is not None


def current_settings(model) -> Optional[ReducerSettings]:
    """The settings a patched model runs with, or ``None``."""
    state = getattr(find_vit(model), STATE_ATTR, None)
    return None if state is None else state.settings


def token_counts(model) -> List[int]:
    """Token counts of the last forward of a patched model (see ``ReductionState``)."""
    state = getattr(find_vit(model), STATE_ATTR, None)
    if state is None:
        raise SettingError(f"{type(model).__name__} has no token reducer applied")
    return list(state.token_counts)


def _set_forward(state: ReductionState, module, forward):
    state.originals[module] = module.__dict__.get("forward")
    module.forward = forward


def _reducing_attention_callable(attn: Attention):
    """The patched attention forward for ``attn``, checkpointed like the original when fairscale wrapped it."""
    original = attn.__dict__.get("forward")
    if isinstance(original, functools.partial) and original.func is _checkpointed_forward:
        offload_to_cpu = original.args[2]
        return functools.partial(_checkpointed_forward, _reducing_attention_forward, weakref.ref(attn), offload_to_cpu)
    return types.MethodType(_reducing_attention_forward, attn)


def _reducing_attention_forward(attn: Attention, x, size=None, need_cls_row=False):
    """LAVIS ``Attention`` via SDPA with the ``log size`` bias; returns ``(out, head-mean keys, cls row or None)``."""
    batch, tokens, channels = x.shape
    qkv = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, channels // attn.num_heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    dropout_p = attn.attn_drop.p if attn.training else 0.0
    out, cls_row = attention(q, k, v, attn.scale, proportional_bias(size), dropout_p, need_cls_row)
    out = attn.proj_drop(attn.proj(out.transpose(1, 2).reshape(batch, tokens, channels)))
    return out, k.mean(dim=1), cls_row


def _reducing_block_forward(block: Block, x, register_hook=False):
    """LAVIS ``Block`` with a merge between attention and MLP; ``register_hook`` (Grad-CAM) is accepted, unused."""
    state, index = block._lavis_accel_slot
    settings = state.settings
    if index == 0:
        state.start_forward(x.shape[1])
    size = state.size if settings.prop_attn else None
    scheduled_r = state.r_per_block[index]
    r = effective_r(x.shape[1], scheduled_r, settings.threshold)  # from the shape: no host sync
    out, metric, cls_row = block.attn(block.norm1(x), size, settings.alpha > 0 and r > 0)
    x = x + block.drop_path(out)
    if r > 0:
        merge = informativity_matching(
            metric, cls_row, r, settings.alpha, settings.beta, settings.gamma, state.merge_layer, class_token=True
        )
        x, state.size = merge_wavg(merge, x, state.size)
    if scheduled_r > 0:
        state.merge_layer += 1  # Turbo counts every block scheduled to merge, even one the threshold skips
    state.token_counts.append(x.shape[1])
    return x + block.drop_path(block.mlp(block.norm2(x)))
