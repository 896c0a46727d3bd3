"""One transformer block: pre-LN (GPT-2, LLaMA, toy models) or post-LN (BERT)."""

from __future__ import annotations

import torch
from torch import nn

from interp.hooks import HookPoint
from models.attention import Attention, AttentionFrame
from models.components import MLP, Norm
from models.config import TransformerConfig


class Block(nn.Module):
    """Hooks: hook_resid_pre, hook_attn_out, hook_resid_mid (not in attention-only
    models), hook_mlp_out, hook_resid_post, all [batch, pos, d_model]. Post-LN blocks
    also have hook_normalized_resid_post: the block's output, which the next block reads.
    """

    def __init__(self, cfg: TransformerConfig, layer: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.layer = layer
        has_norm = cfg.normalization_type is not None
        self.ln1 = Norm(cfg) if has_norm else None
        self.attn = Attention(cfg, layer)
        self.hook_resid_pre = HookPoint()
        self.hook_attn_out = HookPoint()
        if not cfg.attn_only:
            self.ln2 = Norm(cfg) if has_norm else None
            self.mlp = MLP(cfg)
            self.hook_resid_mid = HookPoint()
            self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()
        if cfg.post_ln:
            self.hook_normalized_resid_post = HookPoint()

    def forward(self, resid: torch.Tensor, frame: AttentionFrame) -> torch.Tensor:
        # resid: [batch, pos, d_model]
        if self.cfg.post_ln:
            return self._post_ln(resid, frame)
        resid_pre = self.hook_resid_pre(resid)
        attn_in = self.ln1(resid_pre) if self.ln1 is not None else resid_pre
        attn_out = self.hook_attn_out(self.attn(attn_in, frame))
        if self.cfg.attn_only:
            return self.hook_resid_post(resid_pre + attn_out)
        resid_mid = self.hook_resid_mid(resid_pre + attn_out)
        mlp_in = self.ln2(resid_mid) if self.ln2 is not None else resid_mid
        mlp_out = self.hook_mlp_out(self.mlp(mlp_in))
        return self.hook_resid_post(resid_mid + mlp_out)

    def _post_ln(self, resid: torch.Tensor, frame: AttentionFrame) -> torch.Tensor:
        # BERT: x = LN1(x + attn(x)); x = LN2(x + mlp(x)). Names follow TransformerLens' BertBlock.
        resid_pre = self.hook_resid_pre(resid)
        attn_out = self.hook_attn_out(self.attn(resid_pre, frame))
        if self.cfg.attn_only:
            return self.hook_normalized_resid_post(self.ln1(self.hook_resid_post(resid_pre + attn_out)))
        resid_mid = self.ln1(self.hook_resid_mid(resid_pre + attn_out))
        mlp_out = self.hook_mlp_out(self.mlp(resid_mid))
        resid_post = self.hook_resid_post(resid_mid + mlp_out)
        return self.hook_normalized_resid_post(self.ln2(resid_post))
