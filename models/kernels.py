"""A GPU kernel the toolkit writes itself, used only where PyTorch has none that does the job in one pass.

`causal_softmax_`: the attention pattern of plain causal attention, softmax over each row's visible keys,
in place over the scores `[batch, heads, query, key]`. PyTorch needs a masked_fill pass and a softmax pass
over the [query, key] scores for this (its own masked softmax is slower than both together on an H100), and
that second pass is most of what caching hook_pattern costs beside the fused attention kernel. Triton
compiles it on first use (about a second); without Triton (CPU builds of PyTorch) `available()` is False
and models.attention keeps the two PyTorch passes.
"""

from __future__ import annotations

import functools

import torch

MAX_KEYS = 8192  # a row lives in registers; longer rows take the PyTorch passes


@functools.lru_cache(maxsize=1)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def causal_softmax_rows(x_ptr, n_query, n_key, offset, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        query = row % n_query
        cols = tl.arange(0, BLOCK)
        inside = cols < n_key
        seen = inside & (cols <= query + offset)  # query i (at position offset + i) sees keys 0..offset + i
        ptrs = x_ptr + row * n_key + cols
        x = tl.load(ptrs, mask=seen, other=float("-inf")).to(tl.float32)
        e = tl.where(seen, tl.exp(x - tl.max(x, axis=0)), 0.0)
        tl.store(ptrs, (e / tl.sum(e, axis=0)).to(x_ptr.dtype.element_ty), mask=inside)

    return triton, causal_softmax_rows


@functools.lru_cache(maxsize=1)
def available() -> bool:
    try:
        _kernel()
        return True
    except Exception:  # no Triton, or one that cannot build here: the PyTorch passes do the same job
        return False


def causal_softmax_(scores: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """softmax over keys 0..offset+i of query row i, in place (the rest of the row 0); sums in float32.
    scores: contiguous `[batch, heads, n_query, n_key]` on a CUDA device."""
    triton, kernel = _kernel()
    n_query, n_key = scores.shape[-2:]
    block = triton.next_power_of_2(n_key)
    with torch.cuda.device(scores.device):
        kernel[(scores.numel() // n_key,)](scores, n_query, n_key, offset, BLOCK=block,
                                           num_warps=4 if block <= 1024 else 8)
    return scores
