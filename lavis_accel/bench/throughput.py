"""Throughput of several settings of one model, timed interleaved in one process so drift hits all alike, and
speed-ups taken from paired rounds so that what slows one round down (another process, a frequency change) cancels.
"""
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch


@dataclass
class Contender:
    """One setting to time: ``activate()`` puts the model in this setting (untimed), ``step()`` is timed."""

    name: str
    activate: Callable[[], None]
    step: Callable[[], object]


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so a timer measures work done rather than work launched."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_rate(contender: Contender, samples_per_step: int, device: torch.device, min_time: float) -> float:
    """Samples per second of one measurement: the step repeated until ``min_time`` seconds have passed (once at
    least), so that a short step is not timed at the clock's resolution."""
    contender.activate()
    synchronize(device)
    start, steps = time.perf_counter(), 0
    while True:
        contender.step()
        steps += 1
        synchronize(device)
        elapsed = time.perf_counter() - start
        if elapsed >= min_time:
            return steps * samples_per_step / elapsed


def time_interleaved(
    contenders: Sequence[Contender],
    samples_per_step: int,
    device: torch.device,
    warmup: int = 1,
    repeats: int = 5,
    progress: Callable[[str], None] = lambda message: None,
    min_time: float = 0.0,
    max_repeats: Optional[int] = None,
    settled: Callable[[Dict[str, List[float]]], bool] = lambda rates: True,
) -> Dict[str, List[float]]:
    """Samples per second of each contender, one value per round, after ``warmup`` untimed steps each.

    Each round times every contender once (each measurement lasting ``min_time`` seconds at least); the order
    rotates from round to round so that no setting always runs first (or right after the same neighbour). After
    ``repeats`` rounds, more rounds are run, up to ``max_repeats``, until ``settled(rates)`` says they suffice.
    """
    max_repeats = repeats if max_repeats is None else max_repeats
    if repeats < 1 or warmup < 0 or max_repeats < repeats or min_time < 0:
        raise ValueError(f"time_interleaved: need repeats >= 1, warmup >= 0, max_repeats >= repeats and "
                         f"min_time >= 0, got {repeats}, {warmup}, {max_repeats} and {min_time}")
    rates = {contender.name: [] for contender in contenders}
    for contender in contenders if warmup else ():
        contender.activate()
        for _ in range(warmup):
            contender.step()
        progress(f"warmed up {contender.name}")
    round_index = 0
    while round_index < repeats or (round_index < max_repeats and not settled(rates)):
        shift = round_index % len(contenders)
        for contender in list(contenders[shift:]) + list(contenders[:shift]):
            rates[contender.name].append(_timed_rate(contender, samples_per_step, device, min_time))
        round_index += 1
        summary = ", ".join(f"{name} {values[-1]:.3g}/s" for name, values in rates.items())
        progress(f"round {round_index}/{repeats if round_index <= repeats else max_repeats}: {summary}")
    return rates


# A speed-up is trusted when its confidence interval is no wider than this share of it on either side.
TRUSTED_HALF_WIDTH = 0.05
CONFIDENCE = 0.95


@dataclass(frozen=True)
class PairedRatio:
    """The median of per-round ratios (a setting's rate over the baseline's rate in the same round) with a
    distribution-free confidence interval for that median (order statistics of the ratios)."""

    median: float
    low: float
    high: float
    level: float  # the interval's coverage: CONFIDENCE, or less when there are too few rounds for it
    rounds: int

    @property
    def trusted(self) -> bool:
        return self.level >= CONFIDENCE and (self.high - self.low) / 2 <= TRUSTED_HALF_WIDTH * self.median


def _median_interval_rank(rounds: int, confidence: float = CONFIDENCE) -> tuple:
    """``(k, level)``: the interval ``[x(k), x(n-k+1)]`` of the sorted values covers the median with probability
    ``level >= confidence`` for the largest such k (binomial order statistics); k = 1 (min, max) when n is too
    small, with the level it reaches."""
    tail, k = 0.0, 0
    while True:
        next_tail = tail + math.comb(rounds, k) / 2 ** rounds
        if 1 - 2 * next_tail < confidence or k + 1 > rounds - k:
            break
        tail, k = next_tail, k + 1
    k = max(k, 1)
    level = 1 - 2 * sum(math.comb(rounds, i) for i in range(k)) / 2 ** rounds
    return k, level


def paired_ratio(rates: Sequence[float], baseline: Sequence[float]) -> PairedRatio:
    """Speed-up of ``rates`` over ``baseline`` (same rounds): median per-round ratio and its confidence interval."""
    ratios = sorted(rate / base for rate, base in zip(rates, baseline))
    k, level = _median_interval_rank(len(ratios))
    return PairedRatio(statistics.median(ratios), ratios[k - 1], ratios[len(ratios) - k], level, len(ratios))


def median_and_spread(values: Sequence[float]) -> tuple:
    """Median and interquartile range (0 for a single value)."""
    if len(values) < 2:
        return float(values[0]), 0.0
    lower, _, upper = statistics.quantiles(values, n=4, method="inclusive")
    return float(statistics.median(values)), float(upper - lower)
