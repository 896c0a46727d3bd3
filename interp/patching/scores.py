"""Attention scores recomputed outside the forward (path patching's receivers, AtP*'s q/k fix).

The model's own attention says how q.k becomes a score (scale, soft-cap) and which keys a
query sees (causal, sliding window), so a recomputed pattern equals the forward's in every
family. Models without those methods (TransformerLens') get scaled, causal scores.
"""

from __future__ import annotations

import torch


def score_and_mask(model, layer: int, n_pos: int, device=None):
    """(dots -> scores, allowed [n_pos, n_pos] bool) for an unpadded sequence starting at position 0."""
    attn = model.blocks[layer].attn
    if hasattr(attn, "scores_from_dots"):
        return attn.scores_from_dots, attn.allowed_from_start(n_pos, device)
    cfg = model.cfg
    scale = getattr(cfg, "attn_scale", None) or cfg.d_head ** 0.5
    allowed = torch.ones(n_pos, n_pos, dtype=torch.bool, device=device)
    if getattr(cfg, "attention_dir", "causal") == "causal":
        allowed = allowed.tril()
    return (lambda dots: dots / scale), allowed


def qk_hook_names(cfg) -> tuple[str, str]:
    """The hook points holding the queries and keys that enter the dot product (relative to a block)."""
    if getattr(cfg, "positional_embedding_type", None) == "rotary":
        return "attn.hook_rot_q", "attn.hook_rot_k"
    if getattr(cfg, "qk_norm", None):
        raise ValueError("q/k norms without rotary positions leave no hook on the normalised queries and keys; "
                         "recomputing patterns needs one")
    return "attn.hook_q", "attn.hook_k"
