"""Copies of activations on another device, made without stalling a GPU forward (issue 17).

`run_with_cache(device=..., dtype=...)` and `ActivationCache.to(...)` convert through an `Offload`:

- A CUDA tensor bound for the host is copied by a side CUDA stream into pinned host memory,
  with non_blocking=True. The side stream first waits for the compute stream (an event
  recorded when the tensor is handed over), and the source is marked as in use by the side
  stream (`record_stream`), so the caching allocator neither gives its memory to a later
  activation before the copy has read it nor keeps it longer (a reference kept to the end
  of the run would hold the whole cache on the GPU). A dtype conversion or a non-contiguous
  layout is resolved on the GPU, on the side stream, so each copy is one DMA; host copies
  are contiguous. The forward never waits; `finish()` waits once.
- Anything else (a model on the CPU, a copy to a GPU, `asynchronous=False`) is the plain
  `tensor.to(device, dtype)` it always was: no pinning, no stream.

What a copy sees: the value its tensor had when it was handed over, unless something later
writes into that tensor in place before the side stream gets to it. The forward never does
(every layer makes new tensors; hooks replace activations by returning new ones). Autograd
does, to gradients: it adds the next contribution into a gradient tensor nothing else holds,
so gradients are held (`hold=True`) until `finish()`. A user hook that writes in place into
an activation cached earlier (e.g. `t[...] = 0` on resid_pre of layer l + 1, which is
resid_post of layer l) may be seen by the host copy: clone in that hook, or cache on the GPU.

Pinned memory comes from PyTorch's caching host allocator: a run of the same shapes reuses
the blocks an earlier run's cache gave back, while the first run pays for pinning new memory
(cudaHostAlloc, slow for gigabytes; benchmarks/offload.py times both). The allocator rounds
each block up to a power of two and keeps freed blocks pinned for reuse until
`torch._C._host_emptyCache()`. If pinning fails, the rest of the run is copied into ordinary
memory (correct, but each copy then waits for the GPU), with a warning.
"""

from __future__ import annotations

import warnings
import weakref

import torch


class Offload:
    """Converts tensors to `device` / `dtype` (floating point only), each tensor once however often it comes.

    Call it on every tensor, then `finish()` before reading the results.
    """

    def __init__(self, device=None, dtype: torch.dtype | None = None, asynchronous: bool = True) -> None:
        self.device = None if device is None else torch.device(device)
        self.dtype = dtype
        self.asynchronous = asynchronous
        self.pinned_bytes = 0  # host bytes copied through pinned memory (tests and benchmarks read it)
        # (device, address, dtype, shape, strides) -> (weak reference to the source, its version, the copy): a
        # tensor reachable under two names, or two views of the same memory, is copied once. While the source
        # lives its memory cannot hold another tensor, and its version counter tells an in-place change
        # (autograd accumulates gradients into the tensor it handed to a hook earlier). Weak, so that an
        # activation is freed when the forward drops it.
        self._done: dict[tuple, tuple[weakref.ref, int, torch.Tensor]] = {}
        self._streams: dict[torch.device, torch.cuda.Stream] = {}  # one side stream per source GPU
        self._held: list[torch.Tensor] = []  # sources kept to the end (hold=True)
        self._pin_failed = False

    def __call__(self, tensor: torch.Tensor, hold: bool = False) -> torch.Tensor:
        """The copy of `tensor` (readable after finish()). hold: keep the source until finish(), for a tensor
        that someone may otherwise write into in place before a queued copy has read it: a gradient, which
        autograd accumulates into when nothing else holds its storage."""
        key = (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
        hit = self._done.get(key)
        if hit is not None and hit[0]() is not None and hit[1] == _version(tensor):
            return hit[2]
        t = tensor.detach()
        dtype = self.dtype if self.dtype is not None and t.is_floating_point() else t.dtype
        if self.asynchronous and t.is_cuda and self.device is not None and self.device.type == "cpu":
            out = self._to_host(t, dtype)
            if hold:
                self._held.append(tensor)
        else:
            out = t.to(device=self.device, dtype=dtype)
        self._done[key] = (weakref.ref(tensor), _version(tensor), out)
        return out

    def finish(self) -> None:
        """Wait, once, for every copy issued so far; the host tensors may be read after this."""
        for stream in self._streams.values():
            stream.synchronize()
        self._held.clear()

    # ------------------------------------------------------------------ a GPU tensor to the host
    def _to_host(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        stream = self._streams.get(t.device)
        if stream is None:
            stream = self._streams[t.device] = torch.cuda.Stream(t.device)
        stream.wait_stream(torch.cuda.current_stream(t.device))  # the copy reads t as it is now
        with torch.cuda.stream(stream):
            # Temporaries made here belong to the side stream, which is the only one that reads them.
            src = t.to(dtype=dtype, memory_format=torch.contiguous_format)
            dst = self._host_buffer(t.shape, dtype)
            dst.copy_(src, non_blocking=True)
        t.record_stream(stream)
        return dst

    def _host_buffer(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        if not self._pin_failed:
            try:
                buffer = torch.empty(shape, dtype=dtype, pin_memory=True)
            except RuntimeError as err:
                self._pin_failed = True
                warnings.warn(
                    f"pinning host memory for the cache failed ({err}); the rest of it is copied into ordinary "
                    "memory, which waits for the GPU at every tensor. Return pinned memory that caches no "
                    "longer need (del them, then torch._C._host_emptyCache()), or cache fewer hook points",
                    RuntimeWarning, stacklevel=4)
            else:
                self.pinned_bytes += buffer.numel() * buffer.element_size()
                return buffer
        return torch.empty(shape, dtype=dtype)


def _version(t: torch.Tensor) -> int:
    """How often `t` was changed in place; -1 for a tensor made under torch.inference_mode, which keeps no
    count (and no autograd writes into it)."""
    return -1 if t.is_inference() else t._version
