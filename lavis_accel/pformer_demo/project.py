"""The P-Former demo's LAVIS project configs: stage 0 on sentences, then BLIP-2's two stages for each run.

The models are the tests' tiny ones (``tiny_model_config``: EVA ViT ``eva_vit_tiny``, the tiny BERT as Q-Former and
P-Former) with ``queries`` queries, ``max_txt_len`` equal to it (P-Former's one prompt per token), and the demo's
trained OPT folder as ``opt_model``. The two runs differ only in ``loss_weight`` (0 for the baseline: no P-Former
is built and the stock BLIP-2 losses train) and in ``pretrained_stage0``; their seeds, data, steps and learning
rates are the same, and each run's stage 2 starts from its own stage-1 checkpoint.

One departure from BLIP-2's recipe: the EVA ViT is trained with the Q-Former (``freeze_vit: False``) in both runs.
BLIP-2 freezes a *pre-trained* EVA; no tiny pre-trained one exists, and a frozen random ViT is also left out of
LAVIS's checkpoints (the runner saves trainable weights only), so stage 2 and the evaluation would not see the
ViT stage 1 trained with.
"""
import os

from lavis_accel.testing.tiny_models import tiny_model_config

STAGE0 = ("pformer_opt", "pformer_opt2.7b")
STAGE1 = ("blip2_pformer", "pretrain_pformer")
STAGE2 = ("blip2_pformer_opt", "pretrain_pformer_opt2.7b")
EVALUATED = ("blip2_opt", "pretrain_opt2.7b")  # stock LAVIS: the stage-2 weights load into it
BASELINE, PFORMER = "blip2", "pformer"
RUNS = (BASELINE, PFORMER)


def _run_section(settings, output_dir, epochs, lr, batch_size):
    """LAVIS ``run:`` keys of one training job on the CPU: ``image_text_pretrain``, 20 steps of linear warm-up then
    cosine to lr / 10, no validation (the last epoch's checkpoint is kept)."""
    return {
        "task": "image_text_pretrain",
        "runner": "runner_base",
        "lr_sched": "linear_warmup_cosine_lr",
        "init_lr": lr,
        "min_lr": lr / 10,
        "warmup_lr": 1e-6,
        "warmup_steps": 20,
        "weight_decay": 0.05,
        "max_epoch": epochs,
        "batch_size_train": batch_size,
        "batch_size_eval": batch_size,
        "num_workers": 0,
        "seed": settings.seed,
        "output_dir": output_dir,
        "amp": False,
        "evaluate": False,
        "train_splits": ["train"],
        "device": "cpu",
        "world_size": 1,
        "dist_url": "env://",
        "distributed": False,
    }


def _model_section(settings, arch_and_type, llm_dir, **extra):
    arch, model_type = arch_and_type
    return {"arch": arch, "model_type": model_type, **tiny_model_config(arch, model_type),
            "image_size": settings.image_size, "num_query_token": settings.queries,
            "max_txt_len": settings.queries, "opt_model": llm_dir, **extra}


def stage0_config(settings, sentences, llm_dir):
    """P-Former stage 0 (``pformer_opt``) on the text-only sentences against the frozen toy OPT."""
    model = _model_section(settings, STAGE0, llm_dir)
    run = _run_section(settings, os.path.join(settings.workdir, "stage0"), settings.stage0_epochs, settings.stage0_lr,
                       settings.batch_size)
    return {"model": model, "datasets": sentences, "run": run}


def alignment(settings, run_name, stage, stage0_checkpoint):
    """The alignment keys of one run's stage (1 or 2): the baseline's weight is 0 (stock BLIP-2)."""
    if run_name == BASELINE:
        return {"loss_weight": 0.0}
    weight = settings.stage1_weight if stage == 1 else settings.stage2_weight
    return {"loss_weight": weight, "pretrained_stage0": stage0_checkpoint}


def stage1_config(settings, run_name, pairs, llm_dir, stage0_checkpoint):
    """BLIP-2 stage 1 (``blip2_pformer``: ITC, ITM, image-grounded LM, plus the alignment in the P-Former run)."""
    model = _model_section(settings, STAGE1, llm_dir, freeze_vit=False,
                           **alignment(settings, run_name, 1, stage0_checkpoint))
    run = _run_section(settings, os.path.join(settings.workdir, run_name, "stage1"), settings.stage1_epochs,
                       settings.lr, settings.batch_size)
    return {"model": model, "datasets": pairs, "run": run}


def stage2_config(settings, run_name, pairs, llm_dir, stage0_checkpoint, stage1_checkpoint):
    """BLIP-2 stage 2 (``blip2_pformer_opt``: the frozen OPT's LM loss, plus the alignment in the P-Former run),
    starting from the run's own stage-1 checkpoint."""
    model = _model_section(settings, STAGE2, llm_dir, freeze_vit=False, load_pretrained=True,
                           pretrained=stage1_checkpoint, **alignment(settings, run_name, 2, stage0_checkpoint))
    run = _run_section(settings, os.path.join(settings.workdir, run_name, "stage2"), settings.stage2_epochs,
                       settings.lr, settings.batch_size)
    return {"model": model, "datasets": pairs, "run": run}


def evaluated_model_config(settings, llm_dir, stage2_checkpoint):
    """The stock ``blip2_opt`` model config that loads a run's stage-2 checkpoint."""
    return _model_section(settings, EVALUATED, llm_dir, load_finetuned=False, load_pretrained=True,
                          pretrained=stage2_checkpoint)
