"""The registered MADTP variants of BLIP (retrieval, captioning, VQA, NLVR2): each is its LAVIS parent plus MADTP.

Pinned here: the default yamls are LAVIS's plus ``arch`` and a ``madtp`` reducer block; each variant owns a
``[100, width]`` codebook and a saved tau; tau = 0 gives the parent's outputs; a stock LAVIS checkpoint loads (the
codebook starts fresh) while a MADTP checkpoint's tau wins and re-syncs the steps on every load; every task trains
pruned with a finite alignment loss reaching the codebook; the task code LAVIS runs at evaluation works with pruned
tokens (retrieval's ``compute_sim_matrix`` with per-batch token counts, VQA rank/generate with the pruned question
mask, NLVR2, caption beam search); bad settings fail in one line.
"""
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

import lavis_accel  # noqa: F401  (first: makes torchvision importable for LAVIS and registers the variants)
from lavis.common.registry import registry
from lavis_accel import config_checks
from lavis_accel.errors import SettingError
from lavis_accel.patch import madtp as madtp_patch
from lavis_accel.patch import med as med_binding
from lavis_accel.patch import token_counts
from lavis_accel.patch import vit as vit_binding
from lavis_accel.patch.steps import MadtpControl, MadtpStep
from lavis_accel.testing.tiny_models import TINY_IMAGE_SIZE, build_tiny, tiny_config
from blip_task_outputs import (ANSWER_LIST, TEXTS, BatchesLoader, build_seeded, caption_outputs, nlvr_batch,
                               nlvr_outputs, outputs_by_arch, random_images, record_load_results, retrieval_outputs,
                               training_batch, vqa_batch, vqa_outputs)

PARENTS = {
    "blip_retrieval_madtp": "blip_retrieval",
    "blip_caption_madtp": "blip_caption",
    "blip_vqa_madtp": "blip_vqa",
    "blip_nlvr_madtp": "blip_nlvr",
}
MODEL_TYPES = {
    "blip_retrieval_madtp": ["coco", "flickr"],
    "blip_caption_madtp": ["base_coco"],
    "blip_vqa_madtp": ["vqav2"],
    "blip_nlvr_madtp": ["nlvr"],
}
ARCHS = list(PARENTS)
ARCH_TYPES = [(arch, model_type) for arch in ARCHS for model_type in MODEL_TYPES[arch]]
TEXT_ARCHS = ["blip_retrieval_madtp", "blip_vqa_madtp", "blip_nlvr_madtp"]

TINY_TOKENS = (TINY_IMAGE_SIZE // 16) ** 2 + 1  # 37: [CLS] and 6 x 6 patches
TINY_WIDTH = 128
STRONG = 5.0  # a tau at which the tiny random models prune image and (unpadded) text tokens

# long enough for the tiny random models to prune the question tokens (the VQA tests check they are)
QUESTIONS = ["what color is the circle on the left of the picture?", "how many?"]


def madtp_block(temperature):
    return {"name": "madtp", "temperature": temperature}


def build_variant(arch, temperature=1.0, *, is_eval=True, seed=0, **overrides):
    return build_seeded(arch, MODEL_TYPES[arch][0], seed=seed, is_eval=is_eval, reducer=madtp_block(temperature),
                        **overrides)


def build_parent(arch, seed=0):
    return build_seeded(PARENTS[arch], MODEL_TYPES[arch][0], seed=seed)


# --- task outputs ---------------------------------------------------------------------------------------------------

outputs = outputs_by_arch({
    # two image batches, of 1 and 3 images
    "blip_retrieval_madtp": lambda model: retrieval_outputs(model, [random_images(1, seed=1),
                                                                    random_images(3, seed=2)]),
    "blip_caption_madtp": lambda model: caption_outputs(model, random_images(2, seed=3)),
    "blip_vqa_madtp": lambda model: vqa_outputs(model, random_images(2, seed=4), QUESTIONS, generate=True),
    "blip_nlvr_madtp": lambda model: nlvr_outputs(model, nlvr_samples()),
})


def assert_same_outputs(got, expected):
    assert got["discrete"] == expected["discrete"]
    for value, reference in zip(got["continuous"], expected["continuous"]):
        torch.testing.assert_close(value, reference, rtol=1e-4, atol=1e-5)


def vqa_training_samples():
    return vqa_batch(random_images(2, seed=4), QUESTIONS)


def nlvr_samples():
    return nlvr_batch((5, 6), [f"{TEXTS[0]} next to {TEXTS[2]}", "two"])


def training_samples(arch):
    return training_batch(PARENTS[arch], random_images(2, seed=7), vqa=vqa_training_samples(), nlvr=nlvr_samples())


# --- building -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch, model_type", ARCH_TYPES)
def test_default_yaml_is_the_parent_yaml_plus_arch_and_a_madtp_block(arch, model_type):
    variant_cfg = OmegaConf.to_container(OmegaConf.load(registry.get_model_class(arch).default_config_path(model_type)))
    parent_cls = registry.get_model_class(PARENTS[arch])
    parent_cfg = OmegaConf.to_container(OmegaConf.load(parent_cls.default_config_path(model_type)))
    assert variant_cfg["model"].pop("arch") == arch
    assert variant_cfg["model"].pop("reducer") == {"name": "madtp", "temperature": 1.0}
    parent_cfg["model"].pop("arch")
    assert variant_cfg == parent_cfg


@pytest.mark.parametrize("arch, model_type", ARCH_TYPES)
def test_every_type_builds_tiny_with_a_codebook_and_a_saved_tau(arch, model_type):
    model = build_tiny(arch, model_type, is_eval=True)
    assert model.temperature == 1.0
    state = model.state_dict()
    assert state["madtp_codebook"].shape == (100, TINY_WIDTH) and state["madtp_temperature"].shape == ()
    assert model.madtp_codebook.requires_grad
    control = madtp_patch.control_of(model)
    assert control.codebook is model.madtp_codebook and control.temperature == 1.0
    text = madtp_patch.text_encoder(model)
    assert (text is not None) == (arch in TEXT_ARCHS)
    if text is not None:
        assert med_binding.current_step(text).control is control
    if arch == "blip_retrieval_madtp":
        for tower, binding in ((model.visual_encoder_m, vit_binding), (model.text_encoder_m, med_binding)):
            step = binding.current_step(tower)
            assert step.control is control and step is not vit_binding.current_step(model)


# --- tau = 0 is the parent ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_temperature_zero_gives_the_parent_outputs(arch):
    parent = build_parent(arch)
    variant = build_variant(arch, 0.0, seed=1)
    result = variant.load_state_dict(parent.state_dict(), strict=False)
    assert sorted(result.missing_keys) == ["madtp_codebook", "madtp_temperature"] and not result.unexpected_keys
    assert_same_outputs(outputs(arch, variant), outputs(arch, parent))
    assert token_counts(variant) == [TINY_TOKENS] * 5


@pytest.mark.parametrize("arch", ARCHS)
def test_unpruned_runs_the_parent_and_restores_pruning(arch):
    parent = build_parent(arch)
    variant = build_variant(arch, STRONG, seed=1)
    variant.load_state_dict(parent.state_dict(), strict=False)
    with variant.unpruned():
        assert not vit_binding.is_patched(variant)
        assert_same_outputs(outputs(arch, variant), outputs(arch, parent))
    assert madtp_patch.control_of(variant).temperature == STRONG
    assert madtp_patch.control_of(variant).codebook is variant.madtp_codebook
    outputs(arch, variant)
    assert token_counts(variant)[-1] < TINY_TOKENS


# --- checkpoints ----------------------------------------------------------------------------------------------------

@pytest.fixture
def load_results(monkeypatch):
    """The ``load_state_dict`` result of every ``BaseModel.load_checkpoint`` call (LAVIS only logs it)."""
    return record_load_results(monkeypatch)


def build_from_checkpoint(arch, path, temperature=1.0):
    """The variant built as the plugin's runs build it: ``finetuned`` checked by ``checking_model_checkpoints``."""
    cfg = tiny_config(arch, MODEL_TYPES[arch][0], load_finetuned=True, finetuned=str(path),
                      reducer=madtp_block(temperature))
    with config_checks.checking_model_checkpoints(OmegaConf.create({"model": cfg, "run": {}})):
        return registry.get_model_class(arch).from_config(cfg).eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_a_stock_lavis_checkpoint_loads_and_the_codebook_starts_fresh(arch, tmp_path, load_results):
    parent = build_parent(arch)
    path = tmp_path / "stock.pth"
    torch.save({"model": parent.state_dict()}, path)
    torch.manual_seed(1)  # a different random initialisation: every parent weight must come from the file
    variant = build_from_checkpoint(arch, path, temperature=0.5)
    (result,) = load_results
    assert sorted(result.missing_keys) == ["madtp_codebook", "madtp_temperature"] and not result.unexpected_keys
    loaded = variant.state_dict()
    for key, value in parent.state_dict().items():
        assert torch.equal(loaded[key], value), key
    assert variant.temperature == 0.5 and float(variant.madtp_temperature) == 0.5  # the yaml's tau


def test_a_checkpoint_without_the_codebook_is_still_refused_when_other_weights_are_missing(tmp_path):
    parent = build_parent("blip_nlvr_madtp")
    state = {key: value for key, value in parent.state_dict().items() if not key.startswith("cls_head.")}
    path = tmp_path / "partial.pth"
    torch.save({"model": state}, path)
    with pytest.raises(SettingError, match=r"model.finetuned: .* leaves 4 parameters of BlipNLVRMadtp unset, e.g. "
                                           r"cls_head"):
        build_from_checkpoint("blip_nlvr_madtp", path)


def steps_taus(model):
    towers = [vit_binding.current_step(model)]
    if model.TEXT_PASS is not None:
        towers.append(med_binding.current_step(model.text_encoder))
    towers += [binding.current_step(getattr(model, name)) for name, binding in model.MOMENTUM_TOWERS]
    return {step.control.temperature for step in towers}


@pytest.mark.parametrize("arch", ARCHS)
def test_tau_survives_save_and_load_and_resyncs_the_steps(arch, tmp_path):
    trained = build_variant(arch)
    trained.set_temperature(2.5)
    assert steps_taus(trained) == {2.5} and float(trained.madtp_temperature) == 2.5
    path = tmp_path / "madtp.pth"
    torch.save({"model": trained.state_dict()}, path)

    fresh = build_variant(arch, seed=1)
    assert fresh.temperature == 1.0
    fresh.load_state_dict(torch.load(path)["model"])  # LAVIS's runner: resume, or reload the best epoch
    assert fresh.temperature == 2.5 and steps_taus(fresh) == {2.5}
    assert torch.equal(fresh.madtp_codebook, trained.madtp_codebook)

    evaluated = build_from_checkpoint(arch, path, temperature=1.0)  # an evaluation yaml: the file's tau wins
    assert evaluated.temperature == 2.5 and steps_taus(evaluated) == {2.5}


def test_set_temperature_changes_the_pruning_without_rebuilding():
    model = build_variant("blip_caption_madtp")
    steps = vit_binding.current_step(model)
    model.set_temperature(0.0)
    outputs("blip_caption_madtp", model)
    assert token_counts(model) == [TINY_TOKENS] * 5
    model.set_temperature(STRONG)
    outputs("blip_caption_madtp", model)
    assert token_counts(model)[-1] < TINY_TOKENS and vit_binding.current_step(model) is steps


def test_a_bad_tau_in_a_checkpoint_is_refused_in_one_line():
    model = build_variant("blip_caption_madtp")
    state = model.state_dict()
    state["madtp_temperature"] = torch.tensor(-1.0)
    with pytest.raises(SettingError, match=r"checkpoint: madtp_temperature must be a finite number >= 0, got -1.0"):
        model.load_state_dict(state)


# --- training -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_each_task_trains_pruned_with_an_alignment_loss_reaching_the_codebook(arch):
    model = build_variant(arch, STRONG, is_eval=False)
    assert model.alignment_loss() is None
    output = model(training_samples(arch))
    alignment = model.alignment_loss()
    assert token_counts(model)[-1] < TINY_TOKENS
    assert alignment.dim() == 0 and torch.isfinite(alignment)
    if arch == "blip_caption_madtp":  # no text side: MADTP's loss_fdt is the LM loss
        assert torch.equal(alignment, output.loss)  # plus 0 x codebook: the DDP guard
    else:
        assert 0 < alignment.item() < 2 * len(model.madtp_feature_pairs())  # sums of mean (1 - cos)
    (output.loss + 0.1 * alignment).backward()
    grad = model.madtp_codebook.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_retrieval_aligns_the_itc_text_pass_and_adds_the_momentum_term_without_gradient():
    model = build_variant("blip_retrieval_madtp", STRONG, is_eval=False)
    model(training_samples("blip_retrieval_madtp"))
    (image, text), (image_m, text_m) = model.madtp_feature_pairs()
    assert text.shape == image.shape == (2, 100, TINY_WIDTH)
    assert image.requires_grad and text.requires_grad
    assert not image_m.requires_grad and not text_m.requires_grad
    # the ITM passes ran after the ITC one: the text step's features are the last one's (2 x 2 rows), not the loss's
    assert med_binding.current_step(model.text_encoder).pooled.shape[0] == 4


@pytest.mark.parametrize("arch", ARCHS)
def test_at_tau_zero_the_alignment_term_is_the_references_task_loss(arch):
    model = build_variant(arch, 0.0, is_eval=False)
    output = model(training_samples(arch))
    expected = 2 * output.loss_itc if arch == "blip_retrieval_madtp" else output.loss
    torch.testing.assert_close(model.alignment_loss(), expected)


def test_an_evaluation_forward_keeps_the_last_training_alignment_term():
    model = build_variant("blip_nlvr_madtp", STRONG, is_eval=False)
    model(nlvr_samples())
    alignment = model.alignment_loss()
    model.eval()
    model.predict(nlvr_samples())
    assert model.alignment_loss() is alignment


# --- the tasks LAVIS evaluates, pruned ------------------------------------------------------------------------------

def itm_score(model, features, text):
    """LAVIS's ITM score of one image's (unpadded) features with one tokenized text."""
    ids = text.input_ids.clone()
    ids[:, 0] = model.tokenizer.enc_token_id
    output = model.text_encoder(ids, attention_mask=text.attention_mask, encoder_hidden_states=features[None],
                                encoder_attention_mask=torch.ones(features.shape[:-1], dtype=torch.long)[None],
                                return_dict=True)
    return model.itm_head(output.last_hidden_state[:, 0, :])[0, 1]


def test_retrieval_scores_batches_of_different_token_counts_each_image_at_its_own_length():
    model = build_variant("blip_retrieval_madtp", 2.0)
    # text pruning off for this comparison: with it, an ITM batch's K depends on which images share the batch
    med_binding.apply_step(model.text_encoder, MadtpStep(MadtpControl(model.madtp_codebook, 0.0)))
    batches = [random_images(1, seed=1), random_images(3, seed=2)]
    with torch.no_grad():
        features = [feature for images in batches for feature in model.visual_encoder.forward_features(images)]
        assert len({feature.shape[0] for feature in features}) == 2 and features[0].shape[0] < TINY_TOKENS
        texts = [model.tokenizer([text], padding="max_length", truncation=True, max_length=35, return_tensors="pt")
                 for text in TEXTS]
        text_embeds = [torch.nn.functional.normalize(model.text_proj(
            model.text_encoder.forward_text(text).last_hidden_state[:, 0, :]), dim=-1) for text in texts]
        image_embeds = [torch.nn.functional.normalize(model.vision_proj(feature[0]), dim=-1) for feature in features]
        expected = torch.tensor([[float(itm_score(model, feature, text) + image_embed @ text_embed[0])
                                  for text, text_embed in zip(texts, text_embeds)]
                                 for feature, image_embed in zip(features, image_embeds)])
        i2t, t2i = model.compute_sim_matrix(BatchesLoader(batches, TEXTS), SimpleNamespace(k_test=4))
    i2t, t2i = torch.as_tensor(i2t), torch.as_tensor(t2i)
    scored = i2t != -100  # i2t: the 4 best texts of each image; t2i: all 4 images of each text
    assert scored.sum() == 16 and (t2i != -100).all()
    torch.testing.assert_close(i2t[scored], expected[scored], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(t2i, expected.t(), rtol=1e-5, atol=1e-5)
    assert "forward_features" not in model.visual_encoder.__dict__ and not model.text_encoder._forward_pre_hooks


def test_retrieval_evaluation_runs_with_image_and_text_pruning():
    model = build_variant("blip_retrieval_madtp", STRONG)
    i2t, t2i = outputs("blip_retrieval_madtp", model)["continuous"]
    assert torch.isfinite(i2t).all() and torch.isfinite(t2i).all()
    assert ((i2t != -100).sum(dim=1) == 2).all() and ((t2i != -100).sum(dim=1) == 2).all()
    counts = med_binding.token_counts(model.text_encoder)
    assert counts[-1] < counts[0]


def test_vqa_rank_and_generate_run_with_the_pruned_question_mask():
    model = build_variant("blip_vqa_madtp", STRONG)
    samples = {"image": random_images(2, seed=4), "text_input": QUESTIONS}
    with torch.no_grad():
        ranked = model.predict_answers(dict(samples), inference_method="rank", answer_list=ANSWER_LIST,
                                       num_ans_candidates=4)
        counts = med_binding.token_counts(model.text_encoder)
        encoder_output, _ = model.forward_encoder(samples)
        generated = model.predict_answers(dict(samples), inference_method="generate", max_len=5)
    assert counts[-1] < counts[0]  # the question was pruned
    mask = samples["tokenized_text"].attention_mask
    assert mask.shape == encoder_output.last_hidden_state.shape[:2] and mask.dtype == torch.long
    assert all(answer in ANSWER_LIST for answer in ranked) and len(generated) == 2


def test_vqa_training_forward_feeds_the_decoder_the_pruned_question_mask():
    model = build_variant("blip_vqa_madtp", STRONG, is_eval=False)
    samples = vqa_training_samples()
    loss = model(samples).loss
    assert torch.isfinite(loss)
    counts = med_binding.token_counts(model.text_encoder)
    assert counts[-1] < counts[0] and samples["tokenized_text"].attention_mask.shape[1] == counts[-1]


def test_nlvr_predicts_with_image_and_text_pruning():
    model = build_variant("blip_nlvr_madtp", STRONG)
    with torch.no_grad():
        predictions = model.predict(nlvr_samples())["predictions"]
    assert predictions.shape == (2, 2) and torch.isfinite(predictions).all()
    assert token_counts(model)[-1] < TINY_TOKENS
    counts = med_binding.token_counts(model.text_encoder)
    assert counts[-1] < counts[0]


def test_caption_beam_search_runs_on_pruned_image_tokens():
    model = build_variant("blip_caption_madtp", STRONG)
    with torch.no_grad():
        captions = model.generate({"image": random_images(2, seed=3)}, num_beams=3, max_length=12, min_length=4)
    assert len(captions) == 2 and all(isinstance(caption, str) for caption in captions)
    assert token_counts(model)[-1] < TINY_TOKENS


# --- bad settings ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("block, message", [
    ({"name": "madtp", "temperature": -1}, r"reducer setting 'temperature' of 'madtp' must be a finite number >= 0"),
    ({"name": "madtp", "ratio": 0.5}, r"reducer setting 'ratio' is not known for 'madtp': use temperature"),
    ({"name": "turbo", "r": 4}, r"model.reducer: BlipNLVRMadtp takes a madtp block .*not 'turbo'"),
])
def test_bad_reducer_blocks_fail_at_build_in_one_line(block, message):
    with pytest.raises(SettingError, match=message):
        build_tiny("blip_nlvr_madtp", "nlvr", reducer=block)


def test_set_temperature_refuses_a_negative_tau():
    model = build_variant("blip_caption_madtp")
    with pytest.raises(SettingError, match="reducer setting 'temperature' of 'madtp' must be"):
        model.set_temperature(-0.5)
    assert model.temperature == 1.0


@pytest.mark.parametrize("arch, block, message", [
    ("blip_nlvr_turbo", madtp_block(1.0), r"model.reducer: blip_nlvr_turbo has no MADTP binding: use blip_nlvr_madtp"),
    ("blip_nlvr_madtp", {"name": "turbo"}, r"model.reducer: blip_nlvr_madtp takes a madtp block"),
    ("blip_nlvr", madtp_block(1.0), r"model.reducer: blip_nlvr has no token-reduction binding: use blip_nlvr_madtp$"),
    ("blip_nlvr", {"name": "turbo"}, r"model.reducer: blip_nlvr has no token-reduction binding: use blip_nlvr_turbo$"),
])
def test_the_config_check_refuses_a_block_the_arch_cannot_run_before_building(arch, block, message):
    with pytest.raises(SettingError, match=message):
        config_checks.check_reducer_block(OmegaConf.create({"arch": arch, "reducer": block}))


def test_the_config_check_accepts_a_madtp_block_on_a_madtp_arch():
    config_checks.check_reducer_block(OmegaConf.create({"arch": "blip_vqa_madtp", "reducer": madtp_block(2.0)}))
