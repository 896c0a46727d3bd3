"""Multi-head attention (with grouped KV heads and rotary positions), masks and the KV cache.

One module, two ways to compute the same thing: the fused
`F.scaled_dot_product_attention` kernel when nobody looks at the scores or the pattern,
and the explicit softmax(QK^T)V when a hook on `hook_attn_scores`/`hook_pattern` does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from interp.hooks import HookPoint
from models.config import TransformerConfig
from models.layout import linear_in_heads, linear_out_heads, live_bias, per_head_in, per_head_out


def _flat(bias: torch.Tensor) -> torch.Tensor | None:
    """[heads, d_head] bias -> [heads * d_head], or None when it is zero (see live_bias)."""
    bias = live_bias(bias)
    return None if bias is None else bias.reshape(-1)


# ---------------------------------------------------------------------- rotary positions
def rotary_inv_freq(cfg: TransformerConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies `[rotary_dim / 2]` (float32) and the cos/sin scaling, as `transformers` computes them."""
    dim = cfg.rotary_dim
    inv_freq = 1.0 / (cfg.rotary_base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    params = cfg.rotary_scaling or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / params["factor"], 1.0
    if kind == "llama3":
        factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
        old_len = params["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        return torch.where(medium, smoothed, scaled), 1.0
    raise NotImplementedError(f"rope type {kind!r} is not supported yet (default, linear and llama3 are)")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [batch, pos, heads, d_head]; cos, sin: [batch, pos, rotary_dim] (NeoX/LLaMA half-split style)."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    rd = cos.shape[-1]
    if rd == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)


# ---------------------------------------------------------------------- the KV cache
class KVCache:
    """Keys (after rotary) and values of earlier positions, per layer: `[batch, n_kv_heads, pos, d_head]`.

    Generation appends to it. A frozen cache is read but never extended, so one
    prefix can serve many continuations (patching sweeps reuse it this way).
    """

    def __init__(self, n_layers: int, frozen: bool = False) -> None:
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers
        self.attention_mask: torch.Tensor | None = None  # [batch, pos], 1 = real token
        self.frozen = frozen
        self._length = 0

    @property
    def length(self) -> int:
        return self._length

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        past_k, past_v = self.keys[layer], self.values[layer]
        if past_k is not None:
            k = torch.cat([past_k, k], dim=2)
            v = torch.cat([past_v, v], dim=2)
        if not self.frozen:
            self.keys[layer], self.values[layer] = k, v
        return k, v

    def commit(self, n_new: int, mask: torch.Tensor | None) -> None:
        """Record that a forward added `n_new` positions (called once per forward, after all layers)."""
        if not self.frozen:
            self._length += n_new
            self.attention_mask = mask

    def frozen_copy(self) -> "KVCache":
        out = KVCache(len(self.keys), frozen=True)
        out.keys, out.values = list(self.keys), list(self.values)
        out.attention_mask, out._length = self.attention_mask, self._length
        return out

    def expand(self, batch: int) -> "KVCache":
        """The same prefix repeated for `batch` rows (a cache of batch 1 serving a batch of continuations)."""
        out = self.frozen_copy()
        out.keys = [None if k is None else k.expand(batch, *k.shape[1:]) for k in self.keys]
        out.values = [None if v is None else v.expand(batch, *v.shape[1:]) for v in self.values]
        if self.attention_mask is not None:
            out.attention_mask = self.attention_mask.expand(batch, -1)
        return out


# ---------------------------------------------------------------------- per-forward state
class AttentionFrame:
    """What every layer of one forward shares: masks, positions and rotary tables, built once."""

    def __init__(
        self,
        cfg: TransformerConfig,
        n_query: int,
        positions: torch.Tensor,
        key_mask: torch.Tensor | None,
        past_kv: KVCache | None,
        rotary: "Rotary | None",
        allowed: torch.Tensor | None = None,
    ) -> None:
        self.cfg = cfg
        self.n_query = n_query
        self.positions = positions  # [batch, n_query]
        self.key_mask = key_mask  # [batch, n_past + n_query] bool, or None when nothing is padded
        self.past_kv = past_kv
        self.offset = past_kv.length if past_kv is not None else 0
        self.rotary = rotary
        self._cos_sin: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}
        self._allowed: torch.Tensor | None = allowed  # an explicit mask is used as given
        self._explicit = allowed is not None

    def cos_sin(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if dtype not in self._cos_sin:
            self._cos_sin[dtype] = self.rotary(self.positions, dtype)
        return self._cos_sin[dtype]

    @property
    def needs_mask(self) -> bool:
        """False when SDPA's own `is_causal` (or no mask at all) says everything."""
        if self.key_mask is not None or self._explicit:
            return True
        return self.cfg.causal and self.offset > 0 and self.n_query > 1

    @property
    def sdpa_is_causal(self) -> bool:
        return (self.cfg.causal and self.offset == 0 and self.n_query > 1 and self.key_mask is None
                and not self._explicit)

    def allowed(self) -> torch.Tensor:
        """Boolean `[batch or 1, 1, n_query, n_key]`: may this query read this key?"""
        if self._allowed is None:
            n_key = self.offset + self.n_query
            device = self.positions.device
            allowed = torch.ones(1, 1, self.n_query, n_key, dtype=torch.bool, device=device)
            if self.cfg.causal:
                q_idx = torch.arange(self.offset, n_key, device=device)[:, None]
                allowed = allowed & (torch.arange(n_key, device=device)[None, :] <= q_idx)
            if self.key_mask is not None:
                allowed = allowed & self.key_mask[:, None, None, :]
                # A padding query may see nothing; let it see everything so no row is
                # all -inf (NaN would leak through the zero weights of later layers).
                allowed = allowed | ~allowed.any(-1, keepdim=True)
            self._allowed = allowed
        return self._allowed


class Rotary(nn.Module):
    """cos/sin tables for positions. Frequencies stay float32 whatever the model dtype, as in `transformers`."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.inv_freq, self.scaling = rotary_inv_freq(cfg)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [batch, pos] -> cos, sin: [batch, pos, rotary_dim]
        inv_freq = self.inv_freq.to(positions.device)
        freqs = positions[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scaling).to(dtype), (emb.sin() * self.scaling).to(dtype)


# ---------------------------------------------------------------------- attention
class Attention(nn.Module):
    """Attention with TransformerLens' weights and hooks.

    Weights: W_Q [n_heads, d_model, d_head], W_O [n_heads, d_head, d_model];
    `_W_K`, `_W_V` [n_kv_heads, d_model, d_head] are the stored (grouped) weights and
    `W_K`, `W_V` the same repeated to n_heads. Hooks: hook_q [b, p, n_heads, d_head];
    hook_k, hook_v, hook_rot_k [b, p, n_kv_heads, d_head] (one per KV head under
    GQA); hook_attn_scores, hook_pattern [b, n_heads, q, k]; hook_z [b, p, n_heads, d_head];
    hook_result [b, p, n_heads, d_model] (computed only when hooked).
    """

    def __init__(self, cfg: TransformerConfig, layer: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.layer = layer
        h, kv, d, dh = cfg.n_heads, cfg.n_kv_heads, cfg.d_model, cfg.d_head
        self.W_Q = per_head_in(h, d, dh)
        self._W_K = per_head_in(kv, d, dh)
        self._W_V = per_head_in(kv, d, dh)
        self.W_O = per_head_out(h, dh, d)
        self.b_Q = nn.Parameter(torch.zeros(h, dh))
        self._b_K = nn.Parameter(torch.zeros(kv, dh))
        self._b_V = nn.Parameter(torch.zeros(kv, dh))
        self.b_O = nn.Parameter(torch.zeros(d))
        self.implementation = "auto"  # "auto", "explicit" (always materialise the pattern) or "sdpa"
        for name in ("q", "k", "v", "attn_scores", "pattern", "z", "result"):
            setattr(self, f"hook_{name}", HookPoint())
        if cfg.positional_embedding_type == "rotary":
            self.hook_rot_q = HookPoint()
            self.hook_rot_k = HookPoint()

    # Grouped KV heads, repeated so that head h reads KV head h // (n_heads / n_kv_heads).
    def _repeat(self, t: torch.Tensor) -> torch.Tensor:
        n_rep = self.cfg.n_heads // self.cfg.n_kv_heads
        return t if n_rep == 1 else t.repeat_interleave(n_rep, dim=0)

    @property
    def W_K(self) -> torch.Tensor:
        return self._repeat(self._W_K)

    @property
    def W_V(self) -> torch.Tensor:
        return self._repeat(self._W_V)

    @property
    def b_K(self) -> torch.Tensor:
        return self._repeat(self._b_K)

    @property
    def b_V(self) -> torch.Tensor:
        return self._repeat(self._b_V)

    def uses_explicit_path(self) -> bool:
        if self.hook_attn_scores.active or self.hook_pattern.active:
            return True
        return self.implementation == "explicit"

    def forward(self, x: torch.Tensor, frame: AttentionFrame) -> torch.Tensor:
        # x: [batch, pos, d_model] -> attn_out: [batch, pos, d_model]
        b, p, _ = x.shape
        h, kv, dh = self.cfg.n_heads, self.cfg.n_kv_heads, self.cfg.d_head
        q = self.hook_q(F.linear(x, linear_in_heads(self.W_Q), _flat(self.b_Q)).view(b, p, h, dh))
        k = self.hook_k(F.linear(x, linear_in_heads(self._W_K), _flat(self._b_K)).view(b, p, kv, dh))
        v = self.hook_v(F.linear(x, linear_in_heads(self._W_V), _flat(self._b_V)).view(b, p, kv, dh))
        if frame.rotary is not None:
            cos, sin = frame.cos_sin(x.dtype)
            q = self.hook_rot_q(apply_rotary(q, cos, sin))
            k = self.hook_rot_k(apply_rotary(k, cos, sin))
        # SDPA layout: [batch, heads, pos, d_head]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if frame.past_kv is not None:
            k, v = frame.past_kv.update(self.layer, k, v)
        n_rep = h // kv
        if self.uses_explicit_path():
            z = self._explicit(q, k, v, frame, n_rep)
        else:
            mask = frame.allowed() if frame.needs_mask else None
            if n_rep > 1 and mask is not None:
                k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
            z = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=frame.sdpa_is_causal,
                scale=1.0 / self.cfg.scale, enable_gqa=n_rep > 1 and mask is None,
            )
        z = self.hook_z(z.transpose(1, 2))  # [batch, pos, n_heads, d_head]
        if self.hook_result.active:
            result = self.hook_result(torch.einsum("bphk,hkd->bphd", z, self.W_O))
            return result.sum(dim=2) + self.b_O
        return F.linear(z.reshape(b, p, h * dh), linear_out_heads(self.W_O), live_bias(self.b_O))

    def _explicit(self, q, k, v, frame: AttentionFrame, n_rep: int) -> torch.Tensor:
        if n_rep > 1:
            k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
        scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / self.cfg.scale)  # [b, h, q, k]
        if frame.needs_mask or frame.sdpa_is_causal:
            scores = scores.masked_fill(~frame.allowed(), float("-inf"))
        scores = self.hook_attn_scores(scores)
        pattern = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        # A hook may mask a whole row; a NaN row would poison every later position.
        pattern = torch.nan_to_num(pattern, nan=0.0)
        pattern = self.hook_pattern(pattern)
        return torch.matmul(pattern, v)
