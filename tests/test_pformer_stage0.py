"""P-Former stage 0 (``lavis_accel.models.pformer_stage0``): ``pformer_opt`` and ``pformer_t5`` on tiny offline models.

Pinned here: the registered types and their yamls; the loss terms (each present, finite, summing to ``loss``); OPT's
reconstruction loss recomputed by hand from the frozen OPT's logits (the unmasked sentence + "\\n" after the
prompts, prompts and padding not scored); the VQ loss reading OPT's own input embeddings (no vocabulary copy in the
state); the 25 % masking of the P-Former's input, never on padding or [CLS]; the frozen LLM (no gradient, unchanged
by a step) against the trained P-Former; the contrastive gather with and without a process group; T5's split
(encoder [prompts; prefix], decoder the suffix, one-word sentences); the LLM named by the config in the stock
precision; the reference's key names; ``max_txt_len != num_query_token`` refused in one line before building; and
``generate`` reading the prompts.
"""
import random

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lavis.common.registry import registry
from omegaconf import OmegaConf

import lavis_accel  # noqa: F401
import lavis_accel.models.pformer_stage0 as stage0
from lavis_accel.errors import SettingError
from lavis_accel.reduce.pformer import self_contrastive_loss
from lavis_accel.testing import hub
from lavis_accel.testing.tiny_models import (TINY_NUM_QUERY_TOKEN, build_tiny, load_tiny_model_and_preprocess,
                                             tiny_config)

TEXTS = ["a red circle on the left", "two blue squares", "a green triangle at the top of the picture", "stars"]
OPT_TYPES = ("pformer_opt2.7b", "pformer_opt6.7b")
T5_TYPES = ("pformer_flant5xl", "pformer_flant5xxl")
REFERENCE_KEYS = ("Pformer.cls_proj.weight", "Pformer.pooler.0.weight", "Pformer.text_proj.weight", "Pformer.temp")


def opt_model(**overrides):
    torch.manual_seed(0)
    return build_tiny("pformer_opt", "pformer_opt2.7b", **overrides)


def t5_model(**overrides):
    torch.manual_seed(0)
    return build_tiny("pformer_t5", "pformer_flant5xl", **overrides)


def samples(texts=TEXTS):
    return {"text_input": list(texts)}


def _llm(model):
    return model.opt_model if hasattr(model, "opt_model") else model.t5_model


# ---- registration and yamls ----

@pytest.mark.parametrize("arch,types,key,names", [
    ("pformer_opt", OPT_TYPES, "opt_model", ("facebook/opt-2.7b", "facebook/opt-6.7b")),
    ("pformer_t5", T5_TYPES, "t5_model", ("google/flan-t5-xl", "google/flan-t5-xxl")),
])
def test_registered_types_and_default_yamls(arch, types, key, names):
    model_cls = registry.get_model_class(arch)
    assert model_cls.TEXT_LENGTH_IS_QUERY_COUNT is True
    assert tuple(model_cls.PRETRAINED_MODEL_CONFIG_DICT) == types
    for model_type, name in zip(types, names):
        cfg = OmegaConf.load(model_cls.default_config_path(model_type))
        assert cfg.model.arch == arch
        assert (cfg.model.load_finetuned, cfg.model.load_pretrained) == (False, False)
        assert (cfg.model.num_query_token, cfg.model.max_txt_len, cfg.model[key]) == (32, 32, name)
        processors = cfg.preprocess.text_processor
        assert processors.train.name == processors.eval.name == "blip_caption"


def test_preprocess_cleans_sentences_with_blip_caption():
    model, _, text_processors = load_tiny_model_and_preprocess("pformer_opt", "pformer_opt2.7b")
    assert isinstance(model, stage0.PformerOPT)
    assert text_processors["train"]("A Red  circle, on the LEFT!") == "a red circle, on the left"


# ---- OPT ----

def test_opt_losses_present_finite_and_summed():
    out = opt_model()(samples())
    assert set(out) == {"loss", "loss_c", "loss_vq", "loss_lm"}
    assert all(torch.isfinite(value) and value.ndim == 0 for value in out.values())
    torch.testing.assert_close(out["loss"], out["loss_c"] + out["loss_vq"] + out["loss_lm"])


def test_opt_reconstruction_loss_by_hand():
    model = opt_model().eval()
    gen = torch.Generator().manual_seed(4)
    prompts = torch.randn(2, TINY_NUM_QUERY_TOKEN, model.opt_model.config.hidden_size, generator=gen)
    texts = ["a red circle\n", "two blue squares\n"]  # shorter than max_txt_len (8 tokens): no truncation
    loss = model.reconstruction_loss(prompts, texts)
    total, count = 0.0, 0
    for prompt, text in zip(prompts, texts):  # one sentence at a time: no padding at all
        ids = model.opt_tokenizer(text, return_tensors="pt").input_ids[0]
        assert ids[-1].item() == model.eos_token_id  # the "\n" is scored too
        embeds = torch.cat([prompt, model.opt_model.get_input_embeddings()(ids)])[None]
        logits = model.opt_model(inputs_embeds=embeds, return_dict=True).logits[0]
        log_probs = F.log_softmax(logits.double(), dim=-1)
        first = prompt.shape[0]  # the sentence's BOS: predicted from the last prompt
        for position in range(first, first + len(ids)):
            total -= log_probs[position - 1, ids[position - first]].item()
            count += 1
    assert loss.item() == pytest.approx(total / count, rel=1e-4)


def test_opt_vq_loss_reads_the_frozen_embeddings_and_no_copy_is_kept():
    model = opt_model().eval()
    assert not any("vocab" in name for name, _ in model.named_buffers())
    assert not any("vocab_embeddings" in key for key in model.state_dict())
    torch.manual_seed(1)
    before = model(samples())["loss_vq"]
    with torch.no_grad():
        model.opt_model.get_input_embeddings().weight.zero_()
    torch.manual_seed(1)  # the same masking
    states = model.pformer_states(model.pformer_texts(samples()), mask=True)
    zero_vq = model.prompts(states).pow(2).mean()  # every nearest row is the zero vector now
    torch.manual_seed(1)
    after = model(samples())["loss_vq"]
    torch.testing.assert_close(after, zero_vq)
    assert after.item() != pytest.approx(before.item())


def test_opt_masking_never_touches_padding_or_cls():
    model = opt_model()
    seen = []
    model.Pformer.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["input_ids"].clone()),
                                            with_kwargs=True)
    clean = model.tokenizer(model.pformer_texts(samples()), padding="max_length", truncation=True,
                            max_length=model.max_txt_len, return_tensors="pt").input_ids
    torch.manual_seed(0)
    for _ in range(20):
        model(samples())
    assert len(seen) == 20
    seen = torch.stack(seen)
    protected = (clean == model.tokenizer.pad_token_id) | (clean == model.tokenizer.cls_token_id)
    assert torch.all(seen[:, protected] == clean[protected])
    changed = seen != clean
    assert changed.any() and torch.all(seen[changed] == model.tokenizer.mask_token_id)
    share = changed.sum().item() / (20 * (~protected).sum().item())
    assert 0.15 < share < 0.35


@pytest.mark.parametrize("build", [opt_model, t5_model], ids=["opt", "t5"])
def test_llm_frozen_pformer_trained_by_a_step(build):
    model = build()
    llm_before = {name: param.clone() for name, param in _llm(model).named_parameters()}
    pformer_before = {name: param.clone() for name, param in model.Pformer.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    kept = samples()
    model(kept)["loss"].backward()
    assert kept == samples()  # the caller's batch is not changed
    assert all(not param.requires_grad and param.grad is None for param in _llm(model).parameters())
    assert all(param.grad is not None for param in model.Pformer.parameters())
    optimizer.step()
    assert all(torch.equal(param, llm_before[name]) for name, param in _llm(model).named_parameters())
    projection = "opt_proj" if build is opt_model else "t5_proj"
    for name in ("cls_proj.weight", "pooler.0.weight", f"{projection}.weight", "text_proj.weight", "temp",
                 "encoder.layer.0.attention.self.query.weight", "embeddings.word_embeddings.weight"):
        assert not torch.equal(dict(model.Pformer.named_parameters())[name], pformer_before[name]), name


def test_contrastive_gather_with_and_without_a_process_group(tmp_path):
    """One process with no group gives the same loss and gradients as a one-rank group (gathered, no gradient)."""
    def run():
        model = opt_model().eval()
        torch.manual_seed(2)
        out = model(samples())
        out["loss"].backward()
        return out, {name: param.grad.clone() for name, param in model.Pformer.named_parameters()}

    feats = torch.randn(3, 4, requires_grad=True)
    gathered, rank = stage0.gather_features(feats)
    assert rank == 0 and not gathered.requires_grad and torch.equal(gathered, feats)
    alone, alone_grads = run()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    try:
        gathered, rank = stage0.gather_features(feats)
        assert rank == 0 and not gathered.requires_grad and torch.equal(gathered, feats)
        grouped, grouped_grads = run()
    finally:
        dist.destroy_process_group()
    for key in alone:
        torch.testing.assert_close(alone[key], grouped[key])
    for name in alone_grads:
        torch.testing.assert_close(alone_grads[name], grouped_grads[name])


def test_contrastive_loss_of_the_model_is_the_local_batch_on_rank_zero():
    model = opt_model().eval()
    states = model.pformer_states(model.pformer_texts(samples()))
    feats = F.normalize(model.Pformer.text_proj(states[:, 0]), dim=-1)
    expected = self_contrastive_loss(feats, feats.detach(), model.Pformer.temp, 0)
    torch.testing.assert_close(model.contrastive_loss(states), expected)


# ---- T5 ----

def test_t5_losses_present_finite_and_summed():
    out = t5_model()(samples())
    assert set(out) == {"loss", "loss_c", "loss_lm"}
    assert all(torch.isfinite(value) and value.ndim == 0 for value in out.values())
    torch.testing.assert_close(out["loss"], out["loss_c"] + out["loss_lm"])


def test_t5_encoder_reads_prompts_and_prefix_decoder_the_suffix():
    prompts = 24  # room for the whole sentence in T5's tokens (max_txt_len = num_query_token)
    model = t5_model(num_query_token=prompts, max_txt_len=prompts)
    calls, pformer_ids = [], []
    model.t5_model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs), with_kwargs=True)
    model.Pformer.register_forward_pre_hook(
        lambda module, args, kwargs: pformer_ids.append(kwargs["input_ids"].clone()), with_kwargs=True)
    text = "a b c d e f g h"
    for seed in range(8):
        random.seed(seed)
        model(samples([text]))
    full = model.tokenizer([text], padding="max_length", truncation=True, max_length=prompts,
                           return_tensors="pt").input_ids
    assert all(torch.equal(ids, full) for ids in pformer_ids)  # the full sentence, unmasked
    cuts = set()
    for kwargs in calls:
        labels = kwargs["labels"][0]
        suffix = model.t5_tokenizer.decode(labels[labels != -100], skip_special_tokens=True)
        words = len(text.split(" ")) - len(suffix.split(" "))
        prefix = " ".join(text.split(" ")[:words])
        assert f"{prefix} {suffix}" == text
        encoder_tokens = kwargs["inputs_embeds"].shape[1] - prompts
        assert encoder_tokens == len(model.t5_tokenizer(prefix).input_ids)  # the prefix (and T5's EOS)
        assert kwargs["attention_mask"].shape[1] == prompts + encoder_tokens
        cuts.add(words)
    assert len(cuts) > 1 and cuts <= set(range(1, 2 + len(text.split(" ")) // 2))


def test_t5_one_word_and_empty_sentences():
    model = t5_model()
    for seed in range(3):
        random.seed(seed)
        out = model(samples(["stars", "", "two words"]))
        assert all(torch.isfinite(value) for value in out.values())


# ---- building ----

def test_llm_named_by_the_config_in_the_stock_precision():
    for arch, model_type, key, repo, dtype in (("pformer_opt", "pformer_opt2.7b", "opt_model", hub.TINY_OPT_REPO,
                                                torch.float16),
                                               ("pformer_t5", "pformer_flant5xl", "t5_model", hub.TINY_T5_REPO,
                                                torch.bfloat16)):
        model = registry.get_model_class(arch).from_config(tiny_config(arch, model_type))  # no float() cast
        llm = _llm(model)
        assert llm.config._name_or_path.endswith(repo)  # the reference always loaded facebook/opt-2.7b
        assert {param.dtype for param in llm.parameters()} == {dtype}
        assert {param.dtype for param in model.Pformer.parameters()} == {torch.float32}
        width = model.Pformer.opt_proj if key == "opt_model" else model.Pformer.t5_proj
        assert width.out_features == llm.config.hidden_size == 64


@pytest.mark.parametrize("build,projection,absent", [(opt_model, "opt_proj", "t5_proj"),
                                                     (t5_model, "t5_proj", "opt_proj")], ids=["opt", "t5"])
def test_state_dict_keeps_the_reference_names(build, projection, absent):
    state = build().state_dict()
    for key in REFERENCE_KEYS + (f"Pformer.{projection}.weight", "Pformer.embeddings.word_embeddings.weight",
                                 "Pformer.encoder.layer.0.attention.self.query.weight"):
        assert key in state, key
    width = state["Pformer.pooler.0.weight"].shape[0]
    assert state["Pformer.cls_proj.weight"].shape == (TINY_NUM_QUERY_TOKEN * width, width)
    assert not any(key.startswith(f"Pformer.{absent}") or "vocab_embeddings" in key for key in state)
    assert all(key.startswith("Pformer.") for key in state)  # the frozen LLM (with OPT's tied lm_head) is not saved


@pytest.mark.parametrize("build", [opt_model, t5_model], ids=["opt", "t5"])
def test_the_frozen_llm_follows_train_mode_and_keeps_its_weights_on_load(build):
    model = build()
    llm = _llm(model)
    before = {key: value.clone() for key, value in llm.state_dict().items()}
    model.load_state_dict({key: torch.zeros_like(value) for key, value in model.state_dict().items()})
    assert all(torch.equal(before[key], value) for key, value in llm.state_dict().items())
    assert model.train().training and llm.training  # dropout on in the frozen LLM, as the reference trains it


@pytest.mark.parametrize("arch,model_type", [("pformer_opt", "pformer_opt2.7b"), ("pformer_t5", "pformer_flant5xl")])
def test_text_length_other_than_the_query_count_is_refused_before_building(arch, model_type, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("built before the check")

    monkeypatch.setattr(stage0, "build_pformer", refuse)
    with pytest.raises(SettingError) as err:
        build_tiny(arch, model_type, max_txt_len=TINY_NUM_QUERY_TOKEN + 4)
    message = str(err.value)
    assert "\n" not in message and "max_txt_len (12)" in message and "num_query_token (8)" in message


def test_missing_llm_name_is_refused_in_one_line():
    with pytest.raises(SettingError, match=r"^model\.opt_model: not set"):
        build_tiny("pformer_opt", "pformer_opt2.7b", opt_model="")


# ---- generate ----

def test_opt_generate_continues_from_the_prompts():
    model = opt_model().eval()
    texts = model.generate(samples(), num_beams=2, max_length=4)
    assert len(texts) == len(TEXTS) and all(isinstance(text, str) for text in texts)
    # greedy, one token: OPT's argmax after [prompts; BOS], computed directly
    first = model.generate(samples(), num_beams=1, max_length=1)
    with torch.no_grad():
        prompts = model.prompts(model.pformer_states(model.pformer_texts(samples())))
        bos = model.opt_tokenizer([""] * len(TEXTS), return_tensors="pt").input_ids
        embeds = torch.cat([prompts, model.opt_model.get_input_embeddings()(bos)], dim=1)
        expected = model.opt_model(inputs_embeds=embeds, return_dict=True).logits[:, -1].argmax(-1)
    assert first == [model.opt_tokenizer.decode([token]).strip() for token in expected.tolist()]


def test_t5_generate_continues_from_the_prompts_and_the_prefix():
    model = t5_model().eval()
    texts = model.generate({**samples(), "prompt": ["a red", "two", "a green", "stars"]}, num_beams=2,
                           max_length=4)
    assert len(texts) == len(TEXTS) and all(isinstance(text, str) for text in texts)
    first = model.generate(samples(), num_beams=1, max_length=1)
    with torch.no_grad():
        prompts = model.prompts(model.pformer_states(model.pformer_texts(samples())))
        eos = model.t5_tokenizer([""] * len(TEXTS), return_tensors="pt").input_ids
        embeds = torch.cat([prompts, model.t5_model.encoder.embed_tokens(eos)], dim=1)
        start = torch.full((len(TEXTS), 1), model.t5_model.config.decoder_start_token_id)
        logits = model.t5_model(inputs_embeds=embeds, decoder_input_ids=start, return_dict=True).logits
    expected = logits[:, -1].argmax(-1)
    assert first == model.t5_tokenizer.batch_decode(expected[:, None], skip_special_tokens=True)
    with pytest.raises(SettingError, match="prompt: 2 prompts for 4 sentences"):
        model.generate({**samples(), "prompt": ["a", "b"]})
