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


def madtp_setting_name(settings):
    return f"madtp_p{round(settings.madtp_p * 100)}"


def settings_to_compare(settings):
    """``[(name, reducer block or None)]``: the parent, ToMe and Turbo at each r, then MADTP at its target."""
    compared = [("parent", None)]
    for name in ("tome", "turbo"):
        compared += [(f"{name}_r{r}", {"name": name, "r": r}) for r in settings.r_values]
    return compared + [(madtp_setting_name(settings), {"name": "madtp"})]


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

    progress(f"compressing it with MADTP to {1 - settings.madtp_p:.0%} of its GFLOPs ({settings.madtp_epochs} epochs, "
             "tau searched first)")
    madtp_yaml = write_project(OmegaConf.create(project.madtp_train_config(settings, datasets, checkpoint)),
                               os.path.join(settings.workdir, "configs", "madtp.yaml"))
    compressor = jobs.build_runner(madtp_yaml)
    compressor.train()
    madtp_checkpoint = os.path.join(compressor.output_dir, "checkpoint_best.pth")

    rows, models = [], {}
    for name, reducer in settings_to_compare(settings):
        progress(f"evaluating {name} through LAVIS's retrieval task")
        evaluated = madtp_checkpoint if reducer and reducer["name"] == "madtp" else checkpoint
        eval_yaml = write_project(OmegaConf.create(project.eval_config(settings, datasets, evaluated, name, reducer)),
                                  os.path.join(settings.workdir, "configs", f"eval_{name}.yaml"))
        runner = jobs.build_runner(eval_yaml, mode="evaluate")
        metrics = runner.evaluate(skip_reload=True)["test"]
        model = runner.unwrap_dist_model(runner.model)
        rows.append({"setting": name, "reducer": reducer["name"] if reducer else None,
                     "r": reducer.get("r", 0) if reducer else 0,
                     "temperature": getattr(model, "temperature", None), **metrics})
        models[name] = model

    progress("counting FLOPs and timing every setting, interleaved")
    costs.add_costs(rows, models, settings)
    paths = report.write(rows, settings, checkpoint)
    print(report.table(rows), flush=True)
    for path in paths:
        print(f"[demo] wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
