"""P-Former's stage-1 and stage-2 archs (``lavis_accel.models.pformer_stages``) on tiny offline models.

Pinned here: the default yamls keep their LAVIS parent's keys and add P-Former's (weights 10 / 100 / 1.0);
``loss_align`` is ``loss_weight`` x the MSE between the projected query outputs and the frozen P-Former's prompts,
recomputed by hand (caption + "\\n" for OPT, the raw caption for T5), on top of the parent's own losses, which stay
the same; with ``loss_weight: 0`` each arch computes exactly what its LAVIS parent does and has its state dict;
``alignment_only`` runs no LLM; a step changes the Q-Former and the projection, never the P-Former, the LLM or a
frozen ViT, and the P-Former stays in eval mode; one-word T5 captions train and the caller's batch is left as it
was; a stage-1 checkpoint starts stage 2 and a stage-2 state dict loads strictly into stock ``blip2_opt`` /
``blip2_t5``, which generate with it; bad settings and stage-0 files are refused in one line.
"""
import copy
import logging
import random

import pytest
import torch
from lavis.common.registry import registry
from omegaconf import OmegaConf

import lavis_accel  # noqa: F401
import lavis_accel.models.pformer_stages  # noqa: F401  (registers the archs until lavis_accel.models imports it)
from lavis_accel.errors import SettingError
from lavis_accel.models import pformer_net
from lavis_accel.reduce import pformer as maths
from lavis_accel.testing.tiny_models import TINY_IMAGE_SIZE, TINY_NUM_QUERY_TOKEN, build_tiny, tiny_config

CAPTIONS = ["a red circle on the left of a blue square", "two small green triangles", "stars", "a yellow star"]
TINY_LLM_WIDTH = 64  # the offline hub's OPT hidden size and T5 d_model
STAGE1 = "blip2_pformer"
OPT, T5 = "blip2_pformer_opt", "blip2_pformer_t5"
STAGE1_TYPE = {"opt": "pretrain_pformer", "t5": "pretrain_pformer_flant5xl"}
STAGE2 = {"opt": (OPT, "pretrain_pformer_opt2.7b"), "t5": (T5, "pretrain_pformer_flant5xl")}
STOCK = {STAGE1: ("blip2", "pretrain"), OPT: ("blip2_opt", "pretrain_opt2.7b"), T5: ("blip2_t5", "pretrain_flant5xl")}
LLM = {OPT: "opt_model", T5: "t5_model"}


def batch(n=4, seed=0, captions=CAPTIONS):
    generator = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(n, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=generator),
            "text_input": list(captions[:n])}


def write_stage0(path, kind, num_prompts=TINY_NUM_QUERY_TOKEN, width=TINY_LLM_WIDTH, seed=0):
    """A stage-0 checkpoint as stage 0 saves it (contrastive head included), seeded."""
    torch.manual_seed(seed)
    pformer = pformer_net.build_pformer(num_prompts, kind, width, contrastive=True)
    torch.save({"model": {f"Pformer.{key}": value for key, value in pformer.state_dict().items()}}, path)
    return str(path)


@pytest.fixture(scope="module")
def stage0(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stage0")
    return {kind: write_stage0(folder / f"pformer_{kind}.pth", kind) for kind in ("opt", "t5")}


def build(arch, model_type, stage0_file=None, seed=1, **overrides):
    torch.manual_seed(seed)
    if stage0_file is not None:
        overrides["pretrained_stage0"] = stage0_file
    return build_tiny(arch, model_type, **overrides)


def assert_pformer_from(model, path):
    """The model's P-Former holds the stage-0 file's weights (all of its own; the contrastive head is not used)."""
    saved = torch.load(path)["model"]
    own = model.Pformer.state_dict()
    assert own and all(torch.equal(value, saved[f"Pformer.{key}"]) for key, value in own.items())
    assert not hasattr(model.Pformer, "text_proj") and not hasattr(model.Pformer, "temp")


def stock_twin(model, arch):
    """The LAVIS parent of ``model`` (built tiny, same text length), holding ``model``'s weights (strict load)."""
    stock = build_tiny(*STOCK[arch], max_txt_len=TINY_NUM_QUERY_TOKEN)
    stock.load_state_dict(model.state_dict(), strict=True)
    return stock


def seeded(fn, *args, seed=7):
    torch.manual_seed(seed)
    random.seed(seed)
    return fn(*args)


# --- by-hand alignment loss ------------------------------------------------------------------------------------------

def query_outputs_by_hand(model, image):
    image_embeds = model.ln_vision(model.visual_encoder(image))
    atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long)
    return model.Qformer.bert(query_embeds=model.query_tokens.expand(image.shape[0], -1, -1),
                              encoder_hidden_states=image_embeds, encoder_attention_mask=atts,
                              return_dict=True).last_hidden_state


def prompts_by_hand(model, texts, projection):
    tokens = model.tokenizer(texts, padding="max_length", truncation=True, max_length=model.max_txt_len,
                             return_tensors="pt")
    pformer = model.Pformer
    cls = pformer(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state[:, 0]
    per_prompt = pformer.cls_proj(cls).view(len(texts), model.max_txt_len, -1)
    return getattr(pformer, projection)(torch.tanh(pformer.pooler[0](per_prompt)))


def loss_align_by_hand(model, samples, suffix, projection):
    with torch.no_grad():
        queries = getattr(model, projection)(query_outputs_by_hand(model, samples["image"]))
        prompts = prompts_by_hand(model, [t + suffix for t in samples["text_input"]], projection)
        return model.loss_weight * ((queries - prompts) ** 2).mean()


def test_the_pformers_newline_is_whitespace_to_its_bert_tokenizer():
    """The OPT pipeline's P-Former reads caption + "\\n" (as the reference), the T5 one the raw caption: BERT's
    tokenizer drops the "\\n", so both give the P-Former the same tokens."""
    tokenizer = registry.get_model_class(OPT).init_tokenizer()
    assert tokenizer(CAPTIONS).input_ids == tokenizer([t + "\n" for t in CAPTIONS]).input_ids


# --- default yamls ---------------------------------------------------------------------------------------------------

STOCK_TYPES = {
    (STAGE1, "pretrain_pformer"): ("blip2", "pretrain", "blip2_opt", "pretrain_opt2.7b", 10),
    (STAGE1, "pretrain_pformer_opt6.7b"): ("blip2", "pretrain", "blip2_opt", "pretrain_opt6.7b", 10),
    (STAGE1, "pretrain_pformer_flant5xl"): ("blip2", "pretrain", "blip2_t5", "pretrain_flant5xl", 10),
    (STAGE1, "pretrain_pformer_flant5xxl"): ("blip2", "pretrain", "blip2_t5", "pretrain_flant5xxl", 10),
    (OPT, "pretrain_pformer_opt2.7b"): ("blip2_opt", "pretrain_opt2.7b", None, None, 100),
    (OPT, "pretrain_pformer_opt6.7b"): ("blip2_opt", "pretrain_opt6.7b", None, None, 100),
    (OPT, "caption_coco_opt2.7b"): ("blip2_opt", "caption_coco_opt2.7b", None, None, 1.0),
    (OPT, "caption_coco_opt6.7b"): ("blip2_opt", "caption_coco_opt6.7b", None, None, 1.0),
    (T5, "pretrain_pformer_flant5xl"): ("blip2_t5", "pretrain_flant5xl", None, None, 100),
    (T5, "pretrain_pformer_flant5xxl"): ("blip2_t5", "pretrain_flant5xxl", None, None, 100),
}
WEIGHT_KEYS = {"arch", "pretrained", "finetuned", "load_finetuned", "load_pretrained"}


def default_model_config(arch, model_type):
    return OmegaConf.load(registry.get_model_class(arch).default_config_path(model_type)).model


def test_default_yamls_keep_the_parents_keys_and_add_pformers():
    for (arch, model_type), (stock_arch, stock_type, llm_arch, llm_type, weight) in STOCK_TYPES.items():
        ours = default_model_config(arch, model_type)
        stock = default_model_config(stock_arch, stock_type)
        for key, value in stock.items():
            if key not in WEIGHT_KEYS:
                assert ours[key] == value, (arch, model_type, key)
        if llm_arch:  # stage 1: the LLM that sizes its projection, as that LLM's stage-2 yaml names it
            llm_key = "opt_model" if "opt" in llm_arch else "t5_model"
            assert ours[llm_key] == default_model_config(llm_arch, llm_type)[llm_key]
            assert ("t5_model" if llm_key == "opt_model" else "opt_model") not in ours
            assert not ours.load_pretrained and "alignment_only" not in ours
        else:
            assert ours.alignment_only is False
        assert ours.loss_weight == weight and ours.pretrained_stage0 is None and ours.pretrained is None
        assert ours.max_txt_len == ours.num_query_token == 32 and ours.load_finetuned is False


def test_unnamed_weights_refuse_a_run_and_warn_from_python(stage0, caplog):
    opt = registry.get_model_class(OPT)
    cfg = default_model_config(OPT, "pretrain_pformer_opt2.7b")
    assert opt.unnamed_weights(cfg).startswith("model.pretrained_stage0: loss_weight is 100")
    cfg.pretrained_stage0 = stage0["opt"]
    assert opt.unnamed_weights(cfg).startswith("model.pretrained: blip2_pformer_opt has no published weights")
    cfg.pretrained = stage0["opt"]
    assert opt.unnamed_weights(cfg) is None
    stage1 = default_model_config(STAGE1, "pretrain_pformer")
    assert registry.get_model_class(STAGE1).unnamed_weights({**stage1, "loss_weight": 0}) is None  # bert + EVA start
    cfg = tiny_config(OPT, "pretrain_pformer_opt2.7b", pretrained_stage0=stage0["opt"], load_pretrained=True)
    with caplog.at_level(logging.WARNING):
        model = opt.from_config(cfg)
    assert "model.pretrained: blip2_pformer_opt has no published weights" in caplog.text
    assert model.Pformer is not None


# --- losses ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_stage1_adds_the_weighted_alignment_to_blip2s_own_losses(stage0, kind):
    model = build(STAGE1, STAGE1_TYPE[kind], stage0[kind]).eval()
    projection = pformer_net.LLM_PROJECTIONS[kind]
    assert getattr(model, projection).out_features == TINY_LLM_WIDTH and model.loss_weight == 10
    assert not hasattr(model, "t5_proj" if kind == "opt" else "opt_proj")
    assert_pformer_from(model, stage0[kind])
    samples = batch()
    output = seeded(model, samples)
    suffix = "\n" if kind == "opt" else ""
    torch.testing.assert_close(output.loss_align, loss_align_by_hand(model, samples, suffix, projection))
    assert output["loss"] is output.loss and torch.isfinite(output.loss)
    torch.testing.assert_close(output.loss, output.loss_itc + output.loss_itm + output.loss_lm + output.loss_align)
    stock = build_tiny("blip2", "pretrain", max_txt_len=TINY_NUM_QUERY_TOKEN)
    stock.load_state_dict(model.state_dict(), strict=False)
    parent = seeded(stock.eval(), samples)
    for name in ("loss_itc", "loss_itm", "loss_lm"):
        assert torch.equal(getattr(output, name), getattr(parent, name)), name


def test_stage2_opt_adds_the_weighted_alignment_to_the_lm_loss(stage0):
    model = build(OPT, "pretrain_pformer_opt2.7b", stage0["opt"]).eval()
    samples = batch()
    output = seeded(model, samples)
    assert model.loss_weight == 100
    assert_pformer_from(model, stage0["opt"])
    torch.testing.assert_close(output["loss_align"], loss_align_by_hand(model, samples, "\n", "opt_proj"))
    assert torch.equal(output["loss_lm"], seeded(stock_twin(model, OPT).eval(), samples)["loss"])
    torch.testing.assert_close(output["loss"], output["loss_lm"] + output["loss_align"])
    assert samples["text_input"] == CAPTIONS  # the "\n" is added to copies


def test_alignment_only_runs_no_llm_and_gives_the_same_alignment(stage0):
    model = build(OPT, "pretrain_pformer_opt2.7b", stage0["opt"]).eval()
    samples = batch()
    full = model(samples)
    model.alignment_only = True
    calls = []
    handle = model.opt_model.register_forward_hook(lambda *args: calls.append(1))
    only = model(samples)
    handle.remove()
    assert not calls and set(only) == {"loss", "loss_align"}
    torch.testing.assert_close(only["loss"], full["loss_align"])
    aligned = build(OPT, "pretrain_pformer_opt2.7b", stage0["opt"], alignment_only=True)
    assert aligned.alignment_only


def test_t5_stage2_splits_captions_one_word_included_and_leaves_the_batch_alone(stage0):
    model = build(T5, "pretrain_pformer_flant5xl", stage0["t5"]).eval()
    assert_pformer_from(model, stage0["t5"])
    samples = batch(captions=["stars", "a yellow star", "", "two small green triangles"])
    before = copy.deepcopy(samples)
    output = seeded(model, samples)
    assert samples.keys() == before.keys() and samples["text_input"] == before["text_input"]
    assert torch.isfinite(output["loss"]) and torch.isfinite(output["loss_lm"])
    torch.testing.assert_close(output["loss_align"], loss_align_by_hand(model, samples, "", "t5_proj"))
    random.seed(7)
    prefixes, suffixes = maths.split_for_prefix_lm(samples["text_input"], maths.stage2_longest_prefix)
    assert (prefixes[0], suffixes[0]) == ("stars", "")
    split = {**samples, "text_input": prefixes, "text_output": suffixes}
    torch.manual_seed(7)
    assert torch.equal(output["loss_lm"], stock_twin(model, T5).eval()(split)["loss"])


@pytest.mark.parametrize("arch", [STAGE1, OPT, T5])
def test_with_loss_weight_0_each_arch_is_its_lavis_parent(arch):
    model_type = STAGE1_TYPE["opt"] if arch == STAGE1 else STAGE2["t5" if arch == T5 else "opt"][1]
    model = build(arch, model_type, loss_weight=0).train()
    assert getattr(model, "Pformer", None) is None
    if arch == STAGE1:
        assert not hasattr(model, "opt_proj")  # no projection to train either
    stock = stock_twin(model, arch).train()  # strict: the very same state dict keys
    assert model.state_dict().keys() == stock.state_dict().keys()
    samples = batch()
    ours = seeded(model, samples)
    if arch == T5:
        random.seed(7)
        prefixes, suffixes = maths.split_for_prefix_lm(samples["text_input"], maths.stage2_longest_prefix)
        samples = {**samples, "text_input": prefixes, "text_output": suffixes}
    parent = seeded(stock, samples)
    assert type(ours) is type(parent) and set(ours.keys()) == set(parent.keys())
    for key in parent.keys():
        if torch.is_tensor(parent[key]):
            assert torch.equal(ours[key], parent[key]), key


# --- what trains -----------------------------------------------------------------------------------------------------

def _snapshot(module):
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def _changed(module, before):
    return any(not torch.equal(tensor, before[name]) for name, tensor in module.state_dict().items())


@pytest.mark.parametrize("arch,model_type,kind", [(STAGE1, "pretrain_pformer", "opt"),
                                                  (OPT, "pretrain_pformer_opt2.7b", "opt"),
                                                  (T5, "pretrain_pformer_flant5xl", "t5")])
def test_a_step_trains_the_qformer_and_projection_only(stage0, arch, model_type, kind):
    model = build(arch, model_type, stage0[kind]).train()
    assert not model.Pformer.training and not any(m.training for m in model.Pformer.modules())
    assert not model.visual_encoder.training
    assert not any(p.requires_grad for p in model.Pformer.parameters())
    assert not any(p.requires_grad for p in model.visual_encoder.parameters())
    frozen = {"Pformer": model.Pformer, "visual_encoder": model.visual_encoder}
    if arch != STAGE1:
        frozen["llm"] = getattr(model, LLM[arch])
    trained = {"Qformer": model.Qformer, "projection": model.projection()}
    before = {name: _snapshot(part) for name, part in {**frozen, **trained}.items()}
    query_tokens = model.query_tokens.detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = model(batch())["loss"]
    loss.backward()
    optimizer.step()
    for name, part in frozen.items():
        assert not _changed(part, before[name]), name
    assert _changed(model.Qformer, before["Qformer"]) and _changed(model.projection(), before["projection"])
    assert not torch.equal(model.query_tokens, query_tokens)
    assert not any(m.training for m in model.Pformer.modules())


# --- checkpoints -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_stage1_starts_stage2_whose_state_loads_into_stock_blip2(stage0, kind, tmp_path):
    stage1 = build(STAGE1, STAGE1_TYPE[kind], stage0[kind])
    projection = pformer_net.LLM_PROJECTIONS[kind]
    with torch.no_grad():
        getattr(stage1, projection).weight.add_(1.0)  # unlike any fresh initialisation
    stage1_file = tmp_path / "stage1.pth"
    torch.save({"model": stage1.state_dict()}, stage1_file)
    assert not any(key.startswith("Pformer.") for key in stage1.state_dict())
    resumed = build(STAGE1, STAGE1_TYPE[kind], stage0[kind], seed=3, load_pretrained=True, pretrained=str(stage1_file))
    assert torch.equal(getattr(resumed, projection).weight, getattr(stage1, projection).weight)

    arch, model_type = STAGE2[kind]
    stage2 = build(arch, model_type, stage0[kind], seed=5, load_pretrained=True, pretrained=str(stage1_file))
    assert torch.equal(getattr(stage2, projection).weight, getattr(stage1, projection).weight)
    assert torch.equal(stage2.query_tokens, stage1.query_tokens)
    stage1_state = stage1.state_dict()
    shared = [key for key in stage2.state_dict() if key.startswith("Qformer.") and key in stage1_state]
    assert len(shared) > 20 and all(torch.equal(stage2.state_dict()[key], stage1_state[key]) for key in shared)

    stock = build_tiny(*STOCK[arch], max_txt_len=TINY_NUM_QUERY_TOKEN)
    state = stage2.state_dict()
    assert state.keys() == stock.state_dict().keys()  # no key other than the stock model's own
    stock.load_state_dict(state, strict=True)
    left_out = torch.nn.Module.state_dict(stage2).keys() - stock.state_dict().keys()
    assert left_out and all(key.startswith("Pformer.") for key in left_out)
    samples = batch(n=2)
    captions = stock.eval().generate(samples, num_beams=2, max_length=6)
    assert len(captions) == 2 and all(isinstance(text, str) for text in captions)
    assert captions == stage2.eval().generate(samples, num_beams=2, max_length=6)


# --- bad input -------------------------------------------------------------------------------------------------------

def _one_line_error(match, arch, model_type, stage0_file=None, **overrides):
    with pytest.raises(SettingError, match=match) as err:
        build(arch, model_type, stage0_file, **overrides)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_bad_settings_and_stage0_files_fail_in_one_line(stage0, tmp_path):
    _one_line_error("model.pretrained_stage0: loss_weight is 100", OPT, "pretrain_pformer_opt2.7b")
    _one_line_error("model.pretrained_stage0: checkpoint file not found", OPT, "pretrain_pformer_opt2.7b",
                    pretrained_stage0=str(tmp_path / "missing.pth"))
    _one_line_error(r"model.max_txt_len \(16\) must equal model.num_query_token \(8\)", STAGE1, "pretrain_pformer",
                    stage0["opt"], max_txt_len=16)
    _one_line_error("model.loss_weight: must be a finite number >= 0", OPT, "pretrain_pformer_opt2.7b",
                    stage0["opt"], loss_weight=-1)
    _one_line_error("model.alignment_only: only stage 2", STAGE1, "pretrain_pformer", stage0["opt"],
                    alignment_only=True)
    _one_line_error("model.alignment_only: with loss_weight 0", OPT, "pretrain_pformer_opt2.7b",
                    loss_weight=0, alignment_only=True)
    _one_line_error("model.opt_model / model.t5_model: blip2_pformer needs exactly one", STAGE1, "pretrain_pformer",
                    stage0["opt"], t5_model="google/flan-t5-xl")
    _one_line_error("model.pretrained_stage0: .* lacks", OPT, "pretrain_pformer_opt2.7b", stage0["t5"])
    other_width = write_stage0(tmp_path / "wide.pth", "opt", width=2 * TINY_LLM_WIDTH)
    _one_line_error("model.pretrained_stage0: .* shape", OPT, "pretrain_pformer_opt2.7b", other_width)
    more_prompts = write_stage0(tmp_path / "16.pth", "t5", num_prompts=16)
    _one_line_error("model.pretrained_stage0: .* shape", T5, "pretrain_pformer_flant5xl", more_prompts)
    torch.save({"model": {"Qformer.x": torch.zeros(1)}}, tmp_path / "not_stage0.pth")
    _one_line_error("no P-Former weights", OPT, "pretrain_pformer_opt2.7b", str(tmp_path / "not_stage0.pth"))
