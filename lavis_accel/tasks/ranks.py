"""What the plugin's tasks need across DDP ranks: the model inside the wrapper, and means over every rank."""
from typing import Optional

import torch
import torch.distributed as dist


def unwrapped(model):
    """The model inside DDP (LAVIS's runner hands the wrapped one to ``train_epoch``)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def add_to_mean(total: Optional[torch.Tensor], value: torch.Tensor) -> torch.Tensor:
    """A running ``[sum, count]`` with one more (detached, float) value."""
    value = value.detach().float()
    pair = torch.stack([value, torch.ones_like(value)])
    return pair if total is None else total + pair


def mean_over_ranks(total: Optional[torch.Tensor]) -> Optional[float]:
    """The mean of a running ``[sum, count]`` over every rank (``None`` when nothing was added)."""
    if total is None:
        return None
    if dist.is_available() and dist.is_initialized():
        total = total.clone()
        dist.all_reduce(total)
    return float(total[0] / total[1])
