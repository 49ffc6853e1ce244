"""What every registered CrossGET variant adds to its LAVIS parent: cross-token offsets, the reducer, the JS loss.

A variant is its LAVIS parent plus
- the learnable cross-token offsets ``[1, blocks, width]`` of each tower, zero-initialised as in the reference (a
  family names them: ``crossget_offset_names``). A stock LAVIS checkpoint has none: they start at zero, and
  ``PARAMETERS_STARTING_FRESH`` tells the plugin's checkpoint checks so. With zero offsets CrossGET runs as applied
  without training.
- CrossGET's steps on every tower with a binding (``patch.crossget.apply``), from the ``reducer:`` block
  (``name: crossget``, ``rv``, ``rl``), which read the model's own offsets.

The API the training task uses: ``crossget_kd_loss()``, the JS-style loss between the two towers' per-block cross
tokens of the last forward (each family says how its cross tokens are normed and projected:
``crossget_cross_features``).
"""
from typing import Tuple

import torch
from torch import nn

from lavis_accel.errors import SettingError
from lavis_accel.models.reduced import ReducedModel
from lavis_accel.reduce import crossget



class CrossGetModel(ReducedModel):
    """Mixin placed before a LAVIS model class (see the module docstring)."""

    REDUCER_NAME = "crossget"
    REDUCER_BLOCK = "name: crossget, rv, rl"
    PARAMETERS_STARTING_FRESH: Tuple[str, ...] = ()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_cross_offsets()
        self.PARAMETERS_STARTING_FRESH = tuple(self.crossget_offset_names())

    def add_cross_offsets(self):
        """Register each tower's zero offsets (``crossget_offset_names``) where the family keeps them."""
        raise NotImplementedError(f"{type(self).__name__} must say where its cross-token offsets live")

    def crossget_offset_names(self) -> Tuple[str, ...]:
        """The state-dict names of the offsets (image, text)."""
        raise NotImplementedError(f"{type(self).__name__} must name its cross-token offsets")

    def crossget_cross_features(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The (image, text) per-block cross tokens of the last forward, stacked ``[L * B, E]``, normed and projected
        (detached norms and projections)."""
        raise NotImplementedError(f"{type(self).__name__} must say how its cross tokens are projected")

    def crossget_kd_loss(self) -> torch.Tensor:
        """CrossGET's JS-style loss between the towers' cross tokens of the last forward (``reduce.crossget``)."""
        image, text = self.crossget_cross_features()
        return crossget.js_loss(image, text)


def zero_offsets(depth: int, width: int, like: torch.Tensor) -> nn.Parameter:
    """A ``[1, depth, width]`` zero parameter on ``like``'s device and dtype (CrossGET's initialisation)."""
    return nn.Parameter(torch.zeros(1, depth, width, dtype=like.dtype, device=like.device))


def recorded_cross_tokens(step, tower: str):
    """A step's per-block cross tokens of the last forward, refused in one line when there are none."""
    tokens = getattr(step, "cross_tokens", None)
    if not tokens:
        raise SettingError(f"CrossGET's loss needs a forward of the {tower} tower with the crossget reducer applied")
    return tokens
