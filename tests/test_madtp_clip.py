"""MADTP on LAVIS's CLIP (``patch.clip``) and the registered ``clip_madtp``, on the tiny random CLIP type.

Pinned here: temperature 0 gives stock CLIP's outputs of both towers; pruned text keeps and pools the true EOT
(whatever the other captions of the batch), padding never reaches a real token and the causal mask holds after
pruning; apply/remove leave a stock model; ``clip_madtp`` loads a stock checkpoint, trains a step with its alignment
loss, keeps tau in its checkpoints and runs LAVIS's ``compute_sim_matrix`` pruned.
"""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lavis_accel  # noqa: F401  (first: makes torchvision importable for LAVIS and registers the variants)
from lavis_accel.errors import SettingError
from lavis_accel.models.clip_madtp import ClipMadtp
from lavis_accel.patch import clip as clip_binding
from lavis_accel.patch import madtp as madtp_patch
from lavis_accel.testing.tiny_models import TINY_IMAGE_SIZE, build_tiny

CAPTIONS = ["a big red circle at the top left next to two small blue squares", "two blue squares", "a green triangle"]
IMAGE_TOKENS = (TINY_IMAGE_SIZE // 16) ** 2 + 1  # 37
TEXT_TOKENS = 77
PRUNING_TAU = 20.0  # on the seed-0 tiny model: text 77 -> 8 -> 6 -> 4 tokens, image 37 -> 26 -> ... -> 12


def tiny_clip(arch="clip", temperature=None, seed=0):
    """A float64 tiny CLIP (``clip_madtp`` with ``temperature`` as its reducer's tau)."""
    torch.manual_seed(seed)
    overrides = {} if temperature is None else {"reducer": {"name": "madtp", "temperature": temperature}}
    return build_tiny(arch, is_eval=True, **overrides).double()


def images(count=2):
    return torch.randn(count, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, dtype=torch.float64,
                       generator=torch.Generator().manual_seed(1))


def texts(model, captions=CAPTIONS):
    return model.tokenizer(captions)


@pytest.fixture(scope="module")
def pruning_model():
    return tiny_clip("clip_madtp", temperature=PRUNING_TAU)


# --- temperature 0 is stock CLIP --------------------------------------------------------------------------------------

@pytest.mark.parametrize("train", [False, True])
def test_temperature_zero_gives_stock_outputs_and_gradients_of_both_towers(train):
    stock, patched = tiny_clip().train(train), tiny_clip().train(train)
    lavis_accel.apply(patched, "madtp", temperature=0.0)
    text = texts(stock)
    outputs = [(model.encode_image(images()), model.encode_text(text)) for model in (stock, patched)]
    for before, after in zip(*outputs):
        torch.testing.assert_close(after, before, rtol=0, atol=1e-12)
    for model, (image_features, text_features) in zip((stock, patched), outputs):
        (image_features.square().sum() + text_features.square().sum()).backward()
    for (name, p_stock), p_patched in zip(stock.named_parameters(), patched.parameters()):
        if p_stock.grad is not None:
            torch.testing.assert_close(p_patched.grad, p_stock.grad, rtol=0, atol=1e-10, msg=name)
    assert clip_binding.token_counts(patched) == {"image": [IMAGE_TOKENS] * 5, "text": [TEXT_TOKENS] * 4}


def test_clip_madtp_at_temperature_zero_is_its_parent():
    parent, variant = tiny_clip(), tiny_clip("clip_madtp", temperature=0.0)
    variant.load_state_dict(parent.state_dict(), strict=False)
    for encode in ("encode_image", "encode_text"):
        inputs = images() if encode == "encode_image" else texts(parent)
        torch.testing.assert_close(getattr(variant, encode)(inputs), getattr(parent, encode)(inputs),
                                   rtol=0, atol=1e-12)


# --- the text tower: EOT, padding, causal mask ----------------------------------------------------------------------

def test_each_caption_pools_its_own_eot_whatever_the_batch():
    model = tiny_clip("clip_madtp", temperature=1.0)
    text = texts(model)
    batch = model.encode_text(text)
    batch_counts = clip_binding.token_counts(model)["text"]
    long_alone = model.encode_text(text[:1])
    assert clip_binding.token_counts(model)["text"] == batch_counts  # the longest caption sets K in every layer
    assert batch_counts[-1] < text.argmax(dim=-1)[0] + 1  # so its own real tokens were pruned
    torch.testing.assert_close(batch[0], long_alone[0], rtol=0, atol=1e-12)
    # the short captions fit in that K: all their real tokens are kept, so they are unpruned CLIP's
    model.set_temperature(0.0)
    torch.testing.assert_close(batch[1:], model.encode_text(text[1:]), rtol=0, atol=1e-12)


def test_the_eot_is_never_pruned_nor_fused_and_its_index_is_tracked(pruning_model):
    step = clip_binding.current_steps(pruning_model).text
    seen = []
    reduce = step.reduce

    def checking_reduce(index, x, attention_seen, valid=None):
        rows = torch.arange(x.shape[0])
        eot_before = x[rows, step.eot]
        x, valid = reduce(index, x, attention_seen, valid)
        seen.append((x.shape[1], step.eot.clone()))
        assert torch.equal(x[rows, step.eot], eot_before)  # the very EOT vector, not a mix
        assert valid[rows, step.eot].all()
        return x, valid

    step.reduce = checking_reduce
    text = texts(pruning_model)
    try:
        pruning_model.encode_text(text)
    finally:
        del step.reduce
    assert [length for length, _ in seen] == clip_binding.token_counts(pruning_model)["text"][1:] == [8, 6, 4]
    assert seen[-1][1].tolist() == [2, 2, 2]  # only [SOT] and the EOT remain ahead of the fused token
    assert text.argmax(dim=-1).tolist() == [15, 4, 4]


def test_causal_mask_is_rebuilt_and_padding_hidden_after_pruning(pruning_model):
    step = clip_binding.current_steps(pruning_model).text
    checked = []
    reduce = step.reduce

    def checking_reduce(index, x, attention_seen, valid=None):
        probs = attention_seen.probs  # [B, H, T, T] of this block, T the current length
        later = torch.ones(probs.shape[-2:], dtype=torch.bool).triu(1)
        assert probs[:, :, later].abs().max() == 0  # no token sees a later one
        assert probs.masked_select(~valid[:, None, None, :]).abs().sum() == 0  # nor padding
        checked.append(probs.shape[-1])
        return reduce(index, x, attention_seen, valid)

    step.reduce = checking_reduce
    try:
        pruning_model.encode_text(texts(pruning_model))
    finally:
        del step.reduce
    assert checked == [77, 8, 6]


def test_padding_never_changes_the_pooled_text(pruning_model):
    text = texts(pruning_model)
    other_padding = text.masked_fill(text == 0, 1234)  # different ids after every EOT
    torch.testing.assert_close(pruning_model.encode_text(other_padding), pruning_model.encode_text(text),
                               rtol=0, atol=0)


def test_image_tower_prunes_with_batch_wide_counts(pruning_model):
    features = pruning_model.encode_image(images(3))
    counts = clip_binding.token_counts(pruning_model)["image"]
    assert counts[0] == IMAGE_TOKENS and counts[-1] < counts[0] and counts == sorted(counts, reverse=True)
    assert features.shape == (3, 128) and torch.isfinite(features).all()


# --- apply / remove ---------------------------------------------------------------------------------------------------

def test_apply_remove_restores_stock_clip():
    model, stock = tiny_clip(), tiny_clip()
    lavis_accel.apply(model, "madtp", temperature=PRUNING_TAU)
    lavis_accel.apply(model, "madtp", temperature=PRUNING_TAU)  # again: replaces the steps only
    steps = clip_binding.current_steps(model)
    assert steps.image.no_prune_up_to == 1 and steps.text.no_prune_up_to == 0
    assert len(steps.image.projections) == 4 and steps.image.projections[0].out_features == 768
    assert madtp_patch.control_of(model) is steps.text.control
    assert not any(name.startswith("madtp") for name, _ in model.named_parameters())  # fresh ones stay outside
    text = texts(model)
    assert not torch.allclose(model.encode_text(text), stock.encode_text(text))
    lavis_accel.remove(model)
    assert not clip_binding.is_patched(model) and clip_binding.current_steps(model) is None
    patched_modules = (model, model.visual, *model.visual.transformer.resblocks, *model.transformer.resblocks)
    assert not any({"forward", "encode_text", "_lavis_accel", "_lavis_accel_slot"} & set(vars(m))
                   for m in patched_modules)
    torch.testing.assert_close(model.encode_text(text), stock.encode_text(text), rtol=0, atol=0)
    torch.testing.assert_close(model.encode_image(images()), stock.encode_image(images()), rtol=0, atol=0)
    assert lavis_accel.remove(model) is model  # unpatched: nothing to do


def test_codebook_choice_and_bad_settings():
    model = tiny_clip()
    lavis_accel.apply(model, "madtp", temperature=1.0, codebook=torch.randn(10, 32, dtype=torch.float64))
    assert clip_binding.current_steps(model).text.projections[2].out_features == 32  # fresh ones fit the codebook
    variant = tiny_clip("clip_madtp", temperature=1.0)
    assert madtp_patch.control_of(variant).codebook is variant.madtp_codebook
    with pytest.raises(SettingError, match="'codebook' of 'madtp' has width 32"):
        lavis_accel.apply(variant, "madtp", codebook=torch.randn(10, 32))
    with pytest.raises(SettingError, match="temperature"):
        lavis_accel.apply(model, "madtp", temperature=-1.0)
    with pytest.raises(SettingError, match="is not a LAVIS CLIP"):
        clip_binding.apply_steps(nn.Linear(2, 2), None, None)
    image_step = clip_binding.current_steps(model).image
    with pytest.raises(SettingError, match="does not track the EOT"):
        clip_binding.apply_steps(model, image_step, image_step)


# --- the registered clip_madtp ----------------------------------------------------------------------------------------

def test_clip_madtp_has_madtp_parameters_and_loads_a_stock_checkpoint(tmp_path):
    stock = tiny_clip()
    path = tmp_path / "stock_clip.pt"
    torch.save(stock.state_dict(), path)
    torch.manual_seed(0)
    model = build_tiny("clip_madtp", pretrained=str(path), reducer={"name": "madtp", "temperature": 0.0})
    assert model.madtp_codebook.shape == (100, 768) and model.madtp_temperature.ndim == 0
    assert [q.in_features for q in model.madtp_image_queries] == [128] * 4
    assert [q.out_features for q in model.madtp_text_queries] == [768] * 3
    for name, tensor in stock.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], tensor.float(), msg=name)
    assert set(model.PARAMETERS_STARTING_FRESH) == {n for n, _ in model.named_parameters() if n.startswith("madtp")}


def test_clip_madtp_trains_a_step_with_its_alignment_loss(single_process_group):
    model = tiny_clip("clip_madtp", temperature=PRUNING_TAU).float().train()
    output = model({"image": images(2).float(), "text_input": CAPTIONS[:2]})
    alignment = model.alignment_loss()
    assert torch.isfinite(output.loss) and torch.isfinite(alignment) and alignment > 0
    assert clip_binding.token_counts(model)["text"][-1] < TEXT_TOKENS
    (output.loss + 0.1 * alignment).backward()
    for tensor in (model.madtp_codebook, model.madtp_image_queries[0].weight, model.madtp_text_queries[-1].weight):
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0


def test_clip_madtp_keeps_tau_in_its_checkpoint(tmp_path):
    trained = build_tiny("clip_madtp", is_eval=True)
    trained.set_temperature(2.5)
    path = tmp_path / "checkpoint_best.pth"
    torch.save({"model": trained.state_dict(), "epoch": 0}, path)  # as LAVIS's runner saves it
    torch.manual_seed(5)
    model = build_tiny("clip_madtp", is_eval=True, finetuned=str(path))  # the yaml's tau is 1.0
    assert model.temperature == 2.5 and madtp_patch.control_of(model).temperature == 2.5
    torch.testing.assert_close(model.madtp_codebook, trained.madtp_codebook, rtol=0, atol=0)
    torch.testing.assert_close(model.encode_text(texts(model)), trained.encode_text(texts(model)), rtol=0, atol=0)


class Loader:
    """What LAVIS's ``compute_sim_matrix`` reads of a retrieval data loader: ``dataset.text`` and image batches."""

    def __init__(self, captions, batches):
        self.dataset = SimpleNamespace(text=captions)
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


@torch.no_grad()
def test_compute_sim_matrix_runs_pruned(pruning_model):
    captions = CAPTIONS + ["a yellow star"]
    batches = [images(3), images(1)]
    i2t, t2i = pruning_model.compute_sim_matrix(Loader(captions, [{"image": batch} for batch in batches]))
    assert i2t.shape == (4, 4) and (t2i == i2t.T).all()
    text_features = F.normalize(pruning_model.encode_text(texts(pruning_model, captions)), dim=-1)
    counts = []
    for batch, rows in zip(batches, (i2t[:3], i2t[3:])):
        image_features = F.normalize(pruning_model.encode_image(batch), dim=-1)
        counts.append(clip_binding.token_counts(pruning_model)["image"])
        torch.testing.assert_close(torch.from_numpy(rows), image_features @ text_features.t(), rtol=0, atol=1e-12)
    assert counts[0] != counts[1]  # the two batches kept different numbers of tokens


def test_clip_madtp_is_registered_with_its_types():
    from lavis.common.registry import registry

    assert registry.get_model_class("clip_madtp") is ClipMadtp
    assert set(ClipMadtp.PRETRAINED_MODEL_CONFIG_DICT) == {"ViT-L-14-336", "ViT-B-16", "ViT-Tiny-16"}
