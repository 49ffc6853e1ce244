"""``lavis-accel``: train, evaluate, benchmark and demo LAVIS models with the plugin registered."""
import argparse
import importlib
import os
import sys
import traceback

from lavis_accel.errors import TRACEBACK_VARIABLE, SettingError

# subcommand -> (module, function, help); each module also provides add_arguments(parser)
SUBCOMMANDS = {
    "train": ("lavis_accel.jobs", "train", "train a LAVIS project yaml (LAVIS's train.py)"),
    "evaluate": ("lavis_accel.jobs", "evaluate", "evaluate a LAVIS project yaml (LAVIS's evaluate.py)"),
    "bench": ("lavis_accel.bench.cli", "run", "FLOPs, throughput and memory of an accelerated arch vs its parent"),
    "demo": ("lavis_accel.demo", "run", "train, evaluate and compare accelerated models on synthetic data (CPU)"),
    "pformer-demo": ("lavis_accel.pformer_demo", "run", "P-Former at toy scale: BLIP-2 trained on few pairs with and "
                     "without P-Former alignment, scored on the same held-out images (CPU)"),
    "dry-run": ("lavis_accel.dryrun", "run", "rehearse a project yaml at tiny size on synthetic data, on CPU"),
    "convert": ("lavis_accel.convert", "run", "turn a released checkpoint of another code base (MADTP) into one "
                "the plugin's models load"),
}


def run_guarded(job, args):
    """Run a subcommand; bad input (SettingError) becomes one line on stderr and exit status 2 (with
    ``LAVIS_ACCEL_TRACEBACK=1``, the traceback too)."""
    try:
        return job(args) or 0
    except SettingError as err:
        if os.environ.get(TRACEBACK_VARIABLE):
            traceback.print_exc()
        print(f"lavis-accel: error: {err}", file=sys.stderr)
        return 2


def build_parser():
    parser = argparse.ArgumentParser(
        prog="lavis-accel", description="Faster, smaller vision-language models for Salesforce LAVIS.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, function, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        sub = commands.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sub)
        sub.set_defaults(job=getattr(module, function))
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    return run_guarded(args.job, args)


if __name__ == "__main__":
    sys.exit(main())
