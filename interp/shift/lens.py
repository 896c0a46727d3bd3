"""What a residual-stream vector predicts: the logit lens, lens readouts, nearest tokens.

The logit lens (nostalgebraist 2020) reads any layer's residual vector with the model's
own output head, `unembed(ln_final(h))`, as if the remaining layers were skipped. At the
last layer it *is* the model's output. A tuned lens (`interp.shift.tuned_lens`) first
moves `h` by a learned affine map per layer.

Encoders have no such head to borrow (BERT's norm sits inside each block and all-MiniLM
has no MLM head), so for them `nearest_tokens` compares a vector with the input
embeddings by cosine instead; it works for any model.

Vectors per layer follow `trace_word`'s layout `[n_targets, n_layers + 1, d_model]`:
entry 0 is what the first block reads, entry l the output of block l-1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class NoLensError(ValueError):
    """The model has no decoder output head that a lens can read through."""


def _special_ids(model) -> set[int]:
    tok = getattr(model, "tokenizer", None)
    ids = set(getattr(tok, "all_special_ids", None) or []) if tok is not None else set()
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(model.cfg, name, None)
        if value is not None:
            ids.add(int(value))
    return ids


def check_lens_model(model) -> None:
    """Raise `NoLensError` unless logits are `unembed(ln_final(resid))` for this model."""
    name = getattr(model.cfg, "model_name", type(model).__name__)
    why = None
    if not getattr(model.cfg, "causal", True):
        why = "is an encoder (bidirectional): no final norm + unembedding reads its residual stream"
    elif getattr(model, "unembed", None) is None:
        why = "has no unembedding"
    elif getattr(model, "mlm_head", None) is not None:
        why = "reads its output through an MLM head, not ln_final + unembed"
    elif getattr(model, "ln_final", None) is None and getattr(model.cfg, "normalization_type", None) is not None \
            and getattr(model.cfg, "final_norm", True):
        why = "has norms but no ln_final"
    if why is not None:
        raise NoLensError(
            f"the logit lens needs a decoder's final norm and unembedding; {name} {why}. "
            "Use interp.shift.lens.nearest_tokens(model, vectors) to read vectors by cosine "
            "similarity to the token embeddings instead."
        )


def logit_lens(model, resid: torch.Tensor) -> torch.Tensor:
    """Logits `[..., d_vocab]` of residual vectors `resid [..., d_model]` from any layer.

    The model's own head: `unembed(ln_final(resid))` (RMSNorm for LLaMA/SmolLM2, LayerNorm
    for GPT-2, nothing for norm-free models; Gemma 2's final soft-cap after it), so the final
    layer's lens equals the logits.
    """
    check_lens_model(model)
    W = model.unembed.W_U
    resid = resid.to(device=W.device, dtype=W.dtype)
    if model.ln_final is not None:
        resid = model.ln_final(resid)
    logits = model.unembed(resid)
    cap = getattr(model.cfg, "output_logits_soft_cap", None)
    return torch.tanh(logits / cap) * cap if cap is not None else logits


# ---------------------------------------------------------------------- nearest tokens
@dataclass
class NearestTokens:
    """The k embedding rows closest (cosine) to each vector; leading shape that of the input."""

    ids: torch.Tensor  # [..., k]
    similarities: torch.Tensor  # [..., k]
    tokens: list  # nested lists of strings, shaped like ids

    def to_dict(self) -> dict:
        return {"ids": self.ids.tolist(), "similarities": self.similarities.tolist(), "tokens": self.tokens}


def _decode(model, ids: torch.Tensor) -> list:
    """Nested lists of token strings shaped like `ids` (ids when there is no tokenizer)."""
    flat = ids.reshape(-1).tolist()
    strs = model.to_str_tokens(torch.tensor(flat)) if getattr(model, "tokenizer", None) is not None and flat else \
        [str(i) for i in flat]
    out = strs
    for n in reversed(ids.shape[1:]):
        out = [out[i:i + n] for i in range(0, len(out), n)]
    return out if ids.dim() else out[0]


def nearest_tokens(model, vectors: torch.Tensor, k: int = 5, exclude_special: bool = True,
                   chunk: int = 1024) -> NearestTokens:
    """Top-k rows of `W_E [d_vocab, d_model]` by cosine similarity to each of `vectors [..., d_model]`.

    Special tokens ([CLS], [SEP], BOS/EOS, padding) are left out unless `exclude_special=False`:
    their embeddings are trained as positional anchors and would crowd every list.
    """
    W_E = model.W_E.detach()
    E = W_E / W_E.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # [d_vocab, d_model]
    lead = vectors.shape[:-1]
    v = vectors.detach().reshape(-1, vectors.shape[-1]).to(device=E.device, dtype=E.dtype)
    v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    excluded = torch.tensor(sorted(_special_ids(model)), dtype=torch.long, device=E.device) if exclude_special else None
    ids, sims = [], []
    for start in range(0, v.shape[0], chunk):  # [chunk, d_vocab] at a time, not [n, d_vocab]
        s = v[start:start + chunk] @ E.T
        if excluded is not None and excluded.numel():
            s[:, excluded] = float("-inf")
        top = s.topk(k, dim=-1)
        ids.append(top.indices)
        sims.append(top.values)
    ids_t = torch.cat(ids).reshape(*lead, k).cpu() if ids else torch.empty(*lead, k, dtype=torch.long)
    sims_t = torch.cat(sims).reshape(*lead, k).cpu() if sims else torch.empty(*lead, k)
    return NearestTokens(ids_t, sims_t, _decode(model, ids_t))


# ---------------------------------------------------------------------- lens readouts
@dataclass
class LensReadout:
    """What a lens reads from vectors, per target and layer: top-k tokens and tracked tokens."""

    lens: str  # "logit" or "tuned"
    layers: list[int]  # residual-stream index per slot: l = what block l reads, n_layers = the output
    targets: list[str]  # a label per target vector
    top_ids: torch.Tensor  # [n_targets, n_slots, k]
    top_probs: torch.Tensor  # [n_targets, n_slots, k]
    top_tokens: list  # [n_targets][n_slots][k] strings
    tracked: list[str]  # tracked tokens as given
    tracked_ids: list[int]
    tracked_logprobs: torch.Tensor  # [n_targets, n_slots, n_tracked]
    tracked_ranks: torch.Tensor  # [n_targets, n_slots, n_tracked]; 1 = the top prediction

    def to_frame(self):
        """One row per (target, layer): top1..topk with p1..pk, then logprob/rank per tracked token."""
        import pandas as pd

        rows = []
        for t, target in enumerate(self.targets):
            for s, layer in enumerate(self.layers):
                row = {"target": target, "layer": layer}
                for i in range(self.top_ids.shape[-1]):
                    row[f"top{i + 1}"] = self.top_tokens[t][s][i]
                    row[f"p{i + 1}"] = float(self.top_probs[t, s, i])
                for j, tok in enumerate(self.tracked):
                    row[f"logprob[{tok}]"] = float(self.tracked_logprobs[t, s, j])
                    row[f"rank[{tok}]"] = int(self.tracked_ranks[t, s, j])
                rows.append(row)
        return pd.DataFrame(rows)

    def to_dict(self) -> dict:
        return {
            "lens": self.lens, "layers": list(self.layers), "targets": list(self.targets),
            "top_ids": self.top_ids.tolist(), "top_probs": self.top_probs.tolist(), "top_tokens": self.top_tokens,
            "tracked": list(self.tracked), "tracked_ids": list(self.tracked_ids),
            "tracked_logprobs": self.tracked_logprobs.tolist(), "tracked_ranks": self.tracked_ranks.tolist(),
        }

    def _repr_html_(self) -> str:
        return self.to_frame().to_html(index=False, float_format=lambda x: f"{x:.3g}")


def _token_id(model, token) -> int:
    if isinstance(token, int):
        return token
    return int(model.to_single_token(token))  # raises, naming the pieces, for multi-token strings


def read_lens(model, vectors: torch.Tensor, k: int = 5, track: list[str] | None = None, lens=None,
              layers: list[int] | None = None, targets: list[str] | None = None) -> LensReadout:
    """Read `vectors [n_targets, n_slots, d_model]` (or `[n_slots, d_model]`) through a lens.

    `lens=None` is the logit lens; otherwise a callable `lens(resid [..., d_model], layer) -> logits`,
    e.g. a `TunedLens`. `layers` names the residual-stream index of each slot (default
    0..n_slots-1, i.e. the full `[n_layers + 1]` stack); a tuned lens needs it to pick its
    translator. `track` lists tokens (single-token strings or ids) whose log-prob and rank
    are kept at every slot, e.g. `[" Paris"]` at "tower".
    """
    if vectors.dim() == 2:
        vectors = vectors[None]
    if vectors.dim() != 3:
        raise ValueError(f"vectors must be [n_targets, n_slots, d_model] or [n_slots, d_model], got {tuple(vectors.shape)}")
    n_targets, n_slots, _ = vectors.shape
    layers = list(range(n_slots)) if layers is None else [int(l) for l in layers]
    if len(layers) != n_slots:
        raise ValueError(f"{len(layers)} layer labels for {n_slots} slots")
    targets = [str(i) for i in range(n_targets)] if targets is None else list(targets)
    track = list(track or [])
    track_ids = [_token_id(model, t) for t in track]
    if lens is None:
        check_lens_model(model)
    top_ids, top_probs, tr_lp, tr_rank = [], [], [], []
    with torch.no_grad():
        for s, layer in enumerate(layers):
            h = vectors[:, s]  # [n_targets, d_model]
            logits = (logit_lens(model, h) if lens is None else lens(h, layer)).float()  # [n_targets, d_vocab]
            logp = logits.log_softmax(-1)
            top = logp.topk(k, dim=-1)
            top_ids.append(top.indices)
            top_probs.append(top.values.exp())
            idx = torch.tensor(track_ids, dtype=torch.long, device=logits.device)
            chosen = logits[:, idx]  # [n_targets, n_tracked]
            tr_lp.append(logp[:, idx])
            # Rank by logits (1 + how many tokens score strictly higher), so ties do not split.
            tr_rank.append(1 + (logits[:, None, :] > chosen[:, :, None]).sum(-1))
    top_ids_t = torch.stack(top_ids, 1).cpu()  # [n_targets, n_slots, k]
    return LensReadout(
        lens="logit" if lens is None else getattr(lens, "name", "tuned"), layers=layers, targets=targets,
        top_ids=top_ids_t, top_probs=torch.stack(top_probs, 1).cpu(), top_tokens=_decode(model, top_ids_t),
        tracked=[t if isinstance(t, str) else str(t) for t in track], tracked_ids=track_ids,
        tracked_logprobs=torch.stack(tr_lp, 1).cpu(), tracked_ranks=torch.stack(tr_rank, 1).cpu(),
    )
