"""The demo's LAVIS project configs: one to fine-tune a small BLIP retrieval model, one to compress it with MADTP,
one to fine-tune it with CrossGET, two to train a smaller DLIP student (distilled from the trained model, and on the
task losses only), one per evaluated setting.

The model is the tests' tiny BLIP (``tiny_model_config``) with two changes. Its ViT cuts the 96 px images into 8 px
patches (145 tokens instead of 37): a ViT that sees that many tokens spends its time in matrix products rather than
in per-op overhead, so what merging saves in FLOPs shows up as time, as on ViT-B (577 tokens). And its BERT has one
more layer: CrossGET's loss pairs the ViT's blocks with the text encoder's layers one to one (BLIP ViT-B and
BERT-base have 12 each), and the tiny ViT has 4 blocks where the tiny BERT has 3. ``write_med_config`` writes that
BERT config into the workdir.
"""
import json
import os

from lavis_accel.models.vit_types import vit_type_size
from lavis_accel.testing.tiny_models import TINY_MED_CONFIG, TINY_VIT_TYPE, tiny_model_config

PARENT_ARCH = "blip_retrieval"
VARIANT_ARCH = "blip_retrieval_turbo"
MADTP_ARCH = "blip_retrieval_madtp"
CROSSGET_ARCH = "blip_retrieval_crossget"
MODEL_TYPE = "coco"
DEMO_PATCH_SIZE = 8  # pixels: 12 x 12 patches + [CLS] = 145 ViT tokens
MED_CONFIG = "med_config.json"  # in the workdir's configs/: the tiny BERT, as deep as the tiny ViT
# MADTP's compression fine-tuning of the trained model: the reference's tau search first (its steps start from tau 1;
# the tiny model's random codebook needs a larger tau to prune at all), GFLOPs measured on a few validation batches
MADTP_SEARCH_ROUNDS = 40
MADTP_FLOPS_BATCHES = 2
MADTP_LR = 2e-5
# CrossGET's fine-tuning of the trained model: its JS loss at the reference's weight, at MADTP's learning rate
CROSSGET_LR = 2e-5
CROSSGET_KD_WEIGHT = 0.5
# DLIP's student, as DLIP halves BLIP: the ViT half as wide (DLIP: ViT-S, half ViT-B's width, same depth) and a
# BERT half as wide and half as deep with the teacher's head count (the attention distillation pairs heads one to
# one); the same image size and patch (the cross-attention maps pair image tokens one to one) and vocabulary.
DLIP_PRETRAIN_ARCH = "dlip_pretrain"
DLIP_ARCH = "dlip_retrieval"
STUDENT_MODEL_TYPES = {DLIP_PRETRAIN_ARCH: "base", DLIP_ARCH: MODEL_TYPE}
STUDENT_MED_CONFIG = "student_med_config.json"  # in the workdir's configs/
STUDENT_VIT = {"vit_width": 64, "vit_num_heads": 2}
STUDENT_TEXT = {"hidden_size": 64, "intermediate_size": 256, "encoder_width": 64}
DLIP_LR = 5e-4
DLIP_ALPHA = 0.4  # ITA's momentum distillation, and the weight of the teacher's ITC targets (ramped, as BLIP's)
# The paper's threshold of 100 tokens (for ViT-B's 577) would stop the demo's merges after the first block or two;
# 1 never stops one.
DEMO_THRESHOLD = 1


def _run_section(settings, output_dir, evaluate):
    return {
        "task": "retrieval",
        "runner": "runner_base",
        "lr_sched": "linear_warmup_cosine_lr",
        "init_lr": 2e-4,
        "min_lr": 1e-6,
        "warmup_lr": 1e-6,
        "warmup_steps": 100,
        "weight_decay": 0.05,
        "max_epoch": settings.epochs,
        "batch_size_train": settings.batch_size,
        "batch_size_eval": 64,
        "num_workers": 0,
        "k_test": settings.k_test,
        "seed": settings.seed,
        "output_dir": output_dir,
        "amp": False,
        "evaluate": evaluate,
        "train_splits": ["train"],
        "valid_splits": ["val"],
        "test_splits": ["test"],
        "device": "cpu",
        "world_size": 1,
        "dist_url": "env://",
        "distributed": False,
        "use_dist_eval_sampler": False,
    }


def med_config_path(settings) -> str:
    return os.path.join(settings.workdir, "configs", MED_CONFIG)


def write_med_config(settings) -> str:
    """Write the demo's BERT config: the tiny one with as many layers as the tiny ViT has blocks; return its path."""
    with open(TINY_MED_CONFIG, encoding="utf-8") as handle:
        config = json.load(handle)
    config["num_hidden_layers"] = vit_type_size(TINY_VIT_TYPE)["depth"]
    path = med_config_path(settings)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2)
    return path


def student_med_config_path(settings) -> str:
    return os.path.join(settings.workdir, "configs", STUDENT_MED_CONFIG)


def write_student_med_config(settings) -> str:
    """Write the DLIP student's BERT config: the demo's, half as wide and half as deep, with its heads and
    vocabulary; return its path."""
    with open(med_config_path(settings), encoding="utf-8") as handle:
        config = json.load(handle)
    config.update(STUDENT_TEXT, num_hidden_layers=max(1, config["num_hidden_layers"] // 2))
    path = student_med_config_path(settings)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2)
    return path


def _model_section(settings, arch, **extra):
    # alpha 0 (no momentum distillation) and a 256-text queue: what a 2.2 M-parameter model learns from quickly
    return {"arch": arch, "model_type": MODEL_TYPE, **tiny_model_config(PARENT_ARCH, MODEL_TYPE),
            "vit_patch_size": DEMO_PATCH_SIZE, "med_config_path": med_config_path(settings), "queue_size": 256,
            "alpha": 0.0, **extra}


def train_config(settings, datasets):
    """Training of the parent from scratch. No validation: LAVIS's retrieval task would keep the epoch with the best
    text-retrieval recall, and at this size that direction stays near chance for epochs while image retrieval
    learns (the first epoch's chance-level model, whose scores all tie, once won); the last epoch's is kept. No test
    either: every setting, the parent first, is evaluated on it afterwards."""
    run = _run_section(settings, os.path.join(settings.workdir, "train"), evaluate=False)
    run.update(valid_splits=[], test_splits=[])
    return {"model": _model_section(settings, PARENT_ARCH), "datasets": datasets, "run": run}


def madtp_train_config(settings, datasets, checkpoint):
    """MADTP compression of the trained model ``checkpoint`` to ``(1 - madtp_p)`` of its GFLOPs, through the
    ``madtp_retrieval`` task: the best epoch is chosen among those within the GFLOPs tolerance."""
    model = _model_section(settings, MADTP_ARCH, load_finetuned=True, finetuned=checkpoint,
                           reducer={"name": "madtp", "temperature": 1.0})
    run = _run_section(settings, os.path.join(settings.workdir, "madtp"), evaluate=False)
    run.update({"task": "madtp_retrieval", "max_epoch": settings.madtp_epochs, "init_lr": MADTP_LR, "warmup_steps": 0,
                "madtp": {"p": settings.madtp_p, "calculate_temperature": True, "search_rounds": MADTP_SEARCH_ROUNDS,
                          "flops_batches": MADTP_FLOPS_BATCHES}})
    return {"model": model, "datasets": datasets, "run": run}


def crossget_reducer(settings) -> dict:
    """CrossGET's block in the demo: ``crossget_rv`` merges per ViT block, none in the text (the reference's
    vision-only setting)."""
    return {"name": "crossget", "rv": settings.crossget_rv, "rl": 0}


def crossget_train_config(settings, datasets, checkpoint):
    """CrossGET's fine-tuning of the trained model ``checkpoint`` through the ``crossget_retrieval`` task: ITC + ITM
    and the JS loss between the ViT's and the text encoder's cross tokens, ``(1 - w) * task + w * JS``; the cross
    offsets start at zero. The best epoch on the validation split is kept."""
    model = _model_section(settings, CROSSGET_ARCH, load_finetuned=True, finetuned=checkpoint,
                           reducer=crossget_reducer(settings))
    run = _run_section(settings, os.path.join(settings.workdir, "crossget"), evaluate=False)
    run.update({"task": "crossget_retrieval", "max_epoch": settings.crossget_epochs, "init_lr": CROSSGET_LR,
                "warmup_steps": 0, "crossget": {"kd_weight": CROSSGET_KD_WEIGHT}})
    return {"model": model, "datasets": datasets, "run": run}


def eval_config(settings, datasets, checkpoint, name, reducer=None):
    """Evaluate ``checkpoint`` on the test split: the parent when ``reducer`` is None, else the variant that runs it
    (Turbo's for ToMe/Turbo; MADTP's, whose tau comes from its checkpoint; CrossGET's, with its trained offsets)."""
    finetuned = {"load_finetuned": True, "finetuned": checkpoint}
    if reducer is None:
        model = _model_section(settings, PARENT_ARCH, **finetuned)
    elif reducer["name"] == "madtp":
        model = _model_section(settings, MADTP_ARCH, **finetuned, reducer=reducer)
    elif reducer["name"] == "crossget":
        model = _model_section(settings, CROSSGET_ARCH, **finetuned, reducer=reducer)
    else:
        model = _model_section(settings, VARIANT_ARCH, **finetuned, reducer={**reducer, "threshold": DEMO_THRESHOLD})
    run = _run_section(settings, os.path.join(settings.workdir, "eval", name), evaluate=True)
    run.pop("valid_splits")
    return {"model": model, "datasets": datasets, "run": run}


def _student_section(settings, arch, **extra):
    """A DLIP student's model keys: the arch's tiny config at the student's size (no gradient checkpointing: there
    is no memory to save at this size), the demo's queue."""
    model_type = STUDENT_MODEL_TYPES[arch]
    return {"arch": arch, "model_type": model_type, **tiny_model_config(arch, model_type), **STUDENT_VIT,
            "vit_patch_size": DEMO_PATCH_SIZE, "vit_grad_ckpt": False,
            "med_config_path": student_med_config_path(settings), "queue_size": 256, "alpha": DLIP_ALPHA, **extra}


def dlip_teacher(settings, checkpoint) -> dict:
    """The ``teacher:`` block naming the demo's trained model ``checkpoint`` (a ``blip_retrieval``: no decoder, so
    the six distillation terms that need none)."""
    section = _model_section(settings, PARENT_ARCH)
    return {**section, "pretrained": checkpoint}


def dlip_train_config(settings, datasets, checkpoint, distilled=True):
    """DLIP pretraining of the student through LAVIS's ``image_text_pretrain`` task on the demo's training captions
    (``coco_retrieval``'s train split: its samples carry the image and ``text_input`` that BLIP's ITA, ITM and LM
    read): from the trained model ``checkpoint`` as teacher, or without one (``distilled=False``: the task losses
    only, the same steps). No validation (the task has no metric): the last epoch's checkpoint is the student's."""
    teacher = dlip_teacher(settings, checkpoint) if distilled else None
    model = _student_section(settings, DLIP_PRETRAIN_ARCH, teacher=teacher)
    name = "dlip" if distilled else "dlip_task_only"
    run = _run_section(settings, os.path.join(settings.workdir, name), evaluate=False)
    run.update({"task": "image_text_pretrain", "max_epoch": settings.dlip_epochs, "init_lr": DLIP_LR,
                "valid_splits": [], "test_splits": []})
    return {"model": model, "datasets": datasets, "run": run}


def dlip_eval_config(settings, datasets, checkpoint, name):
    """Evaluate a DLIP student's pretraining ``checkpoint`` on the test split as a ``dlip_retrieval`` model (its ITA
    and ITM heads are pretraining's)."""
    model = _student_section(settings, DLIP_ARCH, load_finetuned=False, load_pretrained=True, pretrained=checkpoint)
    run = _run_section(settings, os.path.join(settings.workdir, "eval", name), evaluate=True)
    run.pop("valid_splits")
    return {"model": model, "datasets": datasets, "run": run}
