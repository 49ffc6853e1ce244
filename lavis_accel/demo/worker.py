"""The demo's work, in the process whose environment points transformers at the offline hub.

Stages: data -> training through LAVIS's runner -> evaluation of every setting through LAVIS's retrieval task ->
cost of every setting (counted FLOPs, interleaved timing) -> one table, ``results.json`` and a plot.
"""
import argparse
import os
import sys
import time

from lavis_accel.demo.settings import DemoSettings, add_arguments


def progress(message):
    print(f"[demo {time.perf_counter() - _START:6.0f}s] {message}", flush=True)


_START = time.perf_counter()


def settings_to_compare(settings):
    """``[(name, reducer block or None)]``: the parent, then ToMe and Turbo at each r."""
    compared = [("parent", None)]
    for name in ("tome", "turbo"):
        compared += [(f"{name}_r{r}", {"name": name, "r": r}) for r in settings.r_values]
    return compared


def main(argv=None):
    from lavis_accel import jobs
    from lavis_accel.datasets import write_retrieval
    from omegaconf import OmegaConf

    from lavis_accel.demo import costs, project, report
    from lavis_accel.testing.projects import write_project

    settings = DemoSettings.from_args(add_arguments(argparse.ArgumentParser()).parse_args(argv))
    progress(f"writing {settings.n_train}/{settings.n_val}/{settings.n_test} synthetic scenes")
    datasets = write_retrieval(os.path.join(settings.workdir, "data"), settings.n_train, settings.n_val,
                               settings.n_test, seed=settings.seed)

    progress(f"fine-tuning a small BLIP retrieval model for {settings.epochs} epochs through LAVIS's runner")
    train_yaml = write_project(OmegaConf.create(project.train_config(settings, datasets)),
                               os.path.join(settings.workdir, "configs", "train.yaml"))
    trainer = jobs.build_runner(train_yaml)
    trainer.train()
    checkpoint = os.path.join(trainer.output_dir, "checkpoint_best.pth")
    progress(f"best checkpoint: {checkpoint}")

    rows, models = [], {}
    for name, reducer in settings_to_compare(settings):
        progress(f"evaluating {name} through LAVIS's retrieval task")
        eval_yaml = write_project(OmegaConf.create(project.eval_config(settings, datasets, checkpoint, name, reducer)),
                                  os.path.join(settings.workdir, "configs", f"eval_{name}.yaml"))
        runner = jobs.build_runner(eval_yaml, mode="evaluate")
        metrics = runner.evaluate(skip_reload=True)["test"]
        rows.append({"setting": name, "reducer": reducer["name"] if reducer else None,
                     "r": reducer["r"] if reducer else 0, **metrics})
        models[name] = runner.unwrap_dist_model(runner.model)

    progress("counting FLOPs and timing every setting, interleaved")
    costs.add_costs(rows, models, settings)
    paths = report.write(rows, settings, checkpoint)
    print(report.table(rows), flush=True)
    for path in paths:
        print(f"[demo] wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
