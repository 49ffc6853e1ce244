"""P-Former's maths (reduce/pformer.py) against values computed by hand with python ``math`` loops.

Pinned here: the self-contrastive loss with label smoothing over a two-rank global batch (targets ``rank*B + i``),
the VQ loss to the nearest vocabulary row (as the reference's one-hot formulation, gradient to the prompts only),
the weighted alignment MSE (no gradient to the targets), the 25 % masking that never touches padding or [CLS], and
the T5 prefix/suffix split (stage 0 and stage 2 bounds, one-word captions, the caller's list untouched).
"""
import math
import random

import pytest
import torch
import torch.nn.functional as F

from lavis_accel.reduce import pformer

F64 = torch.float64


def _tensor(values, requires_grad=False, dtype=F64):
    return torch.tensor(values, dtype=dtype, requires_grad=requires_grad)


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def _smoothed_cross_entropy(row, target, smoothing):
    """Cross-entropy of one row of logits with label smoothing: (1 - s) * NLL(target) + s * mean_j NLL(j)."""
    top = max(row)
    log_total = top + math.log(sum(math.exp(v - top) for v in row))
    nll = [log_total - v for v in row]
    return (1 - smoothing) * nll[target] + smoothing * sum(nll) / len(row)


# ---- L_c ----

def _contrastive_by_hand(feats, feats_all, temperature, rank, smoothing):
    batch = len(feats)
    rows = [[_dot(f, g) / temperature for g in feats_all] for f in feats]
    return sum(_smoothed_cross_entropy(row, rank * batch + i, smoothing) for i, row in enumerate(rows)) / batch


def test_self_contrastive_loss_by_hand_on_rank_one_of_two():
    feats = _tensor([[0.6, 0.8], [1.0, 0.0]], requires_grad=True)
    other_rank = [[0.0, 1.0], [-0.8, 0.6]]
    feats_all = torch.cat([_tensor(other_rank), feats.detach()])  # rank 0's features first, then this rank's
    temperature = _tensor(0.07, requires_grad=True)
    loss = pformer.self_contrastive_loss(feats, feats_all, temperature, rank=1)
    expected = _contrastive_by_hand(feats.tolist(), feats_all.tolist(), 0.07, 1, 0.1)
    assert loss.dtype == F64
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    loss.backward()
    assert feats.grad is not None and feats.grad.abs().sum() > 0
    assert temperature.grad is not None and temperature.grad.item() != 0  # the temperature is learned


def test_self_contrastive_loss_targets_on_rank_zero_and_without_smoothing():
    gen = torch.Generator().manual_seed(0)
    feats = F.normalize(torch.randn(3, 4, generator=gen, dtype=F64), dim=-1)
    feats_all = torch.cat([feats, F.normalize(torch.randn(3, 4, generator=gen, dtype=F64), dim=-1)])
    loss = pformer.self_contrastive_loss(feats, feats_all, 0.5, rank=0)
    assert loss.item() == pytest.approx(_contrastive_by_hand(feats.tolist(), feats_all.tolist(), 0.5, 0, 0.1),
                                        abs=1e-12)
    plain = pformer.self_contrastive_loss(feats, feats_all, 0.5, rank=0, label_smoothing=0.0)
    assert plain.item() == pytest.approx(_contrastive_by_hand(feats.tolist(), feats_all.tolist(), 0.5, 0, 0.0),
                                         abs=1e-12)
    # rank 1 scores the same rows against the other half: another value
    assert pformer.self_contrastive_loss(feats, feats_all, 0.5, rank=1).item() != pytest.approx(loss.item())


# ---- L_vq ----

def _vq_by_hand(prompts, vocab):
    """Mean over all elements of (x - nearest vocabulary row)^2, nearest by squared L2 distance."""
    total, count = 0.0, 0
    for x in prompts:
        distances = [sum((a - b) ** 2 for a, b in zip(x, v)) for v in vocab]
        nearest = vocab[distances.index(min(distances))]
        total += sum((a - b) ** 2 for a, b in zip(x, nearest))
        count += len(x)
    return total / count


def _vq_one_hot(prompts, vocab):
    """The reference's formulation: expanded distances, a one-hot [N, V] matrix, quantised = one_hot @ vocab."""
    flat = prompts.reshape(-1, prompts.shape[-1])
    distances = flat.pow(2).sum(1, keepdim=True) + vocab.pow(2).sum(1) - 2 * flat @ vocab.t()
    one_hot = torch.zeros(flat.shape[0], vocab.shape[0], dtype=flat.dtype)
    one_hot.scatter_(1, distances.argmin(1, keepdim=True), 1)
    return F.mse_loss((one_hot @ vocab).detach(), flat)


def test_vq_loss_by_hand_and_gradient_to_prompts_only():
    prompts = _tensor([[[0.9, 0.2], [-1.0, 2.5]]], requires_grad=True)  # [B=1, P=2, D=2]
    vocab = _tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, -3.0]], requires_grad=True)
    loss = pformer.vq_loss(prompts, vocab)
    # nearest rows: (1, 0) for the first prompt, (0, 2) for the second
    expected = ((0.9 - 1) ** 2 + 0.2 ** 2 + 1.0 ** 2 + 0.5 ** 2) / 4
    assert loss.dtype == F64
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert loss.item() == pytest.approx(_vq_by_hand(prompts.detach().reshape(-1, 2).tolist(), vocab.tolist()),
                                        abs=1e-12)
    loss.backward()
    expected_grad = [[[2 * (0.9 - 1) / 4, 2 * 0.2 / 4], [2 * -1.0 / 4, 2 * 0.5 / 4]]]
    torch.testing.assert_close(prompts.grad, _tensor(expected_grad))
    assert vocab.grad is None  # the vocabulary is a fixed target


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_vq_loss_equals_the_one_hot_formulation(dtype):
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randn(3, 5, 8, generator=gen, dtype=dtype)
    vocab = torch.randn(40, 8, generator=gen, dtype=dtype)
    loss = pformer.vq_loss(prompts, vocab)
    assert loss.dtype == dtype
    torch.testing.assert_close(loss, _vq_one_hot(prompts, vocab), rtol=0, atol=0)


def test_nearest_rows_in_chunks_and_a_half_precision_vocabulary():
    gen = torch.Generator().manual_seed(2)
    points, table = torch.randn(37, 6, generator=gen), torch.randn(50, 6, generator=gen)
    whole = pformer.nearest_rows(points, table)
    assert torch.equal(pformer.nearest_rows(points, table, chunk_rows=5), whole)
    by_hand = [min(range(50), key=lambda j: sum((a - b) ** 2 for a, b in zip(p, table[j].tolist())))
               for p in points.tolist()]
    assert whole.tolist() == by_hand
    # the frozen OPT keeps fp16 embeddings: the prompts' dtype is kept
    loss = pformer.vq_loss(points.reshape(1, 37, 6), table.half())
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


# ---- alignment ----

def test_alignment_loss_by_hand_weight_and_no_gradient_to_the_prompts():
    queries = _tensor([[[1.0, 2.0], [0.0, -1.0]]], requires_grad=True)
    prompts = _tensor([[[0.5, 2.0], [1.0, 1.0]]], requires_grad=True)
    loss = pformer.alignment_loss(queries, prompts, 10)
    squared = [(1.0 - 0.5) ** 2, 0.0, (0.0 - 1.0) ** 2, (-1.0 - 1.0) ** 2]
    assert loss.dtype == F64
    assert loss.item() == pytest.approx(10 * sum(squared) / 4, abs=1e-12)
    loss.backward()
    torch.testing.assert_close(queries.grad, 10 * 2 * (queries.detach() - prompts.detach()) / 4)
    assert prompts.grad is None


# ---- masking ----

PAD, CLS, MASK = 0, 101, 103


def _ids():
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(1000, 2000, (200, 32), generator=gen)
    ids[:, 0] = CLS
    lengths = torch.randint(2, 33, (200,), generator=gen)
    ids[torch.arange(32)[None] >= lengths[:, None]] = PAD
    return ids


def test_mask_tokens_never_touches_padding_or_cls_and_keeps_the_input():
    ids = _ids()
    original = ids.clone()
    masked = pformer.mask_tokens(ids, MASK, (PAD, CLS), generator=torch.Generator().manual_seed(0))
    assert torch.equal(ids, original)
    protected = (original == PAD) | (original == CLS)
    assert torch.equal(masked[protected], original[protected])
    changed = masked != original
    assert torch.all(masked[changed] == MASK)
    share = changed.sum().item() / (~protected).sum().item()
    assert share == pytest.approx(0.25, abs=0.02)
    again = pformer.mask_tokens(ids, MASK, (PAD, CLS), generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, masked)  # the generator decides


def test_mask_tokens_probability_bounds():
    ids = _ids()
    protected = (ids == PAD) | (ids == CLS)
    assert torch.equal(pformer.mask_tokens(ids, MASK, (PAD, CLS), probability=0.0), ids)
    everything = pformer.mask_tokens(ids, MASK, (PAD, CLS), probability=1.0)
    assert torch.all(everything[~protected] == MASK) and torch.equal(everything[protected], ids[protected])


# ---- T5 prefix / suffix ----

def test_split_stage0_bounds_and_the_callers_list():
    texts = ["one two three four five six seven", "a b", "single"]
    kept = list(texts)
    cuts = {text: set() for text in texts}
    for seed in range(200):
        prefixes, suffixes = pformer.split_for_prefix_lm(texts, pformer.stage0_longest_prefix, random.Random(seed))
        for text, prefix, suffix in zip(texts, prefixes, suffixes):
            cut = len(prefix.split(" "))
            cuts[text].add(cut)
            assert " ".join(w for w in (prefix, suffix) if w) == text
    assert texts == kept
    assert cuts == {texts[0]: {1, 2, 3, 4}, texts[1]: {1, 2}, texts[2]: {1}}  # 1 .. 1 + n // 2


def test_split_stage2_bounds_and_one_word_captions():
    cuts = set()
    for seed in range(200):
        prefixes, suffixes = pformer.split_for_prefix_lm(["one two three four five six seven", "word", ""],
                                                         pformer.stage2_longest_prefix, random.Random(seed))
        cuts.add(len(prefixes[0].split(" ")))
        assert (prefixes[1], suffixes[1]) == ("word", "")
        assert (prefixes[2], suffixes[2]) == ("", "")
    assert cuts == {1, 2, 3}  # 1 .. n // 2
    with pytest.raises(ValueError):
        random.Random(0).randint(1, 1 // 2)  # the reference's bound on a one-word caption


def test_split_uses_pythons_random_by_default():
    texts = ["the quick brown fox jumps over the lazy dog"] * 5
    random.seed(7)
    by_default = pformer.split_for_prefix_lm(texts, pformer.stage0_longest_prefix)
    assert by_default == pformer.split_for_prefix_lm(texts, pformer.stage0_longest_prefix, random.Random(7))
