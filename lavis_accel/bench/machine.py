"""What a benchmark ran on, recorded beside its figures: speed-ups mean little without the machine behind them."""
import os
import platform

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _cpu_model_and_flags():
    """The CPU's model name and feature flags from ``/proc/cpuinfo`` (Linux), else what ``platform`` knows."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                if model and flags:
                    break
    except OSError:
        pass
    return model, flags


def machine_info(device: torch.device, dtype: torch.dtype) -> dict:
    """CPU model, cores and torch threads, bf16 support, torch and Python versions, device (and GPU) and dtype."""
    model, flags = _cpu_model_and_flags()
    info = {
        "cpu": model,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_bf16_instructions": bool(flags & {"avx512_bf16", "amx_bf16"}),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# Timing is not trusted when other processes used more than this share of all CPUs meanwhile.
BUSY_SHARE = 0.10


def _cpu_ticks():
    """``(busy, total)`` clock ticks of all CPUs since boot, from the first line of ``/proc/stat``; None elsewhere."""
    try:
        with open("/proc/stat", encoding="utf-8") as f:
            fields = [int(value) for value in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _own_ticks():
    times = os.times()
    return (times.user + times.system) * os.sysconf("SC_CLK_TCK")


class OtherLoad:
    """Context that measures the share of the machine's CPU time other processes used while it was open.

    A busy neighbour slows the settings of a round unequally (a step with more threads waits more), a bias that
    paired ratios do not cancel and that a narrow interval does not reveal: it is measured directly instead.
    ``share`` is None where ``/proc/stat`` is unavailable.
    """

    share = None

    def __enter__(self):
        self._start = (_cpu_ticks(), _own_ticks())
        return self

    def __exit__(self, *exc):
        machine, own = _cpu_ticks(), _own_ticks()
        if machine is not None and self._start[0] is not None:
            busy, total = (end - start for end, start in zip(machine, self._start[0]))
            others = busy - (own - self._start[1])
            self.share = max(0.0, others / total) if total > 0 else None
        return False
