"""Binds token-reduction steps (``patch.steps``) to both towers of LAVIS's CLIP, per instance, removably.

LAVIS's CLIP (``lavis.models.clip_models.model.CLIP``, open_clip's design) runs the image tokens through
``visual.transformer.resblocks`` and the text tokens through ``transformer.resblocks``: ``ResidualAttentionBlock``s
working in the ``[L, N, D]`` layout, attention by ``nn.MultiheadAttention``. Only instance attributes change: every
block gets an instance-level ``forward`` (the step between the attention residual and the MLP, tokens handled
``[N, L, D]`` inside, so the block still takes and returns LAVIS's ``[L, N, D]``), ``visual`` gets a ``forward`` that
opens the image tower's forward, and the model gets an ``encode_text`` (below). Classes, parameters and state-dict
keys stay LAVIS's.

Attention is computed from ``attn.in_proj_weight``/``in_proj_bias`` and leaves through ``attn.out_proj``, by SDPA
unless the step asks for the probabilities (then eagerly, ``reduce.attention.eager_attention``) or for the
reference's op order (``reduce.attention.reference_order_attention``: CrossGET, whose merges hinge on last bits).

The text tower. Stock CLIP adds a fixed ``77 x 77`` causal mask and pools the token at ``text.argmax(-1)`` of the
token ids, the EOT's position before any pruning. Here:
- tokens after the EOT are padding: ``valid`` is False for them, the step neither scores nor keeps them as real
  tokens, and they are hidden as keys from every query. Index 0 ([SOT]) is the protected token and always real, so
  no row of the mask is empty.
- the causal mask is rebuilt for the current length at every block: a token sees itself and the tokens before it in
  the sequence. Kept tokens stay in their original order (``reduce.madtp.prune_and_fuse``), so no real token sees a
  later one; a fused token is appended last, as in the reference, so no real token sees it either.
- the EOT is never pruned or fused, and its index is tracked through pruning (``EotMadtpStep``); the patched
  ``encode_text`` pools the output at the tracked index. Padding never reaches a real token, so the EOT output does
  not depend on the padding length, and at ``temperature = 0`` it is stock CLIP's.
The reference (double125/MADTP ``clip/model.py``) instead guards text pruning with ``K <= max EOT index + 2``,
truncates the fixed causal mask to the new length (its kept tokens are out of order) and still pools at
``text.argmax(-1)``. ``encode_text`` is replaced whole because the stock one reads that index inline.
"""
import types
from typing import Dict, List, NamedTuple, Optional

import torch
from lavis.models.clip_models.model import CLIP, VisualTransformer
from torch import nn

from lavis_accel.errors import SettingError
from lavis_accel.patch.instance_patches import InstancePatches
from lavis_accel.patch.steps import AttentionNeeds, AttentionSeen, MadtpControl, MadtpStep
from lavis_accel.reduce import madtp
from lavis_accel.reduce.attention import attention, eager_attention, reference_order_attention

STATE_ATTR = "_lavis_accel"
SLOT_ATTR = "_lavis_accel_slot"
IMAGE_QUERIES_ATTR = "madtp_image_queries"  # per-block Linear(width -> codebook width) of a model that owns them
TEXT_QUERIES_ATTR = "madtp_text_queries"
CODE_WIDTH = 768  # MADTP's codebook width (``sd_dim``) for CLIP
VISION_NO_PRUNE_UP_TO = 1  # MADTP's CLIP vision guard: a block keeping at most one token prunes nothing


class TowerState:
    """One tower's step and its current forward: the real-token mask (text), token counts.

    ``token_counts``: entry 0 enters block 0, entry ``i + 1`` leaves block ``i``'s reduction (ints from shapes).
    """

    def __init__(self, step, causal: bool):
        self.step = step
        self.causal = causal
        self.valid = None
        self.token_counts = []

    def begin(self):
        self.step.start_forward()
        self.valid = None
        self.token_counts = []


class ClipReductionState:
    """The two towers' states of one patched CLIP and the instance attributes the patch replaced."""

    def __init__(self, image: TowerState, text: TowerState):
        self.image, self.text = image, text
        self.patches = InstancePatches()


class ClipSteps(NamedTuple):
    """The steps of a patched CLIP's two towers."""

    image: object
    text: object


class EotMadtpStep(MadtpStep):
    """MADTP in CLIP's text tower: as ``MadtpStep``, with the EOT never pruned nor fused and its index tracked.

    ``start_text`` sets ``eot`` (``[B]`` indices into the sequence, [SOT] at 0) and hides the padding after it;
    ``reduce`` keeps ``eot`` pointing at the EOT. The batch-wide K is the reference's count of tokens above the threshold; the EOT
    ranks first, so it always holds one of the K places (when it is not above the threshold itself, the weakest
    token that is goes into the fused token instead). In CLIP's causal text the [SOT] row attends to itself only,
    so ``I_cls`` is 0, as in the reference.
    """

    def start_forward(self):
        super().start_forward()
        self.eot = None

    def start_text(self, text: torch.Tensor) -> torch.Tensor:
        """Take the token ids ``[B, L]`` of the forward; the real-token mask (up to the EOT) the tower applies."""
        self.eot = text.argmax(dim=-1)
        return torch.arange(text.shape[1], device=text.device) <= self.eot[:, None]

    def reduce(self, index: int, x: torch.Tensor, seen: AttentionSeen, valid=None):
        temperature = self.control.temperature
        if temperature <= 0:
            return x, valid
        body, body_valid = x[:, 1:], valid[:, 1:]
        importance = self.importance(seen, body_valid)
        counts = madtp.keep_counts(importance, self._similarity, temperature, body_valid)
        k = madtp.batch_keep(counts, body.shape[1], self.no_prune_up_to)
        if k == 0:
            return x, valid
        is_eot = torch.arange(body.shape[1], device=x.device) == (self.eot - 1)[:, None]
        ranking = importance.masked_fill(is_eot, float("inf"))
        kept_body, kept_valid = madtp.prune_and_fuse(body, ranking, k, body_valid)
        # where the EOT went: the same ranking keeps the same tokens, so a one-hot EOT marker lands in its place
        marker, _ = madtp.prune_and_fuse(is_eot[:, :, None].to(x.dtype), ranking, k, body_valid)
        self.eot = marker[:, :k, 0].argmax(dim=1) + 1
        return torch.cat([x[:, :1], kept_body], dim=1), torch.cat([valid[:, :1], kept_valid], dim=1)


# --- apply / remove -------------------------------------------------------------------------------------------------

def is_clip(model) -> bool:
    return isinstance(model, CLIP)


def apply_steps(model, image_step, text_step):
    """Patch both towers of ``model`` (a LAVIS CLIP with a ViT image tower) with the steps; return ``model``.

    ``text_step`` must track the EOT (``start_text``, ``eot``) like ``EotMadtpStep``. Applying again only replaces
    the steps.
    """
    check_clip(model)
    if not hasattr(text_step, "start_text"):
        raise SettingError(f"step {type(text_step).__name__} does not track the EOT: it cannot reduce CLIP's text")
    state = getattr(model, STATE_ATTR, None)
    if state is not None:
        state.image.step, state.text.step = image_step, text_step
        return model
    state = ClipReductionState(TowerState(image_step, causal=False), TowerState(text_step, causal=True))
    for tower, blocks in ((state.image, model.visual.transformer.resblocks), (state.text, model.transformer.resblocks)):
        for index, block in enumerate(blocks):
            setattr(block, SLOT_ATTR, (tower, index))
            state.patches.set(block, "forward", types.MethodType(_reducing_block_forward, block))
    state.patches.set(model.visual, "forward", types.MethodType(_opening_visual_forward, model.visual))
    state.patches.set(model, "encode_text", types.MethodType(_encode_text_at_tracked_eot, model))
    setattr(model.visual, SLOT_ATTR, state)
    setattr(model, STATE_ATTR, state)
    return model


def remove(model):
    """Undo ``apply_steps``: every patched attribute restored; an unpatched ``model`` is returned as is."""
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        return model
    state.patches.restore()
    for module in (model.visual, *model.visual.transformer.resblocks, *model.transformer.resblocks):
        delattr(module, SLOT_ATTR)
    delattr(model, STATE_ATTR)
    return model


def is_patched(model) -> bool:
    return getattr(model, STATE_ATTR, None) is not None


def current_steps(model) -> Optional[ClipSteps]:
    """The (image, text) steps a patched CLIP runs, or ``None``."""
    state = getattr(model, STATE_ATTR, None)
    return None if state is None else ClipSteps(state.image.step, state.text.step)


def token_counts(model) -> Dict[str, List[int]]:
    """Each tower's token counts of its last forward (see ``TowerState``): ``{"image": [...], "text": [...]}``."""
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        raise SettingError(f"{type(model).__name__} has no token reducer applied")
    return {"image": list(state.image.token_counts), "text": list(state.text.token_counts)}


def check_clip(model):
    if not is_clip(model):
        raise SettingError(f"{type(model).__name__} is not a LAVIS CLIP (lavis.models.clip_models.model.CLIP)")
    if not isinstance(model.visual, VisualTransformer):
        raise SettingError(f"CLIP image tower {type(model.visual).__name__} has no transformer blocks to reduce: "
                           "only ViT CLIP types are supported")



# --- MADTP's steps for CLIP -----------------------------------------------------------------------------------------

def code_width(model, codebook=None) -> int:
    """The codebook width MADTP needs on ``model``: its own projections' output width; without projections, the
    given codebook's (fresh projections map to any width), else MADTP's 768."""
    own = getattr(model, IMAGE_QUERIES_ATTR, None)
    if own is not None:
        return own[0].out_features
    if isinstance(codebook, torch.Tensor) and codebook.dim() == 2:
        return codebook.shape[1]
    return CODE_WIDTH


def apply_madtp(model, control: MadtpControl):
    """Patch both towers with MADTP's steps sharing ``control``; return ``model``.

    Each block maps its tokens to the codebook width with its own ``Linear(width -> codebook width)`` first, as
    MADTP's CLIP does: the model's ``madtp_image_queries``/``madtp_text_queries`` (``clip_madtp`` owns and trains
    them), else fresh ones, randomly initialised like ``nn.Linear`` on the model's device and dtype. Fresh
    projections are held by the steps (as a random codebook is held by the control): they are not the model's
    parameters, so they are neither trained nor saved, are drawn anew by every apply and go away with ``remove``.
    The image tower keeps MADTP's CLIP guard (``K <= 1``: no pruning).
    """
    check_clip(model)
    width = control.codebook.shape[1]
    image_queries = _queries(model, IMAGE_QUERIES_ATTR, model.visual.transformer, width)
    text_queries = _queries(model, TEXT_QUERIES_ATTR, model.transformer, width)
    image_step = MadtpStep(control, list(image_queries), no_prune_up_to=VISION_NO_PRUNE_UP_TO)
    return apply_steps(model, image_step, EotMadtpStep(control, list(text_queries)))


def _queries(model, attr: str, transformer, width: int) -> nn.ModuleList:
    own = getattr(model, attr, None)
    if own is not None:
        if len(own) != len(transformer.resblocks):
            raise SettingError(f"model.{attr} has {len(own)} projections for {len(transformer.resblocks)} blocks")
        return own
    reference = transformer.resblocks[0].attn.in_proj_weight
    return nn.ModuleList(
        nn.Linear(transformer.width, width, device=reference.device, dtype=reference.dtype)
        for _ in transformer.resblocks
    )


# --- the patched forwards -------------------------------------------------------------------------------------------

def _opening_visual_forward(visual, image):
    """LAVIS's ``VisualTransformer.forward``, opening the image tower's forward first."""
    state: ClipReductionState = getattr(visual, SLOT_ATTR)
    state.image.begin()
    return state.patches.original(visual, "forward")(image)


def _encode_text_at_tracked_eot(model, text):
    """CLIP's text features, pooled at the EOT's tracked index (see the module docstring)."""
    state: ClipReductionState = getattr(model, STATE_ATTR)
    tower = state.text
    tower.begin()
    tower.valid = tower.step.start_text(text)
    x = model.token_embedding(text) + model.positional_embedding
    x = model.transformer(x.transpose(0, 1)).transpose(0, 1)
    x = model.ln_final(x)
    return x[torch.arange(x.shape[0], device=x.device), tower.step.eot] @ model.text_projection


def _reducing_block_forward(block, x, attn_mask=None):
    """LAVIS's ``ResidualAttentionBlock`` (``[L, N, D]`` in and out) with the step between attention and MLP.

    ``attn_mask`` (the stock fixed causal mask) is not used: the text tower's mask is rebuilt for the current
    length from ``causal`` and the real tokens.
    """
    tower, index = getattr(block, SLOT_ATTR)
    x = x.transpose(0, 1)
    step = tower.step
    x, tower.valid = step.enter(index, x, tower.valid)
    if index == 0:
        tower.token_counts.append(x.shape[1])
    needs: AttentionNeeds = step.needs(index, x, tower.valid)
    bias = _tower_bias(tower, x)
    if needs.bias is not None:
        bias = needs.bias if bias is None else bias + needs.bias
    out, seen = _attention(block.attn, block.ln_1(x), bias, needs)
    x = x + out
    x, tower.valid = step.reduce(index, x, seen, tower.valid)
    tower.token_counts.append(x.shape[1])
    x = x + block.mlp(block.ln_2(x))
    return x.transpose(0, 1)


def _tower_bias(tower: TowerState, x: torch.Tensor) -> Optional[torch.Tensor]:
    """The additive attention mask ``[B, 1, T, T]`` of a text tower (causal, padding keys hidden), else ``None``."""
    if not tower.causal:
        return None
    length = x.shape[1]
    allowed = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
    if tower.valid is not None:
        allowed = allowed & tower.valid[:, None, None, :]
    return torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill(~allowed, float("-inf"))


def _attention(attn: nn.MultiheadAttention, x: torch.Tensor, bias, needs: AttentionNeeds):
    """``attn`` (batch-first ``[B, T, C]`` tokens) with the additive ``bias``, plus what the step asked for.

    Returns ``(out [B, T, C], AttentionSeen)``.
    """
    batch, tokens, channels = x.shape
    heads = attn.num_heads
    qkv = nn.functional.linear(x, attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.reshape(batch, tokens, 3, heads, channels // heads).permute(2, 0, 3, 1, 4).unbind(0)
    scale = (channels // heads) ** -0.5
    dropout_p = attn.dropout if attn.training else 0.0
    queries = keys = None
    if needs.projections:
        queries, keys = (qkv[:, :, i * channels:(i + 1) * channels] for i in (0, 1))
    if needs.reference_order:
        out = reference_order_attention(q, k, v, bias, dropout_p)
        seen = AttentionSeen(k.mean(dim=1), queries=queries, projected_keys=keys)
    elif needs.probs:
        out, probs, cls_probs = eager_attention(q, k, v, scale, bias, dropout_p)
        seen = AttentionSeen(k.mean(dim=1), None, probs, cls_probs, out, queries, keys)
    else:
        out, cls_row = attention(q, k, v, scale, bias, dropout_p, needs.cls_row)
        seen = AttentionSeen(k.mean(dim=1), cls_row, queries=queries, projected_keys=keys)
    return attn.out_proj(out.transpose(1, 2).reshape(batch, tokens, channels)), seen
