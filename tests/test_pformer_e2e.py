"""P-Former end to end through the real CLI, as a user chains it: every shipped projects/pformer yaml made tiny, on
synthetic data, on CPU, each stage starting from the previous stage's checkpoint as the yamls and run scripts chain
them.

OPT: stage 0 on sentences -> stage 1 (``pretrained_stage0``) -> stage 2 (``pretrained`` = stage 1's checkpoint) ->
COCO caption fine-tuning -> the stock ``blip2_opt`` evaluates the stage-2 checkpoint zero-shot on VQAv2, OK-VQA and
GQA and the caption checkpoint on COCO. Flan-T5: stage 0 -> stage 1 -> stage 2 -> stock ``blip2_t5`` on the same
three VQA sets.
"""
import math
import os
import subprocess
import sys

import pytest
import torch
from lavis.common.registry import registry

from lavis_accel.dryrun.data import write_datasets
from lavis_accel.models.blip2_opt_answers import lemmatizer_available
from lavis_accel.testing.projects import tiny_project, write_project
from lavis_accel.testing.tiny_models import tiny_config
from cli_jobs import job_dir, metrics_lines, run_cli, train_stats

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PFORMER = os.path.join(REPO, "projects", "pformer")
RUN = {"batch_size_train": 4, "batch_size_eval": 8, "max_epoch": 1, "warmup_steps": 2}
GENERATION = {"max_len": 4, "min_len": 1, "num_beams": 2}
TIMEOUT = 240  # seconds per CLI job: a hung job fails the test instead of the suite
DATASETS = ("laion_sentence_115m", "coco_caption", "vg_caption", "conceptual_caption_3m", "sbu_caption", "coco_vqa",
            "ok_vqa", "gqa")

# every shipped yaml runs here (tests/test_dry_run.py leaves them out of its own list rather than run them twice)
YAMLS_RUN_END_TO_END = (
    "train/pretrain_stage0_opt2.7b.yaml", "train/pretrain_stage1.yaml", "train/pretrain_stage2_opt2.7b.yaml",
    "train/caption_coco_ft_opt2.7b.yaml", "eval/vqav2_zeroshot_opt2.7b_eval.yaml",
    "eval/okvqa_zeroshot_opt2.7b_eval.yaml", "eval/gqa_zeroshot_opt2.7b_eval.yaml",
    "eval/caption_coco_opt2.7b_eval.yaml",
    "train/pretrain_stage0_flant5xl.yaml", "train/pretrain_stage1_flant5xl.yaml",
    "train/pretrain_stage2_flant5xl.yaml", "eval/vqav2_zeroshot_flant5xl_eval.yaml",
    "eval/okvqa_zeroshot_flant5xl_eval.yaml", "eval/gqa_zeroshot_flant5xl_eval.yaml",
)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """``(root, datasets)``: every synthetic dataset the P-Former yamls read, written once for the module."""
    root = tmp_path_factory.mktemp("pformer_data")
    return root, write_datasets(list(DATASETS), str(root))


def run_yaml(data, out, name, *, model=None, run=None):
    """Run ``projects/pformer/<name>`` made tiny through ``lavis-accel train|evaluate``; ``(job folder, config)``."""
    root, datasets = data
    command = "evaluate" if name.startswith("eval/") else "train"
    cfg = tiny_project(os.path.join(PFORMER, name), datasets, out, cache_root=root, model=model,
                       run={**RUN, **(GENERATION if command == "evaluate" else {}), **(run or {})})
    run_cli(command, "--cfg-path", write_project(cfg, out / "project.yaml"), timeout=TIMEOUT)
    return job_dir(out), cfg


def finite_losses(directory):
    values = [float(line["train_loss"]) for line in train_stats(directory)]
    assert values and all(math.isfinite(v) and v > 0 for v in values), values
    return values


class Chain:
    """One LLM family's chain of stages, run once per module (each stage a fixture of the next)."""

    def __init__(self, data, tmp_path_factory, llm, stage1_yaml):
        self.data, self.factory, self.llm, self.stage1_yaml = data, tmp_path_factory, llm, stage1_yaml
        self.jobs = {}

    def stage0(self):
        if "stage0" not in self.jobs:
            self.jobs["stage0"] = run_yaml(self.data, self.factory.mktemp(f"stage0_{self.llm}"),
                                           f"train/pretrain_stage0_{self.llm}.yaml")
        return os.path.join(self.jobs["stage0"][0], "checkpoint_0.pth")

    def stage1(self):
        if "stage1" not in self.jobs:
            self.jobs["stage1"] = run_yaml(self.data, self.factory.mktemp(f"stage1_{self.llm}"),
                                           f"train/{self.stage1_yaml}", model={"pretrained_stage0": self.stage0()})
        return os.path.join(self.jobs["stage1"][0], "checkpoint_0.pth")

    def stage2(self):
        if "stage2" not in self.jobs:
            self.jobs["stage2"] = run_yaml(
                self.data, self.factory.mktemp(f"stage2_{self.llm}"), f"train/pretrain_stage2_{self.llm}.yaml",
                model={"load_pretrained": True, "pretrained": self.stage1(), "pretrained_stage0": self.stage0()})
        return os.path.join(self.jobs["stage2"][0], "checkpoint_0.pth")

    def evaluate(self, task, **model):
        name = f"eval/{task}_zeroshot_{self.llm}_eval.yaml"
        directory, cfg = run_yaml(self.data, self.factory.mktemp(f"{task}_{self.llm}"), name,
                                  model={"load_pretrained": True, "pretrained": self.stage2(), **model})
        return metrics_lines(directory), cfg


@pytest.fixture(scope="module")
def opt(data, tmp_path_factory):
    return Chain(data, tmp_path_factory, "opt2.7b", "pretrain_stage1.yaml")


@pytest.fixture(scope="module")
def t5(data, tmp_path_factory):
    return Chain(data, tmp_path_factory, "flant5xl", "pretrain_stage1_flant5xl.yaml")


def stock_keys(arch, model_type):
    return set(registry.get_model_class(arch).from_config(tiny_config(arch, model_type)).state_dict())


@pytest.mark.parametrize("chain_name", ["opt", "t5"])
def test_each_stage_trains_from_the_previous_stage_checkpoint(request, chain_name):
    chain = request.getfixturevalue(chain_name)
    stage0, stage1, stage2 = chain.stage0(), chain.stage1(), chain.stage2()
    for stage in ("stage0", "stage1", "stage2"):
        finite_losses(chain.jobs[stage][0])
    saved0 = torch.load(stage0, map_location="cpu")["model"]
    assert any(key.startswith("Pformer.cls_proj") for key in saved0)
    assert not any(key.startswith(("opt_model.", "t5_model.")) for key in saved0)  # the frozen LLM is not saved
    for path, stage in ((stage1, "stage1"), (stage2, "stage2")):
        checkpoint = torch.load(path, map_location="cpu")
        assert not any(key.startswith("Pformer.") for key in checkpoint["model"]), stage  # never saved after stage 0
        assert checkpoint["config"]["model"]["pretrained_stage0"] == stage0
    weights = {"stage1": 10.0, "stage2": 100.0}
    for stage, weight in weights.items():
        assert chain.jobs[stage][1].model.loss_weight == weight


@pytest.mark.parametrize("chain_name, arch, model_type", [("opt", "blip2_opt", "pretrain_opt2.7b"),
                                                          ("t5", "blip2_t5", "pretrain_flant5xl")])
def test_the_stage2_checkpoint_holds_only_stock_blip2_keys(request, chain_name, arch, model_type):
    chain = request.getfixturevalue(chain_name)
    saved = set(torch.load(chain.stage2(), map_location="cpu")["model"])
    assert saved and saved <= stock_keys(arch, model_type)


@pytest.mark.parametrize("chain_name", ["opt", "t5"])
@pytest.mark.parametrize("task, metric", [("vqav2", "agg_metrics"), ("okvqa", "agg_metrics"), ("gqa", "agg_metrics")])
def test_stock_blip2_answers_zero_shot_from_the_stage2_checkpoint(request, chain_name, task, metric):
    chain = request.getfixturevalue(chain_name)
    # en_core_web_sm cannot be installed here: OK-VQA's lemmatiser is switched off (its refusal is tested below)
    lines, cfg = chain.evaluate(task, apply_lemmatizer=False)
    assert cfg.model.arch in ("blip2_opt", "blip2_t5")
    assert lines and 0.0 <= lines[-1][metric] <= 100.0


def test_caption_fine_tuning_then_stock_blip2_opt_captions(opt, tmp_path_factory):
    directory, cfg = run_yaml(opt.data, tmp_path_factory.mktemp("caption_ft"), "train/caption_coco_ft_opt2.7b.yaml",
                              model={"pretrained": opt.stage2(), "pretrained_stage0": opt.stage0()},
                              run={"valid_splits": [], "test_splits": []})
    finite_losses(directory)
    assert cfg.model.loss_weight == 1.0  # the reference leaves the alignment on at weight 1 while fine-tuning
    evaluated, _ = run_yaml(opt.data, tmp_path_factory.mktemp("caption_eval"), "eval/caption_coco_opt2.7b_eval.yaml",
                            model={"load_finetuned": True, "finetuned": os.path.join(directory, "checkpoint_0.pth")})
    assert {"Bleu_4", "CIDEr"} <= set(metrics_lines(evaluated)[-1]["test"])


@pytest.mark.skipif(lemmatizer_available(), reason="en_core_web_sm is installed here: the lemmatiser runs")
def test_okvqa_lemmatiser_without_its_spacy_model_is_refused_before_any_work(data, tmp_path):
    root, datasets = data
    cfg = tiny_project(os.path.join(PFORMER, "eval", "okvqa_zeroshot_opt2.7b_eval.yaml"), datasets, tmp_path / "out",
                       cache_root=root)
    process = subprocess.run([sys.executable, "-m", "lavis_accel.cli", "evaluate", "--cfg-path",
                              write_project(cfg, tmp_path / "project.yaml")], capture_output=True, text=True)
    assert process.returncode == 2
    (line,) = process.stderr.strip().splitlines()
    assert "model.apply_lemmatizer" in line and "en_core_web_sm" in line
    assert not os.path.exists(tmp_path / "out")  # refused before the job folder is made
