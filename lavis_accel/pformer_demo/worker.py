"""The P-Former demo's work, in the process whose environment points transformers at the offline hub.

Stages: data -> the toy OPT learns the captions' language from text alone -> P-Former stage 0 on the same
sentences through LAVIS's runner -> BLIP-2 stages 1 and 2 on the few pairs, twice with the same seed and steps
(baseline: ``loss_weight`` 0; P-Former: weights 10 and 100) -> stock ``blip2_opt`` loads each stage-2 checkpoint
and is scored on the same held-out images -> one table, ``results.json`` and ``results.md``.
"""
import argparse
import json
import os
import sys
import time

from lavis_accel.pformer_demo.settings import PformerDemoSettings, add_arguments

_START = time.perf_counter()


def progress(message):
    print(f"[pformer-demo {time.perf_counter() - _START:6.0f}s] {message}", flush=True)


def training_log(checkpoint):
    """The per-epoch training statistics LAVIS's runner wrote next to ``checkpoint`` (its ``log.txt``)."""
    path = os.path.join(os.path.dirname(checkpoint), "log.txt")
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.startswith('{"train')]


def train_stage(config, path, label):
    """Train one project config through LAVIS's runner (the demo's ``train``); ``(checkpoint, seconds, log)``."""
    from lavis_accel.demo.worker import train

    start = time.perf_counter()
    checkpoint = train(config, path)
    seconds = time.perf_counter() - start
    log = training_log(checkpoint)
    last = log[-1] if log else {}
    progress(f"{label}: {seconds:.0f}s, last epoch's " + ", ".join(f"{k[6:]} {v}" for k, v in last.items()
                                                                   if k.startswith("train_loss")))
    return checkpoint, seconds, log


def count_params(model):
    """``(all parameters, those outside the frozen OPT)`` of a stock ``blip2_opt``."""
    total = sum(p.numel() for p in model.parameters())
    return total, total - sum(p.numel() for p in model.opt_model.parameters())


def main(argv=None):
    from lavis_accel.pformer_demo import data, llm, project, report, scoring

    settings = PformerDemoSettings.from_args(add_arguments(argparse.ArgumentParser()).parse_args(argv))
    configs = os.path.join(settings.workdir, "configs")
    root = os.path.join(settings.workdir, "data")
    progress(f"writing {settings.pairs} image-text pairs, {settings.held_out} held-out images and "
             f"{settings.sentences} text-only sentences")
    held_out_path = data.write_held_out(settings, os.path.join(root, "held_out"))
    pairs = data.write_pairs(settings, root)
    sentences, scenes = data.write_language(settings, root, held_out_path)

    progress(f"training the toy OPT on documents of the {len(scenes)} text-only scenes' captions for "
             f"{settings.llm_steps} steps")
    llm_dir, llm_loss = llm.train_llm(scenes, os.path.join(settings.workdir, "llm"), settings.llm_steps,
                                      settings.llm_lr, settings.seed, log=progress)

    progress(f"P-Former stage 0 (pformer_opt) on the sentences, {settings.stage0_epochs} epochs, LAVIS's runner")
    stage0, stage0_seconds, stage0_log = train_stage(project.stage0_config(settings, sentences, llm_dir),
                                                     os.path.join(configs, "stage0.yaml"), "stage 0")
    stages, seconds, logs = {}, {"stage0": stage0_seconds}, {"stage0": stage0_log}
    for run in project.RUNS:
        progress(f"{run}: BLIP-2 stage 1 ({settings.stage1_epochs} epochs on {settings.pairs} pairs)")
        stage1, seconds[f"{run}_stage1"], logs[f"{run}_stage1"] = train_stage(
            project.stage1_config(settings, run, pairs, llm_dir, stage0), os.path.join(configs, f"{run}_stage1.yaml"),
            f"{run} stage 1")
        progress(f"{run}: BLIP-2 stage 2 ({settings.stage2_epochs} epochs), from its stage-1 checkpoint")
        stages[run], seconds[f"{run}_stage2"], logs[f"{run}_stage2"] = train_stage(
            project.stage2_config(settings, run, pairs, llm_dir, stage0, stage1),
            os.path.join(configs, f"{run}_stage2.yaml"), f"{run} stage 2")

    held_out = data.read_held_out(held_out_path)
    rows, losses, captions = [], {}, {}
    for run in project.RUNS:
        progress(f"{run}: stock blip2_opt loads its stage-2 checkpoint; scoring {len(held_out)} held-out images")
        model = scoring.build_stock_model(project.evaluated_model_config(settings, llm_dir, stages[run]))
        metrics, losses[run], generated = scoring.score(model, held_out, settings.image_size,
                                                        settings.max_caption_tokens)
        params, trained = count_params(model)
        text_only = scoring.text_only_loss(model, held_out)  # the same frozen OPT in both runs
        rows.append({"run": run, "params": params, "trained_params": trained, "pairs": settings.pairs,
                     "held_out_images": len(held_out), "checkpoint": stages[run], **metrics})
        captions[run] = [{"image": os.path.basename(path), "generated": text, "objects": objects}
                         for (path, _, objects), text in zip(held_out, generated)]

    difference, standard_error = scoring.paired_difference(losses[project.BASELINE], losses[project.PFORMER])
    lines = report.verdict(rows, difference, standard_error, text_only)
    extra = {"text_only_caption_loss": text_only, "held_out": held_out_path, "stage0_checkpoint": stage0,
             "llm": llm_dir, "llm_last_loss": llm_loss, "seconds": seconds, "training_logs": logs,
             "per_image_caption_loss": losses, "captions": captions,
             "loss_difference": difference, "loss_difference_standard_error": standard_error}
    paths = report.write(rows, lines, settings, extra)
    print(report.table(rows), flush=True)
    for line in lines:
        print(f"- {line}", flush=True)
    for path in paths:
        print(f"[pformer-demo] wrote {path}", flush=True)
    progress("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
