"""Exact decomposition of the residual stream at chosen tokens into every component's share.

The residual stream of a pre-LN transformer is a plain sum (Elhage et al. 2021, "A
Mathematical Framework"): embeddings, each head's output z_h @ W_O[h], each attention
bias b_O and each MLP's output. `decompose` returns those terms at one target token per
prompt, so "why did 'tower' move after 'Eiffel'" becomes a ranked list of components.

Post-LN models (BERT) renormalise the stream after every sublayer. A LayerNorm is linear
once its scale is held at the value of the real forward, LN(x) = (x - mean x) / s * w + b,
so every earlier term is pushed through (centred, divided by s, times w) and the norm's
bias becomes a term of its own ("L3 ln1 bias"). The sum stays exact for the forward it
came from; the terms are attributions under that fixed scale, not what a component would
give alone. Norms on a sublayer's output (Gemma 2/3's and OLMo 2's ln1_post) are
linearised the same way, for that layer's heads and attention bias only; MLP outputs
are read after their ln2_post. Parallel blocks add heads and MLP from the same stream.

Works on any model with TransformerLens-style hooks (`run_with_hooks`, `hook_dict`,
`blocks[l].attn.W_O/b_O`, norms with `w`, `b`, `hook_scale`) and a forward taking
`stop_at_layer`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from interp.devices import one_device, take


@dataclass
class Decomposition:
    """`components[t, c]` is component c's share of `resid[t]`; they sum to it exactly."""

    labels: list[str]  # "embed", "pos_embed", "L3H5", "L3 attn bias", "L3 MLP", "L3 ln1 bias", ...
    kinds: list[str]  # "embed" | "head" | "attn_bias" | "mlp" | "norm_bias"
    layer_of: list[int]  # -1 for the embeddings (and the embedding norm's bias)
    head_of: list[int | None]
    components: torch.Tensor  # [n_targets, n_components, d_model]
    resid: torch.Tensor  # [n_targets, d_model]: the vector decomposed (what block `layer` would read)
    layer: int  # how many blocks were applied (0..n_layers)
    positions: list[int] = field(default_factory=list)  # the target position in each prompt

    def total(self) -> torch.Tensor:
        """`[n_targets, d_model]`: the components' sum, equal to `resid`."""
        return self.components.sum(1)

    def index(self, label: str) -> int:
        try:
            return self.labels.index(label)
        except ValueError:
            raise KeyError(f"no component {label!r}; labels look like {self.labels[:4]}") from None

    def __getitem__(self, label: str) -> torch.Tensor:
        """`[n_targets, d_model]`: one component by label."""
        return self.components[:, self.index(label)]

    def project(self, direction: torch.Tensor) -> torch.Tensor:
        """`[n_targets, n_components]`: each component . unit(direction).

        direction: `[d_model]` (shared) or `[n_targets, d_model]` (one per target, e.g.
        each prompt's shift vector)."""
        d = torch.as_tensor(direction, device=self.components.device).to(self.components.dtype)
        if d.shape[-1] != self.components.shape[-1] or d.dim() not in (1, 2):
            raise ValueError(f"direction must be [d_model] or [n_targets, d_model], got {tuple(d.shape)}")
        if d.dim() == 1:
            d = d.expand(self.components.shape[0], -1)
        elif d.shape[0] != self.components.shape[0]:
            raise ValueError(f"{d.shape[0]} directions for {self.components.shape[0]} targets")
        unit = d / d.norm(dim=-1, keepdim=True)
        return torch.einsum("tcd,td->tc", self.components, unit)

    def top(self, direction: torch.Tensor, k: int = 10, target: int | None = None) -> list[tuple[str, float]]:
        """The k components with the largest |projection| on `direction` (signed values),
        for one target or averaged over all targets."""
        proj = self.project(direction)
        values = proj.mean(0) if target is None else proj[target]
        order = values.abs().argsort(descending=True)[:k]
        return [(self.labels[i], float(values[i])) for i in order.tolist()]

    def to_frame(self, direction: torch.Tensor | None = None):
        """pandas: one row per (target, component) with its norm (and projection on `direction`)."""
        import pandas as pd

        norms = self.components.norm(dim=-1)  # [n_targets, n_components]
        proj = self.project(direction) if direction is not None else None
        rows = []
        for t in range(self.components.shape[0]):
            for c, label in enumerate(self.labels):
                row = {"target": t, "position": self.positions[t] if self.positions else None, "label": label,
                       "kind": self.kinds[c], "layer": self.layer_of[c], "head": self.head_of[c],
                       "norm": float(norms[t, c])}
                if proj is not None:
                    row["projection"] = float(proj[t, c])
                rows.append(row)
        frame = pd.DataFrame(rows)
        frame["head"] = frame["head"].astype("Int64")  # integers with <NA>, not floats with NaN
        return frame


# ---------------------------------------------------------------------- checks and helpers
def _targets(model, tokens, positions, attention_mask) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens [batch, pos], rows [n], cols [n]) with positions checked; negatives count from the end."""
    tokens = torch.as_tensor(tokens, device=next(model.parameters()).device)
    if tokens.dim() == 1:
        tokens = tokens[None]
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [batch, pos], got {tuple(tokens.shape)}")
    batch, n_pos = tokens.shape
    if isinstance(positions, int) or (torch.is_tensor(positions) and positions.dim() == 0):
        positions = [int(positions)] * batch
    positions = [int(p) for p in positions]
    if len(positions) != batch:
        raise ValueError(f"need one position per prompt: {len(positions)} positions for a batch of {batch}")
    for i, p in enumerate(positions):
        if not -n_pos <= p < n_pos:
            raise IndexError(f"position {p} of prompt {i} is outside its {n_pos} tokens")
    cols = torch.tensor([p % n_pos for p in positions], device=tokens.device)
    rows = torch.arange(batch, device=tokens.device)
    if attention_mask is not None:
        real = torch.as_tensor(attention_mask, device=tokens.device)[rows, cols]
        if not bool(real.all()):
            bad = [i for i in range(batch) if not bool(real[i])]
            raise ValueError(f"target position is padding in prompt(s) {bad}")
    return tokens, rows, cols


def _embed_norm(model):
    """The post-LN embedding norm: ours is `model.ln_embed`, TransformerLens' BERT has `embed.ln`."""
    norm = getattr(model, "ln_embed", None)
    return norm if norm is not None else getattr(getattr(model, "embed", None), "ln", None)


def _centres(norm) -> bool:
    """LayerNorm centres its input; RMSNorm does not."""
    if hasattr(norm, "rms"):
        return not norm.rms
    return "rms" not in type(norm).__name__.lower()


def _gathering_hook(store: dict, rows: torch.Tensor, cols: torch.Tensor):
    """Keep only the target rows of an activation [batch, pos, ...] -> [n_targets, ...]."""
    def hook(tensor, hook):
        store[hook.name] = take(tensor, rows, cols).detach()
    return hook


def _forward_kwargs(attention_mask, token_type_ids) -> dict:
    kwargs = {}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if token_type_ids is not None:
        kwargs["token_type_ids"] = token_type_ids
    return kwargs


# ---------------------------------------------------------------------- the decomposition
def decompose(model, tokens: torch.Tensor, positions: Sequence[int] | int, layer: int | None = None,
              attention_mask: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None) -> Decomposition:
    """Decompose the residual stream after `layer` blocks (None: all of them, before any
    final norm) at `positions[i]` of prompt i into embeddings, heads, biases and MLPs.

    tokens: `[batch, pos]`; positions: one per prompt (or one int for all); one forward,
    caching only the target rows of the hooks it needs."""
    cfg = model.cfg
    n_layers = cfg.n_layers
    layer = n_layers if layer is None else layer
    if not isinstance(layer, int) or not 0 <= layer <= n_layers:
        raise ValueError(f"layer must be in 0..{n_layers} (blocks applied), got {layer!r}")
    tokens, rows, cols = _targets(model, tokens, positions, attention_mask)
    post_ln = bool(getattr(cfg, "post_ln", False))
    attn_only = bool(getattr(cfg, "attn_only", False))
    hook_dict = model.hook_dict

    embeds = [("embed", "hook_embed")]
    if "hook_token_type_embed" in hook_dict:
        embeds.append(("token_type_embed", "hook_token_type_embed"))
    if getattr(cfg, "positional_embedding_type", "standard") == "standard" and "hook_pos_embed" in hook_dict:
        embeds.append(("pos_embed", "hook_pos_embed"))
    names = [name for _, name in embeds]
    for l in range(layer):
        names.append(f"blocks.{l}.attn.hook_z")
        if not attn_only:
            names.append(f"blocks.{l}.hook_mlp_out")
    embed_norm = _embed_norm(model) if post_ln else None
    # Norms on a sublayer's output before the add (Gemma 2/3, OLMo 2): the heads reach the stream through
    # ln1_post, linearised at its real scale like the post-LN norms. hook_mlp_out is already after ln2_post.
    attn_post = [getattr(model.blocks[l], "ln1_post", None) for l in range(layer)]
    if post_ln:  # the real forward's norm scales [batch, pos, 1], to linearise each norm with
        norms = ([embed_norm] if embed_norm is not None else []) + [model.blocks[l].ln1 for l in range(layer)]
        norms += [] if attn_only else [model.blocks[l].ln2 for l in range(layer)]
        names += [norm.hook_scale.name for norm in norms]
    names += [norm.hook_scale.name for norm in attn_post if norm is not None]

    store: dict[str, torch.Tensor] = {}
    hook = _gathering_hook(store, rows, cols)
    with torch.no_grad():
        stream = model.run_with_hooks(tokens, fwd_hooks=[(n, hook) for n in names], stop_at_layer=layer,
                                      **_forward_kwargs(attention_mask, token_type_ids))
    resid = take(stream, rows, cols)  # [n, d_model]: what block `layer` reads (or the last block's output)
    dtype = torch.promote_types(resid.dtype, torch.float32)

    labels, kinds, layer_of, head_of = [], [], [], []
    parts: list[torch.Tensor] = []  # each [n, k, d_model]

    def add(part, new_labels, kind, at_layer, heads=None):
        parts.append(part.to(resid.device, dtype))  # a split model: every term where the stream ended
        labels.extend(new_labels)
        kinds.extend([kind] * len(new_labels))
        layer_of.extend([at_layer] * len(new_labels))
        head_of.extend(heads if heads is not None else [None] * len(new_labels))

    def through_norm(norm, label, at_layer, first: int = 0):
        # LN(x) with its scale s fixed is linear: push every term (from parts[first] on) through, then add its bias.
        scale = store[norm.hook_scale.name].to(resid.device, dtype)[:, None]  # [n, 1, 1]
        acc = torch.cat(parts[first:], dim=1)  # [n, k, d_model]
        if _centres(norm):
            acc = acc - acc.mean(-1, keepdim=True)
        acc = acc / scale
        weight = getattr(norm, "effective_weight", getattr(norm, "w", None))
        if weight is not None:
            acc = acc * weight.to(resid.device, dtype)
        parts[first:] = [acc]
        if getattr(norm, "b", None) is not None:
            add(norm.b.to(dtype).expand(len(rows), 1, -1), [label], "norm_bias", at_layer)

    for label, name in embeds:
        add(store[name][:, None], [label], "embed", -1)
    if embed_norm is not None:
        through_norm(embed_norm, "embed ln bias", -1)
    for l in range(layer):
        attn = model.blocks[l].attn
        z = store[f"blocks.{l}.attn.hook_z"].to(dtype)  # [n, n_heads, d_head], per query head (GQA too)
        heads = torch.einsum("nhk,hkd->nhd", z, attn.W_O.to(dtype))  # only the targets, never hook_result
        first = len(parts)
        add(heads, [f"L{l}H{h}" for h in range(heads.shape[1])], "head", l, list(range(heads.shape[1])))
        add(attn.b_O.to(dtype).expand(len(rows), 1, -1), [f"L{l} attn bias"], "attn_bias", l)
        if attn_post[l] is not None:
            through_norm(attn_post[l], f"L{l} ln1_post bias", l, first)
        if post_ln:
            through_norm(model.blocks[l].ln1, f"L{l} ln1 bias", l)
        if not attn_only:
            add(store[f"blocks.{l}.hook_mlp_out"][:, None], [f"L{l} MLP"], "mlp", l)
            if post_ln:
                through_norm(model.blocks[l].ln2, f"L{l} ln2 bias", l)
    return Decomposition(labels, kinds, layer_of, head_of, torch.cat(parts, dim=1), resid.to(dtype), layer,
                         cols.tolist())


def head_attention_from(model, tokens: torch.Tensor, positions: Sequence[int] | int,
                        heads: Sequence[tuple[int, int]], attention_mask: torch.Tensor | None = None,
                        token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
    """`[n_targets, len(heads), pos]`: where each listed head (layer, head) attends from the
    target position of each prompt. One forward, stopped after the last layer needed, with
    `hook_pattern` hooked only in the layers listed."""
    cfg = model.cfg
    heads = [(int(l), int(h)) for l, h in heads]
    if not heads:
        raise ValueError("no heads listed")
    for l, h in heads:
        if not (0 <= l < cfg.n_layers and 0 <= h < cfg.n_heads):
            raise ValueError(f"head ({l}, {h}) is outside {cfg.n_layers} layers x {cfg.n_heads} heads")
    tokens, rows, cols = _targets(model, tokens, positions, attention_mask)
    layers = sorted({l for l, _ in heads})
    store: dict[str, torch.Tensor] = {}

    def hook(pattern, hook):  # [batch, n_heads, q, k] -> [n, n_heads, k]
        store[hook.name] = take(pattern, rows, slice(None), cols).detach()

    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{l}.attn.hook_pattern", hook) for l in layers],
                             stop_at_layer=layers[-1] + 1, **_forward_kwargs(attention_mask, token_type_ids))
    return torch.stack(one_device([store[f"blocks.{l}.attn.hook_pattern"][:, h] for l, h in heads]), dim=1)
