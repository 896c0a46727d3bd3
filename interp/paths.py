"""Path expansion of an attention-only model's logits (Elhage et al. 2021, "path expansion trick").

With the attention patterns held at the values of a real forward, an attention-only
transformer is linear in its embeddings, so its logits are an exact sum of paths:

    logits = direct                       embeddings -> unembedding
           + sum_h  L{l}H{h}              one head between them
           + sum_{i<j} L{l}H{i}->L{m}H{j}   virtual heads: i's output read by j's values (V-composition)
           + ...                          longer chains, up to `max_order` heads, then merged
           + bias                         everything that starts at a bias

Norm scales are held at their values too (a norm is linear once its scale is fixed),
so the sum is exact for models with norms as well; without norms nothing is held but
the patterns. Q- and K-composition change the patterns themselves and so appear in
which pattern a head has, not as separate terms.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PathExpansion:
    """terms[name]: `[batch, pos, d_vocab_out]`, one per path; `logits` is the model's own output."""

    terms: dict[str, torch.Tensor]
    logits: torch.Tensor

    def total(self) -> torch.Tensor:
        return torch.stack(list(self.terms.values())).sum(0)

    def order(self, name: str) -> int:
        if name in ("direct", "bias"):
            return 0
        if name == "higher-order":
            return -1
        return name.count("->") + 1

    def by_order(self) -> dict[str, torch.Tensor]:
        """Terms grouped: direct, single heads, virtual heads (order 2), longer, bias."""
        groups: dict[str, torch.Tensor] = {}
        labels = {0: None, 1: "single heads", 2: "virtual heads"}
        for name, term in self.terms.items():
            k = self.order(name)
            label = name if k == 0 else labels.get(k, "higher order")
            groups[label] = groups.get(label, 0) + term
        return groups

    def to_frame(self, position: int = -1):
        """One row per path: its mean contribution's norm at `position`, largest first."""
        import pandas as pd

        rows = [{"path": n, "order": self.order(n), "norm": float(t[:, position].norm(dim=-1).mean())}
                for n, t in self.terms.items()]
        return pd.DataFrame(rows).sort_values("norm", ascending=False, ignore_index=True)


def _norm_parts(norm, scale: torch.Tensor):
    """(linear map, constant) of a norm whose scale is held fixed; identity when there is no norm."""
    if norm is None:
        return (lambda v: v), None
    centre = not norm.rms

    def linear(v: torch.Tensor) -> torch.Tensor:
        if centre:
            v = v - v.mean(-1, keepdim=True)
        v = v / scale
        weight = getattr(norm, "effective_weight", norm.w)
        return v * weight if weight is not None else v

    return linear, norm.b


def path_expansion(model, tokens: torch.Tensor, max_order: int = 2) -> PathExpansion:
    """Decompose `model(tokens)`'s logits into paths; needs a pre-LN attention-only model."""
    cfg = model.cfg
    if not cfg.attn_only or getattr(cfg, "post_ln", False):
        raise ValueError("path expansion needs a pre-LN attention-only model (MLPs are not linear)")
    if getattr(cfg, "post_sublayer_norm", False) or not getattr(cfg, "pre_norm", True):
        raise ValueError("path expansion needs each head's output added to the stream as it is; this model "
                         "normalises the attention output (ln1_post) before the add")
    if getattr(cfg, "output_logits_soft_cap", None) is not None or getattr(cfg, "embed_scale", None) is not None:
        raise ValueError("path expansion needs logits linear in the stream and unscaled embeddings; this model "
                         "soft-caps its logits or scales its embeddings")
    tokens = torch.as_tensor(tokens, device=model.device)
    tokens = tokens[None] if tokens.dim() == 1 else tokens
    wanted = ("hook_pattern", "hook_scale", "hook_embed", "hook_pos_embed")
    logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith(wanted))
    embed = cache["hook_embed"]
    if "hook_pos_embed" in cache:
        embed = embed + cache["hook_pos_embed"]
    sources: dict[str, torch.Tensor] = {"direct": embed, "bias": torch.zeros_like(embed)}
    for layer, block in enumerate(model.blocks):
        attn = block.attn
        scale = cache[f"blocks.{layer}.ln1.hook_scale"] if block.ln1 is not None else None
        linear, const = _norm_parts(block.ln1, scale)
        pattern = cache["pattern", layer]  # [batch, head, query, key]
        new: dict[str, torch.Tensor] = {}
        for name, stream in sources.items():
            x = linear(stream)
            if name == "bias" and const is not None:
                x = x + const
            v = torch.einsum("bpd,hdk->bhpk", x, attn.W_V)
            if name == "bias":
                v = v + attn.b_V[None, :, None, :]  # rows of the pattern sum to 1
            out = torch.einsum("bhqp,bhpk,hkd->bhqd", pattern, v, attn.W_O)
            for head in range(cfg.n_heads):
                if name == "bias":
                    key = "bias"
                elif name == "direct":
                    key = f"L{layer}H{head}"
                elif name == "higher-order" or name.count("->") + 1 >= max_order:
                    key = "higher-order"
                else:
                    key = f"{name}->L{layer}H{head}"
                new[key] = new.get(key, 0) + out[:, head]
        new["bias"] = new["bias"] + attn.b_O
        for key, value in new.items():
            sources[key] = sources.get(key, 0) + value
    scale = cache["ln_final.hook_scale"] if model.ln_final is not None else None
    linear, const = _norm_parts(model.ln_final, scale)
    terms = {}
    for name, stream in sources.items():
        x = linear(stream)
        if name == "bias" and const is not None:
            x = x + const
        terms[name] = x @ model.W_U + (model.b_U if name == "bias" else 0)
    return PathExpansion(terms, logits)
