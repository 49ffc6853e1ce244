"""CrossGET's primitives: complete-graph soft matching guided by a cross token, importance-weighted ensembling, and
the JS-style loss between the two towers' cross tokens (arXiv 2305.17455; sdc17/CrossGET ``CLIP/clip``).

Tokens are ``[B, T, C]`` with the protected [CLS] (or [SOT]) at index 0 and the tower's *cross token* last; a text
tower also protects its EOT. Matching works on the projected keys (heads concatenated): importance is each key's
cosine to the cross (or EOT) query; similarity is the full ``T x T`` key cosine matrix, not a bipartite one. The
``r`` tokens whose importance minus best available similarity is lowest are ensembled into their most similar
remaining token; the remaining tokens keep their original order. A token's *size* is how many original tokens it
stands for; proportional attention adds ``log size`` to the logits (``merge.proportional_bias``).
"""
import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from lavis_accel.reduce.merge import at_least_float32


class Matching(NamedTuple):
    """Which tokens merge where, from ``complete_graph_matching``; indices ``[B, n, 1]``.

    ``sources``: the ``r`` merged tokens; ``destinations``: all other tokens, in priority order (not sorted);
    ``picks``: for each source, the index *into* ``destinations`` of the token it joins; ``weights``: ``[B, r, 2]``,
    each pair's ensemble weights (source, destination), summing to 1.
    """

    sources: torch.Tensor
    destinations: torch.Tensor
    picks: torch.Tensor
    weights: torch.Tensor


def effective_r(num_tokens: int, r: int, tracks_eot: bool = False, sided: bool = False) -> int:
    """How many tokens a block merges: ``r`` clamped to half the unprotected tokens.

    Protected are index 0 and the cross token, and the EOT of a text tower: ``min(r, (t - protected) // 2)``.
    ``sided``: matching keeps two sides apart (``complete_graph_matching``'s ``side``); the last-ranked token of each
    side then has no partner and can never be a source, so at most ``t - protected - 2`` tokens can (without this
    limit, at ``t = protected + 2`` a merge would be forced on a token with no partner, even a protected one).
    """
    protected = 3 if tracks_eot else 2
    limit = (num_tokens - protected) // 2
    if sided:
        limit = min(limit, num_tokens - protected - 2)
    return max(0, min(r, limit))


def token_schedule(num_tokens: int, r: int, depth: int, tracks_eot: bool = False, sided: bool = False):
    """Token counts through ``depth`` blocks merging ``r`` each: entry 0 enters block 0, entry ``i + 1`` leaves
    block ``i``'s merge (the cross token included)."""
    counts = [num_tokens]
    for _ in range(depth):
        counts.append(counts[-1] - effective_r(counts[-1], r, tracks_eot, sided))
    return counts


def ordering_mask(similarity: torch.Tensor) -> torch.Tensor:
    """The complete graph's ordering constraint: ``0`` where token ``i`` may pair with token ``j``, else ``-inf``.

    Tokens are ranked by their best similarity, descending; the token at rank ``a`` may only pair with tokens ranked
    after it, so no chain or cycle of merges can form. The ranking is ``argsort(dim=1, descending=True)`` of the
    ``[B, T, 1]`` best similarities, the reference's very call. The two tokens of a mutual best pair have the same
    best similarity in exact arithmetic; in floating point ``metric @ metric.T`` is not bitwise symmetric, so the
    pair either ties exactly (torch's default sort then breaks the tie in its own order, which a stable sort would
    not reproduce: on CPU it differs from about 200 tokens on) or is ordered by the last bit of rounding. Either
    way the order, and with it which token of the pair may become a source, follows the reference only on
    bitwise-equal keys: keys that differ by rounding (another attention kernel, device or batch) can merge other
    tokens, in the reference as here.
    """
    rank = similarity.max(dim=-1, keepdim=True).values.argsort(dim=1, descending=True)[..., 0]
    position = torch.empty_like(rank).scatter_(1, rank, torch.arange(rank.shape[1], device=rank.device).expand_as(rank))
    later = position[:, None, :] > position[:, :, None]
    return torch.zeros_like(similarity).masked_fill(~later, -math.inf)


def complete_graph_matching(
    keys: torch.Tensor,
    query: torch.Tensor,
    r: int,
    eot: Optional[torch.Tensor] = None,
    side: Optional[torch.Tensor] = None,
) -> Optional[Matching]:
    """Choose the merges of one block; ``None`` when it merges nothing (``effective_r`` is 0).

    ``keys`` ``[B, T, C]`` (projected, heads concatenated); ``query`` ``[B, C]``, the cross (or EOT) token's
    projected query; ``eot`` ``[B]``, the EOT's index (text); ``side`` ``[B, T]``, optional labels: tokens with
    different labels never pair (e.g. before/after the EOT). Runs without grad, in float32 at least.
    """
    batch, tokens, _ = keys.shape
    r = effective_r(tokens, r, eot is not None, side is not None)
    if r == 0:
        return None
    with torch.no_grad():
        metric = at_least_float32(keys)
        metric = metric / metric.norm(dim=-1, keepdim=True)
        similarity = metric @ metric.transpose(-1, -2)
        similarity.diagonal(dim1=-2, dim2=-1).fill_(-math.inf)
        similarity[:, 0, :] = similarity[:, :, 0] = -math.inf
        similarity[:, -1, :] = similarity[:, :, -1] = -math.inf
        if eot is not None:
            rows = torch.arange(batch, device=keys.device)
            similarity[rows, eot, :] = -math.inf
            similarity[rows, :, eot] = -math.inf
        if side is not None:
            similarity = similarity.masked_fill(side[:, :, None] != side[:, None, :], -math.inf)
        available = similarity + ordering_mask(similarity)
        query = at_least_float32(query).to(metric.dtype)
        # [B, T, 1]; the query as a transposed [B, 1, C] row, as the reference multiplies it: a [B, C, 1] column
        # takes another BLAS path whose results differ in the last bit, enough to reorder near-equal priorities
        importance = metric @ (query / query.norm(dim=-1, keepdim=True))[:, None, :].transpose(-1, -2)
        order = (importance - available.max(dim=-1, keepdim=True).values).argsort(dim=1)
        sources, destinations = order[:, :r], order[:, r:]
        candidates = similarity.gather(1, sources.expand(-1, -1, tokens))
        candidates = candidates.gather(2, destinations.transpose(1, 2).expand(-1, r, -1))
        picks = candidates.argmax(dim=-1)[..., None]
        pair = torch.cat([importance.gather(1, sources), importance.gather(1, destinations).gather(1, picks)], -1)
        return Matching(sources, destinations, picks, pair.softmax(dim=-1))


def merge_sum(matching: Matching, values: torch.Tensor, weighted: bool = False) -> torch.Tensor:
    """Apply ``matching`` to ``values`` ``[B, T, C]``: each source is added to its destination; ``[B, T - r, C]``.

    ``weighted``: the ensemble, ``dst += 2 w_src * src + (2 w_dst - 1) * dst`` per pair (for one source, the
    weighted sum ``2 (w_src src + w_dst dst)``; several sources of one destination each add their term, as in the
    reference). The remaining tokens are returned in their original order.
    """
    channels = values.shape[-1]
    sources = values.gather(1, matching.sources.expand(-1, -1, channels))
    destinations = values.gather(1, matching.destinations.expand(-1, -1, channels))
    picks = matching.picks.expand(-1, -1, channels)
    added = sources
    if weighted:
        weights = (2 * matching.weights).to(values.dtype)
        added = weights[..., :1] * sources + (weights[..., 1:] - 1) * destinations.gather(1, picks)
    merged = destinations.scatter_add(1, picks, added)
    original_order = matching.destinations.argsort(dim=1).expand(-1, -1, channels)
    return merged.gather(1, original_order)


def ensemble(matching: Matching, x: torch.Tensor, size: Optional[torch.Tensor] = None):
    """CrossGET's merge of ``x`` ``[B, T, C]``: returns ``(x', size')``, ``x' = ensemble(x * s) / size'``.

    ``size`` ``[B, T, 1]`` (``None``: all ones) is kept in float32 at least and summed unweighted; ``x'`` has
    ``x``'s dtype.
    """
    if size is None:
        size = at_least_float32(torch.ones_like(x[..., :1]))
    merged_size = merge_sum(matching, size)
    merged = merge_sum(matching, x.to(size.dtype) * size, weighted=True)
    return (merged / merged_size).to(x.dtype), merged_size


def merge_token_ids(matching: Matching, token_ids: torch.Tensor, size: torch.Tensor,
                    merged_size: torch.Tensor) -> torch.Tensor:
    """Token ids ``[B, T]`` (float) merged as the reference does: size-weighted means, so the EOT (the largest
    id, never merged) is still found by ``argmax``."""
    return (merge_sum(matching, token_ids[..., None] * size) / merged_size)[..., 0]


def cross_features(cross_tokens, norm: torch.nn.LayerNorm, projection) -> torch.Tensor:
    """A tower's per-block cross tokens (a list of ``[B, C]``) stacked block-major ``[L * B, C]``, layer-normed with
    ``norm``'s *detached* affine and projected by the *detached* ``projection`` (a matrix ``[C, E]`` or a Linear):
    only the cross offsets get gradients from the loss."""
    stacked = F.layer_norm(torch.cat(cross_tokens), norm.normalized_shape, norm.weight.detach(),
                           norm.bias.detach(), norm.eps)
    if isinstance(projection, torch.nn.Linear):
        bias = None if projection.bias is None else projection.bias.detach()
        return F.linear(stacked, projection.weight.detach(), bias)
    return stacked @ projection.detach()


def js_loss(image_cross: torch.Tensor, text_cross: torch.Tensor) -> torch.Tensor:
    """CrossGET's JS-style loss: ``m = (softmax(a) + softmax(b)) / 2``, ``(KL(m || a) + KL(m || b)) / 2``, each
    KL summed over the embedding and averaged over the ``L * B`` rows (``batchmean``). Needs equal block counts."""
    if image_cross.shape != text_cross.shape:
        raise ValueError(f"CrossGET's loss needs cross tokens of the same shape in both towers (as many blocks, "
                         f"one embedding width), got {tuple(image_cross.shape)} and {tuple(text_cross.shape)}")
    mean = (image_cross.softmax(dim=-1) + text_cross.softmax(dim=-1)) / 2
    return (F.kl_div(image_cross.log_softmax(dim=-1), mean, reduction="batchmean")
            + F.kl_div(text_cross.log_softmax(dim=-1), mean, reduction="batchmean")) / 2
