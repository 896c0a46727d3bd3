"""Exact peak memory of the tensors a piece of code allocates: `LiveBytes` (a dispatch mode) and `peak_bytes`.

What it counts: the storage of every tensor an aten op returns that no input of the op shares (views and in-place
results do not count again), from the op that allocates it until the storage is freed, on any device (meta tensors
aside). Model-agnostic and deterministic, unlike the process's resident size or the CUDA allocator's statistics,
which reuse, caching and page granularity blur. What it misses: memory a kernel allocates and frees inside itself
(scratch space, e.g. the CPU flash-attention kernel's per-thread blocks), tensors made outside the `with` block
(weights, inputs), and allocator overhead (rounding, cached free blocks).
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveBytes(TorchDispatchMode):
    """Bytes of tensor storage allocated by aten ops inside the `with` block and still alive; `.peak` their maximum.

    A storage is new when no input of the op shares it (views and in-place results do not count again); it is
    counted until it is freed (a weak reference to the storage). Exact and deterministic, unlike the process's
    resident size, which the allocator's reuse and page granularity blur; what it does not see is memory a kernel
    allocates and frees inside itself (for attention, the flash kernel's per-thread blocks, which do not grow
    with the sequence length).
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = self.peak = 0
        self._seen: set[int] = set()
        self._refs: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = id(storage)
            if key in inputs or key in self._seen:
                continue
            self._seen.add(key)
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
            self._refs.append(weakref.ref(storage, _Release(self, key, storage.nbytes())))
        return out


class _Release:
    def __init__(self, tracker: LiveBytes, key: int, nbytes: int) -> None:
        self.tracker, self.key, self.nbytes = tracker, key, nbytes

    def __call__(self, _ref) -> None:
        self.tracker.current -= self.nbytes
        self.tracker._seen.discard(self.key)


def peak_bytes(fn) -> int:
    """Peak bytes of tensors allocated while `fn()` runs (its result included until it is dropped)."""
    with LiveBytes() as tracker:
        out = fn()
        del out
    return tracker.peak
