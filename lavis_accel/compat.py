"""Narrow, guarded fixes that let LAVIS 1.0.2 run on a CPU-only, offline machine.

Each fix applies only when the problem it fixes is actually present, so a GPU user's run with matching
wheels behaves exactly as stock LAVIS.
"""
import logging
import sys

logger = logging.getLogger(__name__)

_TORCHVISION_OP_SCHEMAS = {
    "nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}


def ensure_torchvision_importable():
    """Import torchvision, defining its two missing op schemas if a CUDA wheel sits beside CPU torch.

    PyPI's torchvision 0.28 is built against CUDA torch; beside the CPU build of torch 2.13 its import fails
    with ``operator torchvision::nms does not exist``. Declaring the schemas (no kernels: LAVIS never calls
    nms) lets transforms, datasets and every LAVIS processor work. Any other import error is re-raised.
    """
    try:
        import torchvision  # noqa: F401
        return
    except RuntimeError as err:
        if "torchvision::nms does not exist" not in str(err):
            raise
    import torch

    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    for name, schema in _TORCHVISION_OP_SCHEMAS.items():
        try:
            torch.library.define(f"torchvision::{name}", schema)
        except RuntimeError:  # already declared by an earlier attempt
            pass
    import torchvision  # noqa: F401,F811

    logger.info("torchvision: declared missing op schemas %s (CUDA wheel beside CPU torch)",
                sorted(_TORCHVISION_OP_SCHEMAS))
