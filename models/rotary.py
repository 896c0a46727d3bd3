"""Rotary positions: frequency tables (default, linear, llama3, longrope) and their application.

Two layouts rotate the first `rotary_dim` dimensions of each head and pass the rest
through: NeoX/LLaMA's "rotate half" (dimension i pairs with i + rotary_dim/2) and GPT-J's
"rotate every two" (dimension 2i pairs with 2i + 1, `cfg.rotary_adjacent_pairs`).
Frequencies stay float32 whatever the model dtype, as in `transformers`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from models.config import TransformerConfig

# The rope types implemented here; a converter refuses any other (UnsupportedArchitectureError).
ROPE_TYPES = ("default", "linear", "llama3", "longrope")


def rope_kind(params: dict | None) -> str:
    params = params or {}
    return params.get("rope_type", params.get("type", "default"))


def inv_freq_for(dim: int, base: float, params: dict | None) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """(inverse frequencies `[dim / 2]`, the long-context ones or None, cos/sin scaling), as `transformers`."""
    shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv_freq = 1.0 / (base ** shape)
    params = params or {}
    kind = rope_kind(params)
    if kind == "default":
        return inv_freq, None, 1.0
    if kind == "linear":
        return inv_freq / params["factor"], None, 1.0
    if kind == "llama3":
        factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
        old_len = params["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        return torch.where(medium, smoothed, scaled), None, 1.0
    if kind == "longrope":
        # Phi-3's LongRoPE: per-frequency factors, "short" up to the original context and "long"
        # beyond it (chosen per forward by the largest position, as transformers does).
        short = 1.0 / (torch.tensor(params["short_factor"], dtype=torch.float32) * base ** shape)
        long = 1.0 / (torch.tensor(params["long_factor"], dtype=torch.float32) * base ** shape)
        return short, long, float(params["attention_factor"])
    raise NotImplementedError(f"rope type {kind!r} is not implemented (implemented: {', '.join(ROPE_TYPES)})")


def longrope_attention_factor(params: dict, max_position_embeddings: int) -> float:
    """LongRoPE's cos/sin scaling when the checkpoint does not state it (transformers' formula)."""
    if params.get("attention_factor") is not None:
        return float(params["attention_factor"])
    original = params["original_max_position_embeddings"]
    factor = params.get("factor") or max_position_embeddings / original
    if factor <= 1.0:
        return 1.0
    return math.sqrt(1 + math.log(factor) / math.log(original))


class Rotary(nn.Module):
    """cos/sin tables for positions, for one rope setting (a model with local layers has two)."""

    def __init__(self, cfg: TransformerConfig, base: float | None = None, scaling: dict | None = None) -> None:
        super().__init__()
        base = cfg.rotary_base if base is None else base
        self.inv_freq, self.long_inv_freq, self.scaling = inv_freq_for(cfg.rotary_dim, base, scaling)
        self.long_after = (scaling or {}).get("original_max_position_embeddings") if self.long_inv_freq is not None else None
        self.adjacent = cfg.rotary_adjacent_pairs

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [batch, pos] -> cos, sin: [batch, pos, rotary_dim]
        inv_freq = self.inv_freq.to(positions.device)
        if self.long_inv_freq is not None and positions.numel():
            # torch.where on the scalar keeps this free of a device synchronisation.
            longer = positions.max() + 1 > self.long_after
            inv_freq = torch.where(longer, self.long_inv_freq.to(positions.device), inv_freq)
        freqs = positions[..., None].float() * inv_freq
        emb = freqs.repeat_interleave(2, dim=-1) if self.adjacent else torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scaling).to(dtype), (emb.sin() * self.scaling).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, adjacent: bool = False) -> torch.Tensor:
    """x: [batch, pos, heads, d_head]; cos, sin: [batch, pos, rotary_dim]; the first rotary_dim dims rotate."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    rotate = rotate_every_two if adjacent else rotate_half
    rd = cos.shape[-1]
    if rd == x.shape[-1]:
        return x * cos + rotate(x) * sin
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    return torch.cat((x_rot * cos + rotate(x_rot) * sin, x_pass), dim=-1)
