"""Turbo's informativity score and the SDPA attention with its [CLS] row, against hand computations."""
import math

import torch

from lavis_accel.reduce.attention import attention, cls_attention_row
from lavis_accel.reduce.merge import bipartite_soft_matching, merge_wavg
from lavis_accel.reduce.turbo import informativity_matching, informativity_scores, semantic_weight


def test_semantic_weight_decays_around_gamma():
    assert semantic_weight(5.0, 1.0, 0.0, layer=7) == 150.0
    assert semantic_weight(2.0, 0.5, 3.0, layer=1) == 2.0 * 30 * 0.25
    assert semantic_weight(2.0, 0.5, 3.0, layer=5) == 2.0 * 30 * 0.25
    assert semantic_weight(0.0, 0.5, 3.0, layer=5) == 0.0


def test_informativity_scores_match_a_hand_computation():
    torch.manual_seed(0)
    metric = torch.randn(2, 7, 5, dtype=torch.float64)
    cls_row = torch.rand(2, 7, dtype=torch.float64)
    alpha, beta, gamma, layer = 0.5, 0.8, 2.0, 4
    scores = informativity_scores(metric, cls_row, alpha, beta, gamma, layer)
    assert scores.shape == (2, 4, 3)
    for batch in range(2):
        for row, i in enumerate(range(0, 7, 2)):
            for col, j in enumerate(range(1, 7, 2)):
                if i == 0:
                    assert scores[batch, row, col] == -math.inf
                    continue
                cosine = torch.nn.functional.cosine_similarity(metric[batch, i], metric[batch, j], dim=0)
                expected = cosine - alpha * 30 * beta ** abs(gamma - layer) * cls_row[batch, i]
                torch.testing.assert_close(scores[batch, row, col], expected)


def merged_groups(merge, tokens):
    membership = merge(torch.eye(tokens)[None])[0]
    return [set(torch.nonzero(row).flatten().tolist()) for row in membership]


def test_alpha_zero_is_exactly_tome_matching():
    torch.manual_seed(1)
    metric = torch.randn(1, 15, 6)
    cls_row = torch.rand(1, 15)
    turbo = informativity_matching(metric, cls_row, r=5, alpha=0.0)
    tome = bipartite_soft_matching(metric, r=5)
    assert merged_groups(turbo, 15) == merged_groups(tome, 15)
    x = torch.randn(1, 15, 3)
    torch.testing.assert_close(merge_wavg(turbo, x), merge_wavg(tome, x))


def test_cls_attention_protects_a_token_from_merging_but_not_its_destination():
    torch.manual_seed(2)
    metric = torch.randn(1, 11, 4)
    tome_groups = merged_groups(bipartite_soft_matching(metric, r=1), 11)
    source = next(i for group in tome_groups if len(group) == 2 for i in group if i % 2 == 0)
    cls_row = torch.zeros(1, 11)
    cls_row[0, source] = 1.0  # [CLS] attends only to the token ToMe would merge first
    turbo_groups = merged_groups(informativity_matching(metric, cls_row, r=1, alpha=1.0), 11)
    assert {source} in turbo_groups
    # the semantic term is constant per row: every A token keeps ToMe's destination
    scores = informativity_scores(metric, cls_row, alpha=1.0)
    tome_scores = informativity_scores(metric, None, alpha=0.0)
    assert torch.equal(scores[0, 1:].argmax(-1), tome_scores[0, 1:].argmax(-1))


def test_attention_matches_explicit_softmax_with_bias_and_cls_row():
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 3, 6, 4, dtype=torch.float64) for _ in range(3))
    bias = torch.rand(2, 1, 1, 6, dtype=torch.float64).log()
    scale = 0.37
    out, cls_row = attention(q, k, v, scale, bias, need_cls_row=True)
    probabilities = ((q @ k.transpose(-2, -1)) * scale + bias).softmax(-1)
    torch.testing.assert_close(out, probabilities @ v)
    torch.testing.assert_close(cls_row, probabilities[:, :, 0].mean(1))
    unbiased = (q @ k.transpose(-2, -1) * scale).softmax(-1)
    torch.testing.assert_close(cls_attention_row(q, k, scale), unbiased[:, :, 0].mean(1))
    assert attention(q, k, v, scale)[1] is None
