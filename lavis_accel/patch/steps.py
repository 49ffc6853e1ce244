"""What each token-reduction method does inside a block, between the attention residual and the MLP.

One patched block forward (per module family: BLIP ViT, ``med`` BERT, CLIP) serves every method:

    x, valid = step.enter(index, x, valid)       # a method's extra token (CrossGET's cross token), else as is
    needs = step.needs(index, x, valid)          # what attention must hand over (and the bias it must add)
    seen = <attention computing only that>        # AttentionSeen
    x = x + attention output
    x, valid = step.reduce(index, x, seen, valid)
    x = x + MLP(x)

``x`` is ``[B, T, C]`` with the protected token ([CLS] / [ENC]) at 0; ``valid`` is the ``[B, T]`` bool mask of
real (unpadded) tokens of a text tower, ``None`` for images. A step object belongs to one patched module and keeps
that module's per-forward state; ``start_forward`` resets it at block 0.
"""
from typing import List, NamedTuple, Optional

import torch

from lavis_accel.reduce import madtp
from lavis_accel.reduce.merge import effective_r, merge_wavg, parse_r, proportional_bias, token_schedule
from lavis_accel.reduce.settings import ReducerSettings
from lavis_accel.reduce.turbo import informativity_matching, token_scaled_alpha


class AttentionNeeds(NamedTuple):
    """What a step asks of the block's attention. Nothing beyond it is computed (full probabilities cost an eager
    attention: only ``probs=True`` pays it)."""

    bias: Optional[torch.Tensor] = None  # additive logits bias broadcasting to [B, H, T, T] (proportional attention)
    cls_row: bool = False  # head-mean [CLS] probabilities [B, T] (Turbo)
    probs: bool = False  # full probabilities, the [CLS] row per head and per-head outputs (MADTP)
    projections: bool = False  # the projected queries and keys, heads concatenated (CrossGET)
    reference_order: bool = False  # eager attention in the reference's op order, bit for bit (CrossGET on CLIP)


class AttentionSeen(NamedTuple):
    """What the attention hands to the step; fields not asked for are ``None``."""

    keys: torch.Tensor  # head-mean keys [B, T, C / H] (ToMe's matching metric)
    cls_row: Optional[torch.Tensor] = None  # [B, T]
    probs: Optional[torch.Tensor] = None  # [B, H, T, T], before dropout
    cls_probs: Optional[torch.Tensor] = None  # [B, H, T], [CLS] row after dropout
    head_outputs: Optional[torch.Tensor] = None  # [B, H, T, D], per-head attention outputs before the projection
    queries: Optional[torch.Tensor] = None  # [B, T, C], projected queries (with bias, unscaled), heads concatenated
    projected_keys: Optional[torch.Tensor] = None  # [B, T, C], projected keys, heads concatenated


class ReductionStep:
    """The hooks every step has; a method overrides what it uses. ``text_modes``: the ``med`` BERT passes the step
    reduces (``None``: all of them; BLIP's ``mode`` argument: ``"text"``, ``"multimodal"``, ``"fusion"``)."""

    text_modes: Optional[tuple] = None

    def start_forward(self):
        """A new forward of the tower begins (before block 0)."""

    def enter(self, index: int, x: torch.Tensor, valid=None):
        """Before block ``index``'s attention: the tokens (and text mask) the block runs on."""
        return x, valid


class MergingStep(ReductionStep):
    """ToMe / Turbo: merge ``r`` tokens per block by (informativity-driven) bipartite matching, sizes, log-size bias."""

    def __init__(self, settings: ReducerSettings, depth: int):
        self.settings = settings
        self.r_per_block = parse_r(depth, settings.r)
        self.start_forward()

    def start_forward(self):
        self.size = None
        self.merge_layer = 0
        self._r = 0

    def needs(self, index: int, x: torch.Tensor, valid=None) -> AttentionNeeds:
        settings = self.settings
        self._r = effective_r(x.shape[1], self.r_per_block[index], settings.threshold)  # from the shape: no sync
        bias = proportional_bias(self.size) if settings.prop_attn else None
        return AttentionNeeds(bias=bias, cls_row=settings.alpha > 0 and self._r > 0)

    def reduce(self, index: int, x: torch.Tensor, seen: AttentionSeen, valid=None):
        settings = self.settings
        if self._r > 0:
            alpha = token_scaled_alpha(settings.alpha, x.shape[1]) if settings.scale_alpha else settings.alpha
            merge = informativity_matching(
                seen.keys, seen.cls_row, self._r, alpha, settings.beta, settings.gamma, self.merge_layer,
                class_token=True,
            )
            x, self.size = merge_wavg(merge, x, self.size)
        if self.r_per_block[index] > 0:
            self.merge_layer += 1  # Turbo counts every block scheduled to merge, even one the threshold skips
        return x, valid

    def describe(self, num_tokens: int) -> str:
        s = self.settings
        counts = token_schedule(num_tokens, self.r_per_block, s.threshold)
        scaled = ", alpha scaled to the token count" if s.scale_alpha else ""
        return (f"{s.name} (r={s.r}, alpha={s.alpha:g}{scaled}, threshold={s.threshold}) keeps ViT tokens "
                + " -> ".join(map(str, counts)))


class MadtpControl:
    """What the MADTP steps of one model share: the codebook (a parameter when the model owns one) and ``tau``.

    ``temperature`` is a Python float, read by the steps without a host synchronisation; ``tau = 0`` prunes
    nothing (the code features are still pooled, for the alignment loss).
    """

    def __init__(self, codebook: torch.Tensor, temperature: float):
        self.codebook = codebook
        self.temperature = float(temperature)


class MadtpStep(ReductionStep):
    """MADTP in one tower: codebook similarity of the block input, the three importances, keep top-K + fuse.

    ``projections`` (CLIP) maps block ``i``'s tokens to the codebook width first; BLIP uses none. The code-pooled
    features of every block are summed into ``pooled`` (``[B, M, C]``, reset each forward), the tower's input to
    the alignment loss. ``no_prune_up_to``: a block keeps all tokens when the batch-wide K is at most this.
    """

    def __init__(self, control: MadtpControl, projections: Optional[List[torch.nn.Module]] = None,
                 no_prune_up_to: int = 0):
        self.control = control
        self.projections = projections
        self.no_prune_up_to = no_prune_up_to
        self.start_forward()

    def start_forward(self):
        self.pooled = None
        self._similarity = None

    def needs(self, index: int, x: torch.Tensor, valid=None) -> AttentionNeeds:
        tokens = x[:, 1:]
        queries = tokens if self.projections is None else self.projections[index](tokens)
        codebook = self.control.codebook
        self._similarity = madtp.code_similarity(queries, codebook)
        body_valid = None if valid is None else valid[:, 1:]
        pooled = madtp.pooled_features(queries, self._similarity, codebook.shape[1], body_valid)
        self.pooled = pooled if self.pooled is None else self.pooled + pooled
        return AttentionNeeds(probs=self.control.temperature > 0)

    def reduce(self, index: int, x: torch.Tensor, seen: AttentionSeen, valid=None):
        temperature = self.control.temperature
        if temperature <= 0:
            return x, valid
        body, body_valid = x[:, 1:], (None if valid is None else valid[:, 1:])
        importance = self.importance(seen, body_valid)
        counts = madtp.keep_counts(importance, self._similarity, temperature, body_valid)
        k = madtp.batch_keep(counts, body.shape[1], self.no_prune_up_to)
        if k == 0:
            return x, valid
        body, body_valid = madtp.prune_and_fuse(body, importance, k, body_valid)
        x = torch.cat([x[:, :1], body], dim=1)
        if valid is not None:
            valid = torch.cat([valid[:, :1], body_valid], dim=1)
        return x, valid

    def importance(self, seen: AttentionSeen, body_valid=None) -> torch.Tensor:
        """MADTP's importance ``[B, N]`` of the tokens after the protected one, from this block's attention and the
        codebook similarity of its input."""
        head_norms = seen.head_outputs[:, :, 1:].norm(dim=-1)
        return madtp.token_importance(
            madtp.self_attention_importance(seen.probs, body_valid),
            madtp.code_importance(self._similarity, body_valid),
            madtp.cls_importance(seen.cls_probs[:, :, 1:], head_norms),
            body_valid,
        )

    def describe(self, num_tokens: int) -> str:
        control = self.control
        return (f"madtp (temperature={control.temperature:g}, codebook {tuple(control.codebook.shape)}) keeps a "
                "number of tokens per block set by the inputs")

