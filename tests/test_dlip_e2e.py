"""DLIP end to end through the real CLI, as a user runs it: the shipped projects/dlip yamls made tiny, on synthetic
data, on CPU.

A tiny ``dlip_pretrain`` with a tiny random BLIP teacher (``write_tiny_teacher``) is pretrained twice: on LAVIS's
pretraining mix (COCO, CC3M, SBU and VG captions; epoch-based runner) and streamed from img2dataset tar shards
(``image_text_shards``, ``runner_iter``). The student is then fine-tuned from those checkpoints for Flickr30k
retrieval and captioning (``model.pretrained``), and the fine-tuned checkpoints are evaluated alone with the eval
yamls (``lavis-accel evaluate``).
"""
import json
import math
import os

import pytest
import torch
from lavis.common.registry import registry
from lavis.models.vit import interpolate_pos_embed
from omegaconf import OmegaConf

from lavis_accel.datasets import (
    write_caption, write_flickr30k_caption, write_image_text_pairs, write_retrieval, write_scene_shards,
)
from lavis_accel.testing.projects import tiny_project, write_project
from lavis_accel.testing.tiny_models import parent_config, write_tiny_teacher
from cli_jobs import job_dir, metrics_lines, run_cli, train_stats

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DLIP = os.path.join(REPO, "projects", "dlip")
BATCH = {"batch_size_train": 8, "batch_size_eval": 8}
RECALLS = {"txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean", "agg_metrics"}
CAPTION_METRICS = {"Bleu_1", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}
TIMEOUT = 180  # seconds per CLI job: a hung job fails the test instead of the suite


# the shipped yamls run here through the real CLI (made tiny as a dry-run makes them): tests/test_dry_run.py leaves
# them out of its own list rather than run them twice
YAMLS_RUN_END_TO_END = ("train/pretrain.yaml", "train/pretrain_shards.yaml", "train/retrieval_flickr_ft.yaml",
                        "train/caption_flickr_ft.yaml", "eval/ret_flickr_eval.yaml", "eval/caption_flickr_eval.yaml")


def project(name):
    return os.path.join(DLIP, name)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """``(root, datasets)``: every synthetic dataset the DLIP yamls read, written once for the module."""
    root = tmp_path_factory.mktemp("dlip_data")
    datasets = write_caption(root, n_train=8, n_val=4, n_test=4)
    for name in ("conceptual_caption_3m", "sbu_caption", "vg_caption"):
        datasets.update(write_image_text_pairs(root, name, n=4))
    (flickr,) = write_retrieval(root / "flickr30k", n_train=16, n_val=8, n_test=8).values()
    datasets.update(flickr30k=flickr, **write_flickr30k_caption(root, n_train=16, n_val=8, n_test=8))
    datasets.update(write_scene_shards(root, n=24, shard_size=8))
    return root, datasets


def pretrain(data, out, name, run):
    """Pretrain with ``projects/dlip/train/<name>`` made tiny, its teacher a tiny random BLIP written first;
    ``(job folder, tiny config)``."""
    root, datasets = data
    teacher_checkpoint = out / "teacher.pth"
    cfg = tiny_project(project(f"train/{name}"), datasets, out / "train", run={**BATCH, **run},
                       teacher_checkpoint=teacher_checkpoint, cache_root=root)
    write_tiny_teacher(cfg.model.teacher, teacher_checkpoint)
    run_cli("train", "--cfg-path", write_project(cfg, out / "train.yaml"), timeout=TIMEOUT)
    return job_dir(out / "train"), cfg


@pytest.fixture(scope="module")
def mix_pretraining(data, tmp_path_factory):
    """One epoch on LAVIS's pretraining mix (the epoch-based runner writes checkpoint_0.pth)."""
    return pretrain(data, tmp_path_factory.mktemp("pretrain"), "pretrain.yaml", {"max_epoch": 1, "warmup_steps": 2})


@pytest.fixture(scope="module")
def shard_pretraining(data, tmp_path_factory):
    """Two inner epochs of two steps streamed from the shards (runner_iter: checkpoint_2.pth, checkpoint_4.pth)."""
    return pretrain(data, tmp_path_factory.mktemp("pretrain_shards"), "pretrain_shards.yaml",
                    {"max_iters": 4, "iters_per_inner_epoch": 2, "warmup_steps": 2})


def finetune(data, out, name, pretrained, run):
    """Fine-tune ``projects/dlip/train/<name>`` made tiny from ``pretrained``; its job folder."""
    root, datasets = data
    cfg = tiny_project(project(f"train/{name}"), datasets, out / "train", cache_root=root,
                       model={"load_pretrained": True, "pretrained": str(pretrained)},
                       run={**BATCH, "max_epoch": 1, **run})
    run_cli("train", "--cfg-path", write_project(cfg, out / "train.yaml"), timeout=TIMEOUT)
    return job_dir(out / "train")


def evaluate(data, out, name, finetuned, run):
    """Evaluate ``finetuned`` with ``projects/dlip/eval/<name>`` made tiny; ``(job folder, evaluate.txt lines)``."""
    root, datasets = data
    cfg = tiny_project(project(f"eval/{name}"), datasets, out / "eval", cache_root=root,
                       model={"load_finetuned": True, "finetuned": str(finetuned)}, run={**BATCH, **run})
    run_cli("evaluate", "--cfg-path", write_project(cfg, out / "eval.yaml"), timeout=TIMEOUT)
    directory = job_dir(out / "eval")
    return directory, metrics_lines(directory)


@pytest.fixture(scope="module")
def retrieval(data, mix_pretraining, tmp_path_factory):
    """Retrieval fine-tuning from the mix pretraining, then evaluation of its best checkpoint:
    ``(train job folder, (eval job folder, its evaluate.txt lines))``."""
    out = tmp_path_factory.mktemp("retrieval")
    pretrained = os.path.join(mix_pretraining[0], "checkpoint_0.pth")
    directory = finetune(data, out, "retrieval_flickr_ft.yaml", pretrained,
                         {"k_test": 4, "valid_splits": ["val"], "test_splits": ["test"]})
    return directory, evaluate(data, out, "ret_flickr_eval.yaml", os.path.join(directory, "checkpoint_best.pth"),
                               {"k_test": 4})


@pytest.fixture(scope="module")
def captioning(data, shard_pretraining, tmp_path_factory):
    """Caption fine-tuning from the shard pretraining (no evaluation while training: scoring is slow), then
    evaluation of its checkpoint: ``(train job folder, (eval job folder, its evaluate.txt lines))``."""
    out = tmp_path_factory.mktemp("captioning")
    pretrained = os.path.join(shard_pretraining[0], "checkpoint_4.pth")
    directory = finetune(data, out, "caption_flickr_ft.yaml", pretrained, {"valid_splits": [], "test_splits": []})
    generation = {"max_len": 8, "min_len": 2, "num_beams": 2}
    return directory, evaluate(data, out, "caption_flickr_eval.yaml", os.path.join(directory, "checkpoint_0.pth"),
                               generation)


def losses(directory):
    """The training losses in LAVIS's log.txt, checked to be finite and positive."""
    values = [float(line["train_loss"]) for line in train_stats(directory)]
    assert values and all(math.isfinite(v) and v > 0 for v in values), values
    return values


def test_pretraining_on_the_mix_with_its_teacher_writes_a_student_checkpoint(mix_pretraining):
    directory, cfg = mix_pretraining
    assert len(losses(directory)) == 1
    checkpoint = torch.load(os.path.join(directory, "checkpoint_0.pth"), map_location="cpu")
    teacher = checkpoint["config"]["model"]["teacher"]  # the run's config, as LAVIS saved it
    assert (teacher["arch"], teacher["pretrained"]) == ("blip_pretrain", cfg.model.teacher.pretrained)
    state = checkpoint["model"]
    assert {"visual_encoder.pos_embed", "text_encoder.embeddings.word_embeddings.weight", "itm_head.weight",
            "text_decoder.cls.predictions.bias", "visual_encoder_m.pos_embed"} <= set(state)


def test_pretraining_streamed_from_shards_runs_its_inner_epochs(shard_pretraining):
    directory, _ = shard_pretraining
    assert len(losses(directory)) == 2  # two inner epochs
    assert {"checkpoint_2.pth", "checkpoint_4.pth"} <= set(os.listdir(directory))


@pytest.mark.parametrize("run, checkpoint", [("mix", "checkpoint_0.pth"), ("shards", "checkpoint_4.pth")])
def test_the_frozen_teacher_is_not_saved_with_the_student(run, checkpoint, mix_pretraining, shard_pretraining):
    """The teacher comes from its own checkpoint: a student checkpoint holds none of its tensors."""
    directory, _ = mix_pretraining if run == "mix" else shard_pretraining
    state = torch.load(os.path.join(directory, checkpoint), map_location="cpu")["model"]
    teacher_keys = [key for key in state if key.startswith("teacher.")]
    assert not teacher_keys, f"{len(teacher_keys)} teacher tensors saved, e.g. {teacher_keys[:3]}"


def test_a_retrieval_model_built_from_the_pretraining_checkpoint_has_its_weights(mix_pretraining):
    """As the fine-tuning job builds it (``load_pretrained`` from the pretraining checkpoint), at a larger image size
    than pretraining (the recipe goes from 224 to 384 px): the position embedding is interpolated, every other ViT
    and text-encoder weight is the checkpoint's."""
    directory, cfg = mix_pretraining
    path = os.path.join(directory, "checkpoint_0.pth")
    state = torch.load(path, map_location="cpu")["model"]
    project_cfg = tiny_project(project("train/retrieval_flickr_ft.yaml"), {"flickr30k": {}}, directory,
                               model={"load_pretrained": True, "pretrained": path,
                                      "image_size": cfg.model.image_size + 32})
    # what LAVIS's runner builds: the arch's default yaml for the model type, then the project's model keys
    model_cfg = OmegaConf.merge(parent_config("dlip_retrieval", "flickr"), project_cfg.model)
    model = registry.get_model_class("dlip_retrieval").from_config(model_cfg)
    vit = model.visual_encoder.state_dict()
    assert vit["pos_embed"].shape[1] > state["visual_encoder.pos_embed"].shape[1]
    assert torch.equal(vit["pos_embed"], interpolate_pos_embed(state["visual_encoder.pos_embed"], model.visual_encoder))
    for name, tensor in vit.items():
        if name != "pos_embed":
            assert torch.equal(tensor, state[f"visual_encoder.{name}"]), name
    for name, tensor in model.text_encoder.state_dict().items():
        assert torch.equal(tensor, state[f"text_encoder.{name}"]), name


def test_retrieval_fine_tuned_from_pretraining_is_evaluated_alone(retrieval):
    directory, (_, evaluated) = retrieval
    losses(directory)
    trained = metrics_lines(directory)[-1]  # the test split, with the best checkpoint
    (metrics,) = evaluated
    assert RECALLS <= set(metrics)
    assert all(math.isfinite(metrics[key]) and 0 <= metrics[key] <= 100 for key in RECALLS)
    assert metrics == pytest.approx(trained)  # the checkpoint alone gives the training job's test scores


def test_captioning_fine_tuned_from_shard_pretraining_is_evaluated_alone(captioning):
    directory, (eval_directory, evaluated) = captioning
    losses(directory)
    (metrics,) = [line["test"] for line in evaluated if "test" in line]
    assert CAPTION_METRICS <= set(metrics)
    assert all(math.isfinite(metrics[key]) and metrics[key] >= 0 for key in CAPTION_METRICS)
    with open(os.path.join(eval_directory, "result", "test_epochbest.json"), encoding="utf-8") as f:
        generated = json.load(f)
    assert len(generated) == 8 and all(isinstance(r["caption"], str) for r in generated)
