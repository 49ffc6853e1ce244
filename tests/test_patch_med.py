"""The reduction step bound to BLIP's text BERT (``med`` and NLVR2's twin cross-attention encoder).

Pinned here: at tau = 0 the patched encoders give LAVIS's outputs (text and multimodal modes, padded batches, head
mask, gradients); with pruning, padded tokens never displace real ones, the returned mask follows the hidden states
and marks the fused token, padding does not change a sample's result, and each layer syncs with the host once; the
decoder, a 3-D mask and cached decoding never prune; gradient checkpointing is refused; ``remove`` restores stock;
``lavis_accel.apply(model, "madtp")`` covers a BLIP task model's text encoder and ``remove`` undoes it.
"""
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import lavis_accel  # first: makes torchvision importable for LAVIS
from lavis.models import med
from lavis.models.blip_models import nlvr_encoder
from lavis_accel.configs import packaged_config
from lavis_accel.errors import SettingError
from lavis_accel.patch import is_patched
from lavis_accel.patch import madtp as madtp_patch
from lavis_accel.patch import med as med_binding
from lavis_accel.patch import steps as patch_steps
from lavis_accel.patch.steps import MadtpControl, MadtpStep
from lavis_accel.reduce.settings import ReducerSettings
from lavis_accel.testing.tiny_models import build_tiny

WIDTH = 128  # med_config_tiny.json: hidden 128, 3 layers, 4 heads
LAYERS = 3
IMAGE_TOKENS = 7
PRUNING_TAU = 100.0  # with a unit-scale random codebook, this prunes the tiny random BERT layer after layer
ENCODERS = {"med": med.BertModel, "nlvr": nlvr_encoder.BertModel}


def tiny_bert(kind="med", seed=0, **config):
    cfg = med.BertConfig.from_json_file(packaged_config("med_config_tiny.json"))
    for key, value in config.items():
        setattr(cfg, key, value)
    torch.manual_seed(seed)
    return ENCODERS[kind](cfg, add_pooling_layer=False).double().eval()


def twin_berts(kind="med", **config):
    """A stock BERT and a MADTP-patched one with the same weights, and the patched one's control."""
    stock, patched = tiny_bert(kind, **config), tiny_bert(kind, **config)
    control = MadtpControl(codebook(), 0.0)
    med_binding.apply_step(patched, MadtpStep(control))
    return stock, patched, control


def codebook(seed=3):
    return torch.randn(100, WIDTH, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def token_ids(real_lengths, length, seed=1):
    """``[B, length]`` ids ([CLS]-like 101 first) and the 0/1 long mask of ``real_lengths`` real tokens each."""
    ids = torch.randint(5, 1000, (len(real_lengths), length), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = 101
    mask = (torch.arange(length)[None, :] < torch.tensor(real_lengths)[:, None]).long()
    return ids.masked_fill(mask == 0, 0), mask


def image_inputs(kind, batch, seed=2):
    """What the encoder cross-attends to: one image (``med``) or NLVR2's two, with their all-ones masks."""
    generator = torch.Generator().manual_seed(seed)
    images = [torch.randn(batch, IMAGE_TOKENS, WIDTH, generator=generator, dtype=torch.float64) for _ in range(2)]
    masks = [torch.ones(batch, IMAGE_TOKENS, dtype=torch.long) for _ in range(2)]
    if kind == "med":
        return {"encoder_hidden_states": images[0], "encoder_attention_mask": masks[0]}
    return {"encoder_hidden_states": images, "encoder_attention_mask": masks}


def encode(bert, ids, mask, mode, kind="med", **kwargs):
    inputs = image_inputs(kind, ids.shape[0]) if mode == "multimodal" else {}
    return bert(ids, attention_mask=mask, mode=mode, return_dict=True, **inputs, **kwargs)


class RecordingStep(MadtpStep):
    """MADTP's step, recording each layer's real-token mask before and after its reduction."""

    def start_forward(self):
        super().start_forward()
        self.layers = []

    def reduce(self, index, x, seen, valid=None):
        new_x, new_valid = super().reduce(index, x, seen, valid)
        self.layers.append((valid, new_valid, new_x.shape[1]))
        return new_x, new_valid


@pytest.mark.parametrize("kind", ["med", "nlvr"])
@pytest.mark.parametrize("mode", ["text", "multimodal"])
def test_temperature_zero_reproduces_stock_outputs(kind, mode):
    stock, patched, _ = twin_berts(kind)
    ids, mask = token_ids([9, 5, 12], 12)
    with torch.no_grad():
        expected = encode(stock, ids, mask, mode, kind, output_attentions=True, output_hidden_states=True)
        got = encode(patched, ids, mask, mode, kind, output_attentions=True, output_hidden_states=True)
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, rtol=0, atol=1e-13)
    for name in ("hidden_states", "attentions"):
        for layer_got, layer_expected in zip(getattr(got, name), getattr(expected, name)):
            torch.testing.assert_close(layer_got, layer_expected, rtol=0, atol=1e-13)
    assert med_binding.pruned_attention_mask(patched) is mask
    assert med_binding.token_counts(patched) == [12] * (LAYERS + 1)


def test_temperature_zero_keeps_head_mask_and_gradients_of_stock():
    stock, patched, _ = twin_berts(attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)
    ids, mask = token_ids([10, 6], 10)
    head_mask = torch.tensor([1.0, 0.0, 1.0, 0.5], dtype=torch.float64)
    outputs = []
    for bert in (stock, patched):
        bert.train()
        outputs.append(encode(bert, ids, mask, "multimodal", head_mask=head_mask).last_hidden_state)
        outputs[-1].square().sum().backward()
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=1e-13)
    for (name, p_stock), p_patched in zip(stock.named_parameters(), patched.parameters()):
        torch.testing.assert_close(p_patched.grad, p_stock.grad, rtol=1e-10, atol=1e-12, msg=name)


def test_pruned_training_reaches_the_codebook_through_the_fused_tokens():
    bert = tiny_bert().train()
    book = codebook().requires_grad_()
    med_binding.apply_step(bert, MadtpStep(MadtpControl(book, PRUNING_TAU)))
    ids, mask = token_ids([12, 9], 12)
    out = encode(bert, ids, mask, "multimodal").last_hidden_state
    assert out.shape[1] < 12
    out[:, 0].sum().backward()
    assert torch.isfinite(book.grad).all() and book.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["med", "nlvr"])
def test_pruning_keeps_real_tokens_first_and_the_mask_in_step(kind):
    bert = tiny_bert(kind)
    step = RecordingStep(MadtpControl(codebook(), PRUNING_TAU))
    med_binding.apply_step(bert, step)
    ids, mask = token_ids([12, 7, 3], 12)
    with torch.no_grad():
        out = encode(bert, ids, mask, "multimodal", kind, output_attentions=True)
    counts = med_binding.token_counts(bert)
    assert counts[0] == 12 and counts[-1] < 12 and counts == sorted(counts, reverse=True)
    for valid_in, valid_out, length in step.layers:
        if valid_out.shape[1] == valid_in.shape[1]:
            continue
        k = length - 2  # [CLS], k kept tokens, the fused one
        real = valid_in[:, 1:].sum(dim=1)
        assert torch.equal(valid_out[:, 1:-1].sum(dim=1), real.clamp(max=k))  # no padding kept over a real token
        assert torch.equal(valid_out[:, -1], real > k)  # the fused token is real when it holds a real token
        assert valid_out[:, 0].all()
    pruned = med_binding.pruned_attention_mask(bert)
    assert pruned.shape == out.last_hidden_state.shape[:2] and pruned.dtype == mask.dtype
    assert torch.equal(pruned, step.layers[-1][1].long())
    assert [a.shape[-1] for a in out.attentions] == counts[:-1]  # each layer attended over its own tokens
    assert not pruned.all()  # the short samples end with masked (padded) slots


def test_padding_does_not_change_a_samples_result():
    """A sample alone and unpadded, and in a padded batch keeping as many tokens per layer, give the same [CLS].

    Rows 0 and 1: one sample padded by 5 (the batch keeps its K). Row 2: [CLS] and 2 words, never pruned alone
    (dropping 1 of 2 tokens is no reduction), in the batch keeping both words and masked padded slots.
    """
    bert = tiny_bert()
    med_binding.apply_step(bert, MadtpStep(MadtpControl(codebook(), PRUNING_TAU)))
    ids, mask = token_ids([11, 11, 3], 16)
    ids[1] = ids[0]
    with torch.no_grad():
        short_alone = encode(bert, ids[2:, :3], mask[2:, :3], "text").last_hidden_state
        assert med_binding.token_counts(bert) == [3] * (LAYERS + 1)
        alone = encode(bert, ids[:1, :11], mask[:1, :11], "text").last_hidden_state
        counts_alone = med_binding.token_counts(bert)
        batch = encode(bert, ids, mask, "text").last_hidden_state
    assert counts_alone[1] < 11 and min(counts_alone) >= 4 and med_binding.token_counts(bert)[1:] == counts_alone[1:]
    torch.testing.assert_close(batch[:2, 0], alone[:, 0].expand(2, WIDTH), rtol=0, atol=1e-12)
    assert not med_binding.pruned_attention_mask(bert)[2].all()  # the short sample ends with masked slots
    torch.testing.assert_close(batch[2, 0], short_alone[0, 0], rtol=0, atol=1e-12)


def test_one_host_synchronisation_per_layer(monkeypatch):
    calls = []
    original = patch_steps.madtp.batch_keep

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(patch_steps.madtp, "batch_keep", counting)
    bert = tiny_bert()
    med_binding.apply_step(bert, MadtpStep(MadtpControl(codebook(), PRUNING_TAU)))
    ids, mask = token_ids([12, 8], 12)
    with torch.no_grad():
        for mode in ("text", "multimodal"):
            encode(bert, ids, mask, mode)
    assert len(calls) == 2 * LAYERS


def test_decoder_causal_and_cached_use_never_prunes():
    stock, patched, control = twin_berts()
    control.temperature = PRUNING_TAU
    ids, mask = token_ids([8, 5], 8)
    three_d = mask[:, None, :].expand(2, 8, 8)
    next_ids, next_mask = torch.full((2, 1), 7), torch.ones(2, 9, dtype=torch.long)
    calls = [{"attention_mask": three_d}, {"attention_mask": mask, "is_decoder": True},
             {"attention_mask": mask, "is_decoder": True, "use_cache": True}]
    with torch.no_grad():
        for kwargs in calls:
            expected = stock(ids, mode="text", return_dict=True, **kwargs)
            got = patched(ids, mode="text", return_dict=True, **kwargs)
            torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, rtol=0, atol=1e-13)
            assert med_binding.token_counts(patched) == []
            assert med_binding.current_step(patched).pooled is None  # the step never ran
        cached = {"attention_mask": next_mask, "past_key_values": expected.past_key_values, "is_decoder": True}
        expected = stock(next_ids, mode="text", return_dict=True, **cached)
        got = patched(next_ids, mode="text", return_dict=True, **cached)
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, rtol=0, atol=1e-13)
    assert med_binding.pruned_attention_mask(patched) is next_mask


def test_gradient_checkpointing_is_refused_in_one_line():
    bert = tiny_bert().train()
    bert.encoder.gradient_checkpointing = True
    med_binding.apply_step(bert, MadtpStep(MadtpControl(codebook(), 1.0)))
    ids, mask = token_ids([6], 6)
    with pytest.raises(SettingError, match="gradient checkpointing") as error:
        encode(bert, ids, mask, "text")
    assert "\n" not in str(error.value)
    with torch.no_grad():
        assert encode(bert.eval(), ids, mask, "text").last_hidden_state.shape[1] <= 6  # eval is not recomputed


def test_remove_restores_stock_and_applying_again_replaces_the_step():
    bert = tiny_bert()
    stock_attributes = {name: dict(module.__dict__) for name, module in bert.named_modules()}
    ids, mask = token_ids([12, 9], 12)
    with torch.no_grad():
        stock = encode(bert, ids, mask, "multimodal").last_hidden_state
        first, second = MadtpStep(MadtpControl(codebook(), 1.0)), MadtpStep(MadtpControl(codebook(), PRUNING_TAU))
        assert med_binding.apply_step(bert, first) is bert and med_binding.current_step(bert) is first
        assert med_binding.apply_step(bert, second) is bert and med_binding.current_step(bert) is second
        assert encode(bert, ids, mask, "multimodal").last_hidden_state.shape[1] < 12
        assert med_binding.remove(bert) is bert
        restored = encode(bert, ids, mask, "multimodal").last_hidden_state
    assert torch.equal(restored, stock)
    assert {name: dict(module.__dict__) for name, module in bert.named_modules()} == stock_attributes
    assert med_binding.current_step(bert) is None
    assert med_binding.remove(bert) is bert  # removing twice is harmless
    assert list(bert.state_dict()) == list(tiny_bert().state_dict())


def test_bad_targets_fail_in_one_line():
    step = MadtpStep(MadtpControl(codebook(), 1.0))
    with pytest.raises(SettingError, match="not a BLIP text encoder"):
        med_binding.apply_step(nn.Linear(2, 2), step)
    with pytest.raises(SettingError, match="position_embedding_type 'relative_key'"):
        med_binding.apply_step(tiny_bert(position_embedding_type="relative_key"), step)
    with pytest.raises(SettingError, match="no token reducer applied"):
        med_binding.pruned_attention_mask(tiny_bert())
    patched = med_binding.apply_step(tiny_bert(), step)
    with pytest.raises(SettingError, match="has not run a forward"):
        med_binding.pruned_attention_mask(patched)
    with torch.no_grad():
        encode(patched, *token_ids([4], 4), "text")
    med_binding.apply_step(patched, MadtpStep(MadtpControl(codebook(), PRUNING_TAU)))
    with pytest.raises(SettingError, match="has not run a forward"):  # not the mask of the previous step's forward
        med_binding.pruned_attention_mask(patched)


def test_merging_steps_cannot_reduce_text():
    bert = tiny_bert()
    settings = ReducerSettings.from_config({"name": "tome", "r": 2})
    med_binding.apply_step(bert, patch_steps.MergingStep(settings, LAYERS))
    ids, mask = token_ids([8], 8)
    with pytest.raises(SettingError, match="MergingStep changed the text length without its mask"):
        encode(bert, ids, mask, "text")


def run_text_encoder(arch, text, ids, mask):
    """The task model's own call of its text encoder: retrieval's ITC text pass, NLVR2's twin multimodal pass."""
    if arch == "blip_retrieval":
        return text.forward_text(SimpleNamespace(input_ids=ids, attention_mask=mask))
    images = {key: [value.float() if value.is_floating_point() else value for value in values]
              for key, values in image_inputs("nlvr", ids.shape[0]).items()}
    return text(ids, attention_mask=mask, return_dict=True, **images)


@pytest.mark.parametrize("arch, model_type", [("blip_retrieval", "coco"), ("blip_nlvr", "nlvr")])
def test_madtp_apply_covers_a_blip_models_text_encoder_and_remove_undoes_it(arch, model_type):
    model = build_tiny(arch, model_type, is_eval=True)
    text = model.text_encoder
    lavis_accel.apply(model, "madtp", temperature=PRUNING_TAU)
    assert med_binding.current_step(text).control is madtp_patch.control_of(model)  # one codebook and tau
    if hasattr(model, "text_encoder_m"):
        assert med_binding.current_step(model.text_encoder_m) is None  # momentum encoders stay stock
    ids, mask = token_ids([10, 6], 10)
    with torch.no_grad():
        out = run_text_encoder(arch, text, ids, mask).last_hidden_state
    assert madtp_patch.text_code_features(model).shape == (2, 100, WIDTH)
    assert med_binding.pruned_attention_mask(text).shape == out.shape[:2]
    lavis_accel.apply(model, "turbo", r=2)
    assert med_binding.current_step(text) is None  # ToMe/Turbo reduce the ViT only
    lavis_accel.apply(model, "madtp", temperature=1.0)
    lavis_accel.remove(model)
    assert med_binding.current_step(text) is None and not is_patched(model)


def test_blip_caption_has_no_text_encoder_to_prune():
    model = build_tiny("blip_caption", "base_coco", is_eval=True)
    lavis_accel.apply(model, "madtp", temperature=1.0)
    assert madtp_patch.text_encoder(model) is None
    assert med_binding.current_step(model.text_decoder.bert) is None
    with pytest.raises(SettingError, match="no MADTP reducer"):
        madtp_patch.text_code_features(model)
    lavis_accel.remove(model)
    assert not is_patched(model)
