"""One transformer block. The families are switches on this one forward:

    sequential pre-norm (GPT-2, LLaMA):  mid = pre + attn(ln1(pre));        post = mid + mlp(ln2(mid))
    parallel (GPT-NeoX, GPT-J, Phi-2):    post = pre + attn(ln1(pre)) + mlp(ln2(pre) or ln1(pre))
    post-sublayer norms (Gemma 2/3):      mid = pre + ln1_post(attn(ln1(pre))); post = mid + ln2_post(mlp(ln2(mid)))
    norms after the sublayers only (OLMo 2): as above without ln1/ln2
    post-LN (BERT, OPT-350m):             mid = ln1(pre + attn(pre));         post = ln2(mid + mlp(mid))

A decoder block of an encoder-decoder model (`cross=True`) adds cross-attention over the
encoder's output between the two, with TransformerLens' T5 names: `ln2` before (pre-norm,
T5) or after (post-LN, BART) `cross_attn`, `hook_cross_attn_out`, `hook_resid_mid_cross`,
and `ln3` for the MLP.

`hook_attn_out` and `hook_mlp_out` are exactly what is added to the residual stream
(after a post-sublayer norm), so `resid_mid = resid_pre + attn_out` holds in every
pre-norm family, and `resid_post = resid_pre + attn_out + mlp_out` in parallel blocks,
which have no `hook_resid_mid`.
"""

from __future__ import annotations

import torch
from torch import nn

from interp.hooks import HookPoint
from models.attention import Attention
from models.frame import AttentionFrame, CrossFrame
from models.components import MLP, Norm
from models.config import TransformerConfig
from models.moe import MoE


class Block(nn.Module):
    """Hooks: hook_resid_pre, hook_attn_out, hook_resid_mid (not in attention-only or
    parallel blocks), hook_mlp_out, hook_resid_post, all [batch, pos, d_model]. Post-LN
    blocks also have hook_normalized_resid_post: the block's output, which the next block reads.
    """

    def __init__(self, cfg: TransformerConfig, layer: int, cross: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.layer = layer
        self.cross = cross
        has_norm = cfg.normalization_type is not None
        pre = has_norm and (cfg.pre_norm or cfg.post_ln)
        post = has_norm and cfg.post_sublayer_norm
        self.ln1 = Norm(cfg) if pre else None
        self.ln1_post = Norm(cfg, kind=cfg.base_norm_type) if post else None
        self.attn = Attention(cfg, layer)
        self.hook_resid_pre = HookPoint()
        self.hook_attn_out = HookPoint()
        if cross:
            self.ln2 = Norm(cfg) if has_norm else None
            self.cross_attn = Attention(cfg, layer, cross=True)
            self.hook_cross_attn_out = HookPoint()
            self.hook_resid_mid_cross = HookPoint()
        if not cfg.attn_only:
            # A parallel block whose MLP reads ln1's output has no second pre-norm.
            mlp_norm = Norm(cfg) if pre and not (cfg.parallel_attn_mlp and cfg.shared_norm) else None
            setattr(self, "ln3" if cross else "ln2", mlp_norm)
            self.ln2_post = Norm(cfg, kind=cfg.base_norm_type) if post else None
            self.mlp = MoE(cfg) if cfg.is_moe(layer) else MLP(cfg)
            if not cfg.parallel_attn_mlp:
                self.hook_resid_mid = HookPoint()
            self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()
        if cfg.post_ln:
            self.hook_normalized_resid_post = HookPoint()
        # TransformerLens' opt-in hook points (model.set_use_split_qkv_input / set_use_attn_in / set_use_hook_mlp_in).
        if cfg.use_split_qkv_input:
            self.hook_q_input, self.hook_k_input, self.hook_v_input = HookPoint(), HookPoint(), HookPoint()
        if cfg.use_attn_in:
            self.hook_attn_in = HookPoint()
        if cfg.use_hook_mlp_in and not cfg.attn_only:
            self.hook_mlp_in = HookPoint()
        self.placed_on: torch.device | None = None  # set when the model spans several devices (models.placement)

    @property
    def mlp_norm(self) -> Norm | None:
        """The norm before (or, post-LN, after) the MLP: ln2, or ln3 in a block with cross-attention."""
        return getattr(self, "ln3" if self.cross else "ln2", None)

    def forward(self, resid: torch.Tensor, frame: AttentionFrame, cross: CrossFrame | None = None) -> torch.Tensor:
        # resid: [batch, pos, d_model]; cross: the encoder's output, for a decoder block of an encoder-decoder
        if self.cross and cross is None:
            raise ValueError("a decoder block with cross-attention needs the encoder's output")
        if self.placed_on is not None:  # a model over several devices: the stream, and what attention shares, cross here
            resid = resid.to(self.placed_on)
            frame = frame.on(self.placed_on)
            cross = cross.on(self.placed_on) if cross is not None else None
        if self.cfg.post_ln:
            return self._post_ln(resid, frame, cross)
        resid_pre = self.hook_resid_pre(resid)
        attn_in = self.ln1(resid_pre) if self.ln1 is not None else resid_pre
        attn_out = self.attn(attn_in, frame, self._head_inputs(resid_pre))
        if self.ln1_post is not None:
            attn_out = self.ln1_post(attn_out)
        attn_out = self.hook_attn_out(attn_out)
        if self.cfg.attn_only:
            return self.hook_resid_post(resid_pre + attn_out)
        if self.cfg.parallel_attn_mlp:
            if hasattr(self, "hook_mlp_in"):
                mlp_resid = self.hook_mlp_in(resid_pre.clone())
                norm = self.ln1 if self.cfg.shared_norm else self.ln2
                mlp_in = norm(mlp_resid) if norm is not None else mlp_resid
            else:
                mlp_in = attn_in if self.cfg.shared_norm else (self.ln2(resid_pre) if self.ln2 is not None else resid_pre)
            mlp_out = self.hook_mlp_out(self._mlp(mlp_in))
            return self.hook_resid_post(resid_pre + attn_out + mlp_out)
        resid_mid = self.hook_resid_mid(resid_pre + attn_out)
        if self.cross:
            cross_in = self.ln2(resid_mid) if self.ln2 is not None else resid_mid
            resid_mid = self.hook_resid_mid_cross(resid_mid + self.hook_cross_attn_out(self.cross_attn(cross_in, cross)))
        norm = self.mlp_norm
        mlp_resid = self.hook_mlp_in(resid_mid.clone()) if hasattr(self, "hook_mlp_in") else resid_mid
        mlp_in = norm(mlp_resid) if norm is not None else mlp_resid
        mlp_out = self.hook_mlp_out(self._mlp(mlp_in))
        return self.hook_resid_post(resid_mid + mlp_out)

    def _head_inputs(self, resid: torch.Tensor):
        """TransformerLens' per-head copies of the attention input (before the norm), when switched on:
        (q input [b, p, n_heads, d_model], k input, v input [b, p, n_kv_heads, d_model]), normalised; or None."""
        split, shared = hasattr(self, "hook_q_input"), hasattr(self, "hook_attn_in")
        if not (split or shared):
            return None
        h, kv = self.cfg.n_heads, self.cfg.n_kv_heads
        copies = lambda n: resid[:, :, None].expand(-1, -1, n, -1).clone()  # noqa: E731
        if shared:
            attn_in = self.hook_attn_in(copies(h))
            q_in = attn_in
            k_in = v_in = attn_in[:, :, :: h // kv]  # a KV head reads its group's first copy
        if split:
            q_in, k_in, v_in = (self.hook_q_input(copies(h)), self.hook_k_input(copies(kv)),
                                self.hook_v_input(copies(kv)))
        norm = self.ln1
        return tuple(norm(t) if norm is not None else t for t in (q_in, k_in, v_in))

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        out = self.mlp(x)
        return self.ln2_post(out) if self.ln2_post is not None else out

    def _post_ln(self, resid: torch.Tensor, frame: AttentionFrame, cross: CrossFrame | None = None) -> torch.Tensor:
        # BERT: x = LN1(x + attn(x)); x = LN2(x + mlp(x)). Names follow TransformerLens' BertBlock.
        # BART's decoder: x = LN2(x + cross_attn(x)) between the two, and the MLP's norm is ln3.
        resid_pre = self.hook_resid_pre(resid)
        attn_out = self.hook_attn_out(self.attn(resid_pre, frame))
        if self.cfg.attn_only:
            return self.hook_normalized_resid_post(self.ln1(self.hook_resid_post(resid_pre + attn_out)))
        resid_mid = self.ln1(self.hook_resid_mid(resid_pre + attn_out))
        if self.cross:
            cross_out = self.hook_cross_attn_out(self.cross_attn(resid_mid, cross))
            resid_mid = self.ln2(self.hook_resid_mid_cross(resid_mid + cross_out))
        mlp_out = self.hook_mlp_out(self.mlp(resid_mid))
        resid_post = self.hook_resid_post(resid_mid + mlp_out)
        return self.hook_normalized_resid_post(self.mlp_norm(resid_post))
