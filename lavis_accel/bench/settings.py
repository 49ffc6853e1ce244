"""The settings a benchmark compares: the stock parent, the SDPA-only baseline, and each reducer at each r or tau."""
from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence, Union

import lavis_accel
from lavis_accel.errors import SettingError
from lavis_accel.patch.madtp import checked_temperature
from lavis_accel.processors import build_reducer
from lavis_accel.reduce.settings import ReducerSettings

PARENT, SDPA, REDUCED = "parent", "sdpa", "reduced"
MADTP = "madtp"


@dataclass(frozen=True)
class MadtpSettings:
    """MADTP at one temperature, with a random codebook (the bench's weights are random too): ``tau = 0`` prunes
    nothing but still pools the code features, MADTP's own overhead."""

    temperature: float
    name: str = MADTP
    r = None  # MADTP has no fixed merge count: it keeps what the threshold lets through

    def as_dict(self):
        return asdict(self)


ReducerChoice = Union[ReducerSettings, MadtpSettings]


@dataclass(frozen=True)
class BenchSetting:
    """One way to run the model. ``reducer`` is ``None`` for LAVIS's stock model (the parent).

    ``role``: ``parent`` (stock LAVIS), ``sdpa`` (the plugin's patch merging nothing, so only attention changes to
    SDPA: the baseline that separates the gain of the reduction from the gain of SDPA) or ``reduced``.
    """

    role: str
    reducer: Optional[ReducerChoice] = None

    @property
    def label(self) -> str:
        if self.reducer is None:
            return "parent (LAVIS)"
        if isinstance(self.reducer, MadtpSettings):
            suffix = " (no pruning)" if self.role == SDPA else ""
            return f"madtp tau={self.reducer.temperature:g}{suffix}"
        if self.role == SDPA:
            return f"{self.reducer.name} r=0 (SDPA only)"
        return f"{self.reducer.name} r={self.reducer.r}"

    def activate(self, model) -> None:
        """Put ``model`` (patched in place) in this setting."""
        if self.reducer is None:
            lavis_accel.remove(model)
        else:
            settings = self.reducer.as_dict()
            lavis_accel.apply(model, settings.pop("name"), **settings)


def reducer_settings(name: str, r, arch_block: Optional[dict]) -> ReducerSettings:
    """Settings of reducer ``name`` at ``r``, taking the task's settings (threshold, ...) from the arch's ``reducer:``
    block, as a yaml switching that block's ``name`` would (``build_reducer``: ToMe drops Turbo's knobs)."""
    if (arch_block or {}).get("name") == MADTP:
        arch_block = None  # a MADTP arch's block holds no ToMe/Turbo settings
    block = {key: value for key, value in (arch_block or {}).items() if key != "name"}
    return build_reducer({**block, "name": name, "r": r}).settings


def reducer_choices(name: str, r_values: Sequence, temperatures: Sequence, arch_block) -> List[ReducerChoice]:
    """Reducer ``name`` at each r (ToMe, Turbo) or each temperature (MADTP)."""
    if name == MADTP:
        if not temperatures:
            raise SettingError("--temperature: give the MADTP temperatures to compare (e.g. --temperature 0.5 1)")
        return [MadtpSettings(checked_temperature(tau)) for tau in temperatures]
    if not r_values:
        raise SettingError("--r: the arch has no reducer block, give the r values to compare (e.g. --r 0 30)")
    return [reducer_settings(name, r, arch_block) for r in r_values]


def baseline_choice(name: str, arch_block) -> ReducerChoice:
    """The reducer patched in but removing nothing: r = 0, or MADTP at tau = 0."""
    return MadtpSettings(0.0) if name == MADTP else reducer_settings(name, 0, arch_block)


def bench_settings(reducers: Sequence[str], r_values: Sequence, arch_block: Optional[dict],
                   temperatures: Sequence = ()) -> List[BenchSetting]:
    """Parent, the baseline of the first reducer (r = 0 / tau = 0), then every reducer at every r or temperature
    (no setting twice)."""
    if not reducers:
        raise SettingError("--reducer: the arch has no reducer block, name one (e.g. --reducer turbo)")
    settings = [BenchSetting(PARENT), BenchSetting(SDPA, baseline_choice(reducers[0], arch_block))]
    for name in reducers:
        for choice in reducer_choices(name, r_values, temperatures, arch_block):
            setting = BenchSetting(REDUCED, choice)
            if all(setting.reducer != existing.reducer for existing in settings):
                settings.append(setting)
    return settings
