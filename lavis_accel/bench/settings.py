"""The settings a benchmark compares: the stock parent, the SDPA-only baseline, and each reducer at each r."""
from dataclasses import dataclass
from typing import List, Optional, Sequence

import lavis_accel
from lavis_accel.errors import SettingError
from lavis_accel.reduce.settings import DEFAULTS, ReducerSettings

PARENT, SDPA, REDUCED = "parent", "sdpa", "reduced"


@dataclass(frozen=True)
class BenchSetting:
    """One way to run the model. ``reducer`` is ``None`` for LAVIS's stock model (the parent).

    ``role``: ``parent`` (stock LAVIS), ``sdpa`` (the plugin's patch merging nothing, so only attention changes to
    SDPA: the baseline that separates the gain of the reduction from the gain of SDPA) or ``reduced``.
    """

    role: str
    reducer: Optional[ReducerSettings] = None

    @property
    def label(self) -> str:
        if self.reducer is None:
            return "parent (LAVIS)"
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
    """Settings of reducer ``name`` at ``r``, taking the task's settings from the arch's ``reducer:`` block.

    Settings of the arch's own reducer carry over whole. For another reducer only the settings the two share (same
    key, same default, e.g. ``threshold``, ``prop_attn``) carry over; method-specific ones (Turbo's ``alpha`` for a
    ToMe run) keep the other reducer's defaults.
    """
    carried = {}
    if arch_block is not None:
        block_name = arch_block.get("name")
        for key, value in arch_block.items():
            if key != "name" and (block_name == name or _shared_setting(key, block_name, name)):
                carried[key] = value
    return ReducerSettings.from_config({**carried, "name": name, "r": r})


def _shared_setting(key, first, second) -> bool:
    """Whether reducers ``first`` and ``second`` both have setting ``key`` with the same default."""
    first_defaults, second_defaults = DEFAULTS.get(first, {}), DEFAULTS.get(second, {})
    return key in first_defaults and key in second_defaults and first_defaults[key] == second_defaults[key]


def bench_settings(reducers: Sequence[str], r_values: Sequence, arch_block: Optional[dict]) -> List[BenchSetting]:
    """Parent, the SDPA baseline (first reducer at r=0), then every reducer at every r (no setting twice)."""
    if not reducers:
        raise SettingError("--reducer: the arch has no reducer block, name one (e.g. --reducer turbo)")
    if not r_values:
        raise SettingError("--r: the arch has no reducer block, give the r values to compare (e.g. --r 0 30)")
    settings = [BenchSetting(PARENT), BenchSetting(SDPA, reducer_settings(reducers[0], 0, arch_block))]
    for name in reducers:
        for r in r_values:
            setting = BenchSetting(REDUCED, reducer_settings(name, r, arch_block))
            if all(setting.reducer != existing.reducer for existing in settings):
                settings.append(setting)
    return settings
