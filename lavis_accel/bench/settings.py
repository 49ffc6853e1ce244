"""The settings a benchmark compares: the stock parent, the SDPA-only baseline, and each reducer at each r or tau
(CrossGET: at each rv x rl); for a distilled student arch, the full-size parent and the student."""
import itertools
import numbers
from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence, Union

import lavis_accel
from lavis_accel.errors import SettingError
from lavis_accel.patch.madtp import checked_temperature
from lavis_accel.processors import build_reducer
from lavis_accel.reduce.settings import ReducerSettings

PARENT, SDPA, REDUCED, STUDENT = "parent", "sdpa", "reduced", "student"
MADTP = "madtp"
CROSSGET = "crossget"


@dataclass(frozen=True)
class MadtpSettings:
    """MADTP at one temperature, with a random codebook (the bench's weights are random too): ``tau = 0`` prunes
    nothing but still pools the code features, MADTP's own overhead."""

    temperature: float
    name: str = MADTP
    r = None  # MADTP has no fixed merge count: it keeps what the threshold lets through

    def as_dict(self):
        return asdict(self)


@dataclass(frozen=True)
class CrossGetSettings:
    """CrossGET with ``rv`` merges per image block and ``rl`` per text block, with fresh zero cross-token offsets
    (the bench's weights are random). ``rv = rl = 0`` merges nothing but still carries the cross tokens (an extra
    key in the image tower, as in the reference): CrossGET's own overhead, its baseline."""

    rv: int
    rl: int = 0
    eot_guard: bool = False
    name: str = CROSSGET

    @property
    def r(self) -> int:
        """The image tower's merges per block: what ``--r`` sets and the plot's x axis."""
        return self.rv

    def as_dict(self):
        return asdict(self)


ReducerChoice = Union[ReducerSettings, MadtpSettings, CrossGetSettings]


@dataclass(frozen=True)
class BenchSetting:
    """One way to run the model. ``reducer`` is ``None`` for LAVIS's stock model (the parent).

    ``role``: ``parent`` (stock LAVIS), ``sdpa`` (the plugin's patch merging nothing, so only attention changes to
    SDPA: the baseline that separates the gain of the reduction from the gain of SDPA), ``reduced``, or
    ``student`` (a distilled student arch: another, smaller model, stock). ``model``: which model the setting
    runs when a bench compares two (``blip_retrieval / flickr``), shown in the label; None when all settings patch
    one model.
    """

    role: str
    reducer: Optional[ReducerChoice] = None
    model: Optional[str] = None

    @property
    def label(self) -> str:
        if self.role == STUDENT:
            return f"student ({self.model})"
        if self.reducer is None:
            return f"parent (LAVIS {self.model})" if self.model else "parent (LAVIS)"
        if isinstance(self.reducer, MadtpSettings):
            suffix = " (no pruning)" if self.role == SDPA else ""
            return f"madtp tau={self.reducer.temperature:g}{suffix}"
        if isinstance(self.reducer, CrossGetSettings):
            suffix = " (cross tokens, no merging)" if self.role == SDPA else ""
            guard = " eot_guard" if self.reducer.eot_guard else ""
            return f"crossget rv={self.reducer.rv} rl={self.reducer.rl}{guard}{suffix}"
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
    if (arch_block or {}).get("name") in (MADTP, CROSSGET):
        arch_block = None  # a MADTP or CrossGET arch's block holds no ToMe/Turbo settings
    block = {key: value for key, value in (arch_block or {}).items() if key != "name"}
    return build_reducer({**block, "name": name, "r": r}).settings


def merge_count(option: str, value) -> int:
    """A CrossGET merge count (``--r`` as rv, ``--rl``) as an int >= 0, refused in one line otherwise; the upper
    bound depends on the tower and is checked when the setting is applied."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 0:
        raise SettingError(f"{option}: crossget's merges per block must be integers >= 0, got {value!r}")
    return int(value)


def crossget_choices(rv_values: Sequence, rl_values: Sequence, arch_block) -> List[CrossGetSettings]:
    """CrossGET at every (rv, rl) pair, rv outer; ``eot_guard`` from a CrossGET arch's ``reducer:`` block."""
    if not rv_values:
        raise SettingError("--r: the arch has no crossget rv, give the image merges per block to compare "
                           "(e.g. --r 0 16)")
    block = arch_block if (arch_block or {}).get("name") == CROSSGET else {}
    guard = bool(block.get("eot_guard", False))
    return [CrossGetSettings(merge_count("--r", rv), merge_count("--rl", rl), guard)
            for rv, rl in itertools.product(rv_values, rl_values)]


def reducer_choices(name: str, r_values: Sequence, temperatures: Sequence, arch_block,
                    rl_values: Sequence = (0,)) -> List[ReducerChoice]:
    """Reducer ``name`` at each r (ToMe, Turbo), each temperature (MADTP) or each (rv, rl) (CrossGET)."""
    if name == MADTP:
        if not temperatures:
            raise SettingError("--temperature: give the MADTP temperatures to compare (e.g. --temperature 0.5 1)")
        return [MadtpSettings(checked_temperature(tau)) for tau in temperatures]
    if name == CROSSGET:
        return crossget_choices(r_values, rl_values, arch_block)
    if not r_values:
        raise SettingError("--r: the arch has no reducer block, give the r values to compare (e.g. --r 0 30)")
    return [reducer_settings(name, r, arch_block) for r in r_values]


def baseline_choice(name: str, arch_block) -> ReducerChoice:
    """The reducer patched in but removing nothing: r = 0, MADTP at tau = 0, CrossGET at rv = rl = 0."""
    if name == MADTP:
        return MadtpSettings(0.0)
    if name == CROSSGET:
        return crossget_choices([0], [0], arch_block)[0]
    return reducer_settings(name, 0, arch_block)


def student_settings(parent: str, student: str) -> List[BenchSetting]:
    """A distilled student's bench: the full-size LAVIS parent (``parent``, e.g. ``blip_retrieval / flickr``), then
    the student (``student``, e.g. ``dlip_retrieval / flickr``), both stock (no SDPA baseline: nothing is patched)."""
    return [BenchSetting(PARENT, model=parent), BenchSetting(STUDENT, model=student)]


def bench_settings(reducers: Sequence[str], r_values: Sequence, arch_block: Optional[dict],
                   temperatures: Sequence = (), rl_values: Sequence = (0,)) -> List[BenchSetting]:
    """Parent, the baseline of the first reducer (r = 0 / tau = 0 / rv = rl = 0), then every reducer at every r,
    temperature or (rv, rl) (no setting twice). ``rl_values`` (text merges) are CrossGET's alone."""
    if not reducers:
        raise SettingError("--reducer: the arch has no reducer block, name one (e.g. --reducer turbo)")
    if CROSSGET not in reducers and any(rl != 0 for rl in rl_values):
        raise SettingError("--rl: only crossget merges text tokens, add it to --reducer (e.g. --reducer crossget)")
    settings = [BenchSetting(PARENT), BenchSetting(SDPA, baseline_choice(reducers[0], arch_block))]
    for name in reducers:
        for choice in reducer_choices(name, r_values, temperatures, arch_block, rl_values):
            setting = BenchSetting(REDUCED, choice)
            if all(setting.reducer != existing.reducer for existing in settings):
                settings.append(setting)
    return settings
