"""A mixture-of-experts MLP (Mixtral, Qwen2/3-MoE, OLMoE): a router, gated experts, an optional shared expert.

    logits = x W_router                               hook_router_logits   [batch, pos, n_experts]
    w, i = topk(softmax(logits), k) (renormalised)    hook_expert_weights  [batch, pos, k]
                                                      hook_expert_indices  [batch, pos, k]
    y_j = expert_{i_j}(x)                             hook_expert_out      [batch, pos, k, d_model]
    per expert: w_j y_j at expert i_j, else 0         hook_experts         [batch, pos, n_experts, d_model]
    out = sum_j w_j y_j (+ sigmoid(x W_shared_gate) * shared(x), hook_shared_expert_out)

Routing happens after `hook_router_logits`, so editing the logits re-routes (a logit of
-inf removes an expert and the next one takes its place); `hook_experts` (computed only
when hooked, like hook_result) holds each expert's weighted contribution, so zeroing an
entry removes that expert's share without re-routing. Each expert is a gated MLP: the
stored weights are `W_gate`, `W_in` `[n_experts, d_model, d_mlp_expert]` and `W_out`
`[n_experts, d_mlp_expert, d_model]`, in nn.Linear's memory layout (models/layout.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from interp.hooks import HookPoint
from models.components import MLP, activation
from models.config import TransformerConfig
from models.layout import in_out, per_expert_out, per_head_in


class MoE(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        E, d, d_exp = cfg.num_experts, cfg.d_model, cfg.d_mlp_expert or cfg.d_mlp
        self.k = cfg.experts_per_token
        self.act = activation(cfg.act_fn)
        self.W_router = in_out(d, E)
        self.W_gate = per_head_in(E, d, d_exp)
        self.W_in = per_head_in(E, d, d_exp)
        self.W_out = per_expert_out(E, d_exp, d)
        for name in ("router_logits", "expert_weights", "expert_indices", "expert_out", "experts"):
            setattr(self, f"hook_{name}", HookPoint())
        self.shared = None
        if cfg.d_mlp_shared:
            self.shared = MLP(cfg, d_mlp=cfg.d_mlp_shared)
            self.W_shared_gate = in_out(d, 1)
            self.hook_shared_expert_out = HookPoint()

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [batch, pos, k], expert indices [batch, pos, k]) for x [batch, pos, d_model]."""
        logits = self.hook_router_logits(F.linear(x, self.W_router.T))
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        weights, indices = probs.topk(self.k, dim=-1)
        if self.cfg.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        if not self.cfg.router_weights_fp32:
            weights = weights.to(x.dtype)
        return self.hook_expert_weights(weights), self.hook_expert_indices(indices)

    def expert(self, e: int, h: torch.Tensor) -> torch.Tensor:
        """Expert e's output for tokens h [n, d_model]."""
        gated = self.act(F.linear(h, self.W_gate[e].T)) * F.linear(h, self.W_in[e].T)
        return F.linear(gated, self.W_out[e].T)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [batch, pos, d_model]
        b, p, d = x.shape
        weights, indices = self.route(x)
        flat, idx = x.reshape(-1, d), indices.reshape(-1, self.k)
        out = flat.new_zeros(flat.shape[0], self.k, d)  # [tokens, k, d_model]: each chosen expert's output
        for e in idx.unique().tolist():  # only the experts some token chose run, on those tokens
            rows, slots = (idx == e).nonzero(as_tuple=True)
            out[rows, slots] = self.expert(e, flat[rows])
        out = self.hook_expert_out(out.view(b, p, self.k, d))
        contrib = (out * weights[..., None]).to(x.dtype)  # [batch, pos, k, d_model]
        if self.hook_experts.active:
            dense = x.new_zeros(b, p, self.cfg.num_experts, d)
            dense = dense.scatter(2, indices[..., None].expand(-1, -1, -1, d), contrib)
            moe_out = self.hook_experts(dense).sum(2)
        else:
            moe_out = contrib.sum(2)
        if self.shared is not None:
            gate = torch.sigmoid(F.linear(x, self.W_shared_gate.T))
            moe_out = moe_out + self.hook_shared_expert_out(gate * self.shared(x))
        return moe_out
