"""Embeddings, norms, MLPs and the unembedding (attention lives in attention.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from interp.hooks import HookPoint
from models.config import TransformerConfig
from models.layout import in_out, live_bias


def activation(name: str):
    if name == "gelu":
        return F.gelu
    if name in ("gelu_new", "gelu_fast", "gelu_pytorch_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "silu":
        return F.silu
    if name == "relu":
        return F.relu
    raise ValueError(f"unknown activation {name!r}")


def init_gpt2_style(model: nn.Module, cfg) -> None:
    """N(0, init_range) matrices, zero biases, norm weights that multiply by 1 (Gemma's x(1 + w): w = 0)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1].lstrip("_")
            if leaf == "w":
                p.fill_(1.0 - cfg.norm_weight_offset)
            elif leaf.startswith("b"):
                p.zero_()
            else:
                p.normal_(0.0, cfg.init_range)


class Embed(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.W_E = nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # tokens: [batch, pos] -> [batch, pos, d_model]
        return F.embedding(tokens, self.W_E)


class PosEmbed(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.W_pos = nn.Parameter(torch.empty(cfg.n_ctx, cfg.d_model))

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        # positions: [batch, pos] -> [batch, pos, d_model]
        return F.embedding(positions, self.W_pos)


class TokenTypeEmbed(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.W_token_type = nn.Parameter(torch.empty(cfg.n_token_types, cfg.d_model))

    def forward(self, token_type_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(token_type_ids, self.W_token_type)


class Norm(nn.Module):
    """LayerNorm or RMSNorm; `LNPre`/`RMSPre` are the same without the affine part (after folding).

    kind: "LN", "RMS", "LNPre" or "RMSPre" (default: the model's normalization_type);
    bias: whether an LN has a bias (default yes; RMS never); weight_shape: the weight's
    shape when it is not `[d]` (per-head q/k norms with a weight per head: `[n_heads, d_head]`).
    The weight multiplies as `(cfg.norm_weight_offset + w)` (Gemma stores w - 1), after the
    cast back to the input dtype unless `cfg.norm_weight_in_fp32`, each as its family does.

    hook_scale: [batch, pos, 1], the divisor; hook_normalized: [batch, pos, d_model],
    before the affine part. When neither is hooked the fused/HF-identical formula runs.
    """

    def __init__(self, cfg: TransformerConfig, d: int | None = None, *, kind: str | None = None,
                 bias: bool | None = None, weight_shape: tuple[int, ...] | None = None) -> None:
        super().__init__()
        d = d or cfg.d_model
        kind = kind or cfg.normalization_type
        self.rms = kind in ("RMS", "RMSPre")
        self.eps = cfg.norm_eps
        self.d = d
        self.offset = float(cfg.norm_weight_offset)
        self.weight_in_fp32 = bool(cfg.norm_weight_in_fp32) or self.offset != 0.0
        if kind in ("LN", "RMS"):
            shape = tuple(weight_shape or (d,))
            self.w = nn.Parameter(torch.full(shape, 1.0 - self.offset))
            has_bias = (not self.rms) if bias is None else (bias and not self.rms)
            self.b = nn.Parameter(torch.zeros(shape)) if has_bias else None
        else:
            self.w = None
            self.b = None
        self.hook_scale = HookPoint()
        self.hook_normalized = HookPoint()

    def _affine(self, h: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """h: the normalised input in float32 (RMS) or the input dtype (LN)."""
        if self.w is None:
            return h.to(dtype) if self.b is None else h.to(dtype) + self.b
        if self.weight_in_fp32:
            out = (h.float() * (self.w.float() + self.offset)).to(dtype)
        else:
            out = h.to(dtype) * self.w
        return out + self.b if self.b is not None else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hook_scale.active or self.hook_normalized.active:
            return self._hooked(x)
        if not self.rms:
            if self.w is None or (self.w.shape == (self.d,) and not self.offset):
                return F.layer_norm(x, (self.d,), self.w, self.b, self.eps)
            return self._affine(F.layer_norm(x, (self.d,), None, None, self.eps), x.dtype)
        # LlamaRMSNorm's own arithmetic (float32 statistics, rsqrt), so outputs match it bit for bit.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self._affine(h, x.dtype)

    def _hooked(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        if not self.rms:
            h = h - h.mean(-1, keepdim=True)
        scale = self.hook_scale((h.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        normalized = self.hook_normalized((h / scale).to(dtype))
        return self._affine(normalized, dtype)

    @property
    def effective_weight(self) -> torch.Tensor | None:
        """What the normalised input is multiplied by (w, or offset + w), or None."""
        if self.w is None:
            return None
        return self.w + self.offset if self.offset else self.w


class MLP(nn.Module):
    """Dense (GELU) or gated (SwiGLU) MLP.

    hook_pre: [batch, pos, d_mlp] pre-activation (the gate, for gated MLPs);
    hook_pre_linear: [batch, pos, d_mlp] the linear branch of a gated MLP;
    hook_post: [batch, pos, d_mlp] what W_out reads.
    """

    def __init__(self, cfg: TransformerConfig, d_mlp: int | None = None) -> None:
        super().__init__()
        d_mlp = d_mlp or cfg.d_mlp  # another width: an MoE's shared expert
        self.gated = cfg.gated_mlp
        self.act = activation(cfg.act_fn)
        self.W_in = in_out(cfg.d_model, d_mlp)
        self.b_in = nn.Parameter(torch.zeros(d_mlp))
        if self.gated:
            self.W_gate = in_out(cfg.d_model, d_mlp)
            self.b_gate = nn.Parameter(torch.zeros(d_mlp))
        self.W_out = in_out(d_mlp, cfg.d_model)
        self.b_out = nn.Parameter(torch.zeros(cfg.d_model))
        self.hook_pre = HookPoint()
        if self.gated:
            self.hook_pre_linear = HookPoint()
        self.hook_post = HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [batch, pos, d_model]
        if self.gated:
            pre = self.hook_pre(F.linear(x, self.W_gate.T, live_bias(self.b_gate)))
            pre_linear = self.hook_pre_linear(F.linear(x, self.W_in.T, live_bias(self.b_in)))
            post = self.hook_post(self.act(pre) * pre_linear)
        else:
            pre = self.hook_pre(F.linear(x, self.W_in.T, live_bias(self.b_in)))
            post = self.hook_post(self.act(pre))
        return F.linear(post, self.W_out.T, live_bias(self.b_out))


class Unembed(nn.Module):
    """Residual -> logits. With tied embeddings W_U is W_E^T itself (a view, not a copy)."""

    def __init__(self, cfg: TransformerConfig, tied_to: Embed | None = None) -> None:
        super().__init__()
        # A list keeps the embedding out of this module's children (it is registered once, on the model).
        self._tied_to = [tied_to] if tied_to is not None else []
        if tied_to is None:
            self.W_U = in_out(cfg.d_model, cfg.d_vocab_out)
        self.b_U = nn.Parameter(torch.zeros(cfg.d_vocab_out))

    @property
    def tied(self) -> bool:
        return bool(self._tied_to)

    @property
    def W_U(self) -> torch.Tensor:
        if self._tied_to:
            return self._tied_to[0].W_E.T
        param = self._parameters.get("W_U")
        if param is None:  # AttributeError, so that nn.Module can register the parameter
            raise AttributeError("W_U")
        return param

    def untie(self) -> None:
        """Give the unembedding its own copy of W_E^T (weight processing edits it separately)."""
        if not self._tied_to:
            return
        W_E = self._tied_to[0].W_E
        self._tied_to = []
        param = nn.Parameter(torch.empty_like(W_E).T, requires_grad=W_E.requires_grad)
        with torch.no_grad():
            param.copy_(W_E.T)
        self.register_parameter("W_U", param)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [batch, pos, d_model] -> [batch, pos, d_vocab_out]
        return F.linear(x, self.W_U.T, live_bias(self.b_U))


class MLMHead(nn.Module):
    """BERT's prediction-head transform (dense, activation, LayerNorm) before the unembedding."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.act = activation(cfg.act_fn)
        self.W = in_out(cfg.d_model, cfg.d_model)
        self.b = nn.Parameter(torch.zeros(cfg.d_model))
        self.hook_pre = HookPoint()
        self.hook_post = HookPoint()
        self.ln = Norm(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.hook_pre(F.linear(x, self.W.T, self.b))
        return self.ln(self.hook_post(self.act(pre)))
