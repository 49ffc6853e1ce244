"""``python -m lavis_accel.evaluate --cfg-path X.yaml``: LAVIS's evaluate.py with the plugin imported."""
import sys

from lavis_accel.jobs import evaluate, script_main

if __name__ == "__main__":
    sys.exit(script_main(evaluate, "Evaluate a LAVIS model (lavis_accel registered)"))
