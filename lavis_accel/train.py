"""``python -m lavis_accel.train --cfg-path X.yaml``: LAVIS's train.py with the plugin imported."""
import sys

from lavis_accel.jobs import script_main, train

if __name__ == "__main__":
    sys.exit(script_main(train, "Train a LAVIS model (lavis_accel registered)"))
