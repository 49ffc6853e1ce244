"""``lavis-accel dry-run --cfg-path X``: rehearse a project yaml (the plugin's or LAVIS's own) on a CPU in a minute.

The yaml is parsed and checked as ``lavis-accel train`` checks it; the same arch is built at tiny size, synthetic
data is written in the formats of the datasets it names (``data.py``), and the run is cut to one short epoch
(``tiny.py``); a model with a teacher (DLIP's ``dlip_pretrain``) gets a tiny random one, and a P-Former stage-1/2
model a tiny random stage-0 P-Former, written by the child before the job. The tiny yaml then runs through the real CLI, ``lavis-accel train`` (or ``evaluate`` for a
``run.evaluate: True`` yaml), in a child process with an offline tokenizer hub (``job.py``, ``child.py``), and the
report says what was checked (``report.py``). Everything goes under ``--workdir``: by default a temporary folder,
removed afterwards unless ``--keep``.
"""
import os
import shutil
import sys
import tempfile
import time

from lavis_accel.dryrun import data, job, report, tiny
from lavis_accel.testing.hub import write_offline_hub
from lavis_accel.testing.projects import write_project


def add_arguments(parser):
    parser.add_argument("--cfg-path", required=True, help="the project yaml to rehearse (the plugin's or LAVIS's)")
    parser.add_argument("--options", nargs="+", default=None,
                        help="override settings of the yaml, as key=value pairs, before it is made tiny")
    parser.add_argument("--workdir", default=None,
                        help="folder for the tiny yaml, data, log and outputs, kept afterwards "
                             "(default: a temporary folder, removed unless --keep)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    return parser


def run(args):
    """Rehearse ``args.cfg_path``; 0 when the job ran and showed every check, else the failure's status."""
    start = time.perf_counter()
    cfg = tiny.load_project(args.cfg_path, args.options)  # bad input fails here, before any folder is made
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
        return rehearse(cfg, args.cfg_path, os.path.abspath(args.workdir), start, kept=True)
    workdir = tempfile.mkdtemp(prefix="lavis-accel-dry-run-")
    try:
        return rehearse(cfg, args.cfg_path, workdir, start, kept=args.keep)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def _job_dirs(output_dir):
    """The job folders under ``output_dir`` (LAVIS's runner makes one per run)."""
    if not os.path.isdir(output_dir):
        return set()
    return {entry.path for entry in os.scandir(output_dir) if entry.is_dir()}


def _new_job_dir(output_dir, before):
    """The job folder LAVIS's runner made for this run (a reused ``--workdir`` may hold older ones)."""
    made = _job_dirs(output_dir) - before
    return made.pop() if len(made) == 1 else None


def _evaluated_splits(run_cfg, training):
    """The splits the job evaluates: ``valid_splits`` after each training epoch, then ``test_splits``."""
    valid = list(run_cfg.get("valid_splits", [])) if training else []
    return valid + list(run_cfg.get("test_splits", []))


def rehearse(cfg, cfg_path, workdir, start, kept):
    """Write the tiny yaml, its data and the offline hub under ``workdir``, run the job, report; the exit status."""
    data_root, output_dir = os.path.join(workdir, "data"), os.path.join(workdir, "output")
    datasets = data.write_datasets(list(cfg.datasets), data_root)
    tiny_cfg = tiny.tiny_config(cfg, datasets, output_dir, cache_root=data_root,
                                teacher_checkpoint=os.path.join(workdir, "teacher", "tiny_teacher.pth"),
                                stage0_checkpoint=os.path.join(workdir, "stage0", "tiny_stage0.pth"))
    tiny_path = write_project(tiny_cfg, os.path.join(workdir, "tiny_" + os.path.basename(cfg_path)))
    hub_root = write_offline_hub(os.path.join(workdir, "hub"))
    training = tiny.is_training(cfg)
    command = "train" if training else "evaluate"
    evaluating = bool(_evaluated_splits(tiny_cfg.run, training))
    print(f"lavis-accel dry-run: `lavis-accel {command}` on a tiny version of {cfg_path} ...", flush=True)

    before, log_path = _job_dirs(output_dir), os.path.join(workdir, "dry_run.log")
    log_note = f"log: {log_path}" if kept else "rerun with --keep to read the log"
    status = job.run_cli_job(command, tiny_path, hub_root, log_path)
    with open(log_path, encoding="utf-8", errors="replace") as f:
        log_text = f.read()
    if status != 0:
        print(f"lavis-accel dry-run: `lavis-accel {command}` failed (exit {status}): {job.last_error_line(log_text)}"
              f" [{log_note}]", file=sys.stderr)
        return status
    outcome = report.collect(log_text, _new_job_dir(output_dir, before))
    workdir_note = f"{workdir} (kept)" if kept else "temporary, removed (--keep keeps it)"
    print(report.render(cfg, command, outcome, training=training, evaluating=evaluating,
                        seconds=time.perf_counter() - start, workdir_note=workdir_note,
                        teacher=tiny_cfg.model.get("teacher")))
    missing = report.problems(outcome, training, evaluating)
    for problem in missing:
        print(f"lavis-accel dry-run: error: {problem} [{log_note}]", file=sys.stderr)
    return 1 if missing else 0
