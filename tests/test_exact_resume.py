"""Exact resume through the real CLI: a run killed (SIGKILL) during its third epoch and resumed from its last
checkpoint ends with the same weights, momentum encoders, queues and optimizer state, to the bit, as the run that
was never interrupted; the best validation result survives the resume."""
import json
import os
import signal
import subprocess

import pytest
import torch
from lavis.common.registry import registry

from lavis_accel.datasets import write_retrieval
from lavis_accel.testing.projects import tiny_project, write_project
from cli_jobs import CLI, job_dir, run_cli

TRAIN_YAML = os.path.join(registry.get_path("library_root"), "projects", "blip", "train", "retrieval_coco_ft.yaml")
# no validation split: LAVIS then writes checkpoint_<epoch>.pth after each epoch, so the final state can be compared
RUN = {"max_epoch": 3, "batch_size_train": 8, "batch_size_eval": 8, "warmup_steps": 1, "k_test": 4, "log_freq": 1,
       "valid_splits": []}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    return write_retrieval(tmp_path_factory.mktemp("data"), n_train=48, n_val=8, n_test=8)


def _project(datasets, out, **run):
    cfg = tiny_project(TRAIN_YAML, datasets, out / "jobs", run={**RUN, **run})
    return write_project(cfg, out / "train.yaml")


def _job_dir(out):
    return job_dir(out / "jobs")


def _train(yaml_path):
    return run_cli("train", "--cfg-path", yaml_path)


def _train_until_killed(yaml_path, epoch):
    """Start training and SIGKILL it as soon as it logs its first step of ``epoch``."""
    process = subprocess.Popen(CLI + ["train", "--cfg-path", yaml_path], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        if f"Train: data epoch: [{epoch}]" in line:
            process.send_signal(signal.SIGKILL)
            break
    process.stdout.read()
    return process.wait()


def _assert_same_state(a, b):
    assert a["epoch"] == b["epoch"]
    assert a["model"].keys() == b["model"].keys()
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for state_a, state_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for key in state_a:
            assert torch.equal(torch.as_tensor(state_a[key]), torch.as_tensor(state_b[key])), key


def test_killed_run_resumed_from_its_last_checkpoint_is_bit_identical(datasets, tmp_path):
    reference = tmp_path / "reference"
    _train(_project(datasets, reference))
    finished = torch.load(os.path.join(_job_dir(reference), "checkpoint_2.pth"), weights_only=True)
    assert any(".visual_encoder_m." in f".{name}" for name in finished["model"])  # momentum encoders are saved

    killed = tmp_path / "killed"
    assert _train_until_killed(_project(datasets, killed), epoch=2) == -signal.SIGKILL
    killed_dir = _job_dir(killed)
    assert not os.path.exists(os.path.join(killed_dir, "checkpoint_2.pth"))

    resumed = tmp_path / "resumed"
    last = os.path.join(killed_dir, "checkpoint_last.pth")
    log = _train(_project(datasets, resumed, resume_ckpt_path=last))
    assert "Start training epoch 2" in log and "Start training epoch 1" not in log
    _assert_same_state(torch.load(os.path.join(_job_dir(resumed), "checkpoint_2.pth"), weights_only=True), finished)


def test_the_best_validation_result_survives_a_resume(datasets, tmp_path):
    reference = tmp_path / "reference"
    _train(_project(datasets, reference, max_epoch=2, valid_splits=["val"]))
    best = torch.load(os.path.join(_job_dir(reference), "checkpoint_last.pth"), weights_only=True)["best"]
    assert best["epoch"] == 0

    resumed = tmp_path / "resumed"
    last = os.path.join(_job_dir(reference), "checkpoint_last.pth")
    _train(_project(datasets, resumed, max_epoch=2, valid_splits=["val"], resume_ckpt_path=last))
    directory = _job_dir(resumed)
    assert os.path.isfile(os.path.join(directory, "checkpoint_best.pth"))  # the final test has a best model
    with open(os.path.join(directory, "log.txt"), encoding="utf-8") as f:
        val_logs = [json.loads(line) for line in f if line.startswith('{"val_')]
    assert val_logs and all(log["val_best_epoch"] in (0, 1) for log in val_logs)
    reference_logs = [json.loads(line) for line in open(os.path.join(_job_dir(reference), "log.txt"))
                      if line.startswith('{"val_')]
    assert val_logs[-1] == reference_logs[-1]  # epoch 1's validation, and the best epoch, as without the resume
