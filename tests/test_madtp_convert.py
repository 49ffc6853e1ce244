"""``lavis-accel convert madtp CKPT OUT``: released MADTP checkpoints, written here in the reference's key layouts
(double125/MADTP ``compress_*_dtp.py``: ``{"model": state_dict, "epoch", "temperature"}``), become checkpoints that the
plugin's MADTP archs load with their codebook, tau and weights; any other checkpoint is refused in one line and
nothing is written.
"""
import argparse
import os
import subprocess

import pytest
import torch
from omegaconf import OmegaConf

import lavis_accel  # noqa: F401  (first: makes torchvision importable for LAVIS and registers the models)
from lavis_accel import cli
from lavis_accel.checkpoints import safe_load
from lavis_accel.config_checks import checking_model_checkpoints
from lavis_accel.convert.madtp import CODEBOOK, TEMPERATURE, convert_checkpoint
from lavis_accel.errors import SettingError
from lavis_accel.testing.tiny_models import build_tiny
from cli_jobs import CLI

TAU = 1.26
NUM_CODES = 100
QUEUE = 32
CLIP_TOWERS = {"visual.transformer": "madtp_image_queries", "transformer": "madtp_text_queries"}
CLIP_MOMENTUM_MODULES = ("visual", "transformer", "token_embedding", "ln_final", "text_projection",
                         "positional_embedding")
BLIP_PARENTS = [("blip_nlvr", "nlvr"), ("blip_retrieval", "coco"), ("blip_vqa", "vqav2"),
                ("blip_caption", "base_coco")]
# Keys of a BLIP-2 OPT checkpoint (LAVIS's names): another family's layout
BLIP2_KEYS = ["query_tokens", "ln_vision.weight", "ln_vision.bias", "visual_encoder.blocks.0.attn.q_bias",
              "visual_encoder.blocks.0.attn.v_bias", "Qformer.bert.embeddings.LayerNorm.weight", "opt_proj.weight"]


def blip_reference_checkpoint(parent, temperature=TAU):
    """What MADTP saves for a BLIP task: the BLIP repository's keys (LAVIS's, but the queue pointer is named
    ``ptr_queue``), the codebook ``space_dict`` and tau as a python float."""
    state = {key: value.clone() for key, value in parent.state_dict().items()}
    if "queue_ptr" in state:
        state["ptr_queue"] = state.pop("queue_ptr")
    state["space_dict"] = torch.randn(NUM_CODES, state["visual_encoder.pos_embed"].shape[-1])
    return {"model": state, "epoch": 7, "temperature": temperature}


def clip_reference_checkpoint(parent, code_width, temperature=TAU):
    """What MADTP saves for CLIP: OpenAI's keys, a query projection per block of both towers, momentum copies of
    the towers (their projections too), the queues, ``space_dict`` and tau."""
    state = {key: value.clone() for key, value in parent.state_dict().items()}
    for prefix, tower in (("visual.transformer", parent.visual.transformer), ("transformer", parent.transformer)):
        for index in range(len(tower.resblocks)):
            state[f"{prefix}.resblocks.{index}.query_model.q_map.0.weight"] = torch.randn(code_width, tower.width)
            state[f"{prefix}.resblocks.{index}.query_model.q_map.0.bias"] = torch.randn(code_width)
    state.update(momentum_copies(state))
    embed_dim = state["text_projection"].shape[1]
    state.update(image_queue=torch.randn(embed_dim, QUEUE), text_queue=torch.randn(embed_dim, QUEUE),
                 idx_queue=torch.full((1, QUEUE), -100), ptr_queue=torch.zeros(1, dtype=torch.long))
    state["space_dict"] = torch.randn(NUM_CODES, code_width)
    return {"model": state, "epoch": 3, "temperature": temperature}


def momentum_copies(state):
    """``visual_m.*``, ``transformer_m.*``, ..., ``text_projection_m``: the reference's momentum modules."""
    copies = {}
    for key, value in state.items():
        module, dot, rest = key.partition(".")
        if module in CLIP_MOMENTUM_MODULES:
            copies[f"{module}_m{dot}{rest}"] = value.clone()
    return copies


def save(checkpoint, path):
    torch.save(checkpoint, path)
    return str(path)


def run_main(capsys, *argv):
    """``lavis-accel ARGV`` in this process: (exit status, stdout, stderr)."""
    status = cli.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return status, captured.out.strip(), captured.err.strip()


def run_subprocess(*argv):
    return subprocess.run([*CLI, *map(str, argv)], capture_output=True, text=True)


def load_converted(arch, path, model_type=None):
    """The tiny ``arch`` (other random weights than any parent here) with ``path`` as its fine-tuned checkpoint,
    loaded as the plugin's jobs load one: through the safe loader, refused if it leaves a parameter unset."""
    cfg = OmegaConf.create({"model": {"finetuned": str(path), "load_finetuned": True}, "run": {}})
    torch.manual_seed(1)
    with checking_model_checkpoints(cfg):
        return build_tiny(arch, model_type, load_finetuned=True, finetuned=str(path))


def assert_madtp_state(model, reference):
    """The codebook and tau of the reference checkpoint arrived, tau in the buffer and in the pruning steps."""
    assert_same_tensor(model.madtp_codebook.detach(), reference["model"]["space_dict"])
    assert float(model.madtp_temperature) == pytest.approx(reference["temperature"], rel=1e-6)
    assert model.temperature == pytest.approx(reference["temperature"], rel=1e-6)


def assert_same_tensor(actual, expected):
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=0, atol=0)


@pytest.fixture(scope="module")
def nlvr_parent():
    torch.manual_seed(0)
    return build_tiny("blip_nlvr", "nlvr")


@pytest.fixture(scope="module")
def clip_parent():
    torch.manual_seed(0)
    return build_tiny("clip")


@pytest.fixture(scope="module")
def clip_code_width():
    """The codebook width of the tiny ``clip_madtp`` (MADTP's CLIP projects every tower to the codebook's width)."""
    return build_tiny("clip_madtp").madtp_codebook.shape[1]


@pytest.fixture
def nlvr_ckpt(nlvr_parent, tmp_path):
    return save(blip_reference_checkpoint(nlvr_parent), tmp_path / "checkpoint_best.pth")


def test_nlvr_checkpoint_converts_through_the_cli_and_loads_into_blip_nlvr_madtp(nlvr_parent, tmp_path):
    reference = blip_reference_checkpoint(nlvr_parent)
    ckpt, out = save(reference, tmp_path / "checkpoint_best.pth"), tmp_path / "converted.pth"
    result = run_subprocess("convert", "madtp", ckpt, out)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = result.stdout.strip()
    assert "\n" not in summary and "blip_nlvr" in summary and "blip_nlvr_madtp" in summary
    assert f"tau {TAU:g}" in summary and f"{len(reference['model']) - 1} keys kept, 1 renamed, 0 dropped" in summary

    converted = safe_load(str(out), "OUT")
    assert set(converted) == {"model"}
    assert "space_dict" not in converted["model"] and converted["model"][TEMPERATURE].dim() == 0

    model = load_converted("blip_nlvr_madtp", out, "nlvr")
    assert_madtp_state(model, reference)
    loaded = model.state_dict()
    for key, value in nlvr_parent.state_dict().items():
        assert_same_tensor(loaded[key], value)


def test_clip_checkpoint_converts_and_loads_into_clip_madtp(clip_parent, clip_code_width, tmp_path, capsys):
    reference = clip_reference_checkpoint(clip_parent, clip_code_width)
    ckpt, out = save(reference, tmp_path / "checkpoint_best.pth"), tmp_path / "converted.pth"
    status, summary, err = run_main(capsys, "convert", "madtp", ckpt, out)
    assert status == 0, err
    depth = len(clip_parent.visual.transformer.resblocks) + len(clip_parent.transformer.resblocks)
    dropped = len(momentum_copies(reference["model"])) + 4  # and the four queue buffers
    assert f"{len(clip_parent.state_dict())} keys kept, {2 * depth + 1} renamed, {dropped} dropped" in summary
    assert "clip_madtp" in summary

    state = safe_load(str(out), "OUT")["model"]
    assert not [key for key in state if "_m." in key or key.endswith("_m") or "queue" in key or "q_map" in key]
    model = load_converted("clip_madtp", out)
    assert_madtp_state(model, reference)
    for prefix, queries in CLIP_TOWERS.items():
        for index, projection in enumerate(getattr(model, queries)):
            for name in ("weight", "bias"):
                expected = reference["model"][f"{prefix}.resblocks.{index}.query_model.q_map.0.{name}"]
                assert_same_tensor(getattr(projection, name).detach(), expected)
    loaded = model.state_dict()
    for key, value in clip_parent.state_dict().items():
        assert_same_tensor(loaded[key], value)


@pytest.mark.parametrize("arch, model_type", BLIP_PARENTS)
def test_every_blip_task_layout_is_detected_and_keeps_lavis_names(arch, model_type):
    parent = build_tiny(arch, model_type)
    conversion = convert_checkpoint(blip_reference_checkpoint(parent))
    assert conversion.layout.name == arch and conversion.layout.arch == f"{arch}_madtp"
    assert set(conversion.state) == set(parent.state_dict()) | {CODEBOOK, TEMPERATURE}
    renamed = 2 if "queue_ptr" in parent.state_dict() else 1  # space_dict; the BLIP repository's ptr_queue
    assert (conversion.kept, conversion.renamed, conversion.dropped) == (len(parent.state_dict()) + 1 - renamed,
                                                                         renamed, 0)


def test_foreign_checkpoint_is_refused_in_one_line_and_nothing_is_written(tmp_path):
    ckpt = save({"model": {key: torch.zeros(2) for key in BLIP2_KEYS}, "temperature": TAU}, tmp_path / "blip2.pth")
    out = tmp_path / "converted.pth"
    result = run_subprocess("convert", "madtp", ckpt, out)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("lavis-accel: error: CKPT:")
    assert "fits no MADTP checkpoint layout" in lines[0] and "query_tokens" in lines[0]
    assert sorted(os.listdir(tmp_path)) == ["blip2.pth"]


def test_random_keys_are_named_in_the_refusal(tmp_path, capsys):
    keys = [f"block{index}.mystery" for index in range(8)]
    ckpt = save({"model": {key: torch.zeros(1) for key in keys}, "temperature": TAU}, tmp_path / "random.pth")
    status, _, err = run_main(capsys, "convert", "madtp", ckpt, tmp_path / "out.pth")
    assert status == 2 and "\n" not in err
    assert ", ".join(keys[:5]) in err and "(8 in all)" in err
    assert not (tmp_path / "out.pth").exists()


def test_stock_blip_checkpoint_without_codebook_is_refused(nlvr_parent, tmp_path, capsys):
    ckpt = save({"model": nlvr_parent.state_dict(), "temperature": TAU}, tmp_path / "stock.pth")
    status, _, err = run_main(capsys, "convert", "madtp", ckpt, tmp_path / "out.pth")
    assert status == 2 and "no 'space_dict'" in err and "blip_nlvr_madtp" in err
    assert not (tmp_path / "out.pth").exists()


def test_missing_temperature_is_refused_unless_given(nlvr_parent, tmp_path, capsys):
    checkpoint = blip_reference_checkpoint(nlvr_parent)
    del checkpoint["temperature"]
    ckpt, out = save(checkpoint, tmp_path / "no_tau.pth"), tmp_path / "out.pth"
    status, _, err = run_main(capsys, "convert", "madtp", ckpt, out)
    assert status == 2 and "no 'temperature'" in err and "--temperature" in err and not out.exists()

    status, summary, _ = run_main(capsys, "convert", "madtp", ckpt, out, "--temperature", "0.5")
    assert status == 0 and "tau 0.5 (from --temperature)" in summary
    assert float(safe_load(str(out), "OUT")["model"][TEMPERATURE]) == 0.5


def test_given_temperature_overrides_the_checkpoints(nlvr_ckpt, tmp_path, capsys):
    out = tmp_path / "out.pth"
    status, _, _ = run_main(capsys, "convert", "madtp", nlvr_ckpt, out, "--temperature", "0")
    assert status == 0 and float(safe_load(str(out), "OUT")["model"][TEMPERATURE]) == 0.0


@pytest.mark.parametrize("tau", ["-1", "nan", "inf"])
def test_bad_given_temperature_is_refused(nlvr_ckpt, tmp_path, capsys, tau):
    status, _, err = run_main(capsys, "convert", "madtp", nlvr_ckpt, tmp_path / "out.pth", "--temperature", tau)
    assert status == 2 and err.startswith("lavis-accel: error: --temperature must be a finite number >= 0")
    assert not (tmp_path / "out.pth").exists()


def test_bad_stored_temperature_is_refused(nlvr_parent):
    checkpoint = blip_reference_checkpoint(nlvr_parent, temperature="hot")
    with pytest.raises(SettingError, match="'temperature' must be a finite number >= 0, got 'hot'"):
        convert_checkpoint(checkpoint)


def test_existing_out_is_refused_unless_forced(nlvr_ckpt, tmp_path, capsys):
    out = tmp_path / "out.pth"
    out.write_text("keep me")
    status, _, err = run_main(capsys, "convert", "madtp", nlvr_ckpt, out)
    assert status == 2 and "exists" in err and "--force" in err and out.read_text() == "keep me"

    status, _, _ = run_main(capsys, "convert", "madtp", nlvr_ckpt, out, "--force")
    assert status == 0 and CODEBOOK in safe_load(str(out), "OUT")["model"]


@pytest.mark.parametrize("checkpoint, message", [
    ({"visual_encoder.pos_embed": torch.zeros(1)}, "holds no 'model' state dict"),
    ({"model": {}, "temperature": TAU}, "holds no 'model' state dict"),
    ({"model": {"visual_encoder.pos_embed": [0.0]}, "temperature": TAU}, "not tensors: visual_encoder.pos_embed"),
])
def test_not_a_madtp_checkpoint_is_refused(checkpoint, message):
    with pytest.raises(SettingError, match=message):
        convert_checkpoint(checkpoint)


def test_codebook_of_another_width_is_refused(nlvr_parent):
    checkpoint = blip_reference_checkpoint(nlvr_parent)
    checkpoint["model"]["space_dict"] = torch.randn(NUM_CODES, 7)
    with pytest.raises(SettingError, match="'space_dict' is 7 wide, but visual_encoder.pos_embed has"):
        convert_checkpoint(checkpoint)


def test_clip_block_without_its_query_projection_is_refused(clip_parent):
    checkpoint = clip_reference_checkpoint(clip_parent, code_width=16)
    del checkpoint["model"]["transformer.resblocks.1.query_model.q_map.0.bias"]
    with pytest.raises(SettingError, match="lacks the query projections .*: madtp_text_queries.1.bias$"):
        convert_checkpoint(checkpoint)


def test_out_in_a_missing_directory_is_refused(nlvr_ckpt, tmp_path, capsys):
    status, _, err = run_main(capsys, "convert", "madtp", nlvr_ckpt, tmp_path / "missing" / "out.pth")
    assert status == 2 and "OUT: directory" in err and "does not exist" in err


def test_checkpoint_that_would_import_code_is_refused(nlvr_parent, tmp_path, capsys):
    checkpoint = blip_reference_checkpoint(nlvr_parent)
    checkpoint["config"] = argparse.Namespace(p=0.5)  # a pickled object: weights_only loading refuses it
    ckpt = save(checkpoint, tmp_path / "hostile.pth")
    status, _, err = run_main(capsys, "convert", "madtp", ckpt, tmp_path / "out.pth")
    assert status == 2 and "CKPT:" in err and "argparse.Namespace" in err and "\n" not in err
    assert not (tmp_path / "out.pth").exists()
