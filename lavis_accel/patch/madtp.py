"""``apply(model, "madtp", temperature=tau, codebook=C)``: MADTP's pruning steps on every tower of a model.

The towers share one ``MadtpControl`` (codebook and tau). Which codebook: the one given, else the model's own
``madtp_codebook`` parameter (the registered MADTP variants own one), else a new ``randn(100, width)`` (MADTP's
100 codes, random as in the reference), kept by the control, not added to the model's parameters.
"""
import math
import numbers
from typing import Optional

import torch

from lavis_accel.errors import SettingError
from lavis_accel.patch import clip as clip_binding
from lavis_accel.patch import med as med_binding
from lavis_accel.patch import vit as vit_binding
from lavis_accel.patch.steps import MadtpControl, MadtpStep

CODEBOOK_ATTR = "madtp_codebook"
NUM_CODES = 100
KNOWN_SETTINGS = ("temperature", "codebook")


def checked_temperature(value) -> float:
    """``tau`` as a float, refused in one line unless a finite number >= 0."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise SettingError(f"reducer setting 'temperature' of 'madtp' must be a finite number >= 0, got {value!r}")
    return float(value)


def checked_codebook(codebook, width: int) -> torch.Tensor:
    """A ``[M, width]`` codebook tensor, refused in one line otherwise."""
    if not isinstance(codebook, torch.Tensor) or codebook.dim() != 2 or codebook.shape[0] < 1:
        shape = tuple(codebook.shape) if isinstance(codebook, torch.Tensor) else type(codebook).__name__
        raise SettingError(f"reducer setting 'codebook' of 'madtp' must be a [codes, {width}] tensor, got {shape}")
    if codebook.shape[1] != width:
        raise SettingError(f"reducer setting 'codebook' of 'madtp' has width {codebook.shape[1]}, but the model's "
                           f"tokens are {width} wide")
    return codebook


def model_codebook(model, width: int, codebook=None) -> torch.Tensor:
    """The codebook to use (see the module docstring)."""
    if codebook is None:
        codebook = getattr(model, CODEBOOK_ATTR, None)
    if codebook is None:
        reference = next(model.parameters())
        codebook = torch.randn(NUM_CODES, width, dtype=reference.dtype, device=reference.device)
    return checked_codebook(codebook, width)


def apply(model, temperature: float = 0.0, codebook: Optional[torch.Tensor] = None, **unknown):
    """Patch every tower of ``model`` that has a MADTP binding and return ``model``.

    A BLIP task model: its ViT and its ``text_encoder`` (see ``text_encoder``); a bare LAVIS ViT: itself; a LAVIS
    CLIP: both towers, each block mapping its tokens to the codebook width first (``patch.clip.apply_madtp``). Every
    setting is checked before any tower is patched.
    """
    if unknown:
        raise SettingError(f"reducer setting {sorted(unknown)[0]!r} is not known for 'madtp': use "
                           f"{', '.join(KNOWN_SETTINGS)}")
    temperature = checked_temperature(temperature)
    if clip_binding.is_clip(model):
        width = clip_binding.code_width(model, codebook)
        return clip_binding.apply_madtp(model, MadtpControl(model_codebook(model, width, codebook), temperature))
    vit = vit_binding.find_vit(model)
    control = MadtpControl(model_codebook(model, vit.embed_dim, codebook), temperature)
    text = text_encoder(model)
    if text is not None:
        checked_codebook(control.codebook, text.config.hidden_size)
    vit_binding.apply_step(model, MadtpStep(control))
    if text is not None:
        med_binding.apply_step(text, MadtpStep(control))
    return model


def text_encoder(model):
    """A BLIP task model's ``text_encoder`` when the text binding covers it (retrieval, VQA, NLVR2), else ``None``.

    BLIP captioning has only a ``text_decoder``: no text pruning there, as in MADTP.
    """
    encoder = getattr(model, "text_encoder", None)
    return encoder if med_binding.is_text_encoder(encoder) else None


def control_of(model) -> MadtpControl:
    """The shared ``MadtpControl`` of a MADTP-patched model, refused in one line for any other model."""
    step = image_step(model)
    if not isinstance(step, MadtpStep):
        raise SettingError(f"{type(model).__name__} has no MADTP reducer applied")
    return step.control


def image_code_features(model) -> torch.Tensor:
    """The image tower's code-pooled features of its last forward, summed over blocks ``[B, M, C]``."""
    return code_features(image_step(model), model)


def image_step(model):
    """The step of a model's image tower (BLIP's ViT, CLIP's ``visual``), or ``None``."""
    if clip_binding.is_clip(model):
        steps = clip_binding.current_steps(model)
        return None if steps is None else steps.image
    return vit_binding.current_step(model)


def text_code_features(model) -> torch.Tensor:
    """The text encoder's code-pooled features of its last forward, summed over layers ``[B, M, C]``."""
    text = text_encoder(model)
    return code_features(None if text is None else med_binding.current_step(text), model)


def code_features(step, module) -> torch.Tensor:
    """``step.pooled`` of a tower's MADTP step (``module`` names the tower in the error when it has none)."""
    if not isinstance(step, MadtpStep):
        raise SettingError(f"{type(module).__name__} has no MADTP reducer applied")
    return step.pooled
