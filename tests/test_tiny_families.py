"""Each LAVIS family the plugin extends builds tiny through the registry, runs, and round-trips a checkpoint."""
import json
import os
import subprocess
import sys

import pytest
import torch
from lavis.common.registry import registry
from lavis.models.vit import VisionTransformer, VisionTransformerEncoder

from lavis_accel.testing import hub, tokenizers
from lavis_accel.testing.tiny_models import (
    TINY_IMAGE_SIZE, TINY_MED_CONFIG, build_tiny, load_tiny_model_and_preprocess, tiny_config, tiny_model_config)

CAPTIONS = ["a picture of a red circle at the top left", "two blue squares"]
QUESTIONS = ["what color is the circle?", "how many shapes are there?"]


@pytest.fixture
def images():
    return torch.randn(2, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=torch.Generator().manual_seed(0))


def _is_nonempty_text(outputs, count):
    return len(outputs) == count and all(isinstance(text, str) for text in outputs)


# --- offline hub and tokenizers -------------------------------------------------------------------------------------

def test_environment_is_the_offline_hub(offline_hub_dir):
    assert hub.offline_env(offline_hub_dir).items() <= os.environ.items()
    assert hub.active_hub()["bert_vocab_size"] == hub.TINY_BERT_VOCAB_SIZE


def test_fresh_process_loads_the_hub_offline():
    script = ("from transformers import BertTokenizer, BertConfig, AutoTokenizer, T5TokenizerFast;"
              "t = BertTokenizer.from_pretrained('bert-base-uncased');"
              "print(len(t), t.model_max_length, BertConfig.from_pretrained('bert-base-uncased').hidden_size,"
              f"len(AutoTokenizer.from_pretrained('{hub.TINY_OPT_REPO}', use_fast=False)) > 256,"
              f"T5TokenizerFast.from_pretrained('{hub.TINY_T5_REPO}').eos_token_id)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=os.environ.copy())
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == [str(hub.TINY_BERT_VOCAB_SIZE), "512", "128", "True", "1"]


def test_activation_after_transformers_import_with_another_cache_is_refused(tmp_path, monkeypatch, offline_hub_dir):
    for key, value in hub.offline_env(offline_hub_dir).items():
        monkeypatch.setenv(key, value)  # restored after the test
    with pytest.raises(RuntimeError, match="imported before offline_env"):
        hub.activate_offline_hub(tmp_path)


def test_med_config_smaller_than_the_hub_vocabulary_is_refused(tmp_path):
    with open(TINY_MED_CONFIG, encoding="utf-8") as f:
        med = json.load(f)
    small = tmp_path / "med_small_vocab.json"
    small.write_text(json.dumps({**med, "vocab_size": 500}))
    with pytest.raises(ValueError, match="med_config_path: vocab_size 500"):
        build_tiny("blip_caption", med_config_path=str(small))


def test_bert_tokenizer_at_exact_vocab_size(tmp_path):
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(tokenizers.write_bert_tokenizer(tmp_path, vocab_size=30522))
    assert len(tokenizer) == 30522 and tokenizer.pad_token_id == 0
    assert tokenizer.tokenize("A photo of a purple triangle at the bottom right") == \
        ["a", "photo", "of", "a", "purple", "triangle", "at", "the", "bottom", "right"]
    with pytest.raises(ValueError, match="vocab_size"):
        tokenizers.write_bert_tokenizer(tmp_path / "small", vocab_size=10)


def test_tiny_med_config_matches_the_hub_bert():
    with open(TINY_MED_CONFIG, encoding="utf-8") as f:
        med = json.load(f)
    tiny = hub.BERT_SIZES["tiny"]
    assert {key: med[key] for key in tiny} == tiny
    assert med["vocab_size"] == hub.TINY_BERT_VOCAB_SIZE + 2  # [DEC] and [ENC]


# --- BLIP -----------------------------------------------------------------------------------------------------------

def test_blip_retrieval_forward_backward_and_checkpointed_block(images):
    assert tiny_model_config("blip_retrieval", "coco") == {
        "load_finetuned": False, "load_pretrained": False, "image_size": TINY_IMAGE_SIZE, "vit_type": "tiny",
        "med_config_path": TINY_MED_CONFIG, "vit_ckpt_layer": 1, "queue_size": 256, "embed_dim": 128}
    model = build_tiny("blip_retrieval", "coco")
    assert model.visual_encoder.vision_width == 128 and len(model.visual_encoder.blocks) == 4
    wrapped = [isinstance(block.attn.forward, type(model.visual_encoder.blocks[-1].attn.forward))
               and "checkpoint" in repr(block.attn.forward) for block in model.visual_encoder.blocks]
    assert wrapped == [False, False, False, True]  # parent: last 4 of 12 blocks; tiny: last 1 of 4
    output = model({"image": images, "text_input": CAPTIONS, "image_id": torch.tensor([0, 1]),
                    "epoch": 0, "iters": 0, "num_iters_per_epoch": 10})
    output.loss.backward()
    grad = model.visual_encoder.blocks[-1].attn.qkv.weight.grad
    assert torch.isfinite(output.loss) and grad is not None and grad.abs().sum() > 0


def test_blip_caption_loss_and_beam_search(images):
    model = build_tiny("blip_caption", "base_coco")
    assert torch.isfinite(model({"image": images, "text_input": CAPTIONS}).loss)
    model.eval()
    captions = model.generate({"image": images}, num_beams=3, max_length=8, min_length=2)
    assert _is_nonempty_text(captions, 2)


def test_blip_vqa_loss_generate_and_rank(images):
    model = build_tiny("blip_vqa", "vqav2")
    samples = {"image": images, "text_input": QUESTIONS, "answer": ["red", "2", "two"],
               "weight": torch.tensor([1.0, 0.5, 0.5]), "n_answers": torch.tensor([1, 2])}
    assert torch.isfinite(model(samples).loss)
    model.eval()
    question = {"image": images, "text_input": QUESTIONS}
    generated = model.predict_answers(question, num_beams=3, inference_method="generate", max_len=5, min_len=1)
    assert _is_nonempty_text(generated, 2)
    answer_list = ["red", "blue", "2", "yes"]
    ranked = model.predict_answers(question, inference_method="rank", answer_list=answer_list, num_ans_candidates=2)
    assert len(ranked) == 2 and set(ranked) <= set(answer_list)


def test_blip_nlvr_loss_and_predict(images):
    model = build_tiny("blip_nlvr", "nlvr")
    samples = {"image0": images, "image1": images.flip(0), "text_input": CAPTIONS, "label": torch.tensor([0, 1])}
    assert torch.isfinite(model(samples).loss)
    assert model.predict(samples)["predictions"].shape == (2, 2)


def test_load_tiny_model_and_preprocess_end_to_end():
    from PIL import Image

    model, vis_processors, txt_processors = load_tiny_model_and_preprocess("blip_caption", "base_coco", is_eval=True)
    image = vis_processors["eval"](Image.new("RGB", (150, 120), (255, 0, 0))).unsqueeze(0)
    assert image.shape == (1, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    assert txt_processors["eval"]("A Red Circle!") == "a red circle"
    assert _is_nonempty_text(model.generate({"image": image}, num_beams=3, max_length=6, min_length=2), 1)


# --- vit_type extension ---------------------------------------------------------------------------------------------

def test_stock_vit_type_base_is_built_by_lavis():
    encoder = VisionTransformerEncoder.from_config({"vit_type": "base", "image_size": 32})
    reference = VisionTransformer(img_size=32, patch_size=16, embed_dim=768, depth=12, num_heads=12)
    assert encoder.vision_width == 768
    assert {k: v.shape for k, v in encoder.state_dict().items()} == \
        {k: v.shape for k, v in reference.state_dict().items()}


def test_plugin_vit_type_sizes_and_errors():
    small = VisionTransformerEncoder.from_config({"vit_type": "small", "image_size": 32})
    assert (small.vision_width, len(small.blocks), small.blocks[0].attn.num_heads) == (384, 12, 6)
    custom = VisionTransformerEncoder.from_config({"vit_type": "tiny", "image_size": 64, "vit_width": 64,
                                                   "vit_depth": 2, "vit_num_heads": 2, "vit_patch_size": 8})
    assert (custom.vision_width, len(custom.blocks), custom.patch_embed.num_patches) == (64, 2, 64)
    with pytest.raises(ValueError, match="vit_width"):
        VisionTransformerEncoder.from_config({"vit_type": "base", "vit_width": 64})
    with pytest.raises(ValueError, match="unknown 'huge'"):
        VisionTransformerEncoder.from_config({"vit_type": "huge"})


# --- CLIP -----------------------------------------------------------------------------------------------------------

def test_clip_forward_and_features(images, single_process_group):  # CLIP's loss asks torch.distributed
    assert tiny_model_config("clip") == {"model_type": "ViT-Tiny-16", "pretrained": ""}
    model = build_tiny("clip")
    output = model({"image": images, "text_input": CAPTIONS})
    assert torch.isfinite(output.loss)
    features = model.extract_features({"image": images, "text_input": CAPTIONS})
    assert features.image_embeds_proj.shape == features.text_embeds_proj.shape == (2, 128)


# --- BLIP-2 ---------------------------------------------------------------------------------------------------------

def test_blip2_opt_loss_and_beam_search(images):
    model = build_tiny("blip2_opt", "pretrain_opt2.7b")
    assert model.visual_encoder.num_features == 128 and model.query_tokens.shape[1] == 8
    assert torch.isfinite(model({"image": images, "text_input": CAPTIONS})["loss"])
    model.eval()
    assert _is_nonempty_text(model.generate({"image": images}, num_beams=3, max_length=8, min_length=1), 2)


def test_blip2_t5_loss_beam_search_and_vqa(images):
    model = build_tiny("blip2_t5", "pretrain_flant5xl")
    samples = {"image": images, "text_input": ["Question: what color? Answer:"] * 2, "text_output": ["red", "blue"]}
    assert torch.isfinite(model(samples)["loss"])
    model.eval()
    assert _is_nonempty_text(model.generate({"image": images}, num_beams=3, max_length=8, min_length=1), 2)
    answers = model.predict_answers({"image": images, "text_input": QUESTIONS}, num_beams=3, max_len=5, min_len=1)
    assert _is_nonempty_text(answers, 2)


def test_blip2_qformer_loss(images):  # in one process, no process group
    model = build_tiny("blip2", "pretrain")
    assert torch.isfinite(model({"image": images, "text_input": CAPTIONS}).loss)


def test_stock_blip2_vit_names_still_reach_lavis():
    from lavis.models.blip2_models.blip2 import Blip2Base

    with pytest.raises(AssertionError, match="eva_clip_g or clip_L"):
        Blip2Base.init_vision_encoder("eva_vit_huge", 224, 0, False, "fp16")


# --- checkpoints in LAVIS's layout ----------------------------------------------------------------------------------

@pytest.mark.parametrize("arch, model_type", [("blip_retrieval", "coco"), ("blip2_opt", "pretrain_opt2.7b")])
def test_checkpoint_in_lavis_layout_loads_back(tmp_path, arch, model_type):
    source = build_tiny(arch, model_type)
    path = str(tmp_path / "checkpoint.pth")
    torch.save({"model": source.state_dict()}, path)

    stock_cfg = tiny_config(arch, model_type, pretrained=path)
    del stock_cfg["load_pretrained"]  # LAVIS's own path: load_finetuned False loads `pretrained`
    pretrained = registry.get_model_class(arch).from_config(stock_cfg).float()  # load_from_pretrained
    finetuned = build_tiny(arch, model_type, load_finetuned=True, finetuned=path)  # load_checkpoint
    for model in (pretrained, finetuned):
        loaded = model.state_dict()
        assert loaded.keys() == source.state_dict().keys()
        assert all(torch.equal(loaded[key], value) for key, value in source.state_dict().items())
    assert finetuned.load_checkpoint(path).missing_keys == []
