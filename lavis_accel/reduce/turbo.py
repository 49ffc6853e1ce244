"""Turbo's informativity score: mutual redundancy minus semantic value, and the matching it drives.

For A token i and B token j: ``E_ij = cos(k_i, k_j) - alpha * 30 * beta ** |gamma - l| * a_cls[i]``, where
``a_cls`` is the head-averaged [CLS] attention row and ``l`` counts the merging layers already run in this
forward. The semantic term is constant along a row, so it changes only *which* A tokens merge (those the [CLS]
attends to are protected), never where they go. ``alpha = 0`` is exactly ToMe's bipartite soft matching.
"""
from typing import Optional

import torch

from lavis_accel.reduce.merge import Merge, bipartite_scores, bipartite_soft_matching

SEMANTIC_SCALE = 30.0  # the constant the Turbo reference multiplies the [CLS] attention by
ALPHA_TUNED_TOKENS = 577  # BLIP ViT-B/16 at 384 px, the token count Turbo's alpha was tuned for


def token_scaled_alpha(alpha: float, num_tokens: int) -> float:
    """``alpha * num_tokens / 577``: the semantic weight that keeps the [CLS] term's size relative to redundancy when
    a block has ``num_tokens`` tokens (its attention probabilities are about ``577 / num_tokens`` times ViT-B's)."""
    return alpha * num_tokens / ALPHA_TUNED_TOKENS


def semantic_weight(alpha: float, beta: float, gamma: float, layer: int) -> float:
    """Weight ``alpha * 30 * beta ** |gamma - layer|`` of the semantic term in merging layer ``layer``."""
    return alpha * SEMANTIC_SCALE * beta ** abs(gamma - layer)


def semantic_penalty(
    cls_row: Optional[torch.Tensor], alpha: float, beta: float, gamma: float, layer: int
) -> Optional[torch.Tensor]:
    """Per-A-row penalty ``[B, |A|]``: the weighted [CLS] attention of the even tokens; ``None`` when alpha is 0."""
    if alpha == 0:
        return None
    return semantic_weight(alpha, beta, gamma, layer) * cls_row[:, ::2]


def informativity_scores(
    metric: torch.Tensor,
    cls_row: Optional[torch.Tensor],
    alpha: float,
    beta: float = 1.0,
    gamma: float = 0.0,
    layer: int = 0,
    class_token: bool = True,
) -> torch.Tensor:
    """Turbo's score matrix ``E`` ``[B, |A|, |B|]`` (the [CLS] row is ``-inf``)."""
    return bipartite_scores(metric, class_token, semantic_penalty(cls_row, alpha, beta, gamma, layer))


def informativity_matching(
    metric: torch.Tensor,
    cls_row: Optional[torch.Tensor],
    r: int,
    alpha: float,
    beta: float = 1.0,
    gamma: float = 0.0,
    layer: int = 0,
    class_token: bool = True,
    threshold: int = 1,
) -> Optional[Merge]:
    """Bipartite soft matching on Turbo's ``E``: merge the ``r`` most redundant, least informative A tokens.

    Returns the merge closure, or ``None`` when nothing is merged (see ``merge.effective_r``).
    """
    with torch.no_grad():
        penalty = semantic_penalty(cls_row, alpha, beta, gamma, layer)
    return bipartite_soft_matching(metric, r, class_token, threshold, row_penalty=penalty)
