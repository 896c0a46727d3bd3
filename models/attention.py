"""Multi-head attention (with grouped KV heads and rotary positions), masks and the KV cache.

One module, two ways to compute the same thing: the fused
`F.scaled_dot_product_attention` kernel when nobody looks at the scores or the pattern,
and the explicit softmax(QK^T)V when a hook on `hook_attn_scores`/`hook_pattern` does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from interp.hooks import HookPoint
from models.components import Norm
from models.config import TransformerConfig
from models.layout import linear_in_heads, linear_out_heads, live_bias, per_head_in, per_head_out
from models.rotary import Rotary, apply_rotary


def _flat(bias: torch.Tensor) -> torch.Tensor | None:
    """[heads, d_head] bias -> [heads * d_head], or None when it is zero (see live_bias)."""
    bias = live_bias(bias)
    return None if bias is None else bias.reshape(-1)


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
    """What every layer of one forward shares: masks (one per window size), positions and rotary tables."""

    def __init__(
        self,
        cfg: TransformerConfig,
        n_query: int,
        positions: torch.Tensor,
        key_mask: torch.Tensor | None,
        past_kv: KVCache | None,
        rotary: "dict[str, Rotary] | Rotary | None",
        allowed: torch.Tensor | None = None,
        key_positions: torch.Tensor | None = None,
        causal: bool | None = None,
    ) -> None:
        self.cfg = cfg
        self.causal = cfg.causal if causal is None else causal  # an encoder-decoder's encoder is bidirectional
        self.n_query = n_query
        self.positions = positions  # [batch, n_query]
        self.key_mask = key_mask  # [batch, n_past + n_query] bool, or None when nothing is padded
        self.past_kv = past_kv
        self.offset = past_kv.length if past_kv is not None else 0
        if rotary is not None and not isinstance(rotary, dict):
            rotary = {"global": rotary}
        self.rotary = rotary or None
        self._cos_sin: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._given = allowed  # an explicit mask is used as given (packed rows)
        self._explicit = allowed is not None
        self.key_positions = key_positions  # [batch or 1, n_keys]: windows over an explicit mask need them
        self._allowed: dict[int | None, torch.Tensor] = {}
        self.position_bias: torch.Tensor | None = None  # [1 or batch, heads, q, k], T5's relative positions
        self.memory = None  # what cross-attention reads (None: this is a self-attention frame)

    def cos_sin(self, dtype: torch.dtype, local: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        which = "local" if local and "local" in self.rotary else "global"
        if (dtype, which) not in self._cos_sin:
            self._cos_sin[(dtype, which)] = self.rotary[which](self.positions, dtype)
        return self._cos_sin[(dtype, which)]

    def needs_mask(self, window: int | None = None) -> bool:
        """False when SDPA's own `is_causal` (or no mask at all) says everything."""
        if self.key_mask is not None or self._explicit or window is not None:
            return True
        return self.causal and self.offset > 0 and self.n_query > 1

    def sdpa_is_causal(self, window: int | None = None) -> bool:
        return (self.causal and self.offset == 0 and self.n_query > 1 and self.key_mask is None
                and not self._explicit and window is None)

    def allowed(self, window: int | None = None) -> torch.Tensor:
        """Boolean `[batch or 1, 1, n_query, n_key]`: may this query read this key (within `window`)?"""
        if window not in self._allowed:
            self._allowed[window] = self._build(window)
        return self._allowed[window]

    def _build(self, window: int | None) -> torch.Tensor:
        device = self.positions.device
        if self._explicit:
            allowed = self._given
            if window is not None:
                if self.key_positions is None:
                    raise ValueError("an explicit attention mask on a model with sliding windows needs key_positions "
                                     "(the position of every key), so that each window can be applied")
                q_pos = self.positions[:, None, :, None]
                k_pos = torch.as_tensor(self.key_positions, device=device)[:, None, None, :]
                allowed = allowed & (q_pos - k_pos < window)
            return allowed
        n_key = self.offset + self.n_query
        allowed = torch.ones(1, 1, self.n_query, n_key, dtype=torch.bool, device=device)
        q_idx = torch.arange(self.offset, n_key, device=device)[:, None]
        k_idx = torch.arange(n_key, device=device)[None, :]
        if self.causal:
            allowed = allowed & (k_idx <= q_idx)
        if window is not None:
            # transformers' rule, on indices (equal to positions among a row's real tokens): q - k < window.
            allowed = allowed & (q_idx - k_idx < window)
        if self.key_mask is not None:
            allowed = allowed & self.key_mask[:, None, None, :]
            # A padding query may see nothing; let it see everything so no row is
            # all -inf (NaN would leak through the zero weights of later layers).
            allowed = allowed | ~allowed.any(-1, keepdim=True)
        return allowed


class CrossFrame:
    """What a decoder's cross-attention reads: the encoder's output and which of its positions are real."""

    rotary = None
    past_kv = None
    position_bias = None

    def __init__(self, memory: torch.Tensor, key_mask: torch.Tensor | None) -> None:
        self.memory = memory  # [batch, n_encoder_pos, d_model]
        self.key_mask = key_mask  # [batch, n_encoder_pos] bool, or None when nothing is padded
        self._allowed = None

    def needs_mask(self, window: int | None = None) -> bool:
        return self.key_mask is not None

    def sdpa_is_causal(self, window: int | None = None) -> bool:
        return False

    def allowed(self, window: int | None = None) -> torch.Tensor:
        """`[batch, 1, 1, n_encoder_pos]`: every decoder position reads every real encoder position."""
        if self._allowed is None:
            allowed = self.key_mask[:, None, None, :]
            self._allowed = allowed | ~allowed.any(-1, keepdim=True)  # an all-padding row: no NaN
        return self._allowed


# ---------------------------------------------------------------------- attention
class Attention(nn.Module):
    """Attention with TransformerLens' weights and hooks.

    Weights: W_Q [n_heads, d_model, d_head], W_O [n_heads, d_head, d_model];
    `_W_K`, `_W_V` [n_kv_heads, d_model, d_head] are the stored (grouped) weights and
    `W_K`, `W_V` the same repeated to n_heads. Hooks: hook_q [b, p, n_heads, d_head];
    hook_k, hook_v, hook_rot_k [b, p, n_kv_heads, d_head] (one per KV head under
    GQA); hook_attn_scores, hook_pattern [b, n_heads, q, k]; hook_z [b, p, n_heads, d_head];
    hook_result [b, p, n_heads, d_model] (computed only when hooked).

    Family switches (TransformerConfig): q/k norms (`q_norm`, `k_norm`, their own hook
    points, between hook_q/hook_k and the rotary), `clip_qkv` (before hook_q/k/v; with q/k norms, q and k
    are clamped after their norm instead, as OLMoE does),
    soft-capped scores (hook_attn_scores is after the cap and the mask), sliding windows
    (`cfg.window(layer)`), a second rotary table for local layers, GPT-J's interleaved rotary.
    """

    def __init__(self, cfg: TransformerConfig, layer: int, cross: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.layer = layer
        self.cross = cross  # reads keys and values from the encoder's output (frame.memory)
        self.causal = cfg.causal and not cross  # an encoder's blocks set it False
        h, kv, d, dh = cfg.n_heads, cfg.n_kv_heads, cfg.d_model, cfg.d_head
        self.W_Q = per_head_in(h, d, dh)
        self._W_K = per_head_in(kv, d, dh)
        self._W_V = per_head_in(kv, d, dh)
        self.W_O = per_head_out(h, dh, d)
        self.b_Q = nn.Parameter(torch.zeros(h, dh))
        self._b_K = nn.Parameter(torch.zeros(kv, dh))
        self._b_V = nn.Parameter(torch.zeros(kv, dh))
        self.b_O = nn.Parameter(torch.zeros(d))
        self.window = None if cross else cfg.window(layer)
        self.local_rotary = self.window is not None and cfg.rotary_base_local is not None
        self.implementation = "auto"  # "auto", "explicit" (always materialise the pattern) or "sdpa"
        for name in ("q", "k", "v", "attn_scores", "pattern", "z", "result"):
            setattr(self, f"hook_{name}", HookPoint())
        if cfg.positional_embedding_type == "rotary" and not cross:
            self.hook_rot_q = HookPoint()
            self.hook_rot_k = HookPoint()
        self.q_norm = self.k_norm = None
        if cfg.qk_norm is not None:
            kind, bias = cfg.qk_norm_type, cfg.qk_norm_bias
            if cfg.qk_norm == "full":  # OLMo 2: over all heads at once
                self.q_norm = Norm(cfg, h * dh, kind=kind, bias=bias)
                self.k_norm = Norm(cfg, kv * dh, kind=kind, bias=bias)
            else:
                separate = cfg.qk_norm == "head_separate"  # StableLM: a weight per head
                self.q_norm = Norm(cfg, dh, kind=kind, bias=bias, weight_shape=(h, dh) if separate else None)
                self.k_norm = Norm(cfg, dh, kind=kind, bias=bias, weight_shape=(kv, dh) if separate else None)

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
        # SDPA has no soft-cap: capped models always take the explicit path (as transformers' eager).
        return self.implementation == "explicit" or self.cfg.attn_scores_soft_cap is not None

    # ------------------------------------------------------------------ scores
    def scores_from_dots(self, dots: torch.Tensor) -> torch.Tensor:
        """q.k -> the scores the softmax reads (before the mask): scaled, then soft-capped if the model caps."""
        scores = dots * (1.0 / self.cfg.scale)
        cap = self.cfg.attn_scores_soft_cap
        if cap is not None:
            scores = torch.tanh(scores / cap) * cap
        return scores

    def allowed_from_start(self, n_pos: int, device=None) -> torch.Tensor:
        """`[n_pos, n_pos]` bool: which key a query sees in an unpadded sequence starting at position 0
        (causal, within this layer's window). Path and attribution patching recompute patterns with it."""
        idx = torch.arange(n_pos, device=device)
        allowed = torch.ones(n_pos, n_pos, dtype=torch.bool, device=device)
        if self.causal:
            allowed = allowed & (idx[None] <= idx[:, None])
        if self.window is not None:
            allowed = allowed & (idx[:, None] - idx[None] < self.window)
        return allowed

    # ------------------------------------------------------------------ forward
    def _project(self, x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, clip: bool = True) -> torch.Tensor:
        out = F.linear(x, linear_in_heads(W), _flat(b))
        return self._clip(out) if clip else out

    def _clip(self, t: torch.Tensor) -> torch.Tensor:
        clip = self.cfg.clip_qkv
        return t.clamp(min=-clip, max=clip) if clip is not None else t

    def _qk_norm(self, norm: Norm, t: torch.Tensor) -> torch.Tensor:
        if self.cfg.qk_norm == "full":
            return norm(t.flatten(-2)).view(t.shape)
        return norm(t)

    def forward(self, x: torch.Tensor, frame: AttentionFrame, head_inputs=None) -> torch.Tensor:
        # x: [batch, pos, d_model] -> attn_out: [batch, pos, d_model]. head_inputs: per-head copies of the
        # (normalised) input for q, k and v, [b, p, heads, d_model] (TransformerLens' split-qkv hooks).
        b, p, _ = x.shape
        h, kv, dh = self.cfg.n_heads, self.cfg.n_kv_heads, self.cfg.d_head
        normed = self.q_norm is not None
        src = frame.memory if self.cross else x  # cross-attention: keys and values from the encoder
        n = src.shape[1]
        if head_inputs is not None:
            q_in, k_in, v_in = head_inputs
            per_head = lambda t, W, bias, clip: self._clip(  # noqa: E731
                torch.einsum("bphd,hdk->bphk", t, W) + bias) if clip else torch.einsum("bphd,hdk->bphk", t, W) + bias
            q = self.hook_q(per_head(q_in, self.W_Q, self.b_Q, not normed))
            k = self.hook_k(per_head(k_in, self._W_K, self._b_K, not normed))
            v = self.hook_v(per_head(v_in, self._W_V, self._b_V, True))
        else:
            q = self.hook_q(self._project(x, self.W_Q, self.b_Q, clip=not normed).view(b, p, h, dh))
            k = self.hook_k(self._project(src, self._W_K, self._b_K, clip=not normed).view(b, n, kv, dh))
            v = self.hook_v(self._project(src, self._W_V, self._b_V).view(b, n, kv, dh))
        if normed:
            q, k = self._clip(self._qk_norm(self.q_norm, q)), self._clip(self._qk_norm(self.k_norm, k))
        if frame.rotary is not None:
            cos, sin = frame.cos_sin(x.dtype, self.local_rotary)
            adjacent = self.cfg.rotary_adjacent_pairs
            q = self.hook_rot_q(apply_rotary(q, cos, sin, adjacent))
            k = self.hook_rot_k(apply_rotary(k, cos, sin, adjacent))
        # SDPA layout: [batch, heads, pos, d_head]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if frame.past_kv is not None:
            k, v = frame.past_kv.update(self.layer, k, v)
        n_rep = h // kv
        if self.uses_explicit_path():
            z = self._explicit(q, k, v, frame, n_rep)
        else:
            is_causal = frame.sdpa_is_causal(self.window)
            bias = frame.position_bias
            mask = frame.allowed(self.window) if frame.needs_mask(self.window) or (bias is not None and is_causal) \
                else None
            if bias is not None:  # T5: the bias rides in a float mask, the causal mask inside it
                bias = bias.to(q.dtype)
                mask, is_causal = (bias if mask is None else bias.masked_fill(~mask, float("-inf"))), False
            if n_rep > 1 and mask is not None:
                k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
            z = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=is_causal,
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
        scores = self.scores_from_dots(torch.matmul(q, k.transpose(-1, -2)))  # [b, h, q, k]
        if frame.position_bias is not None:
            scores = scores + frame.position_bias
        if frame.needs_mask(self.window) or frame.sdpa_is_causal(self.window):
            scores = scores.masked_fill(~frame.allowed(self.window), float("-inf"))
        scores = self.hook_attn_scores(scores)
        pattern = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        # A hook may mask a whole row; a NaN row would poison every later position.
        pattern = torch.nan_to_num(pattern, nan=0.0)
        pattern = self.hook_pattern(pattern)
        return torch.matmul(pattern, v)
