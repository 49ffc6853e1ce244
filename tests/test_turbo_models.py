"""The registered Turbo variants of BLIP (retrieval, captioning, VQA, NLVR2): each is its LAVIS parent plus a reducer.

Pinned here: the default yamls are LAVIS's plus ``arch`` and the paper's ``reducer:`` block; with ``r: 0`` a variant
holding its parent's weights gives the parent's task outputs; with merging, outputs change and the ViT's token
counts follow the schedule; a stock LAVIS checkpoint loads unchanged; bad reducer settings fail at build; every
variant trains a step on CPU.
"""
import pytest
import torch
from omegaconf import OmegaConf

import lavis_accel  # noqa: F401  (first: makes torchvision importable for LAVIS and registers the variants)
import lavis.models
from lavis.common.registry import registry
from lavis_accel.errors import SettingError
from lavis_accel.patch import current_settings, token_counts
from lavis_accel.reduce import parse_r, token_schedule
from lavis_accel.testing.tiny_models import TINY_IMAGE_SIZE, build_tiny
from blip_task_outputs import (TEXTS, build_seeded, caption_outputs, nlvr_batch, nlvr_outputs, outputs_by_arch,
                               random_images, record_load_results, retrieval_outputs, training_batch, vqa_batch,
                               vqa_outputs)

PARENTS = {
    "blip_retrieval_turbo": "blip_retrieval",
    "blip_caption_turbo": "blip_caption",
    "blip_vqa_turbo": "blip_vqa",
    "blip_nlvr_turbo": "blip_nlvr",
}
MODEL_TYPES = {
    "blip_retrieval_turbo": ["coco", "flickr"],
    "blip_caption_turbo": ["base_coco", "large_coco"],
    "blip_vqa_turbo": ["vqav2"],
    "blip_nlvr_turbo": ["nlvr"],
}
# The table (Turbo's run scripts): r and threshold per task; alpha 5, beta 1, gamma 0 throughout.
PAPER_REDUCERS = {
    "blip_retrieval_turbo": {"r": 30, "threshold": 100},
    "blip_caption_turbo": {"r": 30, "threshold": 40},
    "blip_vqa_turbo": {"r": 40, "threshold": 40},
    "blip_nlvr_turbo": {"r": 30, "threshold": 40},
}
ARCHS = list(PARENTS)
ARCH_TYPES = [(arch, model_type) for arch in ARCHS for model_type in MODEL_TYPES[arch]]

TINY_TOKENS = (TINY_IMAGE_SIZE // 16) ** 2 + 1  # 37: [CLS] and 6 x 6 patches
CROSS_ATTENTION_SCALE = 8
MERGING = {"r": 4, "threshold": 1}  # 37 -> 33 -> 29 -> 25 -> 21 tokens through the tiny ViT's 4 blocks

QUESTIONS = ["what color is the circle?", "how many shapes are there?"]


def first_type(arch):
    return MODEL_TYPES[arch][0]


def build_variant(arch, reducer, *, is_eval=True, **overrides):
    return build_tiny(arch, first_type(arch), is_eval=is_eval, reducer=reducer, **overrides)


def build_parent(arch, seed=0):
    """The tiny parent, made to read its image (see ``sharpen_cross_attention``)."""
    return sharpen_cross_attention(build_seeded(PARENTS[arch], first_type(arch), seed=seed))


def sharpen_cross_attention(model, scale=CROSS_ATTENTION_SCALE):
    """Scale the text side's cross-attention weights so that its outputs depend on the image tokens.

    At BERT's random initialisation (std 0.02) cross-attention is nearly uniform over the image tokens, and a uniform
    average is what a size-weighted merge preserves: outputs would match the parent's with or without merging.
    """
    weights = [weight for name, weight in model.named_parameters() if ".crossattention." in name and weight.dim() == 2]
    assert weights, f"{type(model).__name__} has no cross-attention weights"
    with torch.no_grad():
        for weight in weights:
            weight.mul_(scale)
    return model


def with_weights_of(parent, variant):
    variant.load_state_dict(parent.state_dict())
    return variant


# --- task outputs: discrete ones must be identical at r = 0, continuous ones close ----------------------------------

outputs = outputs_by_arch({
    "blip_retrieval_turbo": lambda model: retrieval_outputs(model, [random_images(3, seed=1)]),
    "blip_caption_turbo": lambda model: caption_outputs(model, random_images(2, seed=2)),
    "blip_vqa_turbo": lambda model: vqa_outputs(model, random_images(2, seed=3), QUESTIONS),
    "blip_nlvr_turbo": lambda model: nlvr_outputs(model, nlvr_batch((4, 5), TEXTS[:2])),
})


# --- default configs ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch, model_type", ARCH_TYPES)
def test_default_yaml_is_the_parent_yaml_plus_arch_and_the_paper_reducer(arch, model_type):
    variant_cfg = OmegaConf.to_container(OmegaConf.load(registry.get_model_class(arch).default_config_path(model_type)))
    parent_cls = registry.get_model_class(PARENTS[arch])
    parent_cfg = OmegaConf.to_container(OmegaConf.load(parent_cls.default_config_path(model_type)))
    assert variant_cfg["model"].pop("arch") == arch
    assert variant_cfg["model"].pop("reducer") == {
        "name": "turbo", "alpha": 5, "beta": 1, "gamma": 0, "prop_attn": True, **PAPER_REDUCERS[arch]}
    parent_cfg["model"].pop("arch")
    assert variant_cfg == parent_cfg


def test_model_zoo_lists_the_variants_and_their_types():
    zoo = lavis.models.model_zoo
    for arch, model_types in MODEL_TYPES.items():
        assert zoo.model_zoo[arch] == model_types
        assert arch in str(zoo)


@pytest.mark.parametrize("arch", ARCHS)
def test_the_default_block_builds_turbo_at_the_paper_setting(arch):
    settings = current_settings(build_variant(arch, {}))
    assert settings.as_dict() == {"name": "turbo", "alpha": 5.0, "beta": 1.0, "gamma": 0.0, "prop_attn": True,
                                  "scale_alpha": False,
                                  **PAPER_REDUCERS[arch]}


# --- outputs vs the parent ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_r_zero_gives_the_parent_outputs(arch):
    parent = build_parent(arch)
    variant = with_weights_of(parent, build_variant(arch, {"r": 0}))
    expected, got = outputs(arch, parent), outputs(arch, variant)
    assert got["discrete"] == expected["discrete"]
    for value, reference in zip(got["continuous"], expected["continuous"]):
        torch.testing.assert_close(value, reference, rtol=1e-4, atol=1e-5)
    assert token_counts(variant) == [TINY_TOKENS] * 5


@pytest.mark.parametrize("arch", ARCHS)
def test_merging_changes_the_outputs_and_follows_the_token_schedule(arch):
    parent = build_parent(arch)
    variant = with_weights_of(parent, build_variant(arch, MERGING))
    expected, got = outputs(arch, parent), outputs(arch, variant)
    for value, reference in zip(got["continuous"], expected["continuous"]):
        assert value.shape == reference.shape and torch.isfinite(value).all()
        assert not torch.allclose(value, reference, rtol=1e-3, atol=1e-4)
    depth = len(variant.visual_encoder.blocks)
    schedule = token_schedule(TINY_TOKENS, parse_r(depth, MERGING["r"]), MERGING["threshold"])
    assert token_counts(variant) == schedule
    assert schedule[-1] < TINY_TOKENS


@pytest.mark.parametrize("arch", ARCHS)
def test_a_tome_block_builds_the_tome_baseline(arch):
    model = build_variant(arch, {"name": "tome", **MERGING})
    settings = current_settings(model)
    assert (settings.name, settings.alpha, settings.r, settings.threshold) == ("tome", 0.0, 4, 1)
    outputs(arch, model)
    assert token_counts(model) == token_schedule(TINY_TOKENS, [4] * 4, 1)


# --- checkpoints ----------------------------------------------------------------------------------------------------

@pytest.fixture
def load_results(monkeypatch):
    """The ``load_state_dict`` result of every ``BaseModel.load_checkpoint`` call (LAVIS only logs it)."""
    return record_load_results(monkeypatch)


@pytest.mark.parametrize("arch, model_type", ARCH_TYPES)
def test_a_stock_lavis_checkpoint_loads_unchanged_through_finetuned(arch, model_type, tmp_path, load_results):
    torch.manual_seed(0)
    parent = build_tiny(PARENTS[arch], model_type)
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": parent.state_dict()}, path)
    torch.manual_seed(1)  # a different random initialisation: every weight must come from the checkpoint
    variant = build_tiny(arch, model_type, load_finetuned=True, finetuned=str(path))
    (result,) = load_results
    assert result.missing_keys == [] and result.unexpected_keys == []
    expected, loaded = parent.state_dict(), variant.state_dict()
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key


# --- bad settings ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("block, message", [
    ({"r": -1}, r"reducer setting 'r' must be"),
    ({"name": "nope"}, r"reducer name 'nope' is not known"),
    ({"threshold": 0}, r"reducer setting 'threshold' must be an integer >= 1"),
    ({"ratio": 0.5}, r"reducer setting 'ratio' is not known"),
])
def test_bad_reducer_settings_fail_at_build_naming_the_setting(arch, block, message):
    with pytest.raises(SettingError, match=message):
        build_variant(arch, block)


def test_bad_reducer_settings_fail_before_the_checkpoint_is_loaded(tmp_path):
    missing = tmp_path / "not_downloaded_yet.pth"
    with pytest.raises(SettingError, match="reducer setting 'r'"):
        build_variant("blip_caption_turbo", {"r": -1}, load_finetuned=True, finetuned=str(missing))


def test_a_variant_without_a_reducer_block_is_refused():
    with pytest.raises(SettingError, match="model.reducer: BlipNLVRTurbo needs a reducer block"):
        build_variant("blip_nlvr_turbo", None)


# --- training -------------------------------------------------------------------------------------------------------

def training_samples(arch):
    images = random_images(2, seed=6)
    return training_batch(PARENTS[arch], images, vqa=vqa_batch(images, QUESTIONS), nlvr=nlvr_batch((6, 7), TEXTS[:2]))


def is_checkpointed(block):
    return "checkpoint" in repr(block.attn.forward)


@pytest.mark.parametrize("arch", ARCHS)
def test_each_variant_trains_a_step_with_merging(arch):
    torch.manual_seed(0)
    model = build_variant(arch, MERGING, is_eval=False)
    blocks = model.visual_encoder.blocks
    # retrieval configs checkpoint the last ViT blocks (fairscale): the merge must run inside them too
    assert [is_checkpointed(block) for block in blocks] == [arch == "blip_retrieval_turbo" and i == len(blocks) - 1
                                                           for i in range(len(blocks))]
    loss = model(training_samples(arch)).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert token_counts(model) == token_schedule(TINY_TOKENS, [4] * len(blocks), 1)
    for block in (blocks[0], blocks[-1]):
        grad = block.attn.qkv.weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
