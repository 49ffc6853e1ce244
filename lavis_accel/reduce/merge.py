"""ToMe's primitives: per-layer schedules, bipartite soft matching, size-weighted merging, proportional attention.

Tokens are ``[B, T, C]`` with the [CLS] token (if any) at index 0. Matching splits them by index parity into
A (even) and B (odd), merges the ``r`` A tokens most similar to some B token into it, and returns the tokens as
``[unmerged A (in original order), all B]``, so [CLS] stays at index 0. A token's *size* is how many original tokens
it stands for; merges are size-weighted averages and sizes add up.
"""
import math
from typing import Callable, List, Optional, Sequence

import torch

from lavis_accel.errors import SettingError

Merge = Callable[[torch.Tensor], torch.Tensor]


def parse_r(num_layers: int, r) -> List[int]:
    """Per-layer merge counts from ToMe's schedule forms.

    An int is constant; ``(r, inflection)`` ramps linearly from ``int(r * (1 - inflection))`` to ``2r`` minus that
    (``(r, -1)`` is ToMe's decreasing schedule); a list is explicit and zero-padded to ``num_layers``.
    Negative ramp values (``inflection > 1``) merge nothing and become 0.
    """
    if isinstance(r, list):
        if len(r) > num_layers:
            raise SettingError(f"reducer setting 'r' lists {len(r)} layers but the model has {num_layers}")
        return list(r) + [0] * (num_layers - len(r))
    inflection = 0.0
    if isinstance(r, tuple):
        r, inflection = r
    first = int(r * (1.0 - inflection))
    last = 2 * r - first
    step = (last - first) / (num_layers - 1) if num_layers > 1 else 0.0
    return [max(0, int(first + step * layer)) for layer in range(num_layers)]


def effective_r(num_tokens: int, r: int, threshold: int = 1, class_token: bool = True) -> int:
    """How many tokens a block really merges: ``r`` clamped to the bipartite limit, 0 below the threshold.

    The limit is half the unprotected tokens, ``(t - [CLS]) // 2``; Turbo skips the merge when ``t < threshold``.
    """
    if num_tokens < threshold:
        return 0
    return max(0, min(r, (num_tokens - int(class_token)) // 2))


def token_schedule(num_tokens: int, r_list: Sequence[int], threshold: int = 1, class_token: bool = True) -> List[int]:
    """Token counts through the blocks: entry 0 enters block 0, entry ``i + 1`` leaves block ``i``'s merge.

    Block ``i`` runs attention on entry ``i`` tokens and its MLP on entry ``i + 1`` (the merge sits between them).
    """
    counts = [num_tokens]
    for r in r_list:
        counts.append(counts[-1] - effective_r(counts[-1], r, threshold, class_token))
    return counts


def bipartite_scores(
    metric: torch.Tensor, class_token: bool = True, row_penalty: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Cosine similarity ``[B, |A|, |B|]`` of A (even) to B (odd) tokens, minus an optional per-A-row penalty.

    Scores are computed in float32 at least: in bf16 (8 significant bits) near-equal similarities tie or swap, and
    the merge decisions would depend on the model's precision.

    The [CLS] row is ``-inf`` so [CLS] is never chosen to merge. ``row_penalty`` is ``[B, |A|]``.
    """
    metric = at_least_float32(metric)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    scores = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)
    if row_penalty is not None:
        scores = scores - row_penalty[..., None].to(scores.dtype)
    if class_token:
        scores[:, 0, :] = -math.inf
    return scores


def bipartite_soft_matching(
    metric: torch.Tensor,
    r: int,
    class_token: bool = True,
    threshold: int = 1,
    row_penalty: Optional[torch.Tensor] = None,
) -> Optional[Merge]:
    """Match A tokens to B tokens on ``metric`` ``[B, T, C]`` and return the merge that folds the best ``r`` in.

    Each A token's destination is its best-scoring B token; the ``r`` A tokens with the highest best score are
    merged, the rest kept in their original order. Returns ``None`` when nothing is merged (``effective_r`` is 0).
    The returned ``merge(x)`` maps ``[B, T, C]`` to ``[B, T - r, C]``, adding each merged A token into its
    destination. Matching runs without grad; gradients flow through ``merge``.
    """
    r = effective_r(metric.shape[1], r, threshold, class_token)
    if r == 0:
        return None
    with torch.no_grad():
        best_score, best_b = bipartite_scores(metric, class_token, row_penalty).max(dim=-1)
        order = best_score.argsort(dim=-1, descending=True)[..., None]
        kept_a = order[:, r:].sort(dim=1).values
        merged_a = order[:, :r]
        destination = best_b[..., None].gather(dim=1, index=merged_a)

    def merge(x: torch.Tensor) -> torch.Tensor:
        a, b = x[:, ::2], x[:, 1::2]
        channels = x.shape[-1]
        kept = a.gather(dim=1, index=kept_a.expand(-1, -1, channels))
        sources = a.gather(dim=1, index=merged_a.expand(-1, -1, channels))
        b = b.scatter_reduce(1, destination.expand(-1, -1, channels), sources, reduce="sum")
        return torch.cat([kept, b], dim=1)

    return merge


def at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself in float32 or float64, else cast to float32 (bf16 and fp16 models)."""
    return tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()


def merge_wavg(merge: Merge, x: torch.Tensor, size: Optional[torch.Tensor] = None):
    """Size-weighted average merge: returns ``(x', size')`` with ``x' = merge(x * s) / merge(s)``, ``size' = merge(s)``.

    ``size`` is ``[B, T, 1]``; ``None`` means every token stands for one original token. Sizes are kept in float32
    at least (bf16 holds integers exactly only up to 256) and the average is taken in their precision; ``x'`` has
    ``x``'s dtype.
    """
    if size is None:
        size = at_least_float32(torch.ones_like(x[..., :1]))
    merged_size = merge(size)
    return (merge(x * size) / merged_size).to(x.dtype), merged_size


def proportional_bias(size: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Additive attention bias ``[B, 1, 1, T]`` of proportional attention: ``log(size)`` of each key token."""
    if size is None:
        return None
    return size.log()[:, None, None, :, 0]
