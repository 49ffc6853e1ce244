"""The registered CrossGET variants of BLIP (retrieval, captioning, VQA, NLVR2): each is its LAVIS parent plus
CrossGET's cross tokens, offsets and merging (a derived design: ``lavis_accel.models.blip_crossget``).

Pinned here: the default yamls are LAVIS's plus ``arch`` and a ``crossget`` block; the offsets are zero parameters of
the model (``crossget_cross_image``, and ``crossget_cross_text`` on retrieval) read by the steps, with the momentum
towers left stock; a stock LAVIS checkpoint loads with the offsets fresh; ``lavis_accel.remove`` gives the parent's
outputs exactly. With ``rv = 0`` and zero offsets the ViT differs from the parent only by the cross token, an extra
key (the output equals the stock blocks run with a copy of [CLS] appended); with ``rl = 0`` the text output is the
parent's (its cross token is masked as a key). Merging keeps [CLS] first and the cross token last and untouched,
follows the token schedule, and never merges text padding with real tokens. The retrieval JS loss reaches the
offsets only; the task code LAVIS evaluates runs on the merged tokens. A tiny retrieval model trains through
``lavis-accel train`` with ``crossget_retrieval`` and is evaluated by LAVIS's ``retrieval`` task.

The tiny models here have a ViT as deep as their BERT (``DEPTH``): the JS loss pairs the towers block by block.
"""
import json
import os
import re

import pytest
import torch
from omegaconf import OmegaConf

import lavis_accel
from lavis.common.registry import registry
from lavis_accel import config_checks
from lavis_accel.datasets import write_retrieval
from lavis_accel.errors import SettingError
from lavis_accel.patch import med as med_binding
from lavis_accel.patch import vit as vit_binding
from lavis_accel.reduce import crossget
from lavis_accel.testing.projects import tiny_project, write_project
from lavis_accel.testing.tiny_models import TINY_IMAGE_SIZE, TINY_MED_CONFIG, tiny_config
from blip_task_outputs import (ANSWER_LIST, TEXTS, build_seeded, caption_outputs, nlvr_batch, nlvr_outputs,
                               outputs_by_arch, random_images, record_load_results, retrieval_outputs, training_batch,
                               vqa_batch, vqa_outputs)
from cli_jobs import job_dir, metrics_lines, run_cli, train_stats

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARENTS = {
    "blip_retrieval_crossget": "blip_retrieval",
    "blip_caption_crossget": "blip_caption",
    "blip_vqa_crossget": "blip_vqa",
    "blip_nlvr_crossget": "blip_nlvr",
}
MODEL_TYPES = {
    "blip_retrieval_crossget": ["coco", "flickr"],
    "blip_caption_crossget": ["base_coco"],
    "blip_vqa_crossget": ["vqav2"],
    "blip_nlvr_crossget": ["nlvr"],
}
ARCHS = list(PARENTS)
ARCH_TYPES = [(arch, model_type) for arch in ARCHS for model_type in MODEL_TYPES[arch]]
NO_TEXT_PASS = ["blip_caption_crossget", "blip_vqa_crossget", "blip_nlvr_crossget"]
RETRIEVAL = "blip_retrieval_crossget"

with open(TINY_MED_CONFIG, encoding="utf-8") as _f:
    DEPTH = json.load(_f)["num_hidden_layers"]  # the tiny ViT is built this deep too
WIDTH = 128
TINY_TOKENS = (TINY_IMAGE_SIZE // 16) ** 2 + 1  # 37: [CLS] and 6 x 6 patches
RV, RL = 16, 4
SCHEDULE = crossget.token_schedule(TINY_TOKENS + 1, RV, DEPTH)  # the cross token included: 38 -> 22 -> 12 -> 7
KEPT = SCHEDULE[-1] - 1  # image tokens leaving the ViT (the cross token dropped)
QUESTIONS = ["what color is the circle on the left of the picture?", "how many?"]


def crossget_block(rv=RV, rl=0):
    return {"name": "crossget", "rv": rv, "rl": rl}


def build_variant(arch, rv=RV, rl=None, *, seed=0, is_eval=True, **overrides):
    """A tiny variant, ViT as deep as BERT; ``rl`` defaults to ``RL`` on retrieval, 0 elsewhere."""
    rl = (RL if arch == RETRIEVAL else 0) if rl is None else rl
    return build_seeded(arch, MODEL_TYPES[arch][0], seed=seed, is_eval=is_eval, vit_depth=DEPTH,
                        reducer=crossget_block(rv, rl), **overrides)


def build_parent(arch, seed=0):
    return build_seeded(PARENTS[arch], MODEL_TYPES[arch][0], seed=seed, vit_depth=DEPTH)


def with_parent_weights(arch, **settings):
    """``(parent, variant)``: the variant holds the parent's weights (and zero offsets)."""
    parent = build_parent(arch)
    variant = build_variant(arch, seed=1, **settings)
    result = variant.load_state_dict(parent.state_dict(), strict=False)
    assert sorted(result.missing_keys) == sorted(variant.crossget_offset_names()) and not result.unexpected_keys
    return parent, variant


def nlvr_samples():
    return nlvr_batch((5, 6), [f"{TEXTS[0]} next to {TEXTS[2]}", "two"])


def training_samples(arch):
    return training_batch(PARENTS[arch], random_images(2, seed=7), vqa=vqa_batch(random_images(2, seed=4), QUESTIONS),
                          nlvr=nlvr_samples())


outputs = outputs_by_arch({
    RETRIEVAL: lambda model: retrieval_outputs(model, [random_images(1, seed=1), random_images(3, seed=2)]),
    "blip_caption_crossget": lambda model: caption_outputs(model, random_images(2, seed=3)),
    "blip_vqa_crossget": lambda model: vqa_outputs(model, random_images(2, seed=4), QUESTIONS, generate=True),
    "blip_nlvr_crossget": lambda model: nlvr_outputs(model, nlvr_samples()),
})


def recording_merges(step):
    """Wrap ``step.merge`` on the instance: every call's ``(matching, x, valid, merged x, merged valid)``."""
    calls = []
    merge = step.merge

    def recorded(matching, x, valid):
        merged, merged_valid = merge(matching, x, valid)
        calls.append((matching, x, valid, merged, merged_valid))
        return merged, merged_valid

    step.merge = recorded
    return calls


def paired(values, matching):
    """``(values of the sources, values of the tokens they join)``, for ``values`` ``[B, T]``."""
    sources = values.gather(1, matching.sources[..., 0])
    destinations = values.gather(1, matching.destinations[..., 0]).gather(1, matching.picks[..., 0])
    return sources, destinations


def one_line(err):
    assert "\n" not in str(err.value)
    return str(err.value)


# --- building -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch, model_type", ARCH_TYPES)
def test_default_yaml_is_the_parent_yaml_plus_arch_and_a_crossget_block(arch, model_type):
    variant_cfg = OmegaConf.to_container(OmegaConf.load(registry.get_model_class(arch).default_config_path(model_type)))
    parent_cls = registry.get_model_class(PARENTS[arch])
    parent_cfg = OmegaConf.to_container(OmegaConf.load(parent_cls.default_config_path(model_type)))
    assert variant_cfg["model"].pop("arch") == arch
    assert variant_cfg["model"].pop("reducer") == {"name": "crossget", "rv": 16, "rl": 0}
    parent_cfg["model"].pop("arch")
    assert variant_cfg == parent_cfg


@pytest.mark.parametrize("arch, model_type", ARCH_TYPES)
def test_every_type_builds_tiny_from_its_yaml_with_zero_offsets_the_steps_read(arch, model_type):
    model = build_seeded(arch, model_type, vit_depth=DEPTH)  # the yaml's own block: rv 16, rl 0
    names = ["crossget_cross_image"] + (["crossget_cross_text"] if arch == RETRIEVAL else [])
    assert [name for name, _ in model.named_parameters() if name.startswith("crossget")] == names
    assert list(model.crossget_offset_names()) == names == list(model.PARAMETERS_STARTING_FRESH)
    for name in names:
        offsets = getattr(model, name)
        assert offsets.shape == (1, DEPTH, WIDTH) and offsets.requires_grad and not offsets.any()
    step = vit_binding.current_step(model)
    assert step.offsets is model.crossget_cross_image and step.r == 16
    if arch == RETRIEVAL:
        text_step = med_binding.current_step(model.text_encoder)
        assert text_step.offsets is model.crossget_cross_text and text_step.r == 0
        # the momentum towers stay stock, and their parameter pairs hold no offsets
        assert vit_binding.current_step(model.visual_encoder_m) is None
        assert med_binding.current_step(model.text_encoder_m) is None
        paired_ids = {id(p) for pair in model.model_pairs for module in pair for p in module.parameters()}
        assert id(model.crossget_cross_image) not in paired_ids and id(model.crossget_cross_text) not in paired_ids
    elif hasattr(model, "text_encoder"):
        assert med_binding.current_step(model.text_encoder) is None


# --- checkpoints ----------------------------------------------------------------------------------------------------

@pytest.fixture
def load_results(monkeypatch):
    return record_load_results(monkeypatch)


def build_from_checkpoint(arch, path):
    """The variant built as the plugin's runs build it: ``finetuned`` checked by ``checking_model_checkpoints``."""
    cfg = tiny_config(arch, MODEL_TYPES[arch][0], load_finetuned=True, finetuned=str(path), vit_depth=DEPTH,
                      reducer=crossget_block())
    with config_checks.checking_model_checkpoints(OmegaConf.create({"model": cfg, "run": {}})):
        return registry.get_model_class(arch).from_config(cfg).eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_a_stock_lavis_checkpoint_loads_with_the_offsets_fresh(arch, tmp_path, load_results):
    parent = build_parent(arch)
    path = tmp_path / "stock.pth"
    torch.save({"model": parent.state_dict()}, path)
    torch.manual_seed(1)  # a different random initialisation: every parent weight must come from the file
    variant = build_from_checkpoint(arch, path)
    (result,) = load_results
    assert sorted(result.missing_keys) == sorted(variant.crossget_offset_names()) and not result.unexpected_keys
    loaded = variant.state_dict()
    for key, value in parent.state_dict().items():
        assert torch.equal(loaded[key], value), key
    assert all(not loaded[name].any() for name in variant.crossget_offset_names())


def test_trained_offsets_survive_save_and_load_and_the_steps_read_them(tmp_path):
    trained = build_variant(RETRIEVAL)
    with torch.no_grad():
        trained.crossget_cross_image.normal_()
        trained.crossget_cross_text.normal_()
    path = tmp_path / "crossget.pth"
    torch.save({"model": trained.state_dict()}, path)
    evaluated = build_from_checkpoint(RETRIEVAL, path)
    assert torch.equal(evaluated.crossget_cross_image, trained.crossget_cross_image)
    assert vit_binding.current_step(evaluated).offsets is evaluated.crossget_cross_image
    assert med_binding.current_step(evaluated.text_encoder).offsets is evaluated.crossget_cross_text


def test_an_offset_of_another_shape_in_a_checkpoint_is_refused_in_one_line(tmp_path):
    model = build_variant("blip_nlvr_crossget")
    state = model.state_dict()
    state["crossget_cross_image"] = torch.zeros(1, DEPTH + 1, WIDTH)
    with pytest.raises(SettingError) as err:
        model.load_state_dict(state)  # LAVIS's runner: resume, or reload the best epoch
    assert one_line(err) == (f"checkpoint: crossget_cross_image has shape [1, {DEPTH + 1}, {WIDTH}], but "
                             f"BlipNLVRCrossGet needs [1, {DEPTH}, {WIDTH}] (one offset per block)")
    path = tmp_path / "wrong.pth"
    torch.save({"model": state}, path)
    with pytest.raises(SettingError) as err:
        build_from_checkpoint("blip_nlvr_crossget", path)
    assert re.match(r"model.finetuned: .* does not fit BlipNLVRCrossGet: 1 tensors differ in shape, e.g. "
                    r"crossget_cross_image", one_line(err))


# --- the parent, exactly --------------------------------------------------------------------------------------------

def assert_same_outputs(got, expected):
    assert got["discrete"] == expected["discrete"]
    for value, reference in zip(got["continuous"], expected["continuous"]):
        assert torch.equal(value, reference)


@pytest.mark.parametrize("arch", ARCHS)
def test_remove_restores_the_parent_outputs_exactly(arch):
    parent, variant = with_parent_weights(arch)
    expected = outputs(arch, parent)
    reduced = outputs(arch, variant)
    assert vit_binding.token_counts(variant)[-1] == KEPT
    assert any(not torch.equal(value, reference)
               for value, reference in zip(reduced["continuous"], expected["continuous"]))
    lavis_accel.remove(variant)
    assert not vit_binding.is_patched(variant)
    assert_same_outputs(outputs(arch, variant), expected)


def stock_vit_with_an_extra_token(vit, images):
    """BLIP's ViT run as LAVIS runs it, with a copy of [CLS] appended after the position embeddings and dropped
    before the final norm: CrossGET at rv = 0 with zero offsets."""
    x = vit.patch_embed(images)
    x = torch.cat([vit.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + vit.pos_embed[:, : x.shape[1] + 1]
    x = vit.pos_drop(x)
    x = torch.cat([x, x[:, :1]], dim=1)
    for block in vit.blocks:
        x = block(x)
    return vit.norm(x[:, :-1])


def test_rv_zero_with_zero_offsets_differs_from_the_parent_only_by_the_cross_token_key():
    parent, variant = with_parent_weights("blip_caption_crossget", rv=0)
    parent, variant = parent.double(), variant.double()
    images = random_images(2, seed=3).double()
    with torch.no_grad():
        expected = stock_vit_with_an_extra_token(parent.visual_encoder, images)
        got = variant.visual_encoder.forward_features(images)
        stock = parent.visual_encoder.forward_features(images)
    assert vit_binding.token_counts(variant) == [TINY_TOKENS + 1] * DEPTH + [TINY_TOKENS]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    assert (got - stock).abs().max() > 1e-3  # every token saw one more key


def test_rl_zero_leaves_the_text_output_unchanged_and_rl_merges_it():
    parent, variant = with_parent_weights(RETRIEVAL, rv=0, rl=0)
    parent, variant = parent.double(), variant.double()
    text = variant.tokenizer(TEXTS[:3], padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    with torch.no_grad():
        expected = parent.text_encoder.forward_text(text).last_hidden_state
        got = variant.text_encoder.forward_text(text).last_hidden_state
        assert med_binding.token_counts(variant.text_encoder) == [36] * DEPTH + [35]  # 35 + the cross token
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
        # merges among padding change nothing a real token sees (padding is masked as a key): one unpadded text
        one = variant.tokenizer(TEXTS[2:3], return_tensors="pt")
        stock = parent.text_encoder.forward_text(one).last_hidden_state
        lavis_accel.apply(variant, "crossget", rv=0, rl=RL)
        merged = variant.text_encoder.forward_text(one).last_hidden_state
    assert merged.shape[1] < one.input_ids.shape[1]
    assert (merged[:, 0] - stock[:, 0]).abs().max() > 1e-3


# --- what merging keeps ---------------------------------------------------------------------------------------------

def test_the_vit_keeps_cls_first_and_the_cross_token_last_and_follows_the_schedule():
    model = build_variant("blip_caption_crossget")
    calls = recording_merges(vit_binding.current_step(model))
    with torch.no_grad():
        features = model.visual_encoder.forward_features(random_images(3, seed=3))
    assert features.shape == (3, KEPT, WIDTH)
    assert vit_binding.token_counts(model) == SCHEDULE[:-1] + [KEPT]
    assert len(calls) == DEPTH
    for matching, x, _, merged, _ in calls:
        last = x.shape[1] - 1
        for values in paired(torch.arange(x.shape[1]).expand(3, -1), matching):
            assert not ((values == 0) | (values == last)).any()  # neither a source nor joined
        assert torch.equal(merged[:, 0], x[:, 0]) and torch.equal(merged[:, -1], x[:, -1])


def test_text_padding_never_merges_with_real_tokens():
    model = build_variant(RETRIEVAL, rv=0, rl=8)
    calls = recording_merges(med_binding.current_step(model.text_encoder))
    texts = ["a red circle", TEXTS[2] + " and " + TEXTS[3], "two"]
    # padded to the longest text (LAVIS pads to 35): a few padding tokens, which would pair with words unguarded
    text = model.tokenizer(texts, padding="longest", return_tensors="pt")
    with torch.no_grad():
        model.text_encoder.forward_text(text)
    kinds = set()
    for matching, _, valid, _, merged_valid in calls:
        source, destination = paired(valid, matching)
        assert torch.equal(source, destination)
        kinds |= set(source.flatten().tolist())
        assert torch.equal(merged_valid.sum(dim=1), valid.sum(dim=1) - source.sum(dim=1))
    assert kinds == {True, False}  # real tokens merged with real ones, padding with padding
    real = med_binding.pruned_attention_mask(model.text_encoder).sum(dim=1)
    assert (real >= 2).all() and real[1] > real[2]  # [CLS] and something of each text


def test_text_cls_and_cross_token_are_never_merged_even_at_four_tokens():
    model = build_variant(RETRIEVAL, rv=0, rl=17)  # 9 -> 6 -> 4 tokens: the last layer merges at 4
    calls = recording_merges(med_binding.current_step(model.text_encoder))
    text = model.tokenizer(["two", "a red circle on the left"], padding="longest", return_tensors="pt")
    with torch.no_grad():
        model.text_encoder.forward_text(text)
    assert med_binding.token_counts(model.text_encoder)[:3] == [9, 6, 4]
    for matching, x, _, _, _ in calls:
        last = x.shape[1] - 1
        for values in paired(torch.arange(x.shape[1]).expand(2, -1), matching):
            assert not ((values == 0) | (values == last)).any()


# --- training -------------------------------------------------------------------------------------------------------

def test_the_retrieval_kd_loss_reaches_the_offsets_only():
    model = build_variant(RETRIEVAL, is_eval=False)
    output = model(training_samples(RETRIEVAL))
    image, text = model.crossget_cross_features()
    assert image.shape == text.shape == (DEPTH * 2, model.vision_proj.out_features)
    kd = model.crossget_kd_loss()
    assert kd.dim() == 0 and 0 < kd.item() < 1
    kd.backward()
    with_grad = sorted(name for name, p in model.named_parameters() if p.grad is not None)
    assert with_grad == ["crossget_cross_image", "crossget_cross_text"]
    assert model.crossget_cross_image.grad.abs().sum() > 0 and model.crossget_cross_text.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    output.loss.backward()  # the task loss: the image offsets through the cross token's key, the text ones by 0 x
    assert model.crossget_cross_image.grad.abs().sum() > 0
    assert model.crossget_cross_text.grad is not None and not model.crossget_cross_text.grad.any()


@pytest.mark.parametrize("arch", NO_TEXT_PASS)
def test_the_other_tasks_train_reduced_and_refuse_the_kd_loss(arch):
    model = build_variant(arch, is_eval=False)
    loss = model(training_samples(arch)).loss
    assert torch.isfinite(loss) and vit_binding.token_counts(model)[-1] == KEPT
    loss.backward()
    assert model.crossget_cross_image.grad.abs().sum() > 0  # the cross token is a key for every image token
    with pytest.raises(SettingError) as err:
        model.crossget_kd_loss()
    assert f"{type(model).__name__} runs none" in one_line(err)


def test_the_kd_loss_needs_a_reduced_forward_and_towers_of_equal_depth():
    with pytest.raises(SettingError, match=r"^CrossGET's loss needs a forward of the image tower"):
        build_variant(RETRIEVAL).crossget_kd_loss()
    model = build_seeded(RETRIEVAL, "coco", is_eval=False, vit_depth=DEPTH + 1, reducer=crossget_block())
    model(training_samples(RETRIEVAL))
    with pytest.raises(SettingError) as err:
        model.crossget_kd_loss()
    assert one_line(err) == (f"CrossGET's loss needs as many ViT blocks as text layers, BlipRetrievalCrossGet has "
                             f"{DEPTH + 1} and {DEPTH}")


# --- the tasks LAVIS evaluates, reduced -----------------------------------------------------------------------------

def encoder_lengths(bert):
    """Hook a BERT's encoder (LAVIS's passes call the BERT's ``forward`` directly, its encoder as a module): the token
    counts of the image features each call cross-attends to (a list per call: NLVR2 passes two images)."""
    lengths = []

    def hook(module, args, kwargs):
        states = kwargs.get("encoder_hidden_states")
        if states is not None:
            lengths.append([s.shape[1] for s in states] if isinstance(states, list) else [states.shape[1]])

    bert.encoder.register_forward_pre_hook(hook, with_kwargs=True)
    return lengths


def test_retrieval_evaluation_reranks_with_itm_on_the_merged_image_tokens():
    model = build_variant(RETRIEVAL)
    lengths = encoder_lengths(model.text_encoder)
    i2t, t2i = outputs(RETRIEVAL, model)["continuous"]  # image batches of 1 and 3
    assert lengths and all(length == [KEPT] for length in lengths)
    assert torch.isfinite(i2t).all() and torch.isfinite(t2i).all()
    assert ((i2t != -100).sum(dim=1) == 2).all() and ((t2i != -100).sum(dim=1) == 2).all()
    counts = med_binding.token_counts(model.text_encoder)  # the last call was an ITM pass: not merged
    assert counts == []
    with torch.no_grad():
        model.text_encoder.forward_text(model.tokenizer(TEXTS, padding="max_length", max_length=35,
                                                        return_tensors="pt"))
    assert med_binding.token_counts(model.text_encoder)[-1] < 36


def test_caption_beam_search_reads_the_merged_image_tokens():
    model = build_variant("blip_caption_crossget")
    lengths = encoder_lengths(model.text_decoder.bert)
    with torch.no_grad():
        captions = model.generate({"image": random_images(2, seed=3)}, num_beams=3, max_length=12, min_length=4)
    assert len(captions) == 2 and all(isinstance(caption, str) for caption in captions)
    assert len(lengths) >= 4 and all(length == [KEPT] for length in lengths)  # every decoding step


def test_vqa_rank_and_generate_run_on_the_merged_image_tokens():
    model = build_variant("blip_vqa_crossget")
    lengths = encoder_lengths(model.text_encoder)
    samples = {"image": random_images(2, seed=4), "text_input": QUESTIONS}
    with torch.no_grad():
        ranked = model.predict_answers(dict(samples), inference_method="rank", answer_list=ANSWER_LIST,
                                       num_ans_candidates=4)
        generated = model.predict_answers(dict(samples), inference_method="generate", max_len=5)
    assert all(answer in ANSWER_LIST for answer in ranked) and len(generated) == 2
    assert lengths == [[KEPT], [KEPT]]  # the question encoding of each call
    assert med_binding.current_step(model.text_encoder) is None  # the question is not merged


def test_nlvr_gives_both_images_the_same_merged_count():
    model = build_variant("blip_nlvr_crossget")
    lengths = encoder_lengths(model.text_encoder)
    with torch.no_grad():
        predictions = model.predict(nlvr_samples())["predictions"]
    assert predictions.shape == (2, 2) and torch.isfinite(predictions).all()
    assert lengths == [[KEPT, KEPT]]


# --- bad input ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch, block, message", [
    ("blip_caption_crossget", crossget_block(rl=2),
     "reducer setting 'rl' of 'crossget' must be 0: BlipCaptionCrossGet has no unimodal text pass to reduce"),
    ("blip_vqa_crossget", crossget_block(rl=1),
     "reducer setting 'rl' of 'crossget' must be 0: BlipVQACrossGet has no unimodal text pass to reduce"),
    ("blip_nlvr_crossget", crossget_block(rv=-1), "reducer setting 'rv' of 'crossget' must be an integer from 0 to 18"),
    ("blip_nlvr_crossget", {"name": "turbo", "r": 4}, "model.reducer: BlipNLVRCrossGet takes a crossget block"),
    ("blip_retrieval_crossget", {"name": "crossget", "r": 4}, "reducer setting 'r' is not known for 'crossget'"),
])
def test_bad_reducer_blocks_fail_at_build_in_one_line(arch, block, message):
    with pytest.raises(SettingError) as err:
        build_seeded(arch, MODEL_TYPES[arch][0], vit_depth=DEPTH, reducer=block)
    assert one_line(err).startswith(message)


def test_the_config_check_pairs_crossget_blocks_with_crossget_archs():
    config_checks.check_reducer_block(OmegaConf.create({"arch": "blip_vqa_crossget", "reducer": crossget_block()}))
    for arch, message in (("blip_nlvr_turbo", "has no CrossGET binding"), ("blip_nlvr", "has no token-reduction "
                                                                                       "binding")):
        with pytest.raises(SettingError, match=f"^model.reducer: {arch} {message}: use blip_nlvr_crossget$"):
            config_checks.check_reducer_block(OmegaConf.create({"arch": arch, "reducer": crossget_block()}))


# --- the shipped projects and scripts -------------------------------------------------------------------------------

BLIP_PROJECTS = ["train/ret_coco.yaml", "train/ret_flickr.yaml", "eval/ret_coco.yaml", "eval/ret_flickr.yaml",
                 "eval/caption_coco.yaml", "eval/vqav2.yaml", "eval/nlvr.yaml"]


def script_targets():
    """The project yamls the ``run_scripts/crossget`` scripts run."""
    targets = []
    for kind in ("train", "eval"):
        folder = os.path.join(REPO, "run_scripts", "crossget", kind)
        for name in sorted(os.listdir(folder)):
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                targets += re.findall(r"--cfg-path\s+(\S+\.yaml)", f.read())
    return targets


def test_every_blip_project_has_a_run_script_and_every_script_a_project():
    targets = script_targets()
    assert all(os.path.isfile(os.path.join(REPO, target)) for target in targets)
    assert {f"projects/crossget/{name}" for name in BLIP_PROJECTS} <= set(targets)
    for name in BLIP_PROJECTS:
        cfg = OmegaConf.load(os.path.join(REPO, "projects", "crossget", name))
        assert cfg.model.arch.startswith("blip_") and cfg.model.arch.endswith("_crossget")
        training = not cfg.run.evaluate
        assert cfg.run.task == ("crossget_retrieval" if training else OmegaConf.load(
            os.path.join(registry.get_path("library_root"), "projects", "blip", "eval",
                         name.split("/")[1].replace(".yaml", "_eval.yaml"))).run.task)
        if training:
            assert cfg.run.init_lr == 1e-5 and cfg.run.crossget.kd_weight == 0.5 and cfg.model.load_finetuned


# --- through the CLI ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """``lavis-accel train`` of the tiny COCO retrieval project (rv 16, rl 4, 2 epochs), then ``lavis-accel evaluate``
    of its best checkpoint with the eval project: ``(train job, train output, eval job, eval output)``."""
    root = tmp_path_factory.mktemp("crossget_cli")
    datasets = write_retrieval(root / "data", n_train=16, n_val=8, n_test=8)
    model = {"vit_depth": DEPTH, "reducer": crossget_block(RV, RL)}
    train = tiny_project(os.path.join(REPO, "projects", "crossget", "train", "ret_coco.yaml"), datasets,
                         root / "train", model=model,
                         run={"max_epoch": 2, "batch_size_train": 8, "batch_size_eval": 8, "k_test": 4,
                              "warmup_steps": 1, "valid_splits": ["val"]})
    train_output = run_cli("train", "--cfg-path", write_project(train, root / "train.yaml"))
    train_dir = job_dir(root / "train")
    checkpoint = os.path.join(train_dir, "checkpoint_best.pth")
    evaluate = tiny_project(os.path.join(REPO, "projects", "crossget", "eval", "ret_coco.yaml"), datasets,
                            root / "eval", model={**model, "load_finetuned": True, "finetuned": checkpoint},
                            run={"batch_size_eval": 8, "k_test": 4})
    eval_output = run_cli("evaluate", "--cfg-path", write_project(evaluate, root / "eval.yaml"))
    return train_dir, train_output, job_dir(root / "eval"), eval_output


def test_a_tiny_retrieval_model_trains_with_the_kd_loss_through_the_cli(cli_run):
    train_dir, output, _, _ = cli_run
    assert "Start training epoch 1" in output
    assert "crossget (r=16) keeps tokens (cross token included) " + " -> ".join(map(str, SCHEDULE)) in output
    stats = train_stats(train_dir)
    assert len(stats) == 2
    for line in stats:
        assert 0 < float(line["train_loss_kd"]) < 1 and float(line["train_loss"]) > 0
    state = torch.load(os.path.join(train_dir, "checkpoint_best.pth"), map_location="cpu", weights_only=True)["model"]
    assert state["crossget_cross_image"].shape == (1, DEPTH, WIDTH) and state["crossget_cross_image"].any()
    assert state["crossget_cross_text"].shape == (1, DEPTH, WIDTH) and state["crossget_cross_text"].any()


def test_its_checkpoint_evaluates_through_lavis_retrieval_task(cli_run):
    train_dir, _, eval_dir, output = cli_run
    (evaluated,) = metrics_lines(eval_dir)
    assert evaluated == pytest.approx(metrics_lines(train_dir)[-1])  # the test split, as the training run scored it
    assert 0 <= evaluated["txt_r1"] <= evaluated["txt_r10"] <= 100
    assert "crossget (r=16)" in output
