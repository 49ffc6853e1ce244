"""The demo's work, in the process whose environment points transformers at the offline hub.

Stages: data -> training through LAVIS's runner -> MADTP's compression and CrossGET's fine-tuning of the trained
model -> a smaller DLIP student trained twice, distilled from the trained model and on the task losses only ->
evaluation of every setting through LAVIS's retrieval task -> cost of every setting (parameters read, counted FLOPs,
interleaved timing) -> one table, ``results.json`` and a plot.
"""
import argparse
import os
import sys
import time

from lavis_accel.demo.settings import DemoSettings, add_arguments


def progress(message):
    print(f"[demo {time.perf_counter() - _START:6.0f}s] {message}", flush=True)


_START = time.perf_counter()


def madtp_setting_name(settings):
    return f"madtp_p{round(settings.madtp_p * 100)}"


def crossget_setting_name(settings):
    return f"crossget_rv{settings.crossget_rv}"


def settings_to_compare(settings):
    """``[(name, reducer block or None)]``: the parent; ToMe, Turbo and Turbo with ``scale_alpha`` at each r (does
    scaling the semantic term to the token count close Turbo's recall gap to ToMe?); MADTP at its target and
    CrossGET at its rv."""
    from lavis_accel.demo.project import crossget_reducer

    compared = [("parent", None)]
    merging = (("tome", "tome", {}), ("turbo", "turbo", {}), ("turbo_scaled", "turbo", {"scale_alpha": True}))
    for name, reducer, extra in merging:
        if reducer in settings.methods:
            compared += [(f"{name}_r{r}", {"name": reducer, "r": r, **extra}) for r in settings.r_values]
    if "madtp" in settings.methods:
        compared.append((madtp_setting_name(settings), {"name": "madtp"}))
    if "crossget" in settings.methods:
        compared.append((crossget_setting_name(settings), crossget_reducer(settings)))
    return compared


def students_to_compare(settings):
    """``[(name, distilled)]``: the DLIP student distilled from the trained model, then the same student trained on
    the task losses only (the same steps), which shows what the distillation adds; none without ``dlip``."""
    return [("dlip", True), ("dlip_task_only", False)] if "dlip" in settings.methods else []


def train(config, path):
    """Write the project ``config`` to ``path``, train it through LAVIS's runner; return its best checkpoint (with
    no validation split: its last epoch's)."""
    from lavis_accel import jobs
    from lavis_accel.testing.projects import write_project
    from omegaconf import OmegaConf

    runner = jobs.build_runner(write_project(OmegaConf.create(config), path))
    runner.train()
    if runner.valid_splits:
        return os.path.join(runner.output_dir, "checkpoint_best.pth")
    return os.path.join(runner.output_dir, f"checkpoint_{runner.max_epoch - 1}.pth")


def evaluate(config, path):
    """Write the project ``config`` to ``path`` and evaluate it through LAVIS's runner: ``(test metrics, model)``."""
    from lavis_accel import jobs
    from lavis_accel.testing.projects import write_project
    from omegaconf import OmegaConf

    runner = jobs.build_runner(write_project(OmegaConf.create(config), path), mode="evaluate")
    metrics = runner.evaluate(skip_reload=True)["test"]
    return metrics, runner.unwrap_dist_model(runner.model)


def row_of(name, reducer, metrics, model):
    """One table row: the setting, its method (the reducer's name; ``turbo_scaled`` for Turbo with
    ``scale_alpha``), its reducer's name and merge count (CrossGET: rv, and rl), MADTP's tau, and LAVIS's retrieval
    metrics."""
    reducer = reducer or {}
    method = "turbo_scaled" if reducer.get("scale_alpha") else reducer.get("name")
    return {"setting": name, "method": method, "reducer": reducer.get("name"),
            "r": reducer.get("r", reducer.get("rv", 0)),
            "rl": reducer.get("rl"), "temperature": getattr(model, "temperature", None), **metrics}


def student_row(name, distilled, metrics, train_seconds):
    """One table row of a DLIP student: no reducer, the method, whether it was distilled, how long its training
    took, and LAVIS's retrieval metrics."""
    return {"setting": name, "method": "dlip", "reducer": None, "r": 0, "rl": None, "temperature": None,
            "distilled": distilled, "train_seconds": round(train_seconds, 1), **metrics}


def main(argv=None):
    from lavis_accel.datasets import write_retrieval

    from lavis_accel.demo import costs, project, report

    settings = DemoSettings.from_args(add_arguments(argparse.ArgumentParser()).parse_args(argv))
    progress(f"writing {settings.n_train}/{settings.n_val}/{settings.n_test} synthetic scenes")
    datasets = write_retrieval(os.path.join(settings.workdir, "data"), settings.n_train, settings.n_val,
                               settings.n_test, seed=settings.seed)

    configs = os.path.join(settings.workdir, "configs")
    project.write_med_config(settings)
    project.write_student_med_config(settings)
    progress(f"fine-tuning a small BLIP retrieval model for {settings.epochs} epochs through LAVIS's runner")
    checkpoint = train(project.train_config(settings, datasets), os.path.join(configs, "train.yaml"))
    progress(f"trained checkpoint: {checkpoint}")

    trained = {}
    if "madtp" in settings.methods:
        progress(f"compressing it with MADTP to {1 - settings.madtp_p:.0%} of its GFLOPs ({settings.madtp_epochs} "
                 "epochs, tau searched first)")
        trained["madtp"] = train(project.madtp_train_config(settings, datasets, checkpoint),
                                 os.path.join(configs, "madtp.yaml"))
    if "crossget" in settings.methods:
        progress(f"fine-tuning it with CrossGET at rv={settings.crossget_rv} ({settings.crossget_epochs} epochs, JS "
                 f"loss weight {project.CROSSGET_KD_WEIGHT})")
        trained["crossget"] = train(project.crossget_train_config(settings, datasets, checkpoint),
                                    os.path.join(configs, "crossget.yaml"))

    students = {}
    for name, distilled in students_to_compare(settings):
        teacher = "distilled from the trained model" if distilled else "on the task losses only"
        progress(f"training a smaller DLIP student {teacher} ({settings.dlip_epochs} epochs of image_text_pretrain)")
        start = time.perf_counter()
        students[name] = train(project.dlip_train_config(settings, datasets, checkpoint, distilled),
                               os.path.join(configs, f"{name}.yaml")), time.perf_counter() - start

    rows, models = [], {}
    for name, reducer in settings_to_compare(settings):
        progress(f"evaluating {name} through LAVIS's retrieval task")
        evaluated = trained.get(reducer["name"], checkpoint) if reducer else checkpoint
        metrics, model = evaluate(project.eval_config(settings, datasets, evaluated, name, reducer),
                                  os.path.join(configs, f"eval_{name}.yaml"))
        rows.append(row_of(name, reducer, metrics, model))
        models[name] = model
    for name, distilled in students_to_compare(settings):
        progress(f"evaluating {name} through LAVIS's retrieval task (as {project.DLIP_ARCH})")
        student, seconds = students[name]
        metrics, models[name] = evaluate(project.dlip_eval_config(settings, datasets, student, name),
                                         os.path.join(configs, f"eval_{name}.yaml"))
        rows.append(student_row(name, distilled, metrics, seconds))

    progress("counting FLOPs and timing every setting, interleaved")
    costs.add_costs(rows, models, settings)
    paths = report.write(rows, settings, checkpoint)
    print(report.table(rows), flush=True)
    for path in paths:
        print(f"[demo] wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
