"""The reducer bound to LAVIS's BLIP ViT: stock outputs at r = 0, token counts, LAVIS's traps, apply/remove."""
import pytest
import torch
from torch import nn

import lavis_accel  # first: it makes torchvision importable for LAVIS on CPU-only machines
from lavis.models.vit import VisionTransformerEncoder
from lavis_accel.errors import SettingError
from lavis_accel.patch import current_settings, is_patched, token_counts
from lavis_accel.patch import steps as patch_steps
from lavis_accel.reduce.merge import token_schedule


def tiny_vit(checkpointed=True, img_size=64, depth=4, seed=0):
    torch.manual_seed(seed)
    return VisionTransformerEncoder(
        img_size=img_size,
        patch_size=16,
        embed_dim=64,
        depth=depth,
        num_heads=4,
        use_grad_checkpointing=checkpointed,
        ckpt_layer=2,
    )


def twin_vits():
    """The same weights with and without fairscale checkpointing on the last two blocks."""
    checkpointed, plain = tiny_vit(True), tiny_vit(False)
    plain.load_state_dict(checkpointed.state_dict())
    return checkpointed, plain


@pytest.fixture
def images():
    torch.manual_seed(1)
    return torch.randn(2, 3, 64, 64)


@pytest.mark.parametrize("name", ["tome", "turbo"])
def test_r_zero_reproduces_stock_lavis_through_forward_and_forward_features(name, images):
    vit = tiny_vit().eval()
    with torch.no_grad():
        stock = vit(images), vit.forward_features(images)
        lavis_accel.apply(vit, name, r=0)
        patched = vit(images), vit.forward_features(images)
    for before, after in zip(stock, patched):
        torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    assert token_counts(vit) == [17] * 5


def test_r_zero_reproduces_stock_lavis_in_train_mode_with_gradients(images):
    """In float64, so that the comparison of gradients is not lost in float32 summation noise."""
    stock_vit, patched_vit = tiny_vit().double().train(), tiny_vit().double().train()
    lavis_accel.apply(patched_vit, "turbo", r=0)
    stock = stock_vit.forward_features(images.double())
    patched = patched_vit.forward_features(images.double())
    torch.testing.assert_close(patched, stock)
    stock.square().sum().backward()
    patched.square().sum().backward()
    for (name, p_stock), p_patched in zip(stock_vit.named_parameters(), patched_vit.parameters()):
        torch.testing.assert_close(p_patched.grad, p_stock.grad, msg=name)


@pytest.mark.parametrize("name", ["tome", "turbo"])
def test_checkpointed_blocks_merge_like_plain_ones_in_eval_and_train(name, images):
    checkpointed, plain = twin_vits()
    for vit in (checkpointed, plain):
        lavis_accel.apply(vit, name, r=3, threshold=1)
    for train in (False, True):
        checkpointed.train(train), plain.train(train)
        out_ckpt, out_plain = checkpointed.forward_features(images), plain.forward_features(images)
        torch.testing.assert_close(out_ckpt, out_plain, atol=1e-5, rtol=0)
        assert token_counts(checkpointed) == token_counts(plain) == [17, 14, 11, 8, 5]
    out_ckpt.sum().backward()
    out_plain.sum().backward()
    grad_ckpt = checkpointed.blocks[3].attn.qkv.weight.grad
    torch.testing.assert_close(grad_ckpt, plain.blocks[3].attn.qkv.weight.grad, atol=1e-5, rtol=1e-4)
    assert grad_ckpt.abs().sum() > 0


def test_checkpointed_attention_is_recomputed_in_backward(images):
    vit = tiny_vit().train()
    lavis_accel.apply(vit, "turbo", r=2, threshold=1)
    calls = {index: 0 for index in range(4)}
    for index, block in enumerate(vit.blocks):
        block.attn.qkv.register_forward_hook(lambda *_, index=index: calls.__setitem__(index, calls[index] + 1))
    vit.forward_features(images).sum().backward()
    assert token_counts(vit) == [17, 15, 13, 11, 9]
    assert calls == {0: 1, 1: 1, 2: 2, 3: 2}  # the last ckpt_layer=2 blocks run their attention again in backward


@pytest.mark.parametrize("img_size, r, threshold, final", [(384, 30, 100, 217), (480, 40, 40, 421)])
def test_token_counts_follow_the_schedule_of_blip_vit_b(img_size, r, threshold, final):
    torch.manual_seed(0)
    vit = VisionTransformerEncoder(img_size=img_size, patch_size=16, embed_dim=32, depth=12, num_heads=2).eval()
    lavis_accel.apply(vit, "turbo", r=r, threshold=threshold)
    with torch.no_grad():
        out = vit.forward_features(torch.randn(1, 3, img_size, img_size))
    assert out.shape[1] == final
    assert token_counts(vit) == token_schedule((img_size // 16) ** 2 + 1, [r] * 12, threshold)


def test_oversized_r_is_clamped_and_threshold_stops_merging(images):
    vit = tiny_vit().eval()
    lavis_accel.apply(vit, "turbo", r=1000, threshold=1)
    with torch.no_grad():
        assert vit(images).shape == (2, 2, 64)
    assert token_counts(vit) == [17, 9, 5, 3, 2]
    lavis_accel.apply(vit, "tome", r=3, threshold=12)
    with torch.no_grad():
        vit(images)
    assert token_counts(vit) == [17, 14, 11, 11, 11]


def test_cls_token_stays_first(images):
    """With all merging in the last block, its [CLS] output must equal the stock model's."""
    vit = tiny_vit().eval()
    with torch.no_grad():
        stock = vit(images)
        lavis_accel.apply(vit, "turbo", r=[0, 0, 0, 8], threshold=1)
        patched = vit(images)
    assert patched.shape[1] == 9
    torch.testing.assert_close(patched[:, 0], stock[:, 0], atol=1e-5, rtol=0)


def test_turbo_layer_counter_counts_blocks_scheduled_to_merge(monkeypatch, images):
    seen = []
    original = patch_steps.informativity_matching

    def spy(metric, cls_row, r, alpha, beta, gamma, layer, **kwargs):
        seen.append((layer, cls_row is not None))
        return original(metric, cls_row, r, alpha, beta, gamma, layer, **kwargs)

    monkeypatch.setattr(patch_steps, "informativity_matching", spy)
    vit = tiny_vit().eval()
    lavis_accel.apply(vit, "turbo", r=[2, 0, 2, 2], beta=0.5, gamma=1, threshold=14)
    with torch.no_grad():
        vit(images)
        vit.forward_features(images)  # the state restarts at every forward, whichever path
    # blocks 0 and 2 merge as merging layers 0 and 1; block 3 (13 tokens < threshold 14) is skipped before any
    # matching or [CLS]-row work, and since token counts only fall, no merge can follow a skipped one
    assert seen == [(0, True), (1, True)] * 2
    assert token_counts(vit) == [17, 15, 15, 13, 13]


def test_remove_restores_stock_lavis_exactly(images):
    vit = tiny_vit().eval()
    stock_forwards = {name: module.__dict__.get("forward") for name, module in vit.named_modules()}
    with torch.no_grad():
        stock = vit.forward_features(images)
        lavis_accel.apply(vit, "turbo", r=3, threshold=1)
        assert vit.forward_features(images).shape[1] < 17
        assert lavis_accel.remove(vit) is vit
        restored = vit.forward_features(images)
    assert torch.equal(restored, stock)
    assert not is_patched(vit)
    assert {name: module.__dict__.get("forward") for name, module in vit.named_modules()} == stock_forwards
    assert not any(hasattr(block, "_lavis_accel_slot") for block in vit.blocks)
    assert lavis_accel.remove(vit) is vit  # removing twice is harmless


def test_applying_twice_is_applying_once_and_replaces_settings(images):
    once, twice = tiny_vit().eval(), tiny_vit().eval()
    lavis_accel.apply(once, "turbo", r=3, alpha=2)
    lavis_accel.apply(twice, "tome", r=1)
    lavis_accel.apply(twice, "turbo", r=3, alpha=2)
    assert current_settings(twice) == current_settings(once)
    assert current_settings(twice).threshold == 40  # unset settings go back to the reducer's defaults
    with torch.no_grad():
        torch.testing.assert_close(twice(images), once(images))
    lavis_accel.remove(twice)
    assert not is_patched(twice)
    assert "forward" not in twice.blocks[0].__dict__


class TinyBlip(nn.Module):
    """Stands for a LAVIS BLIP model: a visual encoder and its momentum copy."""

    def __init__(self):
        super().__init__()
        self.visual_encoder = tiny_vit()
        self.visual_encoder_m = tiny_vit()


def test_a_blip_model_gets_only_its_visual_encoder_patched(images):
    model = TinyBlip().eval()
    other = tiny_vit().eval()
    assert lavis_accel.apply(model, "turbo", r=3, threshold=1) is model
    assert is_patched(model) and is_patched(model.visual_encoder)
    assert not is_patched(model.visual_encoder_m) and not is_patched(other)
    with torch.no_grad():
        assert model.visual_encoder.forward_features(images).shape[1] == 5
        assert model.visual_encoder_m.forward_features(images).shape[1] == 17
        assert other(images).shape[1] == 17


def test_bad_targets_and_settings_fail_in_one_line():
    with pytest.raises(SettingError, match="not a LAVIS BLIP ViT"):
        lavis_accel.apply(nn.Linear(2, 2), "turbo", r=3)
    vit = tiny_vit()
    for settings, key in [({"r": -1}, "'r'"), ({"r": 2.5}, "'r'"), ({"alpha": -1}, "'alpha'"),
                          ({"threshold": 0}, "'threshold'"), ({"speed": 3}, "'speed'")]:
        with pytest.raises(ValueError, match=key) as error:
            lavis_accel.apply(vit, "turbo", **settings)
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="'fastest' is not known: use one of tome, turbo"):
        lavis_accel.apply(vit, "fastest", r=3)
    with pytest.raises(SettingError, match="'r' lists 5 layers but the model has 4"):
        lavis_accel.apply(vit, "turbo", r=[1] * 5)
    assert not is_patched(vit)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["cast", "autocast"])
def test_low_precision_keeps_the_schedule_and_the_cls_feature(images, dtype, mode):
    vit = tiny_vit(checkpointed=False).eval()
    lavis_accel.apply(vit, "turbo", r=8, threshold=1)
    with torch.no_grad():
        reference = vit.forward_features(images)
        if mode == "cast":
            out = vit.to(dtype).forward_features(images.to(dtype))
        else:
            with torch.autocast("cpu", dtype=dtype):
                out = vit.forward_features(images)
    assert out.shape == reference.shape  # the same token schedule: 17 -> 9
    cosine = torch.nn.functional.cosine_similarity(out[:, 0].float(), reference[:, 0], dim=-1)
    # half of this tiny random ViT's tokens merge, among near-equal similarities: a bf16 key can flip a choice
    # (at real size, ViT-B/16 @384 r=30, the [CLS] cosine to fp32 measured 0.9997 to 0.99999)
    assert cosine.min() >= 0.99


def test_scale_alpha_scales_the_semantic_weight_to_the_block_token_count(monkeypatch, images):
    seen = []
    original = patch_steps.informativity_matching

    def spy(metric, cls_row, r, alpha, *args, **kwargs):
        seen.append((metric.shape[1], alpha))
        return original(metric, cls_row, r, alpha, *args, **kwargs)

    monkeypatch.setattr(patch_steps, "informativity_matching", spy)
    vit = tiny_vit().eval()
    with torch.no_grad():
        lavis_accel.apply(vit, "turbo", r=2, alpha=5, threshold=1)
        vit(images)
        lavis_accel.apply(vit, "turbo", r=2, alpha=5, threshold=1, scale_alpha=True)
        vit(images)
    plain, scaled = seen[:4], seen[4:]
    assert [alpha for _, alpha in plain] == [5.0] * 4  # the reference's behaviour by default
    assert scaled == [(tokens, pytest.approx(5.0 * tokens / 577)) for tokens in (17, 15, 13, 11)]


def test_scale_alpha_is_the_reference_at_577_tokens():
    torch.manual_seed(0)
    vit = VisionTransformerEncoder(img_size=384, patch_size=16, embed_dim=32, depth=1, num_heads=2).eval()
    x = torch.randn(1, 3, 384, 384)
    with torch.no_grad():
        outputs = [lavis_accel.apply(vit, "turbo", r=30, threshold=1, scale_alpha=scale)(x) for scale in (False, True)]
    torch.testing.assert_close(outputs[1], outputs[0], atol=0, rtol=0)
