"""The settings a benchmark compares: the stock parent, the SDPA-only baseline, and each reducer at each r."""
from dataclasses import dataclass
from typing import List, Optional, Sequence

import lavis_accel
from lavis_accel.errors import SettingError
from lavis_accel.processors import build_reducer
from lavis_accel.reduce.settings import ReducerSettings

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
    """Settings of reducer ``name`` at ``r``, taking the task's settings (threshold, ...) from the arch's ``reducer:``
    block, as a yaml switching that block's ``name`` would (``build_reducer``: ToMe drops Turbo's knobs)."""
    block = {key: value for key, value in (arch_block or {}).items() if key != "name"}
    return build_reducer({**block, "name": name, "r": r}).settings


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
