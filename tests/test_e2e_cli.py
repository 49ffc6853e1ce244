"""End to end through the real CLI: LAVIS's own train/eval project yamls, made tiny, on synthetic data, on CPU.

Each run is a subprocess of ``python -m lavis_accel.cli``, as a user runs it. Retrieval and captioning are trained
for one epoch; the checkpoint LAVIS's runner writes is then evaluated alone, and used to resume training.
"""
import glob
import json
import os
import subprocess
import sys

import pytest
import torch
from lavis.common.registry import registry

from lavis_accel import cli
from lavis_accel.datasets import write_caption, write_retrieval
from lavis_accel.testing.projects import tiny_project, write_project
from cli_jobs import job_dir, metrics_lines, run_cli

LAVIS_PROJECTS = os.path.join(registry.get_path("library_root"), "projects", "blip")
TINY_RUN = {"max_epoch": 1, "batch_size_train": 8, "batch_size_eval": 8, "warmup_steps": 1}


def last_retrieval_metrics(directory):
    """LAVIS's retrieval task writes its metrics without the split name; the test split is evaluated last."""
    return metrics_lines(directory)[-1]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return root, {**write_retrieval(root, n_train=16, n_val=8, n_test=8), **write_caption(root, 16, 8, 8)}


@pytest.fixture(scope="module")
def retrieval_run(data_root, tmp_path_factory):
    root, datasets = data_root
    out = tmp_path_factory.mktemp("retrieval")
    # LAVIS's yaml as it is: negative_all_rank True gathers negatives over ranks, here in one process with no group
    cfg = tiny_project(os.path.join(LAVIS_PROJECTS, "train", "retrieval_coco_ft.yaml"), datasets, out / "train",
                       run={**TINY_RUN, "k_test": 4, "valid_splits": ["val"]})
    log = run_cli("train", "--cfg-path", write_project(cfg, out / "train.yaml"))
    return out, job_dir(out / "train"), log


def test_train_writes_checkpoint_and_lavis_metrics(retrieval_run):
    _, directory, log = retrieval_run
    assert "Start training epoch 0" in log
    checkpoint = torch.load(os.path.join(directory, "checkpoint_best.pth"), map_location="cpu")
    assert checkpoint["epoch"] == 0 and "visual_encoder.pos_embed" in checkpoint["model"]
    lines = metrics_lines(directory)
    assert len(lines) == 2  # validation after the epoch, then test with the best checkpoint
    test_metrics = lines[-1]
    assert set(test_metrics) >= {"txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "agg_metrics"}
    assert 0 <= test_metrics["txt_r1"] <= test_metrics["txt_r10"] <= 100
    stats = [json.loads(line) for line in open(os.path.join(directory, "log.txt")) if line.startswith('{"train')]
    assert stats and float(stats[0]["train_loss"]) > 0
    assert not [name for name in os.listdir(directory) if name.startswith(".tmp-")]


def test_evaluate_only_from_the_checkpoint_reproduces_the_test_metrics(retrieval_run, data_root):
    out, directory, _ = retrieval_run
    _, datasets = data_root
    checkpoint = os.path.join(directory, "checkpoint_best.pth")
    cfg = tiny_project(os.path.join(LAVIS_PROJECTS, "eval", "ret_coco_eval.yaml"), datasets, out / "eval",
                       model={"load_finetuned": True, "finetuned": checkpoint},
                       run={"batch_size_eval": 8, "k_test": 4})
    run_cli("evaluate", "--cfg-path", write_project(cfg, out / "eval.yaml"))
    (evaluated,) = metrics_lines(job_dir(out / "eval"))
    assert evaluated == pytest.approx(last_retrieval_metrics(directory))


def test_training_resumes_from_its_checkpoint(retrieval_run, data_root):
    out, directory, _ = retrieval_run
    _, datasets = data_root
    cfg = tiny_project(os.path.join(LAVIS_PROJECTS, "train", "retrieval_coco_ft.yaml"), datasets, out / "resumed",
                       run={**TINY_RUN, "max_epoch": 2, "k_test": 4, "valid_splits": ["val"],
                            "resume_ckpt_path": os.path.join(directory, "checkpoint_best.pth")})
    log = run_cli("train", "--cfg-path", write_project(cfg, out / "resume.yaml"))
    assert "Resume checkpoint from" in log
    assert "Start training epoch 1" in log and "Start training epoch 0" not in log


@pytest.mark.parametrize("name, tensor, expected", [
    ("visual_encoder.cls_token", torch.zeros(1, 1, 7), "visual_encoder.cls_token [1, 1, 7] in the file vs [1, 1, 128]"),
    # LAVIS interpolates position embeddings of pre-trained files only: a fine-tuned one must match the image size
    ("visual_encoder.pos_embed", torch.zeros(1, 17, 128), "visual_encoder.pos_embed [1, 17, 128] in the file vs "
                                                          "[1, 37, 128]"),
])
def test_a_checkpoint_that_does_not_fit_is_refused_in_one_line(retrieval_run, data_root, capsys, name, tensor,
                                                               expected):
    out, _, _ = retrieval_run
    _, datasets = data_root
    wrong = out / f"wrong_{name}.pth"
    torch.save({"model": {name: tensor}}, wrong)
    cfg = tiny_project(os.path.join(LAVIS_PROJECTS, "eval", "ret_coco_eval.yaml"), datasets, out / "wrong",
                       model={"load_finetuned": True, "finetuned": str(wrong)}, run={"k_test": 4})
    status = cli.main(["evaluate", "--cfg-path", write_project(cfg, out / "wrong.yaml")])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"lavis-accel: error: model.finetuned: {wrong} does not fit BlipRetrieval: "
                                            f"1 tensors differ in shape, e.g. {expected} in the model")


def test_a_resume_checkpoint_of_another_model_is_refused_in_one_line(retrieval_run, data_root, tmp_path):
    _, _, _ = retrieval_run
    _, datasets = data_root
    wrong = tmp_path / "other.pth"
    torch.save({"model": {"visual_encoder.cls_token": torch.zeros(1, 1, 7)}, "optimizer": {}, "epoch": 0}, wrong)
    cfg = tiny_project(os.path.join(LAVIS_PROJECTS, "train", "retrieval_coco_ft.yaml"), datasets, tmp_path / "out",
                       run={**TINY_RUN, "k_test": 4, "valid_splits": ["val"], "resume_ckpt_path": str(wrong)})
    result = subprocess.run([sys.executable, "-m", "lavis_accel.cli", "train", "--cfg-path",
                             write_project(cfg, tmp_path / "resume.yaml")], capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"lavis-accel: error: run.resume_ckpt_path: {wrong} does not fit BlipRetrieval: 1 tensors differ in shape")


def test_caption_train_then_evaluate_only(data_root, tmp_path):
    root, datasets = data_root
    cfg = tiny_project(os.path.join(LAVIS_PROJECTS, "train", "caption_coco_ft.yaml"), datasets, tmp_path / "train",
                       run={**TINY_RUN, "max_len": 8, "min_len": 2}, cache_root=root)
    run_cli("train", "--cfg-path", write_project(cfg, tmp_path / "train.yaml"))
    directory = job_dir(tmp_path / "train")
    (test_metrics,) = [line["test"] for line in metrics_lines(directory) if "test" in line]
    assert {"CIDEr", "Bleu_4", "METEOR", "ROUGE_L"} <= set(test_metrics)
    assert "SPICE" not in test_metrics  # offline: skipped with a warning, never reported as 0
    results = glob.glob(os.path.join(directory, "result", "test_epochbest.json"))
    assert results and json.load(open(results[0]))[0]["caption"]

    eval_cfg = tiny_project(os.path.join(LAVIS_PROJECTS, "eval", "caption_coco_eval.yaml"), datasets,
                            tmp_path / "eval", cache_root=root, run={"max_len": 8, "min_len": 2},
                            model={"load_finetuned": True,
                                   "finetuned": os.path.join(directory, "checkpoint_best.pth")})
    run_cli("evaluate", "--cfg-path", write_project(eval_cfg, tmp_path / "eval.yaml"))
    (evaluated,) = [line["test"] for line in metrics_lines(job_dir(tmp_path / "eval")) if "test" in line]
    assert evaluated["CIDEr"] == pytest.approx(test_metrics["CIDEr"])
