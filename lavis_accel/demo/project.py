"""The demo's LAVIS project configs: one to fine-tune a small BLIP retrieval model, one to compress it with MADTP,
one to fine-tune it with CrossGET, one per evaluated setting.

The model is the tests' tiny BLIP (``tiny_model_config``) with one more text layer: CrossGET's loss pairs the
ViT's blocks with the text encoder's layers one to one (BLIP ViT-B and BERT-base have 12 each), and the tiny ViT has
4 blocks where the tiny BERT has 3. ``write_med_config`` writes that BERT config into the workdir.
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
MED_CONFIG = "med_config.json"  # in the workdir's configs/: the tiny BERT, as deep as the tiny ViT
# MADTP's compression fine-tuning of the trained model: the reference's tau search first (its steps start from tau 1;
# the tiny model's random codebook needs a larger tau to prune at all), GFLOPs measured on a few validation batches
MADTP_SEARCH_ROUNDS = 40
MADTP_FLOPS_BATCHES = 2
MADTP_LR = 2e-5
# CrossGET's fine-tuning of the trained model: its JS loss at the reference's weight, at MADTP's learning rate
CROSSGET_LR = 2e-5
CROSSGET_KD_WEIGHT = 0.5
# At 37 tokens (96 px, patch 16) the paper's threshold of 100 tokens would stop every merge; 1 never stops one.
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


def _model_section(settings, arch, **extra):
    # alpha 0 (no momentum distillation) and a 256-text queue: what a 2.2 M-parameter model learns from quickly
    return {"arch": arch, "model_type": MODEL_TYPE, **tiny_model_config(PARENT_ARCH, MODEL_TYPE),
            "med_config_path": med_config_path(settings), "queue_size": 256, "alpha": 0.0, **extra}


def train_config(settings, datasets):
    return {"model": _model_section(settings, PARENT_ARCH), "datasets": datasets,
            "run": _run_section(settings, os.path.join(settings.workdir, "train"), evaluate=False)}


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
