"""MADTP training through LAVIS (``lavis_accel.tasks.madtp``): the alignment term, the tau / GFLOPs controller, the
best checkpoint among epochs within the tolerance, evaluation of that checkpoint, exact resume and bad settings.

The end-to-end runs go through the real CLI (``python -m lavis_accel.cli``) with ``projects/madtp/{train,eval}/nlvr*``
made tiny, on synthetic NLVR2 data. They start from a checkpoint the test writes: a tiny ``blip_nlvr_madtp`` at 192 px
(ViT tokens enough for p = 0.5 to be reachable: at 96 px pruning saturates near 66 % of the parent's GFLOPs) whose
codebook is ``0.4 x randn``. The controller moves tau by the reference's step tables, made for ViT-B's tokens, where
tau = 1 to 3 spans the useful range; the tiny random model's tokens are smaller, and with a ``randn`` codebook it
prunes only from tau ~ 10 on, where those steps would need dozens of epochs. Every shipped MADTP yaml is run at tiny
size by ``tests/test_dry_run.py``.
"""
import json
import os
from types import SimpleNamespace

import pytest
import torch
from lavis.common.registry import registry
from omegaconf import OmegaConf

from lavis_accel import cli
from lavis_accel.datasets import write_nlvr
from lavis_accel.errors import SettingError
from lavis_accel.tasks import madtp
from lavis_accel.testing.projects import tiny_project, write_project
from lavis_accel.testing.tiny_models import build_tiny
from cli_jobs import job_dir, metrics_lines, run_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_YAML = os.path.join(REPO, "projects", "madtp", "train", "nlvr.yaml")
EVAL_YAML = os.path.join(REPO, "projects", "madtp", "eval", "nlvr_eval.yaml")
IMAGE_SIZE = 192
RUN = {"batch_size_train": 8, "batch_size_eval": 8, "init_lr": 1e-5}
NLVR = madtp.SCHEDULES["nlvr"]


def as_float32(value):
    return float(torch.tensor(value, dtype=torch.float32))


def log_lines(directory, split):
    """LAVIS's ``log.txt`` lines of one split (``{"<split>_<key>": ...}``), keys without the split prefix."""
    prefix = f'{{"{split}_'
    with open(os.path.join(directory, "log.txt"), encoding="utf-8") as f:
        lines = [json.loads(line) for line in f if line.startswith(prefix)]
    return [{key[len(split) + 1:]: value for key, value in line.items()} for line in lines]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_nlvr(tmp_path_factory.mktemp("data"), n_train=16, n_val=16, n_test=8, image_size=IMAGE_SIZE)


@pytest.fixture(scope="module")
def start_checkpoint(tmp_path_factory):
    """A tiny ``blip_nlvr_madtp`` checkpoint with a codebook at the tiny tokens' scale (see the module docstring)."""
    torch.manual_seed(0)
    model = build_tiny("blip_nlvr_madtp", "nlvr", image_size=IMAGE_SIZE)
    with torch.no_grad():
        model.madtp_codebook.mul_(0.4)
    path = tmp_path_factory.mktemp("start") / "start.pth"
    torch.save({"model": model.state_dict()}, path)
    return str(path)


def project(yaml_path, data, start, out, run=None, model=None):
    cfg = tiny_project(yaml_path, data, out / "jobs",
                       model={"image_size": IMAGE_SIZE, "load_finetuned": True, "finetuned": start, **(model or {})},
                       run={**RUN, **(run or {})})
    return write_project(cfg, out / os.path.basename(yaml_path))


@pytest.fixture(scope="module")
def controller_run(data, start_checkpoint, tmp_path_factory):
    """``lavis-accel train`` of the NLVR2 project (p = 0.5) for 5 epochs: ``(job folder, output)``."""
    out = tmp_path_factory.mktemp("controller")
    path = project(TRAIN_YAML, data, start_checkpoint, out,
                   run={"max_epoch": 5, "valid_splits": ["val"], "test_splits": ["test"]})
    output = run_cli("train", "--cfg-path", path)
    return job_dir(out / "jobs"), output


# ---------------------------------------------------------------------------------------------- the controller
def test_tau_follows_the_reference_table_until_the_gflops_meet_the_target(controller_run):
    directory, output = controller_run
    epochs = log_lines(directory, "val")
    assert len(epochs) == 5
    parent = epochs[0]["parent_gflops"]
    assert all(e["parent_gflops"] == parent and e["target_gflops"] == pytest.approx(0.5 * parent) for e in epochs)
    assert epochs[0]["temperature"] == 1.0 and epochs[0]["gflops"] > 1.05 * epochs[0]["target_gflops"]
    for before, after in zip(epochs, epochs[1:]):
        expected = madtp.next_temperature(before["temperature"], as_float32(before["gflops"]), before["target_gflops"],
                                          parent, NLVR.epoch)
        assert after["temperature"] == pytest.approx(expected, abs=1e-6)
        assert f"tau {before['temperature']:g} -> {after['temperature']:g}" in output
    last = epochs[-1]
    assert last["temperature"] > 1.5  # tau climbed by the table's steps of 0.5, then 0.1
    assert abs(last["gflops"] - last["target_gflops"]) <= 0.05 * last["target_gflops"]


def test_the_best_checkpoint_is_an_epoch_within_the_tolerance(controller_run):
    directory, _ = controller_run
    epochs = log_lines(directory, "val")
    for e in epochs:
        within = e["gflops"] - e["target_gflops"] < NLVR.tolerance * e["parent_gflops"]
        assert e["in_tolerance"] == within
        assert e["metric"] == e["acc"]
        assert e["agg_metrics"] == (e["acc"] if within else madtp.NOT_ELIGIBLE)
    assert not epochs[0]["in_tolerance"] and epochs[-1]["in_tolerance"]
    best = epochs[-1]["best_epoch"]
    assert epochs[best]["in_tolerance"]
    checkpoint = torch.load(os.path.join(directory, "checkpoint_best.pth"), map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == best
    state = checkpoint["model"]
    assert float(state["madtp_temperature"]) == epochs[best]["temperature"]
    assert float(state["madtp_controller.gflops"]) == as_float32(epochs[best]["gflops"])
    assert float(state["madtp_controller.parent_gflops"]) == epochs[best]["parent_gflops"]


def test_the_train_log_has_the_alignment_term_and_the_epochs_gflops(controller_run):
    directory, _ = controller_run
    train, val = log_lines(directory, "train"), log_lines(directory, "val")
    for t, v in zip(train, val):
        assert t["loss_alignment"] > 0
        assert {key: t[key] for key in ("temperature", "gflops", "target_gflops")} == {
            key: v[key] for key in ("temperature", "gflops", "target_gflops")}


def test_the_parent_gflops_are_measured_on_the_stock_lavis_model(controller_run, data):
    """The parent's GFLOPs in the log are those of LAVIS's own ``blip_nlvr`` on the same validation batches."""
    directory, _ = controller_run
    dataset_cfg = OmegaConf.create(data["nlvr"])
    val = registry.get_builder_class("nlvr")(dataset_cfg).build_datasets()["val"]
    parent = build_tiny("blip_nlvr", "nlvr", image_size=IMAGE_SIZE)
    task = registry.get_task_class("multimodal_classification")()
    gflops = madtp.measure_gflops(lambda model, samples, _: len(task.valid_step(model, samples)), parent, val,
                                  OmegaConf.create({"batch_size_eval": 8}), num_batches=20)
    assert log_lines(directory, "val")[0]["parent_gflops"] == pytest.approx(gflops, rel=1e-6)


def test_the_best_checkpoint_evaluates_at_its_tau_and_gflops(controller_run, data, tmp_path):
    directory, _ = controller_run
    epochs = log_lines(directory, "val")
    best = epochs[epochs[-1]["best_epoch"]]
    path = project(EVAL_YAML, data, os.path.join(directory, "checkpoint_best.pth"), tmp_path,
                   model={"reducer": {"name": "madtp", "temperature": 7.0}})  # the checkpoint's tau wins
    output = run_cli("evaluate", "--cfg-path", path)
    assert f"madtp: val at tau {best['temperature']:g}: {best['gflops']:.6g} GFLOPs per sample" in output
    val, _ = metrics_lines(job_dir(tmp_path / "jobs"))
    assert val["val"]["acc"] == best["acc"]


# ------------------------------------------------------------------------------------------------ exact resume
def final_checkpoint(data, start, out, **run):
    path = project(TRAIN_YAML, data, start, out, run={"max_epoch": 3, "valid_splits": [], **run})
    output = run_cli("train", "--cfg-path", path)
    directory = job_dir(out / "jobs")
    return torch.load(os.path.join(directory, "checkpoint_2.pth"), map_location="cpu", weights_only=True), directory, \
        output


def test_a_resumed_run_ends_bit_identical_to_the_uninterrupted_one(data, start_checkpoint, tmp_path):
    """Resumed after epoch 1, the run moves tau from the GFLOPs the checkpoint holds, as the uninterrupted one did."""
    whole, whole_dir, whole_output = final_checkpoint(data, start_checkpoint, tmp_path / "whole")
    resumed, _, resumed_output = final_checkpoint(
        data, start_checkpoint, tmp_path / "resumed", resume_ckpt_path=os.path.join(whole_dir, "checkpoint_1.pth"))
    assert "Start training epoch 2" in resumed_output and "Start training epoch 1" not in resumed_output
    step = [line.split("madtp: ")[1] for line in whole_output.splitlines() if "madtp: epoch 2: tau" in line]
    assert step and step[0] in resumed_output
    assert float(whole["model"]["madtp_temperature"]) != 1.0
    assert whole["model"].keys() == resumed["model"].keys()
    for name, tensor in whole["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    for state_a, state_b in zip(whole["optimizer"]["state"].values(), resumed["optimizer"]["state"].values()):
        for key in state_a:
            assert torch.equal(torch.as_tensor(state_a[key]), torch.as_tensor(state_b[key])), key


# ------------------------------------------------------------------------------------------- the alignment term
def test_the_alignment_term_is_added_to_the_task_loss():
    run_cfg = OmegaConf.create({"task": "madtp_multimodal_classification", "evaluate": False, "max_epoch": 1,
                                "valid_splits": ["val"], "madtp": {"p": 0.5, "alignment_weight": 0.25}})
    task = registry.get_task_class("madtp_multimodal_classification").setup_task(SimpleNamespace(run_cfg=run_cfg))
    model = build_tiny("blip_nlvr_madtp", "nlvr")
    model.train()
    samples = {"image0": torch.randn(2, 3, 96, 96), "image1": torch.randn(2, 3, 96, 96),
               "text_input": ["a red circle on the left", "two blue squares"], "label": torch.tensor([0, 1])}
    torch.manual_seed(0)
    total = task.train_step(model, samples)
    term = model.alignment_loss()
    torch.manual_seed(0)
    plain = model(samples)["loss"]
    assert term.requires_grad and torch.isfinite(term)
    assert total.item() == pytest.approx((plain + 0.25 * term).item(), rel=1e-6)


# ------------------------------------------------------------------------------------- the step tables, unit
REFERENCE_PARENTS = {"nlvr": 132.54, "captioning": 65.7, "vqa": 186.1, "blip_retrieval": 153.2,
                     "clip_retrieval": 395.7}


@pytest.mark.parametrize("family, gap, step", [
    ("nlvr", 31, 1.0), ("nlvr", 11, 0.5), ("nlvr", 6, 0.25), ("nlvr", 2, 0.1), ("nlvr", 0.5, 0.01),
    ("captioning", 51, 0.5), ("captioning", 31, 0.3), ("captioning", 21, 0.2), ("captioning", 11, 0.1),
    ("captioning", 6, 0.05), ("captioning", 3, 0.02), ("captioning", 1, 0.01),
    ("blip_retrieval", 51, 0.5), ("clip_retrieval", 3, 0.02),
    ("vqa", 51, 0.25), ("vqa", 31, 0.15), ("vqa", 11, 0.1), ("vqa", 6, 0.05), ("vqa", 3, 0.01), ("vqa", 1, 0.0),
])
@pytest.mark.parametrize("scale", [1.0, 0.001])  # the reference's ViT-B GFLOPs, and a model 1000 times smaller
def test_tau_steps_are_the_references_at_any_scale(family, gap, step, scale):
    parent = REFERENCE_PARENTS[family] * scale
    target = 0.5 * parent
    table = madtp.SCHEDULES[family].epoch
    assert madtp.next_temperature(2.0, target + gap * scale, target, parent, table) == pytest.approx(2.0 + step)
    assert madtp.next_temperature(2.0, target - gap * scale, target, parent, table) == pytest.approx(2.0 - step)


def test_tau_never_goes_below_zero():
    assert madtp.next_temperature(0.3, 10.0, 100.0, 200.0, NLVR.epoch) == 0.0


@pytest.mark.parametrize("family, search_gap, step", [("captioning", 101, 1.0), ("captioning", 4, 0.02),
                                                      ("clip_retrieval", 101, 0.5), ("clip_retrieval", 11, 0.05)])
def test_the_search_uses_the_references_calculate_temperature_table(family, search_gap, step):
    parent = REFERENCE_PARENTS[family]
    table = madtp.SCHEDULES[family].search
    assert madtp.next_temperature(1.0, parent / 2 + search_gap, parent / 2, parent, table) == pytest.approx(1 + step)


@pytest.mark.parametrize("family, tolerance", [("nlvr", 5), ("captioning", 5), ("blip_retrieval", 10),
                                               ("clip_retrieval", 5)])
def test_the_best_checkpoint_tolerance_is_the_references_one_sided_test(family, tolerance):
    parent = REFERENCE_PARENTS[family]
    allowed = madtp.SCHEDULES[family].tolerance
    assert madtp.within(50 + tolerance - 0.01, 50, parent, allowed)
    assert not madtp.within(50 + tolerance + 0.01, 50, parent, allowed)
    assert madtp.within(1.0, 50, parent, allowed)  # far below the target still meets the budget


# ------------------------------------------------------------------------------------------------ bad settings
def run_cfg(**madtp_block):
    return OmegaConf.create({"madtp": madtp_block, "valid_splits": ["val"]})


@pytest.mark.parametrize("block, message", [
    ({}, "run.madtp.p must be a number in (0, 1)"),
    ({"p": 0}, "run.madtp.p must be a number in (0, 1)"),
    ({"p": 1}, "run.madtp.p must be a number in (0, 1)"),
    ({"p": 1.5}, "run.madtp.p must be a number in (0, 1)"),
    ({"p": -0.2}, "run.madtp.p must be a number in (0, 1)"),
    ({"p": "half"}, "run.madtp.p must be a number in (0, 1)"),
    ({"p": True}, "run.madtp.p must be a number in (0, 1)"),
    ({"p": 0.5, "alignment_weight": -0.1}, "run.madtp.alignment_weight must be a number >= 0"),
    ({"p": 0.5, "flops_batches": 0}, "run.madtp.flops_batches must be an integer of at least 1"),
    ({"p": 0.5, "search_rounds": 1.5}, "run.madtp.search_rounds must be an integer of at least 1"),
    ({"p": 0.5, "tolerance": -1}, "run.madtp.tolerance must be a number > 0"),
    ({"p": 0.5, "calculate_temperature": "yes"}, "run.madtp.calculate_temperature must be True or False"),
    ({"p": 0.5, "pp": 0.5}, "run.madtp.pp is not a MADTP setting: use p, alignment_weight"),
])
def test_a_bad_setting_is_refused_in_one_line(block, message):
    with pytest.raises(SettingError, match="^" + message.replace("(", r"\(").replace(")", r"\)")) as err:
        madtp.MadtpSettings.from_run(run_cfg(**block), training=True)
    assert "\n" not in str(err.value)


def test_evaluation_needs_no_p():
    assert madtp.MadtpSettings.from_run(run_cfg(flops_batches=3), training=False).flops_batches == 3


def test_a_run_without_a_split_to_measure_on_or_with_the_iteration_runner_is_refused():
    with pytest.raises(SettingError, match="MADTP measures GFLOPs on a validation or test split"):
        madtp.measurement_split(OmegaConf.create({"valid_splits": [], "test_splits": []}))
    with pytest.raises(SettingError, match="run.runner 'runner_iter': MADTP tasks update tau once per epoch"):
        madtp.check_runner(OmegaConf.create({"runner": "runner_iter"}))


def test_a_model_without_madtp_is_refused():
    with pytest.raises(SettingError, match="model.arch: blip_nlvr is not a MADTP model"):
        madtp.check_madtp_model(build_tiny("blip_nlvr", "nlvr"), "blip_nlvr")


def test_the_cli_refuses_p_outside_0_1_before_any_work(data, start_checkpoint, tmp_path, capsys):
    path = project(TRAIN_YAML, data, start_checkpoint, tmp_path, run={"max_epoch": 1})
    status = cli.main(["train", "--cfg-path", path, "--options", "run.madtp.p=1.5"])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == ("lavis-accel: error: run.madtp.p must be a number in (0, 1) (the share of "
                                            "the parent's GFLOPs to remove), got 1.5")
    assert [files for _, _, files in os.walk(tmp_path / "jobs") if files] == []  # no log, no checkpoint
