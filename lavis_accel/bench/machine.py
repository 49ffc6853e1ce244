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
