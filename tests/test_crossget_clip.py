"""CrossGET on LAVIS's CLIP: the registered ``clip_crossget`` (``lavis_accel.models.clip_crossget``) on tiny random
CLIPs, and its shipped projects through the real CLI.

Pinned here: the offsets are zero parameters under the reference's names, a stock checkpoint loads with them fresh
and a checkpoint with offsets of another shape is refused in one line; ``quick_gelu`` puts QuickGELU in every MLP;
``remove`` gives the parent's outputs exactly; with rv = rl = 0 the cross token changes the image output (an extra
key) but not the text (causally hidden); token counts per block; each caption of a mixed-length batch pools its own
EOT; the JS loss reaches the offsets only, and needs towers of equal depth; bad reducer settings are one line.
End to end: ``projects/crossget/train/ret_coco_clip.yaml`` made tiny trains with the JS loss (``loss_kd`` in the
log) and ``projects/crossget/eval/ret_coco_clip.yaml`` evaluates its best checkpoint with LAVIS's retrieval task.
The tiny trained model is ``ViT-Tiny-16-Paired`` (4 blocks in each tower): the shared ``ViT-Tiny-16`` has 4 image
and 3 text blocks, which the loss cannot pair.
"""
import os

import pytest
import torch
import yaml
from lavis.common.registry import registry
from lavis.models.clip_models import model as clip_model
from omegaconf import OmegaConf

import lavis_accel  # noqa: F401  (first: makes torchvision importable for LAVIS and registers the variants)
from lavis_accel.config_checks import checked_load_state_dict
from lavis_accel.datasets import write_retrieval
from lavis_accel.errors import SettingError
from lavis_accel.models.clip_crossget import IMAGE_OFFSETS, PAIRED_TINY_CLIP_TYPE, TEXT_OFFSETS, ClipCrossget
from lavis_accel.models.clip_types import TINY_CLIP_TYPE
from lavis_accel.patch import clip as clip_binding
from lavis_accel.patch.crossget_steps import CrossGetStep, EotCrossGetStep
from lavis_accel.testing.projects import tiny_project, write_project
from lavis_accel.testing.tiny_models import TINY_IMAGE_SIZE, parent_config
from cli_jobs import job_dir, metrics_lines, run_cli, train_stats

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_YAML = os.path.join(REPO, "projects", "crossget", "train", "ret_coco_clip.yaml")
EVAL_YAML = os.path.join(REPO, "projects", "crossget", "eval", "ret_coco_clip.yaml")
MODEL_YAMLS = os.path.join(REPO, "lavis_accel", "configs", "models")
CAPTIONS = ["a big red circle at the top left next to two small blue squares and a green triangle on the right",
            "two blue squares", "a green triangle at the bottom"]
RUN = {"max_epoch": 1, "batch_size_train": 8, "batch_size_eval": 8, "init_lr": 1e-4}


def crossget(rv=16, rl=0, **settings):
    return {"reducer": {"name": "crossget", "rv": rv, "rl": rl, **settings}}


def build(arch, model_type, seed=0, **overrides):
    """A float64 tiny model of ``arch`` and ``model_type`` (its default yaml and ``overrides``), in eval mode; built
    by ``from_config`` as LAVIS's ``load_model`` builds it."""
    torch.manual_seed(seed)
    cfg = OmegaConf.merge(parent_config(arch, model_type), overrides)
    return registry.get_model_class(arch).from_config(cfg).eval().double()


def tiny(arch="clip_crossget", seed=0, **overrides):
    """The shared tiny CLIP, ``ViT-Tiny-16`` (4 image, 3 text blocks)."""
    return build(arch, TINY_CLIP_TYPE, seed, **overrides)


def paired(seed=0, **overrides):
    """The tiny ``clip_crossget`` that trains with the loss, ``ViT-Tiny-16-Paired`` (4 blocks in each tower)."""
    return build("clip_crossget", PAIRED_TINY_CLIP_TYPE, seed, **overrides)


def images(count=2):
    return torch.randn(count, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, dtype=torch.float64,
                       generator=torch.Generator().manual_seed(1))


def set_offsets(model, scale=0.5):
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name in (IMAGE_OFFSETS, TEXT_OFFSETS):
            offsets = model.get_parameter(name)
            offsets.copy_(scale * torch.randn(offsets.shape, generator=generator, dtype=offsets.dtype))


def one_line(err):
    message = str(err.value)
    assert isinstance(err.value, SettingError) and "\n" not in message
    return message


# --- the registered model ---------------------------------------------------------------------------------------------

def test_registered_with_its_types_and_zero_offsets_under_the_reference_names():
    assert registry.get_model_class("clip_crossget") is ClipCrossget
    assert set(ClipCrossget.PRETRAINED_MODEL_CONFIG_DICT) == {"ViT-B-16", "ViT-L-14", "ViT-L-14-336", "ViT-Tiny-16",
                                                              PAIRED_TINY_CLIP_TYPE}
    model = tiny()
    state = model.state_dict()
    assert tuple(state[IMAGE_OFFSETS].shape) == (1, 4, 128) and tuple(state[TEXT_OFFSETS].shape) == (1, 3, 128)
    assert IMAGE_OFFSETS == "visual.transformer.cross_image" and TEXT_OFFSETS == "transformer.cross_text"
    for name in (IMAGE_OFFSETS, TEXT_OFFSETS):
        assert model.get_parameter(name).requires_grad and not state[name].any()
    assert set(model.PARAMETERS_STARTING_FRESH) == {IMAGE_OFFSETS, TEXT_OFFSETS}
    steps = clip_binding.current_steps(model)  # the yaml's reducer block: rv 16, rl 0, the model's own offsets
    assert type(steps.image) is CrossGetStep and type(steps.text) is EotCrossGetStep
    assert (steps.image.r, steps.text.r) == (16, 0)
    assert steps.image.offsets is model.get_parameter(IMAGE_OFFSETS)
    assert steps.text.offsets is model.get_parameter(TEXT_OFFSETS)


def test_default_yamls_pick_the_activation_of_their_weights():
    for name, quick in (("vit_base16", True), ("vit_large14", True), ("vit_large14_336", True), ("vit_tiny16", False),
                        ("vit_tiny16_paired", False)):
        with open(os.path.join(MODEL_YAMLS, f"clip_crossget_{name}.yaml"), encoding="utf-8") as f:
            model = yaml.safe_load(f)["model"]
        assert model["quick_gelu"] is quick, name
        assert model["reducer"] == {"name": "crossget", "rv": 16, "rl": 0}, name


def test_quick_gelu_puts_quickgelu_in_every_mlp_of_both_towers():
    gelu, quick = tiny(), tiny(quick_gelu=True)
    blocks = (*quick.visual.transformer.resblocks, *quick.transformer.resblocks)
    assert all(type(block.mlp.gelu) is clip_model.QuickGELU for block in blocks)
    assert all(type(block.mlp.gelu) is torch.nn.GELU for block in gelu.visual.transformer.resblocks)
    for name, tensor in gelu.state_dict().items():  # the activation has no parameters: nothing else differs
        assert torch.equal(quick.state_dict()[name], tensor), name
    assert not torch.allclose(quick.encode_image(images()), gelu.encode_image(images()))
    with pytest.raises(SettingError) as err:
        tiny(quick_gelu="yes")
    assert one_line(err) == "model.quick_gelu must be True or False, got 'yes'"


def test_a_stock_checkpoint_loads_with_the_offsets_fresh(tmp_path):
    stock = tiny("clip")
    path = tmp_path / "stock_clip.pt"
    torch.save(stock.state_dict(), path)
    model = tiny(pretrained=str(path), seed=7)  # another seed: every weight must come from the file
    for name, tensor in stock.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert not model.get_parameter(IMAGE_OFFSETS).any() and not model.get_parameter(TEXT_OFFSETS).any()
    # as a fine-tuned start through the plugin's checks: only the offsets stay unset, which is allowed
    checked = checked_load_state_dict(model, "model.finetuned", str(path))
    result = checked(stock.state_dict(), strict=False)
    assert set(result.missing_keys) == {IMAGE_OFFSETS, TEXT_OFFSETS}


def test_a_checkpoint_with_offsets_loads_them_key_for_key(tmp_path):
    trained = tiny().float()
    set_offsets(trained)
    path = tmp_path / "checkpoint_best.pth"
    torch.save({"model": trained.state_dict(), "epoch": 3}, path)  # as LAVIS's runner and the reference save
    model = tiny(finetuned=str(path), seed=5).float()
    for name in (IMAGE_OFFSETS, TEXT_OFFSETS):
        assert torch.equal(model.get_parameter(name), trained.get_parameter(name))
    image = images().float()
    torch.testing.assert_close(model.encode_image(image), trained.encode_image(image), rtol=0, atol=0)


def test_offsets_of_another_shape_in_a_checkpoint_are_refused_in_one_line(tmp_path):
    state = tiny().state_dict()
    state[IMAGE_OFFSETS] = torch.zeros(1, 3, 128)
    path = tmp_path / "other_depth.pth"
    torch.save({"model": state}, path)
    with pytest.raises(SettingError) as err:
        tiny(finetuned=str(path))
    assert one_line(err) == ("checkpoint: visual.transformer.cross_image has shape [1, 3, 128], but ClipCrossget "
                             "needs [1, 4, 128] (one offset per block of that tower)")
    with pytest.raises(SettingError) as err:  # through the CLI's checks the file is named
        checked_load_state_dict(tiny(), "model.finetuned", str(path))(state, strict=False)
    assert one_line(err).startswith(f"model.finetuned: {path} does not fit ClipCrossget: 1 tensors differ in shape, "
                                    "e.g. visual.transformer.cross_image [1, 3, 128] in the file vs [1, 4, 128]")


def test_vit_b16_has_the_references_offsets_activation_and_token_schedule():
    """CLIP ViT-B/16 with random weights (``pretrained`` empty: LAVIS builds nn.GELU, as for a local file): the
    default yaml's quick_gelu gives QuickGELU; with rv 16 the image tower keeps 198 -> 182 -> ... -> 22 -> 12
    tokens, the clamp binding in the last block (spec §4.4's worked example); the cross token then leaves, so the
    last count is 11."""
    torch.manual_seed(0)
    cfg = OmegaConf.merge(parent_config("clip_crossget", "ViT-B-16"), {"pretrained": ""})
    model = ClipCrossget.from_config(cfg).eval()
    assert tuple(model.get_parameter(IMAGE_OFFSETS).shape) == (1, 12, 768)
    assert tuple(model.get_parameter(TEXT_OFFSETS).shape) == (1, 12, 512)
    blocks = (*model.visual.transformer.resblocks, *model.transformer.resblocks)
    assert all(type(block.mlp.gelu) is clip_model.QuickGELU for block in blocks)
    with torch.no_grad():
        model.encode_image(torch.randn(1, 3, 224, 224))
    assert clip_binding.token_counts(model)["image"] == [198 - 16 * i for i in range(12)] + [11]


# --- outputs and token counts ---------------------------------------------------------------------------------------

def test_remove_restores_the_parents_outputs_exactly():
    parent, model = tiny("clip"), tiny(**crossget(rv=16, rl=6))
    set_offsets(model)
    text = parent.tokenizer(CAPTIONS)
    assert not torch.allclose(model.encode_image(images()), parent.encode_image(images()))
    assert not torch.allclose(model.encode_text(text), parent.encode_text(text))
    lavis_accel.remove(model)
    assert not clip_binding.is_patched(model)
    torch.testing.assert_close(model.encode_image(images()), parent.encode_image(images()), rtol=0, atol=0)
    torch.testing.assert_close(model.encode_text(text), parent.encode_text(text), rtol=0, atol=0)
    lavis_accel.apply(model, "crossget", rv=16, rl=6)  # and back: the model's own offsets again
    assert clip_binding.current_steps(model).image.offsets is model.get_parameter(IMAGE_OFFSETS)


def test_without_merges_the_cross_token_changes_the_image_output_but_not_the_text():
    parent, model = tiny("clip"), tiny(**crossget(rv=0, rl=0))
    text = parent.tokenizer(CAPTIONS)
    for scale in (0.0, 0.5):  # even zero offsets: the image cross token is an extra key every token sees
        set_offsets(model, scale)
        assert not torch.allclose(model.encode_image(images()), parent.encode_image(images()), atol=1e-6)
        torch.testing.assert_close(model.encode_text(text), parent.encode_text(text), rtol=0, atol=1e-12)
    assert clip_binding.token_counts(model) == {"image": [38, 38, 38, 38, 37], "text": [78, 78, 78, 77]}


def test_token_counts_per_block():
    """rv merges per image block, rl per text block, clamped to half the unprotected tokens (image: [CLS] and the
    cross token; text: [SOT], the cross token and the EOT); the cross token leaves after the last block."""
    model = tiny(**crossget(rv=16, rl=6, eot_guard=True))
    assert clip_binding.current_steps(model).text.eot_guard  # the reducer block's setting reached the text step
    model.encode_image(images())
    model.encode_text(model.tokenizer(CAPTIONS))
    # image 37 + 1: 16, 16, min(16, 10 // 2), min(16, 5 // 2) merged; text 77 + 1: 6 per block
    assert clip_binding.token_counts(model) == {"image": [38, 22, 12, 7, 4], "text": [78, 72, 66, 59]}


def test_each_caption_of_a_mixed_length_batch_pools_its_own_eot():
    """Deep text merging (rl 30 of the 37 allowed): words merge, padding merges into words (the reference's
    default), yet the tracked index points at the EOT's very vector in every block, and each caption's output is
    the one it has alone."""
    model = tiny(**crossget(rv=0, rl=30))
    set_offsets(model)
    step = clip_binding.current_steps(model).text
    text = model.tokenizer(CAPTIONS)
    lengths = text.argmax(dim=-1)
    assert len(set(lengths.tolist())) == 3
    seen, reduce = [], step.reduce

    def checking_reduce(index, x, attention_seen, valid=None):
        rows = torch.arange(x.shape[0])
        if index == 0:
            assert torch.equal(step.eot, lengths)
        eot_before = x[rows, step.eot]
        x, valid = reduce(index, x, attention_seen, valid)
        assert torch.equal(x[rows, step.eot], eot_before)  # the very EOT vector, never a mix
        seen.append(x.shape[1])
        return x, valid

    step.reduce = checking_reduce
    try:
        batch = model.encode_text(text)
    finally:
        del step.reduce
    assert seen == [48, 26, 14]  # 78 - 30, 48 - (48 - 3) // 2, 26 - (26 - 3) // 2 less the cross token
    alone = torch.cat([model.encode_text(text[i:i + 1]) for i in range(len(CAPTIONS))])
    torch.testing.assert_close(batch, alone, rtol=0, atol=1e-12)


# --- the JS loss ------------------------------------------------------------------------------------------------------

def test_the_kd_loss_reaches_only_the_offsets():
    model = paired(**crossget(rv=16, rl=6)).train()
    set_offsets(model, 0.1)
    model.encode_image(images())
    model.encode_text(model.tokenizer(CAPTIONS[:2]))
    image_cross, text_cross = model.crossget_cross_features()
    steps = clip_binding.current_steps(model)
    assert image_cross.shape == text_cross.shape == (4 * 2, 128)
    # the reference's norms and projections: ln_pre and proj for the image, ln_final and text_projection for the text
    torch.testing.assert_close(image_cross, model.visual.ln_pre(torch.cat(steps.image.cross_tokens)) @ model.visual.proj)
    torch.testing.assert_close(text_cross, model.ln_final(torch.cat(steps.text.cross_tokens)) @ model.text_projection)
    loss = model.crossget_kd_loss()
    assert torch.isfinite(loss) and loss > 0
    names, parameters = zip(*model.named_parameters())
    grads = dict(zip(names, torch.autograd.grad(loss, parameters, allow_unused=True)))
    assert {name for name, grad in grads.items() if grad is not None} == {IMAGE_OFFSETS, TEXT_OFFSETS}
    assert grads[IMAGE_OFFSETS].abs().sum() > 0 and grads[TEXT_OFFSETS].abs().sum() > 0


def test_the_kd_loss_needs_towers_of_equal_depth_and_a_forward():
    model = tiny(**crossget(rv=16, rl=6)).train()
    model.encode_image(images())
    model.encode_text(model.tokenizer(CAPTIONS[:2]))
    with pytest.raises(SettingError) as err:
        model.crossget_kd_loss()
    assert "has 4 image and 3 text blocks" in one_line(err)
    with pytest.raises(SettingError) as err:
        paired().crossget_kd_loss()
    assert "needs a forward of the image tower" in one_line(err)


# --- bad settings -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("settings, message", [
    ({"rv": -1}, "reducer setting 'rv' of 'crossget' must be an integer from 0 to 18"),
    ({"rv": 19}, "reducer setting 'rv' of 'crossget' must be an integer from 0 to 18"),
    ({"rv": 2.5}, "reducer setting 'rv' of 'crossget' must be an integer from 0 to 18"),
    ({"rl": 38}, "reducer setting 'rl' of 'crossget' must be an integer from 0 to 37"),
    ({"rl": -3}, "reducer setting 'rl' of 'crossget' must be an integer from 0 to 37"),
    ({"r": 8}, "reducer setting 'r' is not known for 'crossget': use rv, rl, eot_guard"),
    ({"eot_guard": "on"}, "reducer setting 'eot_guard' of 'crossget' must be true or false"),
])
def test_bad_reducer_settings_are_refused_in_one_line(settings, message):
    with pytest.raises(SettingError) as err:
        tiny(reducer={"name": "crossget", **settings})
    assert one_line(err).startswith(message)
    with pytest.raises(SettingError) as err:
        lavis_accel.apply(tiny("clip"), "crossget", **settings)
    assert one_line(err).startswith(message)


def test_another_reducer_block_is_refused_in_one_line():
    with pytest.raises(SettingError) as err:
        tiny(reducer={"name": "tome", "r": 4})
    assert one_line(err) == ("model.reducer: ClipCrossget takes a crossget block (name: crossget, rv, rl), "
                             "not 'tome'")


# --- end to end through the CLI ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_retrieval(tmp_path_factory.mktemp("data"), n_train=8, n_val=8, n_test=8)


@pytest.fixture(scope="module")
def start_checkpoint(tmp_path_factory):
    """A fine-tuned start as the reference's: a plain CLIP's state dict (no offsets) under ``model``."""
    torch.manual_seed(0)
    start = clip_model.create_model(PAIRED_TINY_CLIP_TYPE)
    path = tmp_path_factory.mktemp("start") / "finetuned_clip.pth"
    torch.save({"model": start.state_dict()}, path)
    return path, start.state_dict()


def project(yaml_path, data, out, **model):
    cfg = tiny_project(yaml_path, {"coco_retrieval": data["coco_retrieval"]}, out / "jobs",
                       model={"model_type": PAIRED_TINY_CLIP_TYPE, **model}, run=RUN)
    return write_project(cfg, out / os.path.basename(yaml_path))


@pytest.fixture(scope="module")
def trained(data, start_checkpoint, tmp_path_factory):
    """``lavis-accel train`` of the COCO CLIP project (rv 16, and rl 6 by ``--options``): the job folder."""
    out = tmp_path_factory.mktemp("train")
    path = project(TRAIN_YAML, data, out, finetuned=str(start_checkpoint[0]))
    run_cli("train", "--cfg-path", path, "--options", "model.reducer.rl=6")
    return job_dir(out / "jobs")


def test_the_shipped_project_trains_with_the_js_loss(trained, start_checkpoint):
    (stats,) = train_stats(trained)
    assert 0 < stats["train_loss_kd"] < float("inf")
    state = torch.load(os.path.join(trained, "checkpoint_best.pth"), map_location="cpu", weights_only=True)["model"]
    start = start_checkpoint[1]
    assert state[IMAGE_OFFSETS].shape == (1, 4, 128) and state[TEXT_OFFSETS].shape == (1, 4, 128)
    assert state[IMAGE_OFFSETS].abs().sum() > 0 and state[TEXT_OFFSETS].abs().sum() > 0  # trained from zero
    # the start was loaded, then trained: 5 AdamW steps of lr 1e-4 move a weight by 5e-4 at most
    moved = (state["visual.proj"] - start["visual.proj"]).abs().max()
    assert 0 < moved < 1e-3


def test_its_best_checkpoint_evaluates_with_lavis_retrieval_task(trained, data, tmp_path):
    """The eval project (LAVIS's ``retrieval`` task) on the best checkpoint, reduced as it was trained, scores the
    test split as the training job's own final test did."""
    path = project(EVAL_YAML, data, tmp_path, finetuned=os.path.join(trained, "checkpoint_best.pth"))
    assert OmegaConf.load(path).run.task == "retrieval"
    run_cli("evaluate", "--cfg-path", path, "--options", "model.reducer.rl=6")
    (evaluated,) = metrics_lines(job_dir(tmp_path / "jobs"))
    trained_test = metrics_lines(trained)[-1]
    assert evaluated == trained_test
    assert {"txt_r1", "img_r1", "r_mean"} <= set(evaluated)
