"""Peak memory and the parameters an inference step actually uses, on any device.

Both are context managers meant to wrap one untimed run of the step (they slow every op down). CUDA keeps its own
allocator statistics; the CPU has none, so there the storages that ops allocate are followed through a dispatch
mode (each storage counted once, released when Python frees it).
"""
import weakref
from typing import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def _tensors(tree):
    return [leaf for leaf in tree_leaves(tree) if isinstance(leaf, torch.Tensor)]


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes held by ``tensors``, each storage counted once."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


class _LiveStorages(TorchDispatchMode):
    """Follows the storages that ops allocate and records the peak of their total size."""

    def __init__(self):
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._live = set()

    def _release(self, key, nbytes):
        self._live.discard(key)
        self.live_bytes -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # views and in-place results share an input's storage: they allocate nothing
        inputs = {t.untyped_storage()._cdata for t in _tensors((args, kwargs))}
        for tensor in _tensors(out):
            storage = tensor.untyped_storage()
            key = storage._cdata
            if key in self._live or key in inputs:
                continue
            self._live.add(key)
            self.live_bytes += storage.nbytes()
            weakref.finalize(storage, self._release, key, storage.nbytes())
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        return out


class PeakMemory:
    """``with PeakMemory(device, resident) as memory: ...`` then ``memory.peak_bytes``.

    The peak is the ``resident`` tensors (weights, inputs) plus what the wrapped code allocates on top. On CUDA it is
    the allocator's peak for the device, which already holds the resident tensors.
    """

    def __init__(self, device: torch.device, resident: Iterable[torch.Tensor]):
        self.device = torch.device(device)
        self.resident_bytes = tensor_bytes(resident)
        self.peak_bytes = None
        self._tracker = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._tracker = _LiveStorages().__enter__()
        return self

    def __exit__(self, *exc_info):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self._tracker.__exit__(*exc_info)
            self.peak_bytes = self.resident_bytes + self._tracker.peak_bytes
        return False


class ParameterUse(TorchDispatchMode):
    """``with ParameterUse(model) as use: ...`` then ``use.count``: how many of ``model``'s parameters were read.

    Momentum copies, queues and training-only heads that the step never touches are not counted.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.count = None
        self._read = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._read.update(t.untyped_storage().data_ptr() for t in _tensors((args, kwargs)))
        return func(*args, **(kwargs or {}))

    def __exit__(self, *exc_info):
        self.count = sum(p.numel() for p in self.model.parameters() if p.untyped_storage().data_ptr() in self._read)
        return super().__exit__(*exc_info)
