"""lavis_accel: faster, smaller vision-language models for Salesforce LAVIS.

``import lavis_accel`` registers the plugin's models and token reducers into LAVIS's registry (idempotently),
after the guarded compatibility fixes that LAVIS needs on CPU-only, offline machines (``compat``).
"""
from lavis_accel import compat

compat.quiet_known_warnings()
compat.ensure_torchvision_importable()

from lavis_accel import registration  # noqa: E402
from lavis_accel import processors  # noqa: E402,F401  (registers the reducers)
from lavis_accel import models  # noqa: E402,F401  (registers the models and config extensions)
from lavis_accel import tasks  # noqa: E402,F401  (registers the MADTP and CrossGET training tasks)
from lavis_accel import datasets  # noqa: E402,F401  (registers the image_text_shards and flickr30k_caption builders)
from lavis_accel import runner_state  # noqa: E402

compat.enable_cpu_runner()
compat.enable_single_process_runs()
compat.enable_cpu_distributed()
runner_state.enable_exact_resume()
compat.skip_spice_when_offline()
registration.refresh_model_zoo()

from lavis_accel.patch import apply, remove  # noqa: E402

__version__ = "0.1.0"
