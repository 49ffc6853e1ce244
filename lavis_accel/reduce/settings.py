"""Validated settings of a token reducer, built from a ``reducer:`` config block or keyword arguments.

One frozen dataclass holds what ToMe and Turbo need. Every bad value is refused with one line naming the setting,
so a typo in a yaml fails at model build time, before any data is loaded.
"""
import dataclasses
import math
import numbers
from typing import List, Tuple, Union

from omegaconf import DictConfig, OmegaConf

from lavis_accel.errors import SettingError

RSchedule = Union[int, Tuple[int, float], List[int]]

# Per-reducer defaults. ``alpha`` is the Turbo README's recommended 5 (the code's argparse default is 1); ToMe is
# Turbo with alpha fixed to 0. ``threshold`` 40 is the Turbo reference's ``apply_patch`` default; ToMe's default is
# 1, which never skips, as in facebookresearch/ToMe (the registered models' yamls set the threshold explicitly).
DEFAULTS = {
    "tome": {"r": 0, "alpha": 0.0, "beta": 1.0, "gamma": 0.0, "threshold": 1, "prop_attn": True,
             "scale_alpha": False},
    "turbo": {"r": 0, "alpha": 5.0, "beta": 1.0, "gamma": 0.0, "threshold": 40, "prop_attn": True,
              "scale_alpha": False},
}
KNOWN_REDUCERS = tuple(DEFAULTS)
TURBO_ONLY = ("alpha", "beta", "gamma", "scale_alpha")  # Turbo's semantic-term knobs; ToMe has none


@dataclasses.dataclass(frozen=True)
class ReducerSettings:
    """Settings of a ToMe/Turbo reducer.

    - ``r``: tokens merged per block: an int (constant), an ``(r, inflection)`` tuple (ToMe's linear ramp, e.g.
      ``(r, -1)`` for the decreasing schedule) or an explicit per-layer list (zero-padded to the depth).
    - ``alpha``, ``beta``, ``gamma``: weight ``alpha * 30 * beta ** |gamma - l|`` of the [CLS]-attention term of
      Turbo's informativity score (l = merging layers run so far in the forward). ``alpha = 0`` is ToMe.
    - ``scale_alpha``: scale ``alpha`` by ``t / 577`` in a block of ``t`` tokens (off by default: the reference's
      behaviour). Turbo tuned alpha on ViT-B/16 at 384 px (577 tokens); [CLS] attention probabilities grow as ``1 / t``,
      so with fewer tokens the unscaled semantic term outweighs redundancy.
    - ``threshold``: a block merges only while its token count ``t >= threshold``.
    - ``prop_attn``: add ``log(size)`` of merged tokens to the attention logits (proportional attention).

    Build it with ``from_config``, which fills in the reducer's defaults (``DEFAULTS``).
    """

    name: str
    r: RSchedule
    alpha: float
    beta: float
    gamma: float
    threshold: int
    prop_attn: bool
    scale_alpha: bool = False

    @classmethod
    def from_config(cls, cfg):
        """Build from a ``reducer:`` block: an OmegaConf DictConfig or a plain mapping with a ``name`` key.

        Unset settings take the reducer's defaults.
        """
        values = plain_config(cfg)
        name = _checked_name(values.pop("name", None))
        fields = [field.name for field in dataclasses.fields(cls) if field.name != "name"]
        for key in values:
            if key not in fields:
                raise SettingError(f"reducer setting {key!r} is not known for {name!r}: use {', '.join(fields)}")
        return cls(name=name, **{**DEFAULTS[name], **values})

    def __post_init__(self):
        _checked_name(self.name)
        object.__setattr__(self, "r", _checked_r(self.r))
        object.__setattr__(self, "alpha", _checked_number("alpha", self.alpha, minimum=0.0))
        object.__setattr__(self, "beta", _checked_number("beta", self.beta, minimum=0.0))
        object.__setattr__(self, "gamma", _checked_number("gamma", self.gamma, minimum=0.0))
        object.__setattr__(self, "threshold", _checked_threshold(self.threshold))
        for key in ("prop_attn", "scale_alpha"):
            if not isinstance(getattr(self, key), bool):
                raise SettingError(f"reducer setting {key!r} must be True or False, got {getattr(self, key)!r}")
        if self.name == "tome" and self.alpha != 0:
            raise SettingError(f"reducer setting 'alpha' is fixed to 0 for 'tome', got {self.alpha}: use 'turbo'")
        if self.name == "tome" and self.scale_alpha:
            raise SettingError("reducer setting 'scale_alpha' is for 'turbo' ('tome' has no semantic term)")

    def as_dict(self):
        """The settings as keyword arguments (``name`` included), e.g. to log or rebuild them."""
        return dataclasses.asdict(self)


def plain_config(cfg) -> dict:
    """A ``reducer:`` block (DictConfig or mapping) as a plain dict, refusing anything else in one line."""
    if cfg is None:
        raise SettingError("reducer config is empty: it needs at least a 'name'")
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    if not isinstance(cfg, dict):
        raise SettingError(f"reducer config must be a mapping, got {type(cfg).__name__}")
    return dict(cfg)


def _checked_name(name):
    if name not in DEFAULTS:
        raise SettingError(f"reducer name {name!r} is not known: use one of {', '.join(KNOWN_REDUCERS)}")
    return name


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _checked_r(r):
    shape = "a non-negative integer, an (r, inflection) tuple or a list of per-layer non-negative integers"
    if _is_int(r) and r >= 0:
        return int(r)
    if isinstance(r, tuple) and len(r) == 2 and _is_int(r[0]) and r[0] >= 0:
        inflection = r[1]
        if isinstance(inflection, numbers.Real) and not isinstance(inflection, bool) and math.isfinite(inflection):
            return (int(r[0]), float(inflection))
    if isinstance(r, list) and all(_is_int(value) and value >= 0 for value in r):
        return [int(value) for value in r]
    raise SettingError(f"reducer setting 'r' must be {shape}, got {r!r}")


def _checked_number(key, value, minimum):
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
        raise SettingError(f"reducer setting {key!r} must be a finite number, got {value!r}")
    if value < minimum:
        raise SettingError(f"reducer setting {key!r} must be >= {minimum:g}, got {value!r}")
    return float(value)


def _checked_threshold(threshold):
    if not _is_int(threshold) or threshold < 1:
        raise SettingError(f"reducer setting 'threshold' must be an integer >= 1, got {threshold!r}")
    return int(threshold)
