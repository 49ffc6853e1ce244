"""The demo's LAVIS project configs: one to fine-tune a small BLIP retrieval model, one per evaluated setting."""
import os

from lavis_accel.testing.tiny_models import tiny_model_config

PARENT_ARCH = "blip_retrieval"
VARIANT_ARCH = "blip_retrieval_turbo"
MODEL_TYPE = "coco"
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


def eval_config(settings, datasets, checkpoint, name, reducer=None):
    """Evaluate ``checkpoint`` on the test split: the parent when ``reducer`` is None, else the Turbo variant."""
    finetuned = {"load_finetuned": True, "finetuned": checkpoint}
    if reducer is None:
        model = _model_section(PARENT_ARCH, **finetuned)
    else:
        model = _model_section(VARIANT_ARCH, **finetuned, reducer={**reducer, "threshold": DEMO_THRESHOLD})
    run = _run_section(settings, os.path.join(settings.workdir, "eval", name), evaluate=True)
    run.pop("valid_splits")
    return {"model": model, "datasets": datasets, "run": run}
