"""What a dry-run checked: read from the job's log and the files LAVIS's runner wrote, and said in a few lines.

The evidence is LAVIS's own: the runner's "Loaded N records for <split> split" lines (its builders read the
data), the task's "Train: data epoch: [e] [i/N]" progress lines (N steps per epoch, or per inner epoch of
``runner_iter``), the optimizer's count of trainable parameters, ``log.txt``'s training stats, ``evaluate.txt``'s
metrics and the ``checkpoint_*.pth`` files.
"""
import glob
import json
import os
import re
from dataclasses import dataclass, field

_RECORDS = re.compile(r"Loaded (\d+) records for (\w+) split")
_TRAIN_PROGRESS = re.compile(r"Train: data epoch: \[(\d+)\](?:; inner epoch \[(\d+)\])?\s+\[\s*\d+/(\d+)\]")
_PARAMETERS = re.compile(r"number of trainable parameters: (\d+)")
# LAVIS's runner counts no records of a split that is a single webdataset stream (it has no length); only training
# streams (``image_text_shards``): evaluation needs sized datasets
_STREAMED = "Only a single wds.DataPipeline dataset, no __len__ attribute."
STREAMED = "streamed"
SPLIT_ORDER = ("train", "val", "test")


@dataclass
class Outcome:
    """What one LAVIS job left behind."""
    records: dict = field(default_factory=dict)  # split -> records read, or STREAMED (a stream without a length)
    steps_per_epoch: dict = field(default_factory=dict)  # (epoch, runner_iter's inner epoch) -> training steps
    parameters: int | None = None  # trainable parameters (logged when training builds its optimizer)
    train_stats: list = field(default_factory=list)  # log.txt's {"train_loss": ..., ...} lines
    evaluations: list = field(default_factory=list)  # evaluate.txt's lines
    checkpoints: dict = field(default_factory=dict)  # file name -> bytes


def _json_lines(path, prefix="{"):
    """The JSON objects on the lines of ``path`` that start with ``prefix`` (none when the file is missing)."""
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.startswith(prefix)]


def collect(log_text, job_dir):
    """The :class:`Outcome` of a job from its log text and its job folder (None when no folder was made)."""
    records = {split: int(n) for n, split in _RECORDS.findall(log_text)}
    if _STREAMED in log_text and "train" not in records:
        records["train"] = STREAMED
    outcome = Outcome(
        records=records,
        steps_per_epoch={(epoch, inner): int(n) for epoch, inner, n in _TRAIN_PROGRESS.findall(log_text)},
    )
    parameters = _PARAMETERS.findall(log_text)
    outcome.parameters = int(parameters[-1]) if parameters else None
    if job_dir:
        outcome.train_stats = _json_lines(os.path.join(job_dir, "log.txt"), prefix='{"train_')
        outcome.evaluations = _json_lines(os.path.join(job_dir, "evaluate.txt"))
        outcome.checkpoints = {os.path.basename(path): os.path.getsize(path)
                               for path in sorted(glob.glob(os.path.join(job_dir, "checkpoint_*.pth")))}
    return outcome


def metric_names(evaluations):
    """The metric names over all evaluations (lines are ``{metric: value}`` or ``{split: {metric: value}}``)."""
    names = set()
    for line in evaluations:
        for key, value in line.items():
            names.update(value if isinstance(value, dict) else [key])
    return sorted(names)


def problems(outcome, training, evaluating):
    """What a job that exited 0 still failed to show: a training step, a checkpoint, evaluation metrics."""
    found = []
    if training and not outcome.steps_per_epoch:
        found.append("no training step in LAVIS's log")
    if training and not outcome.checkpoints:
        found.append("no checkpoint written")
    if evaluating and not outcome.evaluations:
        found.append("no evaluation metrics written (evaluate.txt)")
    return found


def _training_line(outcome, training):
    if not training:
        return "none (run.evaluate: True)"
    steps = sum(outcome.steps_per_epoch.values())
    losses = [stats["train_loss"] for stats in outcome.train_stats if "train_loss" in stats]
    loss = f", train_loss {losses[-1]}" if losses else ""
    epochs = len(outcome.steps_per_epoch)
    return f"{epochs} epoch{'s' * (epochs != 1)}, {steps} step{'s' * (steps != 1)}{loss}"


def _evaluation_line(outcome, evaluating):
    if not evaluating:
        return "none (no valid_splits or test_splits)"
    count = len(outcome.evaluations)
    names = ", ".join(metric_names(outcome.evaluations))
    return f"{count} result line{'s' * (count != 1)} in LAVIS's evaluate.txt; metrics: {names}"


def _checkpoint_line(outcome, training):
    if not training:
        return "none (evaluation only)"
    return ", ".join(f"{name} ({size / 2 ** 20:.1f} MB)" for name, size in outcome.checkpoints.items()) or "none"


def _split_order(item):
    """Sort key of a ``(split, records)`` item: train, val, test, then any other split by name."""
    split = item[0]
    return (SPLIT_ORDER.index(split) if split in SPLIT_ORDER else len(SPLIT_ORDER), split)


def render(cfg, command, outcome, *, training, evaluating, seconds, workdir_note, teacher=None):
    """The report of a job that exited 0: one line per thing checked (``teacher``: the tiny model's teacher block)."""
    model = cfg.model
    parameters = f", {outcome.parameters:,} trainable parameters" if outcome.parameters else ""
    if teacher:
        parameters += f"; frozen tiny random teacher {teacher.get('arch')} ({teacher.get('model_type')})"
    items = sorted(outcome.records.items(), key=_split_order)
    records = ", ".join(f"{split} {n}" for split, n in items if n != STREAMED)
    records = f"{records} records" if records else ""
    streamed = [split for split, n in items if n == STREAMED]
    if streamed:
        records = ", ".join([f"{' and '.join(streamed)} as a stream (webdataset: no record count)"]
                            + [records] * bool(records))
    rows = [
        ("config", f"parsed and checked: {model.arch} ({model.model_type}), task {cfg.run.task}"),
        ("model", f"tiny {model.arch} built through LAVIS's registry{parameters}"),
        ("data", f"synthetic {', '.join(cfg.datasets)}; LAVIS's builders read {records or 'no records'}"),
        ("training", _training_line(outcome, training)),
        ("evaluation", _evaluation_line(outcome, evaluating)),
        ("checkpoint", _checkpoint_line(outcome, training)),
        ("workdir", workdir_note),
    ]
    lines = [f"lavis-accel dry-run: `lavis-accel {command}` ran on CPU in {seconds:.1f} s"]
    lines += [f"  {name:<12}{text}" for name, text in rows]
    return "\n".join(lines)
