"""Archs without published weights (DLIP's students, P-Former's stages): a config that asks LAVIS to load a
checkpoint it does not name.

From Python such a config builds a random model with a warning, so that LAVIS's ``load_model(arch, type,
checkpoint=path)`` and ``load_model_and_preprocess`` work with one's own file; a ``lavis-accel`` run refuses it in one
line before any work (``config_checks.check_checkpoint_files`` asks the arch's ``unnamed_weights``).
"""
import logging

from omegaconf import OmegaConf

logger = logging.getLogger(__name__)


def unnamed_checkpoint(arch, cfg, finetuned_advice, pretrained_advice, loads_finetuned=True):
    """Why ``cfg`` asks LAVIS to load weights it does not name, or None; the advice completes the one-line message.

    ``loads_finetuned``: whether the arch reads ``finetuned`` at all (BLIP's feature extractor reads ``pretrained``
    only).
    """
    if loads_finetuned and cfg.get("load_finetuned", True):
        if not cfg.get("finetuned"):
            return f"model.finetuned: {arch} has no published weights; {finetuned_advice}"
    elif cfg.get("load_pretrained", True) and not cfg.get("pretrained"):
        return f"model.pretrained: {arch} has no published weights; {pretrained_advice}"
    return None


def random_start_if_unnamed(cfg, problem):
    """``cfg`` as it is when ``problem`` is None; else, after a warning, ``cfg`` loading no checkpoint."""
    if not problem:
        return cfg
    logger.warning("%s; the model is randomly initialised (load_model(..., checkpoint=path) loads a file)", problem)
    return OmegaConf.merge(cfg, {"load_finetuned": False, "load_pretrained": False, "pretrained": None})
