"""MADTP's maths (reduce/madtp.py) on hand-computed cases, and its step on a bare LAVIS ViT (patch.madtp)."""
import math

import pytest
import torch

import lavis_accel  # first: it makes torchvision importable for LAVIS on CPU-only machines
from lavis.models.vit import VisionTransformerEncoder
from lavis_accel.errors import SettingError
from lavis_accel.patch import madtp as madtp_binding
from lavis_accel.patch import token_counts
from lavis_accel.reduce import madtp


def test_code_similarity_and_pooled_features_by_hand():
    tokens = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # B=1, N=2, C=2
    codebook = torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.0, 0.0]])  # M=3
    similarity = madtp.code_similarity(tokens, codebook)
    assert similarity.tolist() == [[[1.0, 2.0, 0.0], [2.0, 0.0, 0.0]]]
    pooled = madtp.pooled_features(tokens, similarity, code_width=4)  # softmax over tokens of G / sqrt(4)
    w = torch.softmax(torch.tensor([0.5, 1.0]), 0)  # code 0: G/2 = (0.5, 1.0)
    torch.testing.assert_close(pooled[0, 0], w[0] * tokens[0, 0] + w[1] * tokens[0, 1])
    torch.testing.assert_close(pooled[0, 2], tokens[0].mean(0))  # code 2 sees equal scores: the plain mean


def test_padded_tokens_get_no_pooling_weight():
    tokens = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [9.0, 9.0]]])
    codebook = torch.tensor([[1.0, 1.0]])
    valid = torch.tensor([[True, True, False]])
    similarity = madtp.code_similarity(tokens, codebook)
    pooled = madtp.pooled_features(tokens, similarity, 2, valid)
    unpadded = madtp.pooled_features(tokens[:, :2], similarity[:, :2], 2)
    torch.testing.assert_close(pooled, unpadded)


def test_the_three_importances_by_hand():
    # 1 [CLS] + 2 tokens, 2 heads
    probs = torch.tensor([[
        [[0.2, 0.3, 0.5], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]],
        [[0.4, 0.4, 0.2], [0.3, 0.1, 0.6], [0.5, 0.4, 0.1]],
    ]])
    # max over heads of rows/cols 1..2: [[0.6, 0.6], [0.4, 0.6]] -> received (sum over queries) [1.0, 1.2]
    torch.testing.assert_close(madtp.self_attention_importance(probs), torch.tensor([[1.0 / 2.2, 1.2 / 2.2]]))
    similarity = torch.tensor([[[1.0, 3.0], [2.0, -1.0]]])  # best codes: 3, 2
    torch.testing.assert_close(madtp.code_importance(similarity), torch.tensor([[0.6, 0.4]]))
    cls_probs = probs[:, :, 0, 1:]  # [[0.3, 0.5], [0.4, 0.2]]
    norms = torch.tensor([[[1.0, 3.0], [3.0, 1.0]]])  # head shares: token 1 (1/4, 3/4), token 2 (3/4, 1/4)
    expected = torch.tensor([[0.3 * 0.25 + 0.4 * 0.75, 0.5 * 0.75 + 0.2 * 0.25]])
    torch.testing.assert_close(madtp.cls_importance(cls_probs, norms), expected)


def test_keep_counts_threshold_is_the_smallest_code_score():
    importance = torch.tensor([[0.5, 0.3, 0.2]])
    similarity = torch.tensor([[[0.0, 10.0], [0.0, 0.0], [0.0, 0.0]]])  # code 0 flat, code 1 peaked on token 0
    # code 0: mean importance 1/3; code 1 at tau=1: ~token 0's 0.5 -> threshold 1/3: only token 0 is above
    assert madtp.keep_counts(importance, similarity, 1.0).tolist() == [1]
    # a huge tau flattens code 1 too: the threshold stays 1/3
    assert madtp.keep_counts(importance, similarity, 1e6).tolist() == [1]


def test_batch_keep_leaves_the_layer_alone_as_the_reference_does():
    assert madtp.batch_keep(torch.tensor([3, 5]), num_tokens=10) == 5
    assert madtp.batch_keep(torch.tensor([0, 0]), num_tokens=10) == 0  # nothing kept
    assert madtp.batch_keep(torch.tensor([9, 2]), num_tokens=10) == 0  # one token left to fuse
    assert madtp.batch_keep(torch.tensor([1, 1]), num_tokens=10, no_prune_up_to=1) == 0  # CLIP vision guard


def test_prune_and_fuse_keeps_top_k_in_order_and_fuses_the_rest_by_importance():
    tokens = torch.arange(4.0).view(1, 4, 1).expand(1, 4, 2)  # token n holds (n, n)
    importance = torch.tensor([[0.1, 0.4, 0.2, 0.3]])
    pruned, valid = madtp.prune_and_fuse(tokens, importance, k=2)
    assert valid is None
    assert pruned[0, :2, 0].tolist() == [1.0, 3.0]  # tokens 1 and 3, in their original order
    fused = (0.2 * 2 + 0.1 * 0) / (0.3 + madtp.EPS)
    assert pruned[0, 2, 0].item() == pytest.approx(fused)


def test_prune_and_fuse_never_keeps_or_fuses_padding():
    tokens = torch.tensor([[[1.0], [2.0], [3.0], [100.0]]])
    importance = torch.tensor([[0.0, 0.2, 0.1, 0.0]])  # padding has importance 0 (token_importance)
    valid = torch.tensor([[True, True, True, False]])
    pruned, new_valid = madtp.prune_and_fuse(tokens, importance, k=2, valid=valid)
    assert pruned[0, :2, 0].tolist() == [2.0, 3.0]
    assert pruned[0, 2, 0].item() == pytest.approx(0.0)  # token 0 has weight 0; the padded 100 is left out
    assert new_valid.tolist() == [[True, True, True]]
    only_padding_dropped, mask = madtp.prune_and_fuse(tokens, importance, k=3, valid=valid)
    assert mask.tolist() == [[True, True, True, False]]  # the fused token holds only padding: masked
    assert only_padding_dropped[0, 3, 0].item() == 0.0


def test_alignment_loss_is_one_minus_cosine():
    image = torch.tensor([[[1.0, 0.0], [0.0, 3.0]]])
    text = torch.tensor([[[2.0, 0.0], [1.0, 0.0]]])
    assert madtp.alignment_loss(image, text).item() == pytest.approx((0.0 + 1.0) / 2)


def tiny_vit(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    vit = VisionTransformerEncoder(img_size=64, patch_size=16, embed_dim=64, depth=4, num_heads=4)
    return vit.to(dtype).eval()


@pytest.fixture
def images():
    torch.manual_seed(1)
    return torch.randn(2, 3, 64, 64)


def test_temperature_zero_keeps_every_token_and_the_stock_outputs(images):
    vit = tiny_vit()
    with torch.no_grad():
        stock = vit.forward_features(images)
        lavis_accel.apply(vit, "madtp", temperature=0)
        patched = vit.forward_features(images)
    torch.testing.assert_close(patched, stock, atol=1e-5, rtol=0)
    assert token_counts(vit) == [17] * 5
    assert madtp_binding.image_code_features(vit).shape == (2, 100, 64)


def test_pruning_runs_in_float64_and_remove_restores_stock(images):
    vit = tiny_vit(dtype=torch.float64)
    x = images.double()
    codebook = torch.randn(20, 64, dtype=torch.float64)
    with torch.no_grad():
        stock = vit.forward_features(x)
        lavis_accel.apply(vit, "madtp", temperature=1.0, codebook=codebook)
        pruned = vit.forward_features(x)
        counts = token_counts(vit)
        lavis_accel.remove(vit)
        restored = vit.forward_features(x)
    assert pruned.dtype == torch.float64
    assert counts[0] == 17 and counts[-1] < 17 and pruned.shape[1] == counts[-1]
    assert all(later <= earlier for earlier, later in zip(counts, counts[1:]))
    torch.testing.assert_close(restored, stock, atol=0, rtol=0)


def test_one_host_synchronisation_per_pruning_block(images, monkeypatch):
    calls = []
    original = madtp.batch_keep
    monkeypatch.setattr(madtp, "batch_keep", lambda *a, **k: calls.append(1) or original(*a, **k))
    vit = tiny_vit()
    lavis_accel.apply(vit, "madtp", temperature=1.0)
    with torch.no_grad():
        vit.forward_features(images)
    assert len(calls) == len(vit.blocks)


def test_larger_temperature_prunes_more(images):
    vit = tiny_vit()
    codebook = torch.randn(100, 64)
    kept = []
    for tau in (0.05, 1.0, 50.0):
        lavis_accel.apply(vit, "madtp", temperature=tau, codebook=codebook)
        with torch.no_grad():
            vit.forward_features(images)
        kept.append(sum(token_counts(vit)))
    assert kept[0] >= kept[1] >= kept[2] and kept[0] > kept[2]


def test_gradients_reach_the_codebook_through_the_fused_token(images):
    vit = tiny_vit().train()
    codebook = torch.nn.Parameter(torch.randn(10, 64))
    lavis_accel.apply(vit, "madtp", temperature=1.0, codebook=codebook)
    out = vit.forward_features(images)
    (out.square().mean() + madtp_binding.image_code_features(vit).square().mean()).backward()
    assert codebook.grad is not None and codebook.grad.abs().sum() > 0


@pytest.mark.parametrize("settings, message", [
    ({"temperature": -1.0}, "'temperature'"),
    ({"temperature": math.nan}, "'temperature'"),
    ({"temperature": "1"}, "'temperature'"),
    ({"temperature": 1.0, "codebook": torch.randn(100, 32)}, "width 32"),
    ({"temperature": 1.0, "codebook": torch.randn(64)}, "'codebook'"),
    ({"temperature": 1.0, "r": 3}, "'r' is not known for 'madtp'"),
])
def test_bad_settings_are_one_line_errors(settings, message):
    with pytest.raises(SettingError, match=message) as error:
        lavis_accel.apply(tiny_vit(), "madtp", **settings)
    assert "\n" not in str(error.value)
