"""What every registered MADTP variant adds to its LAVIS parent: a codebook, a saved tau, the alignment loss.

A variant is its LAVIS parent plus
- ``madtp_codebook`` ``[100, width]``: the codebook the towers share (MADTP's ``space_dict``), ``randn`` at start.
  A stock LAVIS checkpoint has none: the codebook starts fresh, as in MADTP (``PARAMETERS_STARTING_FRESH`` tells
  the plugin's checkpoint checks so).
- ``madtp_temperature``: tau, a 0-dim buffer saved in checkpoints. Every ``load_state_dict`` whose state dict holds
  it re-syncs the patched steps, so a resumed or evaluated model prunes as the saved one did.
- MADTP steps on every tower with a binding, sharing one ``MadtpControl``: the ViT and the text encoder
  (``patch.madtp.apply``), plus ``MOMENTUM_TOWERS``, each with its own step (their pooled features differ).

The API the training task uses: ``temperature`` / ``set_temperature`` (no rebuild), ``alignment_loss()`` (MADTP's
``loss_fdt`` of the last training forward) and ``with model.unpruned():`` (the parent's compute, e.g. to measure
its GFLOPs). The mixin is shared by the BLIP and CLIP variants; a variant says which passes feed the loss
(``TEXT_PASS``, ``madtp_feature_pairs``) and what the reference uses instead at tau = 0 (``madtp_task_loss``).
"""
import contextlib
import logging
import math
import types
from typing import List, Optional, Tuple

import torch
from torch import nn

from lavis_accel import patch as patching
from lavis_accel.errors import SettingError
from lavis_accel.models.reduced import ReducedModel
from lavis_accel.patch import madtp as madtp_patch
from lavis_accel.patch import med as med_binding
from lavis_accel.patch import vit as vit_binding
from lavis_accel.patch.steps import MadtpStep
from lavis_accel.reduce import madtp

CODEBOOK = madtp_patch.CODEBOOK_ATTR
TEMPERATURE = "madtp_temperature"
START_TEMPERATURE = 1.0  # MADTP's tau before its controller moves it
RECORDER_ATTR = "_lavis_accel_text_pass"
logger = logging.getLogger(__name__)


class TextPassRecorder:
    """Keeps the code-pooled features of one text-encoder method's last call (later passes overwrite the step's)."""

    def __init__(self, name: str, original):
        self.name = name
        self.original = original  # the encoder's instance-level attribute before wrapping, or None
        self.features = None


def _recording_text_pass(encoder, *args, **kwargs):
    """The wrapped text pass: the encoder's own method, then its step's pooled features are kept (none when the
    step was removed, e.g. by ``lavis_accel.remove``)."""
    recorder = getattr(encoder, RECORDER_ATTR)
    method = recorder.original or types.MethodType(getattr(type(encoder), recorder.name), encoder)
    output = method(*args, **kwargs)
    step = med_binding.current_step(encoder)
    recorder.features = None if step is None else step.pooled
    return output


class MadtpModel(ReducedModel):
    """Mixin placed before a LAVIS model class (see the module docstring). ``from_config`` builds the parent, loads
    its checkpoint, then the ``reducer:`` block (``name: madtp``, ``temperature``) calls ``attach_madtp``."""

    REDUCER_NAME = "madtp"
    REDUCER_BLOCK = "name: madtp, temperature"
    PARAMETERS_STARTING_FRESH: Tuple[str, ...] = (CODEBOOK,)
    TEXT_PASS: Optional[str] = None  # the text_encoder method whose pass feeds the loss (None: no text pruning)
    MOMENTUM_TOWERS: Tuple[Tuple[str, types.ModuleType], ...] = ()  # (attribute, binding) with their own step

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        reference = next(self.parameters())
        like = {"dtype": reference.dtype, "device": reference.device}
        self.madtp_codebook = nn.Parameter(torch.randn(madtp_patch.NUM_CODES, self.madtp_code_width(), **like))
        self.register_buffer(TEMPERATURE, torch.tensor(START_TEMPERATURE, **like))
        self._madtp_tau = START_TEMPERATURE
        self._madtp_tau_loaded = False
        self._madtp_alignment = None


    def madtp_code_width(self) -> int:
        """Width of the codebook: BLIP's ViT width (its query module has no projection)."""
        return self.visual_encoder.embed_dim

    # --- tau -------------------------------------------------------------------------------------------------------

    @property
    def temperature(self) -> float:
        """tau of the pruning steps (0 prunes nothing), as saved in ``madtp_temperature``."""
        return self._madtp_tau

    def set_temperature(self, temperature: float):
        """Set tau in the buffer and in the patched steps (read at their next forward); nothing is rebuilt."""
        tau = madtp_patch.checked_temperature(temperature)
        with torch.no_grad():
            self.madtp_temperature.fill_(tau)
        self._adopt_temperature(float(self.madtp_temperature))  # as saved: a resumed run continues from this tau

    def attach_madtp(self, temperature: float):
        """Patch every tower; tau is the loaded checkpoint's, else ``temperature`` (the reducer block's)."""
        tau = self._madtp_tau if self._madtp_tau_loaded else temperature
        if self._madtp_tau_loaded and tau != temperature:
            logger.info("%s: MADTP tau %g from the checkpoint (the reducer block's %g is for checkpoints without one)",
                        type(self).__name__, tau, temperature)
        self.set_temperature(tau)
        if self._is_patched():
            self._unpatch_towers()
        self._patch_towers()
        return self

    def _adopt_temperature(self, tau: float):
        self._madtp_tau = tau
        if self._is_patched():
            madtp_patch.control_of(self).temperature = tau

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """After the stock load, a state dict holding tau sets the steps' tau (resume, evaluate, ``finetuned``)."""
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + TEMPERATURE in state_dict:
            tau = float(self.madtp_temperature)
            if not math.isfinite(tau) or tau < 0:
                raise SettingError(f"checkpoint: {prefix + TEMPERATURE} must be a finite number >= 0, got {tau}")
            self._madtp_tau_loaded = True
            self._adopt_temperature(tau)

    # --- towers ----------------------------------------------------------------------------------------------------

    def _is_patched(self) -> bool:
        return vit_binding.is_patched(self)

    def _patch_towers(self):
        madtp_patch.apply(self, temperature=self._madtp_tau)
        control = madtp_patch.control_of(self)
        for name, binding in self.MOMENTUM_TOWERS:
            binding.apply_step(getattr(self, name), MadtpStep(control))
        if self.TEXT_PASS is not None:
            encoder = self.text_encoder
            setattr(encoder, RECORDER_ATTR, TextPassRecorder(self.TEXT_PASS, encoder.__dict__.get(self.TEXT_PASS)))
            setattr(encoder, self.TEXT_PASS, types.MethodType(_recording_text_pass, encoder))

    def _unpatch_towers(self):
        if self.TEXT_PASS is not None:
            encoder = self.text_encoder
            recorder = encoder.__dict__.pop(RECORDER_ATTR)
            delattr(encoder, self.TEXT_PASS)
            if recorder.original is not None:
                setattr(encoder, self.TEXT_PASS, recorder.original)
        for name, binding in self.MOMENTUM_TOWERS:
            binding.remove(getattr(self, name))
        patching.remove(self)

    @contextlib.contextmanager
    def unpruned(self):
        """Run the parent's compute inside the block: every MADTP patch is removed, then restored (same tau and
        codebook) on leaving."""
        patched = self._is_patched()
        if patched:
            self._unpatch_towers()
        try:
            yield self
        finally:
            if patched:
                self._patch_towers()

    # --- the alignment loss ----------------------------------------------------------------------------------------

    def forward(self, samples, *args, **kwargs):
        """The parent's forward; a training forward of a patched model also keeps its alignment term."""
        output = super().forward(samples, *args, **kwargs)
        if self.training:
            self._madtp_alignment = self._alignment_term(output) if self._is_patched() else None
        return output

    def alignment_loss(self) -> Optional[torch.Tensor]:
        """MADTP's alignment term (``loss_fdt``, summed with ``loss_fdt_m`` where the model has momentum towers) of
        the last training forward; ``None`` when there was none (or it ran unpruned). The task adds 0.1 of it.

        Where the reference has no alignment term, at tau = 0 and always for captioning (no text pruning), it uses the
        task loss in its place (``madtp_task_loss``): so does this. The codebook then learns only through the
        importance weights of the fused tokens (none at tau = 0)."""
        return self._madtp_alignment

    def _alignment_term(self, output) -> torch.Tensor:
        """The term, plus ``0 * codebook``: under DDP (LAVIS wraps without ``find_unused_parameters``) a step whose
        loss never reached the codebook (tau = 0, captioning without any pruning) would fail its gradient
        reduction; the zero keeps the codebook in every graph and changes no value or gradient."""
        pairs = self.madtp_feature_pairs() if self._madtp_tau > 0 else []
        term = self.madtp_task_loss(output) if not pairs else sum(
            madtp.alignment_loss(image, text) for image, text in pairs)
        return term + 0.0 * self.madtp_codebook.sum()

    def madtp_feature_pairs(self) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """The (image, text) code-pooled features ``[B, M, C]`` whose alignment terms are summed: the ViT's and the
        ``TEXT_PASS``'s; none without text pruning."""
        if self.TEXT_PASS is None:
            return []
        return [(madtp_patch.image_code_features(self), self.text_pass_features())]

    def text_pass_features(self) -> torch.Tensor:
        """The code-pooled features of the last ``TEXT_PASS`` call of the text encoder."""
        recorder = getattr(self.text_encoder, RECORDER_ATTR)
        if recorder.features is None:
            raise SettingError(f"{type(self).__name__}: its text encoder has not run {self.TEXT_PASS} yet")
        return recorder.features

    def madtp_task_loss(self, output) -> torch.Tensor:
        """What the reference uses as ``loss_fdt`` when it has no alignment term (tau = 0, no text pruning): the task
        loss."""
        return output.loss
