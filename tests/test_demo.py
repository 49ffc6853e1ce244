"""``lavis-accel demo``: its settings, its LAVIS configs, and one small run through the real CLI."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from lavis_accel.config_checks import check_project
from lavis_accel.datasets import write_retrieval
from lavis_accel.demo import project, report
from lavis_accel.demo.settings import DemoSettings
from lavis_accel.demo.worker import settings_to_compare, students_to_compare
from lavis_accel.errors import SettingError

RECALLS = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10")


@pytest.mark.parametrize("changes, message", [
    ({"epochs": 0}, "--epochs must be at least 1"),
    ({"k_test": 300}, r"--k-test \(300\) must not exceed --n-test \(100\)"),
    ({"r_values": (0, 4)}, "--r-values must be positive"),
    ({"madtp_p": 1.0}, r"--madtp-p must be in \(0, 1\)"),
    ({"madtp_epochs": 0}, "--madtp-epochs must be at least 1"),
    ({"crossget_epochs": 0}, "--crossget-epochs must be at least 1"),
    ({"crossget_rv": 0}, r"--crossget-rv must be from 1 to 72 \(half the demo ViT's patch tokens\), got 0"),
    ({"crossget_rv": 73}, "--crossget-rv must be from 1 to 72"),
    ({"dlip_epochs": 0}, "--dlip-epochs must be at least 1"),
    ({"methods": ("tome", "tomme")}, "demo --methods: unknown 'tomme'; choose from tome turbo madtp crossget dlip"),
    ({"methods": ()}, "demo --methods: none given"),
])
def test_bad_settings_are_refused(changes, message):
    with pytest.raises(SettingError, match=message):
        DemoSettings(**changes).check()


def test_compares_the_parent_then_tome_and_turbo_at_each_r_then_madtp_and_crossget():
    compared = settings_to_compare(DemoSettings(r_values=(2, 4), madtp_p=0.3, crossget_rv=6))
    assert [name for name, _ in compared] == ["parent", "tome_r2", "tome_r4", "turbo_r2", "turbo_r4",
                                              "turbo_scaled_r2", "turbo_scaled_r4", "madtp_p30", "crossget_rv6"]
    reducers = dict(compared)
    assert reducers["turbo_r4"] == {"name": "turbo", "r": 4}  # the reference's alpha
    assert reducers["turbo_scaled_r4"] == {"name": "turbo", "r": 4, "scale_alpha": True}
    assert compared[-1][1] == {"name": "crossget", "rv": 6, "rl": 0}


def test_methods_choose_the_rows_and_what_is_trained_for_them():
    quick = DemoSettings(r_values=(8,), methods=("turbo", "tome"))
    assert [name for name, _ in settings_to_compare(quick)] == ["parent", "tome_r8", "turbo_r8", "turbo_scaled_r8"]
    assert students_to_compare(quick) == []
    only_students = DemoSettings(methods=("dlip",))
    assert [name for name, _ in settings_to_compare(only_students)] == ["parent"]
    assert students_to_compare(only_students) == [("dlip", True), ("dlip_task_only", False)]


def test_the_demo_vit_sees_145_tokens_and_so_does_every_model_of_the_table(tmp_path):
    settings = DemoSettings(workdir=str(tmp_path))
    datasets = write_retrieval(tmp_path / "data", n_train=2, n_val=2, n_test=2)
    configs = [project.train_config(settings, datasets),
               project.eval_config(settings, datasets, "ckpt.pth", "tome_r4", {"name": "tome", "r": 4}),
               project.madtp_train_config(settings, datasets, "ckpt.pth"),
               project.crossget_train_config(settings, datasets, "ckpt.pth"),
               project.dlip_train_config(settings, datasets, "ckpt.pth"),
               project.dlip_eval_config(settings, datasets, "student.pth", "dlip")]
    for config in configs:
        model = config["model"]
        assert (model["image_size"] // model["vit_patch_size"]) ** 2 + 1 == 145
    assert configs[4]["model"]["teacher"]["vit_patch_size"] == project.DEMO_PATCH_SIZE


def test_configs_are_valid_lavis_projects(tmp_path):
    settings = DemoSettings(workdir=str(tmp_path))
    datasets = write_retrieval(tmp_path / "data", n_train=2, n_val=2, n_test=2)
    med_config = json.load(open(project.write_med_config(settings)))
    assert med_config["num_hidden_layers"] == 4  # as many text layers as ViT blocks: CrossGET's loss pairs them
    train = OmegaConf.create(project.train_config(settings, datasets))
    check_project(train)
    assert train.model.arch == "blip_retrieval" and train.run.device == "cpu" and train.run.max_epoch == 4
    assert train.model.med_config_path == project.med_config_path(settings)
    assert list(train.run.valid_splits) == [] == list(train.run.test_splits)  # the last epoch is kept
    evaluated = OmegaConf.create(project.eval_config(settings, datasets, "ckpt.pth", "turbo_r4",
                                                     {"name": "turbo", "r": 4}))
    check_project(evaluated)
    assert evaluated.model.arch == "blip_retrieval_turbo" and evaluated.model.finetuned == "ckpt.pth"
    assert dict(evaluated.model.reducer) == {"name": "turbo", "r": 4, "threshold": project.DEMO_THRESHOLD}
    assert evaluated.run.evaluate and "valid_splits" not in evaluated.run
    compress = OmegaConf.create(project.madtp_train_config(settings, datasets, "ckpt.pth"))
    check_project(compress)
    assert compress.model.arch == "blip_retrieval_madtp" and compress.model.finetuned == "ckpt.pth"
    assert compress.run.task == "madtp_retrieval" and compress.run.madtp.p == settings.madtp_p
    madtp_eval = OmegaConf.create(project.eval_config(settings, datasets, "madtp.pth", "madtp_p30", {"name": "madtp"}))
    assert madtp_eval.model.arch == "blip_retrieval_madtp" and dict(madtp_eval.model.reducer) == {"name": "madtp"}
    crossget = OmegaConf.create(project.crossget_train_config(settings, datasets, "ckpt.pth"))
    check_project(crossget)
    assert crossget.model.arch == "blip_retrieval_crossget" and crossget.model.finetuned == "ckpt.pth"
    assert dict(crossget.model.reducer) == {"name": "crossget", "rv": 24, "rl": 0}
    assert crossget.run.task == "crossget_retrieval" and crossget.run.crossget.kd_weight == 0.5
    assert crossget.run.max_epoch == settings.crossget_epochs
    crossget_eval = OmegaConf.create(project.eval_config(settings, datasets, "crossget.pth", "crossget_rv24",
                                                         project.crossget_reducer(settings)))
    check_project(crossget_eval)
    assert crossget_eval.model.arch == "blip_retrieval_crossget" and crossget_eval.run.task == "retrieval"


def test_dlip_configs_train_a_smaller_student_from_the_trained_model_and_without_teacher(tmp_path):
    settings = DemoSettings(workdir=str(tmp_path), dlip_epochs=3)
    datasets = write_retrieval(tmp_path / "data", n_train=2, n_val=2, n_test=2)
    teacher_bert = json.load(open(project.write_med_config(settings)))
    student_bert = json.load(open(project.write_student_med_config(settings)))
    assert student_bert["num_attention_heads"] == teacher_bert["num_attention_heads"]  # paired one to one
    assert student_bert["vocab_size"] == teacher_bert["vocab_size"]
    assert student_bert["hidden_size"] * 2 == teacher_bert["hidden_size"] == 128
    assert student_bert["num_hidden_layers"] * 2 == teacher_bert["num_hidden_layers"] == 4
    distilled = OmegaConf.create(project.dlip_train_config(settings, datasets, "parent.pth"))
    check_project(distilled)
    assert distilled.model.arch == "dlip_pretrain"
    assert distilled.model.med_config_path == project.student_med_config_path(settings)
    assert distilled.model.vit_width == 64 and distilled.model.image_size == 96
    teacher = distilled.model.teacher
    assert (teacher.arch, teacher.model_type, teacher.pretrained) == ("blip_retrieval", "coco", "parent.pth")
    assert teacher.med_config_path == project.med_config_path(settings) and teacher.vit_type == "tiny"
    assert distilled.run.task == "image_text_pretrain" and distilled.run.max_epoch == 3
    assert list(distilled.run.valid_splits) == [] and list(distilled.run.test_splits) == []
    task_only = OmegaConf.create(project.dlip_train_config(settings, datasets, "parent.pth", distilled=False))
    check_project(task_only)
    assert task_only.model.teacher is None and task_only.run.output_dir.endswith("dlip_task_only")
    assert OmegaConf.masked_copy(task_only.run, ["max_epoch", "init_lr", "batch_size_train", "seed"]) == \
        OmegaConf.masked_copy(distilled.run, ["max_epoch", "init_lr", "batch_size_train", "seed"])  # same steps
    evaluated = OmegaConf.create(project.dlip_eval_config(settings, datasets, "student.pth", "dlip"))
    check_project(evaluated)
    assert evaluated.model.arch == "dlip_retrieval" and evaluated.model.pretrained == "student.pth"
    assert not evaluated.model.load_finetuned and evaluated.model.load_pretrained
    assert evaluated.model.vit_width == distilled.model.vit_width and evaluated.run.task == "retrieval"


def test_the_demo_student_pairs_with_the_demo_model_and_is_taught_six_terms(tmp_path):
    from lavis.common.registry import registry

    settings = DemoSettings(workdir=str(tmp_path))
    project.write_med_config(settings)
    project.write_student_med_config(settings)
    torch.manual_seed(0)
    parent_cfg = OmegaConf.create(project.train_config(settings, {})["model"])
    torch.save({"model": registry.get_model_class("blip_retrieval").from_config(parent_cfg).state_dict()},
               tmp_path / "parent.pth")
    cfg = OmegaConf.create(project.dlip_train_config(settings, {}, str(tmp_path / "parent.pth"))["model"])
    student = registry.get_model_class("dlip_pretrain").from_config(cfg)
    assert sum(p.numel() for p in student.visual_encoder.parameters()) * 3 < \
        sum(p.numel() for p in student.teacher.visual_encoder.parameters())
    images = torch.randn(4, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    output = student({"image": images, "text_input": ["a red circle", "two blue squares on the left",
                                                      "a green triangle", "a yellow star at the top"],
                      "epoch": 0, "iters": 0, "num_iters_per_epoch": 10})
    assert set(output.distillation_terms) == {"image_feature", "text_feature", "fused_feature", "itc",
                                              "text_attention", "cross_attention"}  # no decoder in the teacher
    assert all(torch.isfinite(term) and term > 0 for term in output.distillation_terms.values())


def test_table_lists_every_setting():
    row = {"setting": "turbo_r4", "params": 1_234_567, "txt_r1": 50.0, "txt_r5": 80.0, "txt_r10": 90.0,
           "img_r1": 40.0, "img_r5": 70.0, "img_r10": 85.0, "r_mean": 69.1667, "vision_gflops": 0.05,
           "vision_speedup": 1.3, "task_gflops": 0.4, "task_speedup": 1.1}
    lines = report.table([row]).splitlines()
    assert lines[0].startswith("| setting | params (M) | txt R@1") and len(lines) == 3
    assert lines[2] == ("| turbo_r4 | 1.23 | 50.0 | 80.0 | 90.0 | 40.0 | 70.0 | 85.0 | 69.2 | 0.0500 | 1.30x | 0.4000 "
                        "| 1.10x |")


def test_a_small_demo_runs_end_to_end(tmp_path):
    workdir = tmp_path / "demo"
    command = [sys.executable, "-m", "lavis_accel.cli", "demo", "--workdir", str(workdir), "--n-train", "16",
               "--n-val", "4", "--n-test", "8", "--epochs", "1", "--batch-size", "8", "--k-test", "4",
               "--r-values", "4", "--madtp-epochs", "1", "--crossget-epochs", "1", "--crossget-rv", "24",
               "--dlip-epochs", "1"]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "| parent |" in result.stdout and "| turbo_r4 |" in result.stdout
    results = json.load(open(workdir / "results.json"))
    rows = {row["setting"]: row for row in results["results"]}
    assert set(rows) == {"parent", "tome_r4", "turbo_r4", "turbo_scaled_r4", "madtp_p30", "crossget_rv24", "dlip",
                         "dlip_task_only"}
    assert "| crossget_rv24 |" in result.stdout
    assert os.path.isfile(results["checkpoint"])
    assert rows["parent"]["vision_speedup"] == 1.0 and rows["parent"]["vision_speedup_ci"] == [1.0, 1.0]
    low, high = rows["turbo_r4"]["vision_speedup_ci"]
    assert low <= rows["turbo_r4"]["vision_speedup"] <= high
    assert (rows["turbo_scaled_r4"]["method"], rows["turbo_scaled_r4"]["reducer"]) == ("turbo_scaled", "turbo")
    assert OmegaConf.load(workdir / "configs" / "eval_turbo_scaled_r4.yaml").model.reducer.scale_alpha
    assert rows["turbo_r4"]["vision_gflops"] < rows["parent"]["vision_gflops"]
    assert rows["turbo_r4"]["task_gflops"] < rows["parent"]["task_gflops"]
    assert 0 <= rows["turbo_r4"]["txt_r1"] <= rows["turbo_r4"]["txt_r10"] <= 100
    assert rows["madtp_p30"]["temperature"] > 0 and 0 <= rows["madtp_p30"]["img_r1"] <= 100
    crossget = rows["crossget_rv24"]
    assert (crossget["reducer"], crossget["r"], crossget["rl"]) == ("crossget", 24, 0)
    # 145 -> 49 tokens, as ToMe at r = 24 (at rv = 4 the cross token and the T x T matching cost more than it saves)
    assert crossget["vision_gflops"] < rows["parent"]["vision_gflops"]
    assert crossget["task_gflops"] < rows["parent"]["task_gflops"] and crossget["vision_speedup"] > 0
    assert 0 <= crossget["txt_r1"] <= crossget["txt_r10"] <= 100
    (log,) = (workdir / "crossget").rglob("log.txt")
    assert '"train_loss_kd"' in log.read_text()  # fine-tuned with CrossGET's JS loss
    assert (workdir / "recall_vs_speedup.png").read_bytes()[:4] == b"\x89PNG"
    for name, distilled in (("dlip", True), ("dlip_task_only", False)):
        student = rows[name]
        assert f"| {name} |" in result.stdout and (student["method"], student["distilled"]) == ("dlip", distilled)
        assert all(math.isfinite(student[key]) and 0 <= student[key] <= 100 for key in RECALLS)
        assert student["params"] * 3 < rows["parent"]["params"]  # half as wide: about a quarter of the weights
        assert student["vision_gflops"] < rows["parent"]["vision_gflops"] and student["vision_speedup"] > 0
        assert len(list((workdir / name).rglob("checkpoint_0.pth"))) == 1  # its image_text_pretrain run's epoch
    assert OmegaConf.load(workdir / "configs" / "dlip.yaml").model.teacher.pretrained == results["checkpoint"]
    assert OmegaConf.load(workdir / "configs" / "dlip_task_only.yaml").model.teacher is None
