"""CrossGET primitives (``reduce.crossget``) on hand-worked examples, and the EOT guard of CLIP's text step."""
import math

import pytest
import torch
import torch.nn.functional as F

from lavis_accel.patch.crossget_steps import EotCrossGetStep
from lavis_accel.patch.steps import AttentionSeen
from lavis_accel.reduce import crossget

NEG = -math.inf

# The hand example: 7 tokens, [CLS] at 0 and the cross token at 6 protected, tokens 1..5 mergeable. Every key has
# norm 3, so cosines are dot products / 9 (and so are importances, the query having norm 3 too).
KEYS = torch.tensor([
    [3, 0, 0, 0],  # 0 [CLS]: the same key as token 2, and still never merged
    [0, 2, -1, -2],  # 1
    [3, 0, 0, 0],  # 2
    [0, 2, 2, -1],  # 3
    [2, 2, -1, 0],  # 4
    [0, -2, 2, -1],  # 5
    [0, 0, 0, 3],  # 6 cross token
], dtype=torch.float64)[None]
QUERY = torch.tensor([[2, 0, -2, 1]], dtype=torch.float64)  # the cross token's query
# Worked by hand (x 1/9):
#   similarity among 1..5: S12 = 0, S13 = 4, S14 = 5, S15 = -4, S23 = 0, S24 = 6, S25 = 0, S34 = 2, S35 = 1,
#   S45 = -6; rows and columns 0 and 6 are -inf (S02 = 9 does not count).
#   best: 1 -> 5 (4), 2 -> 6 (4), 3 -> 4 (1), 4 -> 6 (2), 5 -> 1 (3).
#   ranking by best: {2, 4} (a tie: whichever sorts first), 1, 3, 5, then 0 and 6 (-inf).
#   importance: i1 = 0, i2 = 6, i3 = -5, i4 = 6, i5 = -5.
#   best similarity to a *later* token: 2 first: 2 -> 6, 4 -> 5; 4 first: 4 -> 6, 2 -> 0; either way 1 -> 4
#   (max(S13, S15)), 3 -> 1 (S35), 5 -> -inf.
#   priority u = importance - that: u3 = -6, u1 = -4, then u2, u4 in {0, 1/9} or {6/9, 0}, u5 = +inf:
#   with r = 2 the sources are 3 then 1 under both tie orders.
#   picks (plain similarity to the destinations {0, 2, 4, 5, 6}): 3 -> 4 (S34 = 2 > S35 = 1 > S32 = 0),
#   1 -> 4 (S14 = 5): two sources into one destination.
#   weights: (3 -> 4) softmax(-5/9, 6/9), (1 -> 4) softmax(0, 6/9).


def hand_matching():
    return crossget.complete_graph_matching(KEYS, QUERY, r=2)


def pair_weights(source_importance, destination_importance):
    ws = 1 / (1 + math.exp(destination_importance - source_importance))
    return [ws, 1 - ws]


def test_effective_r_clamps_to_half_the_unprotected_tokens():
    assert crossget.effective_r(198, 16) == 16
    assert crossget.effective_r(22, 16) == 10  # (22 - [CLS] - cross) // 2
    assert crossget.effective_r(7, 5) == 2
    assert crossget.effective_r(3, 5) == 0
    assert crossget.effective_r(12, 6, tracks_eot=True) == 4  # (12 - [SOT] - EOT - cross) // 2
    assert crossget.effective_r(4, 6, tracks_eot=True) == 0
    assert crossget.effective_r(100, 0) == 0
    # sides kept apart: the last-ranked token of each side has no partner, so at most t - protected - 2 merge
    assert crossget.effective_r(7, 5, sided=True) == 2
    assert crossget.effective_r(5, 5, sided=True) == 1
    assert crossget.effective_r(4, 5, sided=True) == 0  # (4 - 2) // 2 would be 1: a token with no partner
    assert crossget.effective_r(5, 5, tracks_eot=True, sided=True) == 0
    assert crossget.effective_r(6, 5, tracks_eot=True, sided=True) == 1


def test_token_schedules_of_clip_b16_vision_and_text():
    # 197 tokens + the cross token; the clamp binds in the last block only
    assert crossget.token_schedule(198, 16, 12) == [198, 182, 166, 150, 134, 118, 102, 86, 70, 54, 38, 22, 12]
    assert crossget.token_schedule(78, 6, 12, tracks_eot=True) == [78, 72, 66, 60, 54, 48, 42, 36, 30, 24, 18, 12, 8]
    assert crossget.token_schedule(78, 0, 3, tracks_eot=True) == [78, 78, 78, 78]
    assert crossget.token_schedule(9, 3, 4, tracks_eot=True, sided=True) == [9, 6, 5, 5, 5]


def test_ordering_mask_lets_each_token_pair_only_with_later_ranked_ones():
    similarity = torch.tensor([[
        [NEG, 0.1, 0.2, NEG],  # best 0.2: rank 2
        [0.9, NEG, 0.3, NEG],  # best 0.9: rank 0
        [0.5, 0.4, NEG, NEG],  # best 0.5: rank 1
        [NEG, NEG, NEG, NEG],  # best -inf: rank 3
    ]])
    allowed = crossget.ordering_mask(similarity) == 0
    expected = torch.tensor([
        [False, False, False, True],  # 0 may pair with 3 only
        [True, False, True, True],  # 1 (first) with everyone else
        [True, False, False, True],
        [False, False, False, False],  # the last one with nobody
    ])
    assert torch.equal(allowed[0], expected)
    assert crossget.ordering_mask(similarity)[0, 0, 1] == NEG


def test_ordering_mask_is_a_strict_order_on_random_scores():
    torch.manual_seed(0)
    allowed = crossget.ordering_mask(torch.randn(3, 9, 9)) == 0
    off_diagonal = ~torch.eye(9, dtype=torch.bool)
    # exactly one direction of every pair is allowed, and no token pairs with itself: no chains back, no cycles
    assert torch.equal(allowed ^ allowed.transpose(1, 2), off_diagonal.expand(3, -1, -1))
    assert not allowed.diagonal(dim1=1, dim2=2).any()


def test_complete_graph_matching_hand_example():
    m = hand_matching()
    assert m.sources[0, :, 0].tolist() == [3, 1]  # lowest priority first
    assert sorted(m.destinations[0, :, 0].tolist()) == [0, 2, 4, 5, 6]
    assert m.destinations.gather(1, m.picks)[0, :, 0].tolist() == [4, 4]
    expected = torch.tensor([pair_weights(-5 / 9, 6 / 9), pair_weights(0, 6 / 9)], dtype=torch.float64)
    torch.testing.assert_close(m.weights[0], expected, rtol=0, atol=1e-15)
    assert m.weights.dtype == torch.float64
    # the same tokens in reverse order (1..5 -> 5..1): the tie {2, 4} may sort the other way; the result holds
    order = [0, 5, 4, 3, 2, 1, 6]
    m = crossget.complete_graph_matching(KEYS[:, order], QUERY, r=2)
    assert [order[i] for i in m.sources[0, :, 0].tolist()] == [3, 1]
    assert [order[i] for i in m.destinations.gather(1, m.picks)[0, :, 0].tolist()] == [4, 4]


def test_matching_merges_nothing_when_the_clamp_leaves_nothing():
    assert crossget.complete_graph_matching(KEYS[:, :3], QUERY, r=4) is None  # (3 - 2) // 2 = 0
    assert crossget.complete_graph_matching(KEYS[:, :4], QUERY, r=4, eot=torch.tensor([2])) is None
    assert crossget.complete_graph_matching(KEYS[:, :5], QUERY, r=4, eot=torch.tensor([2])).sources.numel() == 1
    assert crossget.complete_graph_matching(KEYS, QUERY, r=0) is None
    assert crossget.complete_graph_matching(KEYS, QUERY, r=9).sources.shape == (1, 2, 1)  # clamped to 2


def test_protected_tokens_and_the_eot_never_merge():
    torch.manual_seed(1)
    keys = torch.randn(4, 12, 6)
    keys[:, 0] = keys[:, 1]  # [CLS] identical to a token, cross token identical to another
    keys[:, -1] = keys[:, 2]
    eot = torch.tensor([3, 5, 10, 7])
    keys[torch.arange(4), eot] = keys[torch.arange(4), eot - 1]
    m = crossget.complete_graph_matching(keys, torch.randn(4, 6), r=9, eot=eot)
    assert m.sources.shape == (4, 4, 1)  # (12 - 3) // 2
    joined = m.destinations.gather(1, m.picks)[..., 0]
    for b in range(4):
        touched = set(m.sources[b, :, 0].tolist()) | set(joined[b].tolist())
        assert not touched & {0, 11, eot[b].item()}
        assert set(m.sources[b, :, 0].tolist()).isdisjoint(m.destinations[b, :, 0].tolist())


def test_ensemble_two_sources_into_one_destination_hand_values():
    m = hand_matching()
    x = torch.arange(7 * 2, dtype=torch.float64).reshape(1, 7, 2) ** 1.5
    merged, size = crossget.ensemble(m, x)
    (ws3, wd3), (ws1, wd1) = pair_weights(-5 / 9, 6 / 9), pair_weights(0, 6 / 9)
    # each pair adds 2 w_src x_src + (2 w_dst - 1) x_dst to x_4 (unit sizes), then / the merged size 3
    x4 = (x[0, 4] + 2 * ws3 * x[0, 3] + (2 * wd3 - 1) * x[0, 4] + 2 * ws1 * x[0, 1] + (2 * wd1 - 1) * x[0, 4]) / 3
    expected = torch.stack([x[0, 0], x[0, 2], x4, x[0, 5], x[0, 6]])  # original order kept
    torch.testing.assert_close(merged[0], expected, rtol=0, atol=1e-12)
    assert size[0, :, 0].tolist() == [1, 1, 3, 1, 1]
    # with unit sizes the coefficients of the merged token sum to one
    assert math.isclose(2 * ws3 + 2 * ws1 + 2 * wd3 + 2 * wd1 - 1, 3, abs_tol=1e-12)


def test_ensemble_with_sizes_follows_the_reference_formula():
    # one pair 1 -> 2 with weights (1/4, 3/4), sizes s1 = 1, s2 = 3 (tokens 0 and 3 protected, kept as they are)
    m = crossget.Matching(sources=torch.tensor([[[1]]]), destinations=torch.tensor([[[2], [0], [3]]]),
                          picks=torch.tensor([[[0]]]), weights=torch.tensor([[[0.25, 0.75]]], dtype=torch.float64))
    x = torch.tensor([[[1.0], [8.0], [4.0], [5.0]]], dtype=torch.float64)
    size = torch.tensor([[[2.0], [1.0], [3.0], [1.0]]], dtype=torch.float64)
    merged, merged_size = crossget.ensemble(m, x, size)
    # x_2' = 2 (w_s s_1 x_1 + w_d s_2 x_2) / (s_1 + s_2) = 2 (0.25 * 8 + 0.75 * 12) / 4 = 5.5: not a convex
    # combination once sizes differ (the reference's formula, kept)
    assert merged[0, :, 0].tolist() == [1.0, 5.5, 5.0]
    assert merged_size[0, :, 0].tolist() == [2.0, 4.0, 1.0]
    summed = crossget.merge_sum(m, x)
    assert summed[0, :, 0].tolist() == [1.0, 12.0, 5.0]


def test_merge_token_ids_keeps_the_eot_at_argmax():
    # [SOT] a b [EOT] pad pad cross; 'a' (size 2) merges into 'b' (size 1), a pad into the other pad
    ids = torch.tensor([[49406.0, 320.0, 1929.0, 49407.0, 0.0, 0.0, 49406.0]])
    size = torch.tensor([[[1.0], [2.0], [1.0], [1.0], [1.0], [1.0], [1.0]]])
    m = crossget.Matching(sources=torch.tensor([[[1], [5]]]),
                          destinations=torch.tensor([[[2], [4], [0], [3], [6]]]),
                          picks=torch.tensor([[[0], [1]]]), weights=torch.full((1, 2, 2), 0.5))
    merged_size = crossget.merge_sum(m, size)
    merged = crossget.merge_token_ids(m, ids, size, merged_size)
    assert merged[0].tolist() == pytest.approx([49406.0, (2 * 320 + 1929) / 3, 49407.0, 0.0, 49406.0])
    assert merged.argmax(dim=-1).item() == 2


def test_merge_token_ids_tracks_the_eot_through_random_matchings():
    torch.manual_seed(2)
    ids = torch.randint(1, 49406, (3, 20)).double()
    eot = torch.tensor([4, 11, 18])
    ids[torch.arange(3), eot] = 49407
    ids[:, 0] = ids[:, -1] = 49406
    size = torch.ones(3, 20, 1, dtype=torch.float64)
    for _ in range(3):
        m = crossget.complete_graph_matching(torch.randn(3, ids.shape[1], 8, dtype=torch.float64),
                                             torch.randn(3, 8, dtype=torch.float64), 3, eot=ids.argmax(-1))
        kept_before = (m.destinations[..., 0] < ids.argmax(-1)[:, None]).sum(-1)  # tokens left before the EOT
        merged_size = crossget.merge_sum(m, size)
        ids, size = crossget.merge_token_ids(m, ids, size, merged_size), merged_size
        assert torch.equal(ids.argmax(-1), kept_before)
        assert (ids.max(-1).values == 49407).all()


def test_js_loss_against_the_hand_formula():
    # row 0: p = softmax(0, ln 3) = (1/4, 3/4), q = (1/2, 1/2), m = (3/8, 5/8); row 1: equal rows, 0
    image = torch.tensor([[0.0, math.log(3)], [0.3, -0.2]], dtype=torch.float64)
    text = torch.tensor([[0.0, 0.0], [0.3, -0.2]], dtype=torch.float64)
    kl_mp = 3 / 8 * math.log((3 / 8) / (1 / 4)) + 5 / 8 * math.log((5 / 8) / (3 / 4))
    kl_mq = 3 / 8 * math.log((3 / 8) / (1 / 2)) + 5 / 8 * math.log((5 / 8) / (1 / 2))
    expected = (kl_mp + kl_mq) / 2 / 2  # batchmean over the 2 rows
    assert crossget.js_loss(image, text).item() == pytest.approx(expected, abs=1e-15)
    assert crossget.js_loss(text, image).item() == pytest.approx(expected, abs=1e-15)
    assert crossget.js_loss(image, image).item() == pytest.approx(0, abs=1e-15)


def test_js_loss_needs_cross_tokens_of_one_shape():
    with pytest.raises(ValueError, match=r"same shape in both towers.*\(24, 8\) and \(12, 8\)"):
        crossget.js_loss(torch.zeros(24, 8), torch.zeros(12, 8))


@pytest.mark.parametrize("linear", [False, True])
def test_cross_features_detach_the_norm_and_projection(linear):
    torch.manual_seed(3)
    norm = torch.nn.LayerNorm(6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    projection = torch.nn.Linear(6, 4) if linear else torch.nn.Parameter(torch.randn(6, 4))
    offsets = torch.zeros(1, 3, 6, requires_grad=True)
    states = torch.randn(3, 2, 6, requires_grad=True)
    tokens = [states[i].detach() + offsets[:, i] for i in range(3)]  # as the steps build them: [B, C] per block
    features = crossget.cross_features(tokens, norm, projection)
    assert features.shape == (3 * 2, 4)
    normed = F.layer_norm(states.detach().reshape(6, 6), (6,), norm.weight, norm.bias, norm.eps)  # block-major
    expected = projection(normed) if linear else normed @ projection
    torch.testing.assert_close(features, expected)
    features.square().sum().backward()
    assert offsets.grad is not None and offsets.grad.abs().sum() > 0
    assert states.grad is None and norm.weight.grad is None and norm.bias.grad is None
    own = [projection.weight, projection.bias] if linear else [projection]
    assert all(p.grad is None for p in own)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_dtypes_outputs_keep_x_dtype_and_sizes_stay_precise(dtype):
    torch.manual_seed(4)
    keys = torch.randn(2, 15, 8).to(dtype)
    query = torch.randn(2, 8).to(dtype)
    x = torch.randn(2, 15, 8).to(dtype)
    m = crossget.complete_graph_matching(keys, query, 3)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    exact = crossget.complete_graph_matching(keys.to(compute), query.to(compute), 3)
    assert m.weights.dtype == compute  # the matching runs in float32 at least ...
    assert torch.equal(m.sources, exact.sources) and torch.equal(m.picks, exact.picks)  # ... on the same values
    merged, size = crossget.ensemble(m, x)
    assert merged.dtype == dtype and size.dtype == compute
    assert merged.shape == (2, 12, 8) and size.sum().item() == 2 * 15
    reference, _ = crossget.ensemble(m, x.to(compute))
    assert torch.equal(merged, reference.to(dtype))
    merged2, size2 = crossget.ensemble(crossget.complete_graph_matching(merged, query, 3), merged, size)
    assert merged2.dtype == dtype and size2.dtype == compute and size2.sum().item() == 2 * 15


def run_eot_step(eot_guard: bool):
    """One block of CLIP's text step on [SOT] w1 w2 [EOT] pad (+ the cross token), r = 1, with keys making w1 and
    the pad a mutual best pair (cosine 0.995) across the EOT. Returns the merged groups (sets of input indices)
    and the step."""
    step = EotCrossGetStep(torch.zeros(1, 1, 5, dtype=torch.float64), r=1, eot_guard=eot_guard)
    step.start_forward()
    valid = step.start_text(torch.tensor([[49406, 320, 321, 49407, 0]]))
    x, valid = step.enter(0, torch.eye(5, dtype=torch.float64)[None], valid)  # one-hot rows: membership
    assert x.shape == (1, 6, 5) and step.eot.item() == 3
    keys = torch.tensor([[[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1], [0, 1, 0.1], [1, 0, 0]]], dtype=torch.float64)
    step.needs(0, x, valid)
    seen = AttentionSeen(keys=keys, queries=keys, projected_keys=keys)
    out, _ = step.reduce(0, x, seen, valid)
    groups = [set(torch.nonzero(row).flatten().tolist()) for row in out[0]]
    return groups, step


def test_eot_guard_keeps_merges_on_one_side_of_the_eot():
    groups, step = run_eot_step(eot_guard=False)
    # the reference's behaviour: w1 and the pad behind the EOT merge (whichever of the tied pair sorts first)
    assert {1, 4} in groups and len(groups) == 4  # the cross token is dropped after the last block
    assert step.token_ids.argmax(-1).item() == step.eot.item() == 2
    groups, step = run_eot_step(eot_guard=True)
    assert all(max(g) <= 3 or min(g) > 3 for g in groups)  # nothing merges across the EOT ...
    assert {1, 2} in groups and {4} in groups  # ... so the words merge with each other, the pad stays alone
    assert step.eot.item() == 2 and groups[step.eot.item()] == {3}


def test_reference_order_attention_is_scaled_query_eager_attention():
    """``q / sqrt(d)``, bmm, + bias, softmax, bmm: the order of the reference's eager attention (its outputs then
    equal the reference's bit for bit); the values are attention's, as SDPA computes them up to rounding."""
    from lavis_accel.reduce.attention import reference_order_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, dtype=torch.float64) for _ in range(3))
    bias = torch.randn(2, 1, 1, 5, dtype=torch.float64)
    out = reference_order_attention(q, k, v, bias)
    flat = [t.reshape(6, 5, 4) for t in (q, k, v)]
    logits = torch.bmm(flat[0] / 2.0, flat[1].transpose(1, 2)) + bias.expand(2, 3, 5, 5).reshape(6, 5, 5)
    assert torch.equal(out, torch.bmm(logits.softmax(-1), flat[2]).reshape(2, 3, 5, 4))
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=bias), rtol=0, atol=1e-12)
