"""The DLIP student archs (``lavis_accel.models.dlip``) and the frozen teacher of ``dlip_pretrain``.

Pinned here: the student's sizes (ViT-S/16, bert-small) in the packaged yamls; ``dlip_pretrain`` adds the nine
distillation terms to BLIP's three losses, computed from the very passes that give the task losses (a student that
is a copy of its teacher has all of them at 0 but ITC distillation, which is a cross-entropy); the teacher is
frozen, in eval mode, gets no gradient and does not change in a step, while the student does; a teacher without a
decoder teaches six terms; the SigLIP-style option; the ViT's DeiT start (file in timm's layout, a timm name that is
not at hand); the inference defaults of ``dlip_caption`` and the features of ``dlip_feature_extractor``; and each
bad input in one line: a teacher checkpoint that does not fit or is missing, another resolution, another number of
heads, a text length the teacher is set to differently, and a default yaml that names no weights.
"""
import logging
import math

import pytest
import torch
from lavis.common.registry import registry
from lavis.models import load_model_and_preprocess
from lavis.models.blip_models.blip_caption import BlipCaption
from lavis.models.blip_models.blip_pretrain import BlipPretrain
from omegaconf import OmegaConf

import lavis_accel  # noqa: F401
from lavis_accel.errors import SettingError
from lavis_accel.models.dlip import DISTILLATION_TERMS
from lavis_accel.models.pretrain_build import build_pretrain_model
from lavis_accel.testing.tiny_models import TINY_IMAGE_SIZE, build_tiny, tiny_config

TEXTS = ["a red circle on the left", "two blue squares", "a green triangle at the top", "a small yellow star"]
DECODER_TERMS = {"decoder_feature", "lm_logits", "decoder_attention"}


def batch(n=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(n, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=generator),
            "text_input": TEXTS[:n], "epoch": 0, "iters": 5, "num_iters_per_epoch": 10}


def write_teacher(path, arch="blip_pretrain", seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = tiny_config(arch, **overrides)
    teacher = build_pretrain_model(BlipPretrain, cfg) if arch == "blip_pretrain" else build_tiny(arch, **overrides)
    torch.save({"model": teacher.state_dict()}, path)
    return teacher


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "blip_pretrain_tiny.pth"
    write_teacher(path)
    return str(path)


def student(teacher_file, **overrides):
    teacher = {"pretrained": teacher_file, **overrides.pop("teacher", {})}
    torch.manual_seed(1)
    return build_tiny("dlip_pretrain", teacher=teacher, **overrides)


def test_packaged_yamls_give_vit_s16_and_bert_small():
    cfg = OmegaConf.load(registry.get_model_class("dlip_retrieval").default_config_path("flickr")).model
    cfg.load_finetuned = False
    cfg.load_pretrained = False
    model = registry.get_model_class("dlip_retrieval").from_config(cfg)
    vit, bert = model.visual_encoder, model.text_encoder.config
    assert (vit.embed_dim, len(vit.blocks), vit.blocks[0].attn.num_heads, vit.patch_embed.patch_size) == \
        (384, 12, 6, (16, 16))
    assert (bert.hidden_size, bert.num_hidden_layers, bert.num_attention_heads, bert.intermediate_size,
            bert.encoder_width) == (384, 6, 12, 3072, 384)
    assert model.vision_proj.out_features == model.text_proj.out_features == 256
    pretrain = OmegaConf.load(registry.get_model_class("dlip_pretrain").default_config_path("base")).model
    assert (pretrain.image_size, pretrain.max_txt_len, pretrain.alpha, pretrain.queue_size) == (224, 30, 0.4, 57600)
    assert (pretrain.teacher.arch, pretrain.teacher.model_type) == ("blip_pretrain", "base")
    assert pretrain.vit_pretrained == "deit_small_patch16_224"


def test_teacher_is_frozen_in_eval_mode_and_only_the_student_learns(teacher_file):
    model = student(teacher_file).train()
    assert not model.teacher.training and not any(p.requires_grad for p in model.teacher.parameters())
    assert not hasattr(model.teacher, "visual_encoder_m") and not hasattr(model.teacher, "image_queue")
    teacher_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    student_before = model.visual_encoder.patch_embed.proj.weight.detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    output = model(batch())
    assert set(output.distillation_terms) == set(DISTILLATION_TERMS)
    assert all(torch.isfinite(v) and v >= 0 for v in output.distillation_terms.values())
    total = output.loss_itc + output.loss_itm + output.loss_lm + sum(output.distillation_terms.values())
    torch.testing.assert_close(output.loss, total)
    output.loss.backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    optimizer.step()
    assert all(torch.equal(v, model.teacher.state_dict()[k]) for k, v in teacher_before.items())
    assert not torch.equal(student_before, model.visual_encoder.patch_embed.proj.weight)


def test_a_student_copy_of_its_teacher_has_every_term_but_itc_at_zero(teacher_file):
    model = student(teacher_file)
    weights = {k: v for k, v in torch.load(teacher_file)["model"].items() if "queue" not in k}
    model.load_state_dict(weights, strict=False)  # same tiny size: the teacher's weights
    output = model.eval()(batch())
    terms = output.distillation_terms
    for name in DISTILLATION_TERMS:
        if name != "itc":
            assert abs(float(terms[name])) < 1e-5, name
    assert float(terms["itc"]) > 0.1  # a cross-entropy against soft targets: never 0


def test_the_recorded_maps_are_those_of_the_positive_itm_and_decoder_passes(teacher_file):
    model = student(teacher_file).eval()
    from lavis_accel.patch.med_record import LastLayerRecorder
    images, text = batch()["image"], model.tokenizer(TEXTS, padding="max_length", truncation=True, max_length=30,
                                                     return_tensors="pt")
    ids = text.input_ids.clone()
    ids[:, 0] = model.tokenizer.enc_token_id
    embeds = model.visual_encoder.forward_features(images)
    atts = torch.ones(embeds.shape[:-1], dtype=torch.long)
    with torch.no_grad(), LastLayerRecorder(model.text_encoder).recording() as recorder:
        plain = model.text_encoder(ids, attention_mask=text.attention_mask, encoder_hidden_states=embeds,
                                   encoder_attention_mask=atts, output_attentions=True, return_dict=True)
    recorded = recorder.pass_attending_to(embeds)
    torch.testing.assert_close(recorded.self_attention, plain.attentions[-1])
    torch.testing.assert_close(recorded.states, plain.last_hidden_state)
    assert recorded.cross_attention.shape == (4, 4, 30, embeds.shape[1])
    torch.testing.assert_close(recorded.cross_attention.sum(-1), torch.ones(4, 4, 30))
    assert plain.cross_attentions == ()  # LAVIS's med drops them: hence the recorder


def test_a_teacher_without_decoder_teaches_six_terms(tmp_path):
    path = tmp_path / "retrieval_teacher.pth"
    write_teacher(path, arch="blip_retrieval")
    model = build_tiny("dlip_pretrain", teacher={"arch": "blip_retrieval", "model_type": "coco",
                                                 "pretrained": str(path), **_tiny_keys("blip_retrieval")})
    terms = model.train()(batch()).distillation_terms
    assert set(terms) == set(DISTILLATION_TERMS) - DECODER_TERMS


def _tiny_keys(arch):
    from lavis_accel.testing.tiny_models import tiny_model_config
    return tiny_model_config(arch)


def test_without_teacher_the_loss_is_blips(teacher_file):
    model = build_tiny("dlip_pretrain", teacher=None)
    assert model.teacher is None
    output = model.train()(batch())
    torch.testing.assert_close(output.loss, output.loss_itc + output.loss_itm + output.loss_lm)


def test_sigmoid_option_replaces_ita_and_trains_scale_and_bias(teacher_file):
    model = student(teacher_file, itc_loss="sigmoid").train()
    assert float(model.logit_scale) == pytest.approx(math.log(10)) and float(model.logit_bias) == -10
    output = model(batch())
    assert set(output.distillation_terms) == set(DISTILLATION_TERMS)
    output.loss.backward()
    assert model.logit_scale.grad is not None and model.logit_bias.grad is not None
    assert model.temp.grad is None  # ITA is out of the loss


def test_vit_starts_from_a_deit_layout_file(tmp_path, teacher_file):
    import timm
    deit = timm.models.vision_transformer.VisionTransformer(img_size=224, patch_size=16, embed_dim=128, depth=4,
                                                              num_heads=4, num_classes=10)
    path = tmp_path / "deit_tiny.pth"
    torch.save({"model": deit.state_dict()}, path)
    model = student(teacher_file, vit_pretrained=str(path))
    torch.testing.assert_close(model.visual_encoder.blocks[2].attn.qkv.weight, deit.blocks[2].attn.qkv.weight)
    torch.testing.assert_close(model.visual_encoder_m.blocks[2].attn.qkv.weight, deit.blocks[2].attn.qkv.weight)
    assert model.visual_encoder.pos_embed.shape[1] == (TINY_IMAGE_SIZE // 16) ** 2 + 1  # interpolated from 197


def test_vit_weights_not_at_hand_warn_and_a_misfit_file_fails(tmp_path, teacher_file, caplog, monkeypatch):
    import timm
    monkeypatch.setattr(timm, "create_model", _offline_create_model)
    with caplog.at_level(logging.WARNING):
        student(teacher_file, vit_pretrained="deit_small_patch16_224")
    assert "the weights of 'deit_small_patch16_224' are not at hand" in caplog.text
    with pytest.raises(SettingError, match="model.vit_pretrained: 'no_such_net' is neither a local checkpoint"):
        student(teacher_file, vit_pretrained="no_such_net")
    wrong = timm.models.vision_transformer.VisionTransformer(img_size=224, patch_size=16, embed_dim=64, depth=4,
                                                             num_heads=4)
    torch.save(wrong.state_dict(), tmp_path / "wrong.pth")
    with pytest.raises(SettingError, match=r"model.vit_pretrained: .*wrong.pth does not fit the ViT: "):
        student(teacher_file, vit_pretrained=str(tmp_path / "wrong.pth"))
    with pytest.raises(SettingError, match="model.vit_pretrained: checkpoint file not found"):
        student(teacher_file, vit_pretrained=str(tmp_path / "missing.pth"))


def _offline_create_model(name, pretrained=False, **kwargs):
    raise OSError("<urlopen error [Errno -2] Name or service not known>")


@pytest.mark.parametrize("overrides, message", [
    ({"teacher": {"image_size": 64}}, r"model.teacher.image_size: the teacher sees 17 image tokens \(64 px, patch 16\), "
                                      r"the student 37 \(96 px, patch 16\)"),
    ({"teacher": {"max_txt_len": 35}}, r"model.teacher.max_txt_len: 35 differs from model.max_txt_len 30"),
    ({"teacher": {"pretrained": None}}, r"model.teacher.pretrained: not set"),
    ({"teacher": {"pretrained": "https://example.invalid/model_base.pth"}},
     r"model.teacher.pretrained: cannot download https://example.invalid/model_base.pth"),
    ({"teacher": {"arch": "blip_nope"}}, r"model.teacher.arch: 'blip_nope' is not a registered LAVIS BLIP model"),
    ({"itc_loss": "hinge"}, r"model.itc_loss: 'hinge' is not one of softmax, sigmoid"),
    ({"max_txt_len": 600}, r"model.max_txt_len: 600 is longer than the 512 positions"),
])
def test_bad_pairings_fail_in_one_line(teacher_file, overrides, message):
    with pytest.raises(SettingError, match=message):
        student(teacher_file, **overrides)


def test_a_teacher_checkpoint_that_does_not_fit_fails_in_one_line(tmp_path, teacher_file):
    wide = tmp_path / "wide.pth"
    write_teacher(wide, embed_dim=64)
    with pytest.raises(SettingError, match=r"model.teacher.pretrained: .*wide.pth does not fit BlipPretrain: .* "
                                           r"vision_proj.weight \[64, 128\] in the file vs \[128, 128\]"):
        student(str(teacher_file), teacher={"pretrained": str(wide)})
    partial = tmp_path / "partial.pth"
    state = {k: v for k, v in torch.load(teacher_file)["model"].items() if not k.startswith("text_decoder.cls")}
    torch.save({"model": state}, partial)
    with pytest.raises(SettingError, match=r"model.teacher.pretrained: .*partial.pth leaves \d+ weights of the "
                                           r"teacher \(blip_pretrain base\) unset, e.g. text_decoder.cls"):
        student(teacher_file, teacher={"pretrained": str(partial)})


def test_a_teacher_with_other_heads_fails_in_one_line(tmp_path, teacher_file):
    import json
    from lavis_accel.testing.tiny_models import TINY_MED_CONFIG
    with open(TINY_MED_CONFIG, encoding="utf-8") as f:
        config = {**json.load(f), "num_attention_heads": 2}
    med = tmp_path / "med_2_heads.json"
    med.write_text(json.dumps(config))
    path = tmp_path / "two_heads.pth"
    write_teacher(path, med_config_path=str(med))
    with pytest.raises(SettingError, match="model.teacher: the teacher's BERT has 2 attention heads, the student's 4"):
        student(teacher_file, teacher={"pretrained": str(path), "med_config_path": str(med)})


def test_default_yamls_name_no_weights_warn_and_a_run_refuses_them(caplog, tmp_path):
    from lavis.models import load_model
    from lavis_accel import config_checks
    with caplog.at_level(logging.WARNING):
        model, vis, txt = load_model_and_preprocess("dlip_feature_extractor", "base", is_eval=True)
    assert "model.pretrained: dlip_feature_extractor has no published weights" in caplog.text
    assert model.visual_encoder.embed_dim == 384 and "eval" in vis
    with torch.no_grad():
        model.text_proj.weight.fill_(0.5)
    path = tmp_path / "dlip_features.pth"
    torch.save({"model": model.state_dict()}, path)
    loaded = load_model("dlip_feature_extractor", "base", checkpoint=str(path))
    assert torch.all(loaded.text_proj.weight == 0.5)
    cfg = OmegaConf.create({"model": {"arch": "dlip_caption", "model_type": "flickr", "load_finetuned": True},
                            "run": {}})
    with pytest.raises(SettingError, match="model.finetuned: dlip_caption has no published weights"):
        config_checks.check_checkpoint_files(cfg)


def test_caption_generates_with_the_serving_defaults(monkeypatch):
    model = build_tiny("dlip_caption", "flickr", is_eval=True)
    seen = []

    def record(self, samples, **kwargs):
        seen.append(kwargs)
        return ["x"]

    monkeypatch.setattr(BlipCaption, "generate", record)
    model.generate({"image": batch(1)["image"]})
    model.generate({"image": batch(1)["image"]}, use_nucleus_sampling=False, num_beams=3)
    assert seen[0] == {"use_nucleus_sampling": True, "num_beams": 3, "max_length": 30, "min_length": 10,
                       "top_p": 0.75, "repetition_penalty": 1.1, "num_captions": 1}
    assert seen[1]["repetition_penalty"] == 1.0  # beam search as LAVIS's caption task runs it: BLIP's default
    monkeypatch.undo()
    torch.manual_seed(0)
    captions = model.generate({"image": batch(2)["image"]}, max_length=8, min_length=2)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)


def test_feature_extractor_gives_normalised_features(tmp_path, teacher_file):
    pretrain = student(teacher_file)
    path = tmp_path / "dlip.pth"
    torch.save({"model": pretrain.state_dict()}, path)
    model = build_tiny("dlip_feature_extractor", is_eval=True, pretrained=str(path))
    torch.testing.assert_close(model.vision_proj.weight, pretrain.vision_proj.weight)
    samples = {"image": batch(2)["image"], "text_input": TEXTS[:2]}
    image = model.extract_features(samples, mode="image").image_embeds_proj[:, 0]
    text = model.extract_features(samples, mode="text").text_embeds_proj[:, 0]
    assert image.shape == text.shape == (2, pretrain.vision_proj.out_features)
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(2))


def test_a_missing_teacher_or_deit_file_is_found_before_any_work(tmp_path, teacher_file):
    from lavis_accel import config_checks
    cfg = OmegaConf.create({"model": {"arch": "dlip_pretrain", "load_pretrained": False,
                                      "teacher": {"pretrained": str(tmp_path / "teacher.pth")},
                                      "vit_pretrained": "deit_small_patch16_224"}, "run": {}})
    with pytest.raises(SettingError, match=r"model.teacher.pretrained: checkpoint file not found: .*teacher.pth"):
        config_checks.check_checkpoint_files(cfg)
    cfg.model.teacher.pretrained = teacher_file
    config_checks.check_checkpoint_files(cfg)  # a timm name is not a file: it is looked up when the model is built
    cfg.model.vit_pretrained = str(tmp_path / "deit.pth")
    with pytest.raises(SettingError, match=r"model.vit_pretrained: checkpoint file not found: .*deit.pth"):
        config_checks.check_checkpoint_files(cfg)
