"""The plugin's LAVIS tasks, registered by ``import lavis_accel``: MADTP's compression fine-tuning (``madtp``) and
CrossGET's fine-tuning with its cross-token loss (``crossget``)."""
from lavis_accel.tasks import crossget, madtp  # noqa: F401  (registers crossget_retrieval, madtp_retrieval, ...)
from lavis_accel.tasks import captioning  # noqa: F401  (registers captioning_own_gt)
