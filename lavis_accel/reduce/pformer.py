"""P-Former's maths in plain torch (BLIText, Jian et al., NeurIPS 2023; spec 6): the prompt head and the losses.

Every function works in its inputs' dtype (float64 included).
"""
import random

import torch
import torch.nn.functional as F
from torch import nn


def prompt_head(cls_state: torch.Tensor, cls_proj: nn.Module, pooler: nn.Module, llm_proj: nn.Module) -> torch.Tensor:
    """``[B, W]`` [CLS] states -> ``[B, P, D]`` prompts: ``cls_proj`` to ``P * W``, one ``W`` vector per prompt,
    ``pooler`` (Linear + Tanh) on each, then ``llm_proj`` to the LLM's width ``D``."""
    batch, width = cls_state.shape
    per_prompt = cls_proj(cls_state).reshape(batch, -1, width)
    return llm_proj(pooler(per_prompt))


# ---- stage 0's losses (spec 6.2) and stages 1-2's alignment (6.3, 6.4) ----

def self_contrastive_loss(feats, feats_all, temperature, rank, label_smoothing=0.1):
    """L_c: each sentence's normalised feature against every feature of the global batch (``feats_all``, the
    ranks' ``feats`` stacked in rank order), scaled by ``1 / temperature``; the class of row ``i`` is its own place,
    ``rank * B + i``, and the cross-entropy is label-smoothed. Positives are the sentences themselves, so the loss
    pushes different sentences apart (uniformity)."""
    batch = feats.shape[0]
    logits = feats @ feats_all.t() / temperature
    targets = torch.arange(batch, device=feats.device) + rank * batch
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)


VQ_SEARCH_ROWS = 1024  # prompt vectors per nearest-row search: bounds the [rows, V] distance block


@torch.no_grad()
def nearest_rows(points, table, chunk_rows=VQ_SEARCH_ROWS):
    """For each row of ``points`` ``[N, D]``, the index of the nearest row of ``table`` ``[V, D]`` by squared L2,
    written ``|x|^2 + |v|^2 - 2 x.v`` as the reference does (the same ties and rounding). Searched ``chunk_rows``
    points at a time, with no gradient: only one ``[chunk_rows, V]`` block of distances is alive at once."""
    table = table.to(points.dtype)
    table_norms = table.pow(2).sum(dim=1)
    found = []
    for chunk in points.split(chunk_rows):
        distances = chunk.pow(2).sum(dim=1, keepdim=True) + table_norms - 2 * chunk @ table.t()
        found.append(distances.argmin(dim=1))
    return torch.cat(found) if found else torch.zeros(0, dtype=torch.long, device=points.device)


def vq_loss(prompts, vocab):
    """L_vq: MSE between every prompt vector (``[B, P, D]``) and its nearest vocabulary row (``vocab`` ``[V, D]``,
    the frozen LLM's input embeddings), the latter held fixed: the gradient pulls the prompts toward real token
    embeddings and never reaches ``vocab``. Rows are picked by index, without the reference's one-hot ``[N, V]``
    matrix (same value)."""
    flat = prompts.reshape(-1, prompts.shape[-1])
    nearest = vocab.detach().index_select(0, nearest_rows(flat.detach(), vocab.detach())).to(flat.dtype)
    return F.mse_loss(flat, nearest)


def alignment_loss(queries, prompts, weight):
    """``weight`` x MSE between the Q-Former's projected queries and the P-Former's prompts for the same caption;
    the prompts are targets (no gradient to the P-Former)."""
    return weight * F.mse_loss(queries, prompts.detach())


MASK_PROBABILITY = 0.25  # stage 0, OPT: share of the P-Former's input tokens replaced by [MASK]


def mask_tokens(input_ids, mask_token_id, protected_ids, probability=MASK_PROBABILITY, generator=None):
    """A copy of ``input_ids`` where each token is replaced by ``mask_token_id`` with ``probability`` (independent
    draws), except the ``protected_ids`` (padding, [CLS]), which are never masked. The input is not changed."""
    draws = torch.full(input_ids.shape, float(probability), device=input_ids.device)
    masked = torch.bernoulli(draws, generator=generator).bool()
    protected = torch.as_tensor(list(protected_ids), dtype=input_ids.dtype, device=input_ids.device)
    masked &= ~torch.isin(input_ids, protected)
    return input_ids.masked_fill(masked, mask_token_id)


def stage0_longest_prefix(num_words):
    """Stage 0 (T5): the prefix takes 1 to ``1 + n // 2`` words (the reference's bound; ``n = 2`` may leave an
    empty suffix)."""
    return 1 + num_words // 2


def stage2_longest_prefix(num_words):
    """Stage 2 (T5): 1 to ``n // 2`` words, at least one (the reference's ``randint(1, n // 2)`` fails on a
    one-word caption, which here becomes the prefix with an empty suffix)."""
    return max(1, num_words // 2)


def split_for_prefix_lm(texts, longest_prefix, rng=random):
    """Split each text at a random word boundary into (prefix, suffix) for T5's prefix language modelling: words
    are the text's ``" "``-separated pieces, the prefix holds ``rng.randint(1, longest_prefix(n))`` of them.
    ``rng`` is python's ``random`` (seeded by LAVIS) or a ``random.Random``; ``texts`` is not changed."""
    prefixes, suffixes = [], []
    for text in texts:
        words = text.split(" ")
        cut = rng.randint(1, longest_prefix(len(words)))
        prefixes.append(" ".join(words[:cut]))
        suffixes.append(" ".join(words[cut:]))
    return prefixes, suffixes
