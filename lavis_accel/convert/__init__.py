"""``lavis-accel convert FORMAT ...``: turn checkpoints released by other code bases into ones the plugin loads."""
import importlib

# format -> (module, help); each module provides add_arguments(parser) and run(args)
CONVERTERS = {
    "madtp": ("lavis_accel.convert.madtp",
              "a released MADTP checkpoint (double125/MADTP: BLIP NLVR2, caption, VQA, retrieval; CLIP retrieval)"),
}


def add_arguments(parser):
    """One sub-command per source format."""
    formats = parser.add_subparsers(dest="format", required=True, metavar="FORMAT")
    for name, (module_name, help_text) in CONVERTERS.items():
        module = importlib.import_module(module_name)
        sub = formats.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sub)
        sub.set_defaults(convert=module.run)
    return parser


def run(args):
    """Run the converter of the format named on the command line."""
    return args.convert(args)
