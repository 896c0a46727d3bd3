"""Multi-head attention (with grouped KV heads and rotary positions); its masks and KV cache are models/frame.py.

One module, two ways to compute the same thing: the fused
`F.scaled_dot_product_attention` kernel when nobody changes the scores or the pattern,
and the explicit softmax(QK^T)V when a hook on `hook_attn_scores`/`hook_pattern` may.
A pattern that is only read (run_with_cache) is computed beside the fused kernel by the
same code the explicit path uses (`Attention._pattern`), so it equals that path's pattern
bit for bit while the output stays the no-hook forward's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from interp.hooks import HookPoint
from models import kernels
from models.components import Norm
from models.config import TransformerConfig
from models.frame import AttentionFrame, CrossFrame, KVCache
from models.layout import linear_in_heads, linear_out_heads, live_bias, per_head_in, per_head_out
from models.rotary import apply_rotary


__all__ = ["Attention", "AttentionFrame", "CrossFrame", "KVCache"]  # the frame's classes lived here before


def _flat(bias: torch.Tensor) -> torch.Tensor | None:
    """[heads, d_head] bias -> [heads * d_head], or None when it is zero (see live_bias)."""
    bias = live_bias(bias)
    return None if bias is None else bias.reshape(-1)


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
        """Must the output come from a materialised pattern? Not when the pattern is only read (every hook on
        it read-only, as run_with_cache's): it is then computed beside the fused kernel (`_show_pattern`)."""
        if self.hook_attn_scores.active or (self.hook_pattern.active and not self.hook_pattern.read_only):
            return True
        # SDPA has no soft-cap: capped models always take the explicit path (as transformers' eager).
        return self.implementation == "explicit" or self.cfg.attn_scores_soft_cap is not None

    # ------------------------------------------------------------------ scores
    def scores_from_dots(self, dots: torch.Tensor) -> torch.Tensor:
        """q.k -> the scores the softmax reads (before the mask): scaled, then soft-capped if the model caps."""
        return self._cap(dots * (1.0 / self.cfg.scale))

    def _cap(self, scores: torch.Tensor) -> torch.Tensor:
        cap = self.cfg.attn_scores_soft_cap
        return scores if cap is None else torch.tanh(scores / cap) * cap

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
            if self.hook_pattern.active:  # read-only hooks; before the kernel, so hooks fire in the explicit order
                self._show_pattern(q, k, frame, n_rep)
            z = self._fused(q, k, v, frame, n_rep)
        z = self.hook_z(z.transpose(1, 2))  # [batch, pos, n_heads, d_head]
        if self.hook_result.active:
            result = self.hook_result(torch.einsum("bphk,hkd->bphd", z, self.W_O))
            return result.sum(dim=2) + self.b_O
        return F.linear(z.reshape(b, p, h * dh), linear_out_heads(self.W_O), live_bias(self.b_O))

    # q: [batch, n_heads, q, d_head]; k, v: [batch, n_kv_heads, k, d_head] (after the KV cache); -> z [b, h, q, d_head]
    def _fused(self, q, k, v, frame: AttentionFrame, n_rep: int) -> torch.Tensor:
        is_causal = frame.sdpa_is_causal(self.window)
        bias = frame.position_bias
        mask = frame.allowed(self.window) if frame.needs_mask(self.window) or (bias is not None and is_causal) \
            else None
        if bias is not None:  # T5: the bias rides in a float mask, the causal mask inside it
            bias = bias.to(q.dtype)
            mask, is_causal = (bias if mask is None else bias.masked_fill(~mask, float("-inf"))), False
        if mask is not None:
            k, v = _repeat_heads(k, n_rep), _repeat_heads(v, n_rep)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal,
            scale=1.0 / self.cfg.scale, enable_gqa=n_rep > 1 and mask is None,
        )

    def _explicit(self, q, k, v, frame: AttentionFrame, n_rep: int) -> torch.Tensor:
        pattern = self.hook_pattern(self._pattern(q, k, frame, n_rep))
        return torch.matmul(pattern, _repeat_heads(v, n_rep))

    def _show_pattern(self, q, k, frame: AttentionFrame, n_rep: int) -> None:
        """The pattern for read-only hooks while the fused kernel computes the output.

        Without autograd: this pattern is not on the output's graph, so no gradient through it would be
        right. A hook that wants one (a backward hook) is not read-only and takes the explicit path.
        """
        with torch.no_grad():
            pattern = self._pattern(q, k, frame, n_rep)
            if self.hook_pattern(pattern) is not pattern:
                raise ValueError(
                    f"a read-only hook on {self.hook_pattern.name} returned a new pattern, which the fused "
                    "attention path would ignore; add the hook without read_only=True (the explicit path then "
                    "uses what it returns), or return None")

    def _pattern(self, q, k, frame: AttentionFrame, n_rep: int) -> torch.Tensor:
        """softmax(scores) `[batch, n_heads, q, k]` in the model dtype, the scores through hook_attn_scores.

        Both paths take the pattern from here, so a pattern cached beside the fused kernel equals the
        explicit path's by construction. One pass each for q.k, the mask and the softmax (plain causal
        attention on a GPU: the mask inside the softmax, models.kernels): this is what a cached pattern
        costs on top of the no-hook forward.
        """
        if self._one_pass_causal(q, frame):
            scores = torch.matmul(self._scaled(q), _repeat_heads(k, n_rep).transpose(-1, -2))
            return kernels.causal_softmax_(scores)
        scores = self.hook_attn_scores(self._scores(q, _repeat_heads(k, n_rep), frame))
        if scores.dtype in (torch.float16, torch.bfloat16):
            # The kernel reads half precision, sums in float32 and rounds once: transformers' eager
            # softmax(dtype=float32).to(dtype) without its float32 [q, k] buffer (two of five passes). An
            # entry may still differ from that by one unit in the last place where the kernel sums in
            # another order (on CPU, rows whose length is not a multiple of the vector width).
            pattern = scores.softmax(-1).to(q.dtype)
        else:
            pattern = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        if self.hook_attn_scores.active or getattr(frame, "_explicit", False):
            # A hook, or a mask taken as given (packed rows), may leave a row all -inf; its NaNs would
            # poison every later position. The masks a frame builds never do (AttentionFrame._build).
            pattern = torch.nan_to_num(pattern, nan=0.0)
        return pattern

    def _one_pass_causal(self, q, frame: AttentionFrame) -> bool:
        """May the pattern come from q.k and one masked-softmax pass (models.kernels)? On a GPU with Triton, in
        half precision, without autograd, for plain causal attention: one square mask for every row (no
        padding, window, cache offset or packed rows), no scores hook (it must see the masked scores), no
        soft-cap, T5 bias or scale that is not a power of two."""
        return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and not self.hook_attn_scores.active
                and not (torch.is_grad_enabled() and q.requires_grad) and getattr(frame, "memory", None) is None
                and frame.causal and self.window is None and frame.position_bias is None
                and frame.key_mask is None and not frame._explicit and not frame.offset and frame.n_query > 1
                and frame.n_query <= kernels.MAX_KEYS and self.cfg.attn_scores_soft_cap is None
                and self._exact_scale() and kernels.available())

    def _exact_scale(self) -> bool:
        """Is 1 / attn_scale a power of two (d_head 16, 64 or 256; T5's 1), so that scaling q instead of q.k
        gives the same scores bit for bit?"""
        return math.frexp(1.0 / self.cfg.scale)[0] == 0.5

    def _scaled(self, q: torch.Tensor) -> torch.Tensor:
        """q / attn_scale, for an exact scale (`_exact_scale`): q.k then needs no pass over [q, k] to scale."""
        inv_scale = 1.0 / self.cfg.scale
        return q if inv_scale == 1.0 else q * inv_scale

    def _scores(self, q, k, frame: AttentionFrame) -> torch.Tensor:
        """scores_from_dots(q k^T), plus T5's bias, -inf where a query may not look: `[b, h, q, k]`.

        Entry for entry what scores_from_dots(q @ k^T) gives, with fewer passes over [q, k]: a power-of-two
        scale (d_head 16, 64 or 256; T5's 1) is applied to q, which is exact in floating point, any other
        in place, and the mask in place.
        """
        if self._exact_scale():
            scores = torch.matmul(self._scaled(q), k.transpose(-1, -2))
        else:
            scores = torch.matmul(q, k.transpose(-1, -2)).mul_(1.0 / self.cfg.scale)
        scores = self._cap(scores)
        if frame.position_bias is not None:
            scores = scores + frame.position_bias
        if frame.needs_mask(self.window) or frame.sdpa_is_causal(self.window):
            scores = scores.masked_fill_(~frame.allowed(self.window), float("-inf"))
        return scores


def _repeat_heads(t: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[batch, n_kv_heads, pos, d_head] -> [batch, n_heads, pos, d_head]: query head h reads KV head h // n_rep."""
    return t if n_rep == 1 else t.repeat_interleave(n_rep, dim=1)
