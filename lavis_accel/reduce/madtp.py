"""MADTP's maths in plain torch: codebook queries, token importance, the dynamic threshold, keep-top-K-and-fuse.

MADTP (Cao et al., CVPR 2024) scores the non-[CLS] tokens of every layer with three normalised importances and
prunes those below a per-sample threshold set by a learnable codebook ``C [M, D]`` shared by the two towers and a
temperature ``tau``. Shapes: tokens ``[B, N, C]`` *without* the protected first token ([CLS] / [ENC]), codebook
``[M, D]``. ``valid`` (``[B, N]`` bool, text only) marks real tokens; ``None`` means all are real.

Differences from the reference code (double125/MADTP), each a bug there:
- padding: the reference scores padded text tokens (codebook similarity, self-attention from padded queries), pools
  them into the code features and can keep them instead of real words. Here padded tokens get no importance, no
  pooling weight, are never counted as kept, rank last and are never fused (a fused token of padding only is masked).
- the text layers of the reference keep the first K of an unsorted top-(K+1); the vision ones the top K. Both keep
  the top K here. Kept tokens stay in their original order (the reference's order is ``topk(sorted=False)``'s).
- ``token_attn /= temperature`` there is in place; everything here is out of place.
With all tokens real, vision and text follow the reference's formulas exactly (compared in float64 in the tests).
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

EPS = 1e-8  # the reference's guard in every normalisation


def code_similarity(tokens: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """``G = X C^T`` ``[B, N, M]``: raw (unscaled) inner products of each token with each code."""
    return tokens @ codebook.to(tokens.dtype).t()


def pooled_features(
    tokens: torch.Tensor, similarity: torch.Tensor, code_width: int, valid: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``F_m = sum_n softmax_n(G_nm / sqrt(code_width)) X_n`` ``[B, M, C]``: the tokens pooled by each code."""
    logits = similarity.transpose(1, 2) / math.sqrt(code_width)
    if valid is not None:
        logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
    return logits.softmax(dim=-1) @ tokens


def _normalised(scores: torch.Tensor) -> torch.Tensor:
    return scores / (scores.sum(dim=1, keepdim=True) + EPS)


def self_attention_importance(probs: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``I_self`` ``[B, N]``: attention each token receives from the others (max over heads, summed over queries).

    ``probs`` ``[B, H, 1 + N, 1 + N]`` are the layer's self-attention probabilities; row and column 0 are left out.
    """
    received = probs[:, :, 1:, 1:].amax(dim=1)
    if valid is not None:
        received = received * valid[:, :, None].to(received.dtype)
    return _normalised(received.sum(dim=1))


def code_importance(similarity: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``I_code`` ``[B, N]``: each token's best code similarity, normalised over the tokens."""
    best = similarity.amax(dim=2)
    if valid is not None:
        best = best * valid.to(best.dtype)
    return _normalised(best)


def cls_importance(cls_probs: torch.Tensor, head_output_norms: torch.Tensor) -> torch.Tensor:
    """``I_cls`` ``[B, N]``: [CLS] attention weighted per head by the head's share of each token's output (AS-ViT).

    ``cls_probs`` ``[B, H, N]``: row 0 of the attention probabilities without column 0; ``head_output_norms``
    ``[B, H, N]``: the norm of each head's attention output at each token.
    """
    head_share = head_output_norms / (head_output_norms.sum(dim=1, keepdim=True) + EPS)
    return (cls_probs * head_share).sum(dim=1)


def token_importance(
    self_importance: torch.Tensor, code_imp: torch.Tensor, cls_imp: torch.Tensor,
    valid: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``I = (I_self + I_code + I_cls) / 3``; padded tokens get 0."""
    importance = (self_importance + code_imp + cls_imp) / 3.0
    return importance if valid is None else importance * valid.to(importance.dtype)


def keep_counts(
    importance: torch.Tensor, similarity: torch.Tensor, temperature: float, valid: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Per-sample count ``[B]`` of tokens above the dynamic threshold.

    Each code m sees the importance ``score_m = sum_n softmax_n(G_nm / tau) I_n``; the threshold is the smallest
    ``score_m`` and a token is kept when ``I_n > threshold``. A larger ``tau`` flattens the softmax toward the mean
    importance, so fewer tokens pass.
    """
    logits = similarity / temperature
    if valid is not None:
        logits = logits.masked_fill(~valid[:, :, None], float("-inf"))
    code_scores = logits.softmax(dim=1).transpose(1, 2) @ importance.unsqueeze(-1)  # [B, M, 1]
    threshold = code_scores.amin(dim=1)  # [B, 1]
    above = importance > threshold
    if valid is not None:
        above = above & valid
    return above.sum(dim=1)


def batch_keep(counts: torch.Tensor, num_tokens: int, no_prune_up_to: int = 0) -> int:
    """The batch-wide K (the largest per-sample count) as a shape: the layer's one host synchronisation.

    Returns 0 when the layer must stay unchanged, as in the reference: ``K <= no_prune_up_to`` (0 in BLIP, so only
    K = 0; the CLIP port uses 1 for vision) or fewer than two tokens to fuse (``N - K <= 1``).
    """
    k = int(counts.max())
    if k <= no_prune_up_to or num_tokens - k <= 1:
        return 0
    return k


def prune_and_fuse(
    tokens: torch.Tensor, importance: torch.Tensor, k: int, valid: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Keep the ``k`` most important tokens (in their original order) and fuse the rest into one last token.

    The fused token is the importance-weighted mean of the dropped tokens (weights renormalised over them).
    Returns ``(tokens [B, k + 1, C], valid [B, k + 1] or None)``; with padding, the fused token is valid when it
    holds at least one real token, and padded tokens never enter it.
    """
    batch, num_tokens, channels = tokens.shape
    ranking = importance if valid is None else importance.masked_fill(~valid, float("-inf"))
    weights, order = ranking.topk(num_tokens, dim=1, largest=True, sorted=True)
    kept = order[:, :k].sort(dim=1).values
    kept_tokens = tokens.gather(1, kept[:, :, None].expand(batch, k, channels))
    dropped = order[:, k:]
    dropped_weights = weights[:, k:]
    if valid is not None:
        dropped_weights = dropped_weights.masked_fill(dropped_weights == float("-inf"), 0.0)
    dropped_weights = _normalised(dropped_weights)
    dropped_tokens = tokens.gather(1, dropped[:, :, None].expand(batch, num_tokens - k, channels))
    fused = dropped_weights.unsqueeze(1) @ dropped_tokens
    new_tokens = torch.cat([kept_tokens, fused], dim=1)
    if valid is None:
        return new_tokens, None
    fused_valid = valid.gather(1, dropped).any(dim=1, keepdim=True)
    return new_tokens, torch.cat([valid.gather(1, kept), fused_valid], dim=1)


def alignment_loss(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """MADTP's ``loss_fdt``: mean ``1 - cos`` between the image and text code-pooled features ``[B, M, C]``.

    The reference's ``CosineEmbeddingLoss`` with target 1 on L2-normalised rows.
    """
    image_rows, text_rows = F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1)
    return (1.0 - (image_rows * text_rows).sum(dim=-1)).mean()
