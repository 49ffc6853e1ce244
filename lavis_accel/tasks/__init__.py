"""The plugin's LAVIS tasks, registered by ``import lavis_accel``: MADTP's compression fine-tuning (``madtp``)."""
from lavis_accel.tasks import madtp  # noqa: F401  (registers madtp_retrieval, madtp_captioning, madtp_vqa, ...)
