"""Peak bytes of live tensors while a function runs, on any device: every storage an op creates is counted from
its creation until it is freed.

CPU has no allocator peak counter like ``torch.cuda.max_memory_allocated``, and RSS also moves with the allocator's
caching and the process's other memory; this counts exactly the tensors (activations kept for the backward,
temporaries, gradients), which is what activation checkpointing and saved-tensor choices change.
"""

from __future__ import annotations

import weakref
from typing import Callable, Dict, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class _StorageCounter(TorchDispatchMode):
    """Counts the bytes of the storages that ops return, until each is freed; keeps the peak."""

    def __init__(self):
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._tracked: Dict[int, weakref.ref] = {}

    def _free(self, key: int, nbytes: int) -> None:
        self._tracked.pop(key, None)
        self.live_bytes -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # An output sharing an input's storage (a view, an in-place result) allocated nothing.
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = id(storage)
            if key in self._tracked or key in inputs or storage.nbytes() == 0:
                continue
            nbytes = storage.nbytes()
            # Storages keep their Python object while they live, so the callback fires when the memory is freed.
            self._tracked[key] = weakref.ref(storage, lambda _, key=key, nbytes=nbytes: self._free(key, nbytes))
            self.live_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        return out


def peak_tensor_bytes(fn: Callable[[], object]) -> Tuple[int, object]:
    """(peak bytes of tensors created by ``fn`` that were alive at the same time, ``fn()``'s result).

    Tensors that existed before the call (weights, inputs) are not counted; ops that the dispatcher does not see
    (inside a compiled extension kernel) are counted by the tensors they return.
    """
    counter = _StorageCounter()
    with counter:
        result = fn()
    return counter.peak_bytes, result
