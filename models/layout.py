"""Parameter layouts: TransformerLens' orientation on the outside, nn.Linear's in memory.

Users read and write weights as `W_Q: [n_heads, d_model, d_head]`, `W_in: [d_model, d_mlp]`
(row vectors: `x @ W`). In memory each is a transposed view of the `[out, in]` matrix
that `torch.nn.Linear` and `transformers` hold, so the forward hands `F.linear` the very
same GEMM the checkpoint's own implementation runs: no per-call copy of a permuted
weight, and the same kernel, hence the same rounding. If a user assigns a contiguous
tensor instead, `reshape` copies and everything stays correct, only slower.
"""

from __future__ import annotations

import torch
from torch import nn


def in_out(d_in: int, d_out: int) -> nn.Parameter:
    """`[d_in, d_out]`, stored as `[d_out, d_in]`."""
    return nn.Parameter(torch.empty(d_out, d_in).T)


def per_head_in(n_heads: int, d_model: int, d_head: int) -> nn.Parameter:
    """`[n_heads, d_model, d_head]` (W_Q, W_K, W_V), stored as `[n_heads * d_head, d_model]`."""
    return nn.Parameter(torch.empty(n_heads, d_head, d_model).permute(0, 2, 1))


def per_head_out(n_heads: int, d_head: int, d_model: int) -> nn.Parameter:
    """`[n_heads, d_head, d_model]` (W_O), stored as `[d_model, n_heads * d_head]`."""
    return nn.Parameter(torch.empty(d_model, n_heads * d_head).T.view(n_heads, d_head, d_model))


def per_expert_out(n_experts: int, d_mlp: int, d_model: int) -> nn.Parameter:
    """`[n_experts, d_mlp, d_model]` (an expert's W_out), stored as `[n_experts, d_model, d_mlp]` (nn.Linear's)."""
    return nn.Parameter(torch.empty(n_experts, d_model, d_mlp).permute(0, 2, 1))


def linear_in_heads(W: torch.Tensor) -> torch.Tensor:
    """`[n, d_model, d_head]` -> the `[n * d_head, d_model]` weight F.linear takes."""
    n, d_model, d_head = W.shape
    return W.permute(0, 2, 1).reshape(n * d_head, d_model)


def linear_out_heads(W: torch.Tensor) -> torch.Tensor:
    """`[n, d_head, d_model]` -> the `[d_model, n * d_head]` weight F.linear takes."""
    n, d_head, d_model = W.shape
    return W.reshape(n * d_head, d_model).T


def live_bias(bias: torch.Tensor) -> torch.Tensor | None:
    """The bias, or None when it is all zeros and adding it would only cost time.

    Checkpoints without biases get zero ones (TransformerLens' convention), but on the
    CPU `addmm` with a zero bias is 4-7% slower than `mm`. The check runs every call (a
    3 microseconds) because in-place edits through `.data` leave no trace to cache
    on. Biases that train, or live on an accelerator (where the add is fused into the
    GEMM and a check would synchronise), are always kept.
    """
    if bias.requires_grad or bias.device.type != "cpu" or bias.count_nonzero().item():
        return bias
    return None


def set_param(param: torch.Tensor, value: torch.Tensor) -> None:
    """Overwrite a parameter in place, keeping its memory layout."""
    if param.shape != value.shape:
        raise ValueError(f"shape mismatch: parameter {tuple(param.shape)} vs value {tuple(value.shape)}")
    with torch.no_grad():
        param.copy_(value)
