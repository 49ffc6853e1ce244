"""Throughput of several settings of one model, timed interleaved in one process so drift hits all alike."""
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence

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


def time_interleaved(
    contenders: Sequence[Contender],
    samples_per_step: int,
    device: torch.device,
    warmup: int = 1,
    repeats: int = 5,
    progress: Callable[[str], None] = lambda message: None,
) -> Dict[str, List[float]]:
    """Samples per second of each contender, ``repeats`` times each, after ``warmup`` untimed steps each.

    Each round times every contender once; the order rotates from round to round so that no setting always runs
    first (or right after the same neighbour).
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"time_interleaved: repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    rates = {contender.name: [] for contender in contenders}
    for contender in contenders if warmup else ():
        contender.activate()
        for _ in range(warmup):
            contender.step()
        progress(f"warmed up {contender.name}")
    for round_index in range(repeats):
        shift = round_index % len(contenders)
        for contender in list(contenders[shift:]) + list(contenders[:shift]):
            contender.activate()
            synchronize(device)
            start = time.perf_counter()
            contender.step()
            synchronize(device)
            rates[contender.name].append(samples_per_step / (time.perf_counter() - start))
        summary = ", ".join(f"{name} {values[-1]:.3g}/s" for name, values in rates.items())
        progress(f"round {round_index + 1}/{repeats}: {summary}")
    return rates


def median_and_spread(values: Sequence[float]) -> tuple:
    """Median and interquartile range (0 for a single value)."""
    if len(values) < 2:
        return float(values[0]), 0.0
    lower, _, upper = statistics.quantiles(values, n=4, method="inclusive")
    return float(statistics.median(values)), float(upper - lower)
