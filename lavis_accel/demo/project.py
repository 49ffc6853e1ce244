"""The demo's LAVIS project configs: one to fine-tune a small BLIP retrieval model, one to compress it with MADTP,
one per evaluated setting."""
import os

from lavis_accel.testing.tiny_models import tiny_model_config

PARENT_ARCH = "blip_retrieval"
VARIANT_ARCH = "blip_retrieval_turbo"
MADTP_ARCH = "blip_retrieval_madtp"
MODEL_TYPE = "coco"
# MADTP's compression fine-tuning of the trained model: the reference's tau search first (its steps start from tau 1;
# the tiny model's random codebook needs a larger tau to prune at all), GFLOPs measured on a few validation batches
MADTP_SEARCH_ROUNDS = 40
MADTP_FLOPS_BATCHES = 2
MADTP_LR = 2e-5
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


def _model_section(arch, **extra):
    # alpha 0 (no momentum distillation) and a 256-text queue: what a 1.7 M-parameter model learns from quickly
    return {"arch": arch, "model_type": MODEL_TYPE, **tiny_model_config(PARENT_ARCH, MODEL_TYPE),
            "queue_size": 256, "alpha": 0.0, **extra}


def train_config(settings, datasets):
    return {"model": _model_section(PARENT_ARCH), "datasets": datasets,
            "run": _run_section(settings, os.path.join(settings.workdir, "train"), evaluate=False)}


def madtp_train_config(settings, datasets, checkpoint):
    """MADTP compression of the trained model ``checkpoint`` to ``(1 - madtp_p)`` of its GFLOPs, through the
    ``madtp_retrieval`` task: the best epoch is chosen among those within the GFLOPs tolerance."""
    model = _model_section(MADTP_ARCH, load_finetuned=True, finetuned=checkpoint,
                           reducer={"name": "madtp", "temperature": 1.0})
    run = _run_section(settings, os.path.join(settings.workdir, "madtp"), evaluate=False)
    run.update({"task": "madtp_retrieval", "max_epoch": settings.madtp_epochs, "init_lr": MADTP_LR, "warmup_steps": 0,
                "madtp": {"p": settings.madtp_p, "calculate_temperature": True, "search_rounds": MADTP_SEARCH_ROUNDS,
                          "flops_batches": MADTP_FLOPS_BATCHES}})
    return {"model": model, "datasets": datasets, "run": run}


def eval_config(settings, datasets, checkpoint, name, reducer=None):
    """Evaluate ``checkpoint`` on the test split: the parent when ``reducer`` is None, else the variant that runs it
    (Turbo's for ToMe/Turbo; MADTP's, whose tau comes from its checkpoint)."""
    finetuned = {"load_finetuned": True, "finetuned": checkpoint}
    if reducer is None:
        model = _model_section(PARENT_ARCH, **finetuned)
    elif reducer["name"] == "madtp":
        model = _model_section(MADTP_ARCH, **finetuned, reducer=reducer)
    else:
        model = _model_section(VARIANT_ARCH, **finetuned, reducer={**reducer, "threshold": DEMO_THRESHOLD})
    run = _run_section(settings, os.path.join(settings.workdir, "eval", name), evaluate=True)
    run.pop("valid_splits")
    return {"model": model, "datasets": datasets, "run": run}
