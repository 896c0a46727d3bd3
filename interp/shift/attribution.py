"""Which components carry a word's shift: the difference between two senses (or two contexts)
decomposed exactly into embeddings, heads, biases and MLPs, with where the top heads attend.

With A and B two groups of contexts and v the word's vector after `layer` blocks, the
direction is u = unit(mean_A v - mean_B v). Each component c contributes
mean_A (c . u) - mean_B (c . u), and the contributions sum to ||mean_A v - mean_B v||
exactly, because the components sum to v in every context (see `decompose`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from interp.shift.decompose import decompose, head_attention_from
from interp.shift.trace import WordTrace


@dataclass
class HeadAttention:
    """Where one head attends from the word in each context of A, then of B: `weights[i]` is `[pos_i]`."""

    label: str  # "L5H3"
    layer: int
    head: int
    weights: list[torch.Tensor]
    top: list[list[tuple[str, float]]]  # per context: the most attended tokens (sink excluded) with weights
    sink: list[float]  # per context: weight on position 0 (a decoder's attention sink)


@dataclass
class ShiftAttribution:
    """Components' shares of the distance between two groups' mean vectors at one layer."""

    layer: int  # blocks applied (0..n_layers)
    a: str
    b: str
    group_a: list[int]
    group_b: list[int]
    labels: list[str]
    kinds: list[str]
    layer_of: list[int]
    head_of: list[int | None]
    per_context: torch.Tensor  # [n_contexts, n_components]: each component . u
    contribution: torch.Tensor  # [n_components]: mean over A - mean over B; sums to `distance`
    distance: float
    attention: list[HeadAttention] = field(default_factory=list)

    def top(self, k: int = 10, kind: str | None = None) -> list[tuple[str, float]]:
        """The k components with the largest |contribution| (optionally of one kind: "head", "mlp", ...)."""
        idx = [i for i in range(len(self.labels)) if kind is None or self.kinds[i] == kind]
        idx.sort(key=lambda i: -abs(float(self.contribution[i])))
        return [(self.labels[i], float(self.contribution[i])) for i in idx[:k]]

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame({"component": self.labels, "kind": self.kinds, "layer": self.layer_of,
                             "head": pd.array(self.head_of, dtype="Int64"),
                             "contribution": self.contribution.tolist(),
                             "share": (self.contribution / self.distance).tolist()}) \
            .sort_values("contribution", key=abs, ascending=False, ignore_index=True)

    def to_dict(self, k: int = 20) -> dict:
        return {"layer": self.layer, "a": self.a, "b": self.b, "distance": self.distance,
                "top": [{"component": c, "contribution": v} for c, v in self.top(k)],
                "attention": [{"head": h.label, "top": [[(t, round(w, 4)) for t, w in row] for row in h.top],
                               "sink": h.sink} for h in self.attention]}


def _groups(trace: WordTrace, a, b) -> tuple[list[int], list[int], str, str]:
    """Context indices of A and B: sense names (with labels) or single context indices."""
    def members(x):
        if isinstance(x, int):
            if not -len(trace.contexts) <= x < len(trace.contexts):
                raise ValueError(f"context index {x} is out of range for {len(trace.contexts)} contexts")
            return [x % len(trace.contexts)], f"context {x % len(trace.contexts)}"
        if trace.labels is None:
            raise ValueError(f"{x!r} is not a context index, and the trace has no sense labels")
        found = [i for i, s in enumerate(trace.labels) if s == x]
        if not found:
            raise ValueError(f"no context has the sense {x!r}; senses: {trace.senses}")
        return found, str(x)

    ga, na = members(a)
    gb, nb = members(b)
    if set(ga) & set(gb):
        raise ValueError(f"{na} and {nb} overlap: contrast two different groups")
    return ga, gb, na, nb


def _padded(trace: WordTrace, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The contexts' tokens right-padded into one batch [n, pos] and its attention mask (padding never
    changes a real position: keys are masked, and positions count real tokens)."""
    length = max(len(trace.token_ids[i]) for i in indices)
    tokens = torch.zeros(len(indices), length, dtype=torch.long)
    mask = torch.zeros(len(indices), length, dtype=torch.long)
    for row, i in enumerate(indices):
        ids = trace.token_ids[i]
        tokens[row, :len(ids)] = ids
        mask[row, :len(ids)] = 1
    return tokens, mask


@torch.no_grad()
def shift_attribution(model, trace: WordTrace, a, b, layer: int | None = None, n_heads_shown: int = 4,
                      top_tokens: int = 3) -> ShiftAttribution:
    """Decompose mean_A v - mean_B v after `layer` blocks (default: all) onto every component.

    a, b: sense names (the trace needs labels) or context indices. The word is read where
    the trace read it (its last sub-token, or the context's end); mean pooling over several
    sub-tokens is decomposed at the last one, since a decomposition is per position.
    """
    layer = trace.n_layers if layer is None else int(layer)
    if not 0 <= layer <= trace.n_layers:
        raise ValueError(f"layer must be in 0..{trace.n_layers}, got {layer}")
    ga, gb, na, nb = _groups(trace, a, b)
    used = ga + gb
    target = [trace.read_positions[i][-1] for i in used]
    tokens, mask = _padded(trace, used)
    dec = decompose(model, tokens, target, layer=layer, attention_mask=mask)
    comps = dec.components.double().cpu()  # [n_used, n_components, d_model]
    pos_a, pos_b = list(range(len(ga))), list(range(len(ga), len(used)))
    total = comps.sum(1)  # [n_used, d_model]
    diff = total[pos_a].mean(0) - total[pos_b].mean(0)
    distance = float(diff.norm())
    if distance == 0:
        raise ValueError(f"{na} and {nb} have the same mean vector after {layer} blocks: there is no shift to "
                         "attribute (e.g. layer 0 of a model without absolute positions)")
    u = diff / distance
    proj = comps @ u  # [n_used, n_components]
    per_context = torch.full((len(trace.contexts), proj.shape[1]), float("nan"), dtype=torch.float64)
    per_context[used] = proj
    contribution = proj[pos_a].mean(0) - proj[pos_b].mean(0)
    result = ShiftAttribution(layer, na, nb, ga, gb, dec.labels, dec.kinds, dec.layer_of, dec.head_of,
                              per_context.float(), contribution.float(), distance)

    heads = [lab for lab, _ in result.top(len(dec.labels), kind="head")][:n_heads_shown]
    pairs = [(dec.layer_of[dec.labels.index(h)], dec.head_of[dec.labels.index(h)]) for h in heads]
    if pairs:
        pattern = head_attention_from(model, tokens, target, pairs, attention_mask=mask)  # [n_used, n_heads, pos]
        skip = 1 if trace.causal else 0
        for j, (label, (l, h)) in enumerate(zip(heads, pairs)):
            rows = [pattern[r, j, :len(trace.token_ids[i])].float().cpu() for r, i in enumerate(used)]
            tops = []
            for i, w in zip(used, rows):
                vals, idx = w[skip:].topk(min(top_tokens, len(w) - skip))
                tops.append([(trace.str_tokens[i][int(p) + skip], float(v)) for v, p in zip(vals, idx)])
            sink = [float(w[0]) if trace.causal else 0.0 for w in rows]
            result.attention.append(HeadAttention(label, l, h, rows, tops, sink))
    return result
