"""``lavis-accel bench``: counted FLOPs, throughput, parameters and peak memory of a LAVIS model's settings.

The CLI entry points are ``add_arguments(parser)`` and ``run(args)``; ``python -m lavis_accel.bench`` runs the same.
"""
from lavis_accel.bench.cli import add_arguments, run  # noqa: F401
