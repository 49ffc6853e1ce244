"""``python -m lavis_accel.bench ...``: the same as ``lavis-accel bench ...``."""
import sys

from lavis_accel.bench.cli import main

sys.exit(main())
