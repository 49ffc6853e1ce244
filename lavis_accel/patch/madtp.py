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

    A BLIP task model: its ViT (and, with the text binding, its text encoders); a bare LAVIS ViT: itself.
    """
    if unknown:
        raise SettingError(f"reducer setting {sorted(unknown)[0]!r} is not known for 'madtp': use "
                           f"{', '.join(KNOWN_SETTINGS)}")
    temperature = checked_temperature(temperature)
    vit = vit_binding.find_vit(model)
    control = MadtpControl(model_codebook(model, vit.embed_dim, codebook), temperature)
    vit_binding.apply_step(model, MadtpStep(control))
    return model


def control_of(model) -> MadtpControl:
    """The shared ``MadtpControl`` of a MADTP-patched model, refused in one line for any other model."""
    step = vit_binding.current_step(model)
    if not isinstance(step, MadtpStep):
        raise SettingError(f"{type(model).__name__} has no MADTP reducer applied")
    return step.control


def image_code_features(model) -> torch.Tensor:
    """The ViT's code-pooled features of its last forward, summed over blocks ``[B, M, C]``."""
    return code_features(vit_binding.current_step(model), model)


def code_features(step, module) -> torch.Tensor:
    """``step.pooled`` of a tower's MADTP step (``module`` names the tower in the error when it has none)."""
    if not isinstance(step, MadtpStep):
        raise SettingError(f"{type(module).__name__} has no MADTP reducer applied")
    return step.pooled
