"""The measuring process of ``lavis-accel bench`` (started by ``bench.cli.run`` with the offline environment).

Checks every option, builds the parent model at its real size with random weights, measures each setting and
writes ``bench.json``, ``bench.md`` and ``bench.png`` to the output directory.
"""
import argparse
import os
import sys

import torch

import lavis_accel  # noqa: F401  (registers the plugin's archs and reducers)
from lavis_accel.bench.build import ArchSpec, arch_spec, build_models, build_parent, parent_label
from lavis_accel.bench.cli import add_arguments
from lavis_accel.bench.machine import DTYPES, machine_info
from lavis_accel.bench.precision import compare_precisions
from lavis_accel.bench.precision import markdown as precision_markdown
from lavis_accel.bench.report import markdown_table, write_reports
from lavis_accel.bench.runner import BenchOptions, run_benchmark, stderr_progress
from lavis_accel.bench.settings import PARENT, bench_settings, student_settings
from lavis_accel.bench.sweep import run_sweep, write_sweep_reports
from lavis_accel.bench.tasks import default_candidates
from lavis_accel.cli import run_guarded
from lavis_accel.errors import SettingError


def device_from(name) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SettingError(f"--device {name!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SettingError(f"--device {name}: CUDA is not available on this machine")
    return device


def check_counts(args) -> None:
    for option, minimum in (("batch_size", 1), ("task_batch_size", 1), ("candidates", 1), ("repeats", 1),
                            ("warmup", 0), ("max_repeats", args.repeats), ("min_time", 0), ("threads", 1)):
        value = getattr(args, option)
        if value is not None and value < minimum:
            raise SettingError(f"--{option.replace('_', '-')} must be >= {minimum}, got {value}")
    for option, minimum in (("image_sizes", 16), ("batch_sizes", 1)):
        bad = [value for value in getattr(args, option) if value < minimum]
        if bad:
            raise SettingError(f"--{option.replace('_', '-')} must all be >= {minimum}, got {bad[0]}")


def check_precisions(args) -> None:
    """``--compare-dtype`` times a second precision of one model: not in a sweep, and not ``--dtype`` again."""
    if args.compare_dtype is None:
        return
    if args.sweep:
        raise SettingError("--compare-dtype: not with --sweep (compare precisions at one image size and batch)")
    if args.compare_dtype == args.dtype:
        raise SettingError(f"--compare-dtype {args.compare_dtype} is --dtype already: name another precision")


def block_values(given, block, key, default):
    """The values of an option: as given, else the arch's ``reducer:`` block's ``key`` (one value), else
    ``default``."""
    if given is not None:
        return given
    return [block[key]] if block and key in block else default


def r_values_of(args, block):
    """``--r``, else the arch block's ``r`` (ToMe, Turbo) or ``rv`` (CrossGET's image merges)."""
    return block_values(args.r, block, "r", block_values(None, block, "rv", []))


def check_student(args, spec: ArchSpec) -> None:
    """A distilled student is compared as itself with its full-size parent: no reducer settings, no sweep or second
    precision (they patch or rebuild one model), and one image size for both models."""
    compared = f"{spec.arch} is a distilled student, compared as itself with {parent_label(spec)}"
    for option in ("reducer", "r", "rl", "temperature"):
        if getattr(args, option) is not None:
            raise SettingError(f"--{option}: {compared}; it takes no reducer settings")
    for option, flag in (("sweep", "--sweep"), ("compare_dtype", "--compare-dtype")):
        if getattr(args, option):
            raise SettingError(f"{flag}: not for a distilled student yet ({compared})")
    if spec.image_size != spec.parent.image_size:
        raise SettingError(f"{spec.arch} / {spec.model_type}: its image size {spec.image_size} differs from "
                           f"{parent_label(spec)}'s {spec.parent.image_size}; the bench feeds both the same images")


def settings_of(args, spec: ArchSpec):
    """The settings to compare: the arch's reducers at each r / tau / (rv, rl), or a student and its parent."""
    if spec.is_student:
        check_student(args, spec)
        return student_settings(parent_label(spec), f"{spec.arch} / {spec.model_type}")
    block = spec.reducer_config
    reducers = args.reducer or ([block["name"]] if block else [])
    return bench_settings(reducers, r_values_of(args, block), block, block_values(args.temperature, block,
                          "temperature", []), block_values(args.rl, block, "rl", [0]))


def building_message(spec: ArchSpec, sizes, device) -> str:
    """The progress line saying which model(s) are built: a student's bench builds its parent and itself."""
    what = f"{spec.parent_class.__name__} for {spec.arch} / {spec.model_type}"
    if spec.is_student:
        what = (f"{spec.parent.parent_class.__name__} ({parent_label(spec)}) and the student "
                f"{spec.arch_class.__name__} ({spec.arch} / {spec.model_type})")
    return f"building {what} ({', '.join(map(str, sizes))} px, random weights) on {device}"


def identity_of(spec: ArchSpec) -> dict:
    """The keys every record starts with: the arch, and a student's parent arch and type."""
    identity = {"arch": spec.arch, "model_type": spec.model_type}
    if spec.is_student:
        identity.update(parent_arch=spec.parent.arch, parent_model_type=spec.parent.model_type)
    return identity


def bench(args) -> int:
    check_counts(args)
    check_precisions(args)
    device = device_from(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = arch_spec(args.arch, args.model_type)
    settings = settings_of(args, spec)
    out_dir = args.out or os.path.join("output", "bench", f"{args.arch}_{args.model_type}")

    progress = stderr_progress()
    sizes = args.image_sizes if args.sweep else [spec.image_size]
    progress(building_message(spec, sizes, device))
    torch.manual_seed(args.seed)
    model = None if args.sweep else build_models(spec)
    parent = model[PARENT] if isinstance(model, dict) else model
    options = BenchOptions(
        parts=tuple(args.parts),
        batch_size=args.batch_size,
        task_batch_size=args.task_batch_size,
        candidates=args.candidates or (1 if args.sweep else default_candidates(parent)),
        warmup=args.warmup,
        repeats=args.repeats,
        max_repeats=args.max_repeats or 3 * args.repeats,
        min_time=args.min_time,
        device=device,
        dtype=DTYPES[args.dtype],
        seed=args.seed,
    )
    progress("settings: " + ", ".join(setting.label for setting in settings))
    identity = identity_of(spec)
    machine = machine_info(device, DTYPES[args.dtype])
    if args.sweep:
        records = run_sweep(spec, settings, options, args.image_sizes, args.batch_sizes, identity, progress)
        paths = write_sweep_reports(records, out_dir, machine)
        print(open(paths[1], encoding="utf-8").read())
    else:
        records = run_benchmark(model, settings, options, spec.image_size, identity, progress)
        precision = None
        if args.compare_dtype:
            torch.manual_seed(args.seed)  # the same weights as ``model``
            precision = compare_precisions(model, build_parent(spec), settings, options, spec.image_size,
                                           DTYPES[args.compare_dtype], progress)
        paths = write_reports(records, out_dir, machine, precision)
        print(markdown_table(records))
        print(precision_markdown(precision or []))
    progress("wrote " + ", ".join(paths))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="lavis-accel bench")
    add_arguments(parser)
    return run_guarded(bench, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
