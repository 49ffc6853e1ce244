"""``lavis-accel dry-run`` rehearses every project yaml shipped under ``projects/`` (``tests/test_dry_run_projects.py``;
but the DLIP and P-Former yamls that ``tests/test_dlip_e2e.py`` and ``tests/test_pformer_e2e.py`` already run through
the real CLI) and LAVIS's own BLIP retrieval, caption, VQA and NLVR2 train and eval yamls on CPU, and refuses what it
cannot rehearse in one line.

The rehearsals call the CLI's ``main`` in this process (the LAVIS job itself always runs in a child process with the
dry-run's own offline hub); one refusal goes through ``python -m lavis_accel.cli`` as a user types it.
"""
import glob
import os
import subprocess
import sys
import tempfile

import pytest
import torch
from lavis.common.registry import registry
from omegaconf import OmegaConf

from lavis_accel import cli
from lavis_accel.testing.projects import tiny_project
from test_dlip_e2e import YAMLS_RUN_END_TO_END
from test_pformer_e2e import YAMLS_RUN_END_TO_END as PFORMER_YAMLS_RUN_END_TO_END

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = sorted(glob.glob(os.path.join(REPO, "projects", "**", "*.yaml"), recursive=True))
LAVIS_BLIP = os.path.join(registry.get_path("library_root"), "projects", "blip")
LAVIS_BLIP2_OPT_CAPTION = os.path.join(registry.get_path("library_root"), "projects", "blip2", "eval",
                                       "caption_coco_opt2.7b_eval.yaml")  # OPT built in fp16: cast to fp32 on CPU
LAVIS_YAMLS = [
    "train/retrieval_coco_ft.yaml", "eval/ret_coco_eval.yaml",
    "train/caption_coco_ft.yaml", "eval/caption_coco_eval.yaml",
    "train/vqav2_ft.yaml", "eval/vqav2_eval.yaml",  # vqav2_ft also trains on Visual Genome QA (vg_vqa)
    "train/nlvr_ft.yaml", "eval/nlvr_eval.yaml",
    "train/okvqa_ft.yaml",  # ok_vqa: written by the VQA writer under its own name
]
RUN_BY_DLIP_E2E = {os.path.join(REPO, "projects", "dlip", name) for name in YAMLS_RUN_END_TO_END}
RUN_BY_PFORMER_E2E = {os.path.join(REPO, "projects", "pformer", name) for name in PFORMER_YAMLS_RUN_END_TO_END}
RUN_END_TO_END = RUN_BY_DLIP_E2E | RUN_BY_PFORMER_E2E
# the shipped yamls are rehearsed by tests/test_dry_run_projects.py (a module of its own, so that the two halves run
# on the two pytest-xdist workers side by side), LAVIS's own here
SHIPPED_CASES = [pytest.param(path, id=os.path.relpath(path, REPO)) for path in SHIPPED if path not in RUN_END_TO_END]
LAVIS_CASES = ([pytest.param(os.path.join(LAVIS_BLIP, name), id=f"lavis/{name}") for name in LAVIS_YAMLS]
               + [pytest.param(LAVIS_BLIP2_OPT_CAPTION, id="lavis/blip2/eval/caption_coco_opt2.7b_eval.yaml")])
CASES = SHIPPED_CASES + LAVIS_CASES


def dry_run(capsys, *argv):
    """``(exit status, stdout, stderr lines)`` of ``lavis-accel dry-run ARGV`` run in this process."""
    status = cli.main(["dry-run", *argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err.strip().splitlines()


def report_rows(out):
    """The report's ``name: text`` rows (two-space indented lines after the header)."""
    rows = [line.strip().split(None, 1) for line in out.splitlines() if line.startswith("  ")]
    return {name: text for name, text in rows}


def evaluates(run, training):
    """Whether a yaml's job evaluates a split: a training yaml its valid and test splits, an eval yaml its test."""
    return bool(run.get("test_splits") or (training and run.get("valid_splits")))


def test_every_shipped_yaml_is_covered():
    assert len(SHIPPED) >= 5, SHIPPED


@pytest.mark.parametrize("cfg_path", LAVIS_CASES)
def test_dry_run_passes(cfg_path, capsys, tmp_path, monkeypatch):
    check_dry_run(cfg_path, capsys, tmp_path, monkeypatch)


def check_dry_run(cfg_path, capsys, tmp_path, monkeypatch):
    """A dry-run of ``cfg_path`` passes, and its report says what it checked."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the default work folder is made
    status, out, err = dry_run(capsys, "--cfg-path", cfg_path)
    assert status == 0, out + "\n".join(err)
    rows = report_rows(out)
    run = OmegaConf.load(cfg_path).run
    training = not run.get("evaluate", False)
    assert rows["config"].startswith("parsed and checked")
    assert "LAVIS's builders read train" in rows["data"]
    if evaluates(run, training):
        assert rows["evaluation"].split("metrics: ")[1]  # LAVIS's task wrote metrics (their names are listed)
    else:  # pretraining (DLIP): no split to evaluate
        assert rows["evaluation"] == "none (no valid_splits or test_splits)"
    if training:
        assert "`lavis-accel train` ran on CPU" in out
        assert rows["training"].startswith("1 epoch, ") and "train_loss" in rows["training"]
        assert rows["checkpoint"].startswith("checkpoint_")
    else:
        assert "`lavis-accel evaluate` ran on CPU" in out
        assert rows["training"] == "none (run.evaluate: True)"
    assert os.listdir(tmp_path) == []  # the temporary work folder is removed


def test_options_reach_the_job_and_a_given_workdir_is_kept(capsys, tmp_path):
    """``--options`` apply to the yaml before it is made tiny: here a reducer that merges at the tiny ViT's 37
    tokens, which the job's log shows; ``--workdir`` keeps the tiny yaml, the data and the log."""
    workdir = tmp_path / "work"
    status, out, err = dry_run(capsys, "--cfg-path", os.path.join(REPO, "projects", "turbo", "eval",
                                                                  "ret_coco_eval.yaml"),
                               "--options", "model.reducer.r=4", "model.reducer.threshold=1",
                               "--workdir", str(workdir))
    assert status == 0, out + "\n".join(err)
    tiny = OmegaConf.load(workdir / "tiny_ret_coco_eval.yaml")
    assert tiny.model.reducer.r == 4 and tiny.model.vit_type == "tiny" and tiny.run.k_test == 8
    assert "keeps ViT tokens 37 -> 33 -> 29 -> 25 -> 21" in (workdir / "dry_run.log").read_text()
    assert (workdir / "data" / "coco_retrieval").is_dir()
    assert report_rows(out)["workdir"] == f"{workdir} (kept)"


def test_a_failing_job_ends_with_its_last_error_line(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    status, _, err = dry_run(capsys, "--cfg-path", os.path.join(REPO, "projects", "turbo", "eval", "nlvr_eval.yaml"),
                             "--options", "model.reducer.name=turob")
    assert status != 0
    assert len(err) == 1 and err[0].startswith("lavis-accel dry-run: `lavis-accel evaluate` failed (exit ")
    assert "turob" in err[0] and "--keep" in err[0]
    assert os.listdir(tmp_path) == []


def test_a_dataset_without_a_synthetic_writer_is_named_in_one_line():
    """Through the real command line: A-OKVQA has its own annotation format, for which no writer exists."""
    result = subprocess.run([sys.executable, "-m", "lavis_accel.cli", "dry-run", "--cfg-path",
                             os.path.join(LAVIS_BLIP, "train", "aokvqa_ft.yaml")], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("lavis-accel: error: datasets: no synthetic data for aok_vqa (dry-run writes ")


def malformed_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  arch: blip_retrieval\n  model_type: [coco\n")
    return str(path), f"config file {path} is not valid YAML"


def arch_without_a_tiny_version(tmp_path):
    cfg = OmegaConf.load(os.path.join(LAVIS_BLIP, "eval", "ret_coco_eval.yaml"))
    cfg.model = {"arch": "albef_retrieval", "model_type": "coco"}
    path = tmp_path / "albef.yaml"
    OmegaConf.save(cfg, path)
    return str(path), "model.arch: no tiny configuration for AlbefRetrieval"


def lavis_yaml_with_a_wrong_model_type(tmp_path):
    """LAVIS 1.0.2 ships this yaml with ``model_type: large``, which blip_caption does not have."""
    return (os.path.join(LAVIS_BLIP, "coco_cap_ft_iter.yaml"),
            "model.model_type 'large' is not a type of blip_caption: one of base_coco, large_coco")


def a_bad_run_setting(tmp_path):
    """The cluster yaml's own run settings are checked, though the dry-run replaces the batch sizes."""
    cfg = OmegaConf.load(os.path.join(LAVIS_BLIP, "eval", "ret_coco_eval.yaml"))
    cfg.run.batch_size_eval = 0
    path = tmp_path / "zero_batch.yaml"
    OmegaConf.save(cfg, path)
    return str(path), "run.batch_size_eval must be an integer of at least 1, not 0"


@pytest.mark.parametrize("bad_input", [malformed_yaml, arch_without_a_tiny_version, lavis_yaml_with_a_wrong_model_type,
                                       a_bad_run_setting])
def test_bad_input_is_one_line_before_any_work(bad_input, capsys, tmp_path, monkeypatch):
    (tmp_path / "temp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "temp"))
    cfg_path, message = bad_input(tmp_path)
    status, out, err = dry_run(capsys, "--cfg-path", cfg_path)
    assert status == 2 and out == ""
    (line,) = err
    assert line.startswith(f"lavis-accel: error: {message}")
    assert os.listdir(tmp_path / "temp") == []  # refused before the work folder is made


def test_an_iteration_based_yaml_runs_one_short_inner_epoch(capsys, tmp_path, monkeypatch):
    """``runner_iter`` (LAVIS's yaml, its model type corrected, without validation to stay short)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    status, out, err = dry_run(capsys, "--cfg-path", os.path.join(LAVIS_BLIP, "coco_cap_ft_iter.yaml"),
                               "--options", "model.model_type=large_coco", "run.valid_splits=[]")
    assert status == 0, out + "\n".join(err)
    rows = report_rows(out)
    assert rows["training"].startswith("1 epoch, 5 steps, train_loss")
    assert rows["checkpoint"].startswith("checkpoint_5.pth")  # runner_iter names checkpoints by iteration
    assert rows["evaluation"] == "none (no valid_splits or test_splits)"


# --- DLIP: a model with a teacher ------------------------------------------------------------------------------------

DLIP_PRETRAIN = os.path.join(REPO, "projects", "dlip", "train", "pretrain.yaml")


def test_every_dlip_yaml_runs_through_the_cli_here_or_end_to_end():
    dlip = {path for path in SHIPPED if os.sep + "dlip" + os.sep in path}
    assert len(dlip) == 8 and RUN_BY_DLIP_E2E <= dlip
    rehearsed_here = {case.values[0] for case in CASES}
    assert dlip - RUN_BY_DLIP_E2E <= rehearsed_here


def test_every_pformer_yaml_runs_through_the_cli_end_to_end():
    pformer = {path for path in SHIPPED if os.sep + "pformer" + os.sep in path}
    assert len(pformer) == 14 and pformer == RUN_BY_PFORMER_E2E


def test_a_pformer_stage_rehearses_with_a_tiny_stage0_pformer(capsys, tmp_path):
    """The yaml's ``pretrained_stage0`` becomes a tiny random stage-0 P-Former the child writes before the job."""
    cfg_path = os.path.join(REPO, "projects", "pformer", "train", "pretrain_stage1.yaml")
    status, out, err = dry_run(capsys, "--cfg-path", cfg_path, "--workdir", str(tmp_path / "work"), "--keep")
    assert status == 0, err
    stage0 = torch.load(tmp_path / "work" / "stage0" / "tiny_stage0.pth", map_location="cpu")["model"]
    assert "Pformer.cls_proj.weight" in stage0 and "Pformer.opt_proj.weight" in stage0


def test_a_dlip_pretraining_rehearses_with_the_teacher_its_yaml_names(capsys, tmp_path):
    """The project's own teacher block (here a retrieval BLIP, which has no text decoder) is made tiny, written as a
    random checkpoint inside the workdir, and distils the student in the job."""
    workdir = tmp_path / "work"
    status, out, err = dry_run(capsys, "--cfg-path", DLIP_PRETRAIN, "--options", "model.teacher.arch=blip_retrieval",
                               "model.teacher.model_type=coco", "--workdir", str(workdir))
    assert status == 0, out + "\n".join(err)
    teacher = OmegaConf.load(workdir / "tiny_pretrain.yaml").model.teacher
    assert (teacher.arch, teacher.model_type, teacher.vit_type) == ("blip_retrieval", "coco", "tiny")
    assert teacher.pretrained == str(workdir / "teacher" / "tiny_teacher.pth")
    assert "model" in torch.load(teacher.pretrained, map_location="cpu")
    assert "frozen tiny random teacher blip_retrieval (coco)" in report_rows(out)["model"]
    assert "has no text decoder; the decoder terms of the distillation are left out" in (
        workdir / "dry_run.log").read_text()


@pytest.mark.parametrize("teacher, expected", [
    ({}, "blip_pretrain"),  # the arch's default block (model_base_capfilt_large)
    ({"arch": "blip_retrieval", "model_type": "flickr"}, "blip_retrieval"),
    (None, None),  # teacher: null trains the student on its task losses only
])
def test_a_tiny_dlip_project_keeps_its_teacher(teacher, expected, tmp_path):
    cfg = OmegaConf.load(DLIP_PRETRAIN)
    if teacher is None:
        cfg.model.teacher = None
    elif not teacher:
        del cfg.model["teacher"]
    else:
        cfg.model.teacher = teacher
    tiny = tiny_project(cfg, {name: {} for name in cfg.datasets}, tmp_path, teacher_checkpoint=tmp_path / "t.pth")
    if expected is None:
        assert tiny.model.teacher is None
        return
    assert tiny.model.teacher.arch == expected and tiny.model.teacher.vit_type == "tiny"
    assert tiny.model.teacher.image_size == tiny.model.image_size  # the student's and teacher's tokens pair up
    assert tiny.model.teacher.pretrained == str(tmp_path / "t.pth")
