"""ToMe primitives: schedules, clamping, bipartite matching, size-weighted merging, proportional attention."""
import math

import pytest
import torch

from lavis_accel.errors import SettingError
from lavis_accel.reduce.attention import attention
from lavis_accel.reduce.merge import (
    bipartite_scores,
    bipartite_soft_matching,
    effective_r,
    merge_wavg,
    parse_r,
    proportional_bias,
    token_schedule,
)


def test_parse_r_constant_ramp_and_list():
    assert parse_r(4, 3) == [3, 3, 3, 3]
    # ToMe's decreasing schedule (r, -1): from 2r down to 0, linearly
    assert parse_r(5, (8, -1.0)) == [16, 12, 8, 4, 0]
    assert parse_r(3, (8, 0.5)) == [4, 8, 12]
    assert parse_r(5, [4, 2]) == [4, 2, 0, 0, 0]
    assert parse_r(1, (8, -1.0)) == [16]
    assert parse_r(3, (4, 2.0)) == [0, 4, 12]  # negative ramp values merge nothing


def test_parse_r_refuses_more_layers_than_the_model_has():
    with pytest.raises(SettingError, match="'r' lists 3 layers but the model has 2"):
        parse_r(2, [1, 1, 1])


def test_effective_r_clamps_to_the_bipartite_limit_and_the_threshold():
    assert effective_r(577, 30) == 30
    assert effective_r(11, 30) == 5  # (11 - [CLS]) // 2
    assert effective_r(11, 30, class_token=False) == 5
    assert effective_r(12, 30, class_token=False) == 6
    assert effective_r(2, 30) == 0
    assert effective_r(39, 5, threshold=40) == 0  # skipped when t < threshold ...
    assert effective_r(40, 5, threshold=40) == 5  # ... and merges at t == threshold


def test_token_schedule_matches_blip_vit_b_examples():
    assert token_schedule(577, [30] * 12, threshold=100)[-1] == 217
    assert token_schedule(901, [40] * 12, threshold=40)[-1] == 421
    assert token_schedule(577, [30] * 12)[:3] == [577, 547, 517]
    # the threshold stops merging once fewer tokens than it remain
    assert token_schedule(101, [10] * 4, threshold=90) == [101, 91, 81, 81, 81]
    # the clamp binds when r exceeds half the tokens
    assert token_schedule(17, [10] * 4) == [17, 9, 5, 3, 2]


def reference_matching(metric, r):
    """Loop-by-loop ToMe matching with [CLS] at 0: returns the output token list as sets of input indices."""
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a_idx = list(range(0, metric.shape[0], 2))
    b_idx = list(range(1, metric.shape[0], 2))
    best = {}
    for i in a_idx:
        scores = [float(metric[i] @ metric[j]) for j in b_idx]
        value = -math.inf if i == 0 else max(scores)
        best[i] = (value, b_idx[scores.index(max(scores))])
    merged = sorted(a_idx, key=lambda i: -best[i][0])[:r]
    groups = [{i} for i in a_idx if i not in merged] + [{j} for j in b_idx]
    for i in merged:
        next(g for g in groups if best[i][1] in g and len(g & set(b_idx)) == 1).add(i)
    return groups


def test_matching_agrees_with_a_loop_reference_and_keeps_cls_first():
    torch.manual_seed(0)
    x = torch.randn(1, 13, 8)
    merge = bipartite_soft_matching(x, r=4)
    # push the one-hot index of each token through the merge to see which inputs each output holds
    membership = merge(torch.eye(13)[None])[0]
    groups = [set(torch.nonzero(row).flatten().tolist()) for row in membership]
    assert groups == reference_matching(x[0], 4)
    assert groups[0] == {0}


def test_cls_never_merges_even_when_it_is_the_most_similar_token():
    x = torch.ones(2, 9, 4) + 0.01 * torch.randn(2, 9, 4)
    x[:, 0] = 1.0  # [CLS] identical to the mean direction: the best match of everyone
    merge = bipartite_soft_matching(x, r=4)
    merged, size = merge_wavg(merge, x)
    assert merged.shape == (2, 5, 4)
    assert torch.equal(merged[:, 0], x[:, 0])
    assert torch.equal(size[:, 0], torch.ones(2, 1))


def test_r_zero_and_unmergeable_inputs_are_the_identity():
    x = torch.randn(2, 9, 4)
    assert bipartite_soft_matching(x, r=0) is None
    assert bipartite_soft_matching(x[:, :2], r=5) is None
    assert bipartite_soft_matching(x, r=5, threshold=10) is None


def test_size_weighted_merge_conserves_mass_and_sizes():
    torch.manual_seed(1)
    x = torch.randn(3, 21, 6, dtype=torch.float64)
    size = torch.randint(1, 5, (3, 21, 1)).to(torch.float64)
    merged, new_size = merge_wavg(bipartite_soft_matching(x, r=7), x, size)
    assert merged.shape == (3, 14, 6)
    torch.testing.assert_close(new_size.sum(1), size.sum(1))
    torch.testing.assert_close((merged * new_size).sum(1), (x * size).sum(1))


def test_merge_averages_the_pair_by_size():
    x = torch.tensor([[[0.0, 1.0], [5.0, 5.0], [1.0, 0.0], [1.0, 0.05]]])
    size = torch.tensor([[[1.0], [1.0], [3.0], [1.0]]])
    merged, new_size = merge_wavg(bipartite_soft_matching(x, r=1), x, size)
    # token 2 (A, size 3) merges into token 3 (B, size 1): [CLS], token 1, then the merged pair
    torch.testing.assert_close(new_size[0, :, 0], torch.tensor([1.0, 1.0, 4.0]))
    torch.testing.assert_close(merged[0, 2], (3 * x[0, 2] + x[0, 3]) / 4)


def test_gradients_flow_through_the_merge():
    x = torch.randn(1, 9, 4, requires_grad=True)
    merged, _ = merge_wavg(bipartite_soft_matching(x, r=3), x)
    merged.sum().backward()
    torch.testing.assert_close(x.grad.sum(), torch.tensor(6.0 * 4))  # each output row sums its inputs' weights


def test_proportional_attention_equals_attention_over_copies():
    torch.manual_seed(2)
    heads, dim = 2, 8
    q = torch.randn(1, heads, 5, dim, dtype=torch.float64)
    k = torch.randn(1, heads, 3, dim, dtype=torch.float64)
    v = torch.randn(1, heads, 3, dim, dtype=torch.float64)
    size = torch.tensor([[[1.0], [3.0], [2.0]]], dtype=torch.float64)
    merged_out, _ = attention(q, k, v, scale=dim**-0.5, bias=proportional_bias(size))
    copies = torch.tensor([0, 1, 1, 1, 2, 2])
    copies_out, _ = attention(q, k[:, :, copies], v[:, :, copies], scale=dim**-0.5)
    torch.testing.assert_close(merged_out, copies_out)


def test_proportional_bias_is_log_size_per_key():
    size = torch.tensor([[[1.0], [4.0]]])
    assert proportional_bias(None) is None
    torch.testing.assert_close(proportional_bias(size), torch.log(torch.tensor([1.0, 4.0])).view(1, 1, 1, 2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_models_match_in_float32_and_keep_exact_sizes(dtype):
    torch.manual_seed(0)
    metric = torch.randn(1, 9, 8)
    assert bipartite_scores(metric.to(dtype)).dtype == torch.float32
    x = torch.randn(1, 9, 8).to(dtype)
    merge = bipartite_soft_matching(metric, 2)
    merged, size = merge_wavg(merge, x, torch.full((1, 9, 1), 300.0))  # bf16 holds 300 as 300, 301 as 300
    assert merged.dtype == dtype and size.dtype == torch.float32
    assert sorted(size.flatten().tolist()) == [300.0] * 5 + [600.0] * 2
    assert merge_wavg(merge, x)[1].dtype == torch.float32
