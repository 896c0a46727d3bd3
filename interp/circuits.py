"""The transformer-circuits framework (Elhage et al. 2021) as functions of a model's weights.

Orientation. Everything here is in TransformerLens' row-vector form (`x @ W`, DESIGN.md):
a full circuit's rows index the token the computation starts from. The paper writes
column vectors, so each matrix here is the transpose of the paper's, or in one case
the same matrix with rows and columns named the other way round:

| here (rows x cols) | paper |
| --- | --- |
| `direct_path`: W_E W_U, [input token, output token] | W_U W_E, [out, in] (transpose) |
| `full_ov`: W_E W_V W_O W_U, [source token, output token] | W_U W_OV W_E, [out, src] (transpose) |
| `full_qk`: W_E W_Q W_K^T W_E^T, [destination token, source token] | W_E^T W_QK W_E, [dest, src] (same) |
| `k_composition_circuit`: W_E W_Q^j W_K^jT (W_V^i W_O^i)^T W_E^T, [dest, src] | same |

Norms. LayerNorm or RMSNorm scales depend on the input, so no weight-only circuit is
exact through them. `prepare(model)` returns a copy with the norms' weights folded into
the matrices that read them (and, for LayerNorm, the writing weights centred); circuits
are then read off that copy with the norm scales taken as 1, as TransformerLens does.
For norm-free models nothing is approximated.

Families. Embeddings are read as the residual stream gets them (Gemma's scale included).
Where a circuit is not what the forward computes, the functions here raise
`CircuitError` rather than hand back a wrong matrix: QK circuits of models with q/k
norms (the scores are not a bilinear form of the stream), OV circuits of models whose
attention output passes a norm before the residual add (Gemma 2/3, OLMo 2), and both for
models that clamp q, k and v (OLMo's clip_qkv). QK circuits
of soft-capped models are the scores before the cap (the cap is monotonic, and applied
elementwise), as `model.QK` documents.

Nothing here materialises a d_vocab x d_vocab matrix unless you ask (`.AB`);
`top1_diagonal_accuracy` walks the rows in chunks.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch

from interp.factored_matrix import FactoredMatrix


class CircuitError(ValueError):
    """A weight-only circuit that this model's forward does not compute (it would be silently wrong)."""


def circuit_limits(cfg) -> dict[str, str]:
    """{"QK": why, "OV": why} for the circuits that are not exact for this config (empty when all are)."""
    out = {}
    qk_norm = getattr(cfg, "qk_norm", None)
    if qk_norm:
        width = "over all heads at once" if qk_norm == "full" else "per head"
        out["QK"] = (f"q and k are normalised {width} (attn.q_norm / attn.k_norm) between the projection and the "
                     "dot product, so the attention scores are not a bilinear form of the residual stream")
    clip = getattr(cfg, "clip_qkv", None)
    if clip is not None:
        why = (f"q, k and v are clamped to [-{clip}, {clip}] after their projections (clip_qkv), so the scores and "
               "the values are not linear in the residual stream wherever the clamp bites")
        out.setdefault("QK", why)
        out["OV"] = why
    if getattr(cfg, "post_sublayer_norm", False):
        out["OV"] = ("the attention output passes ln1_post (a division by the rms of all heads' summed output, "
                     "then a weight) before the residual add, so W_V W_O is what a head writes into that norm, "
                     "not into the residual stream")
    return out


def require_exact(model, circuits: str, what: str) -> None:
    """Raise CircuitError if any of `circuits` ("QK", "OV" or "QKOV") is not exact for `model`."""
    limits = circuit_limits(model.cfg)
    for name in ("QK", "OV"):
        if name in circuits and name in limits:
            raise CircuitError(f"{what} needs the {name} circuit, which is not exact for "
                               f"{getattr(model.cfg, 'model_name', 'this model')}: {limits[name]}. Hook the "
                               "activations instead (run_with_cache: hook_pattern, hook_z, hook_attn_out).")


def embedding(model) -> torch.Tensor:
    """W_E as the residual stream receives it: `[d_vocab, d_model]` (times Gemma's embedding scale)."""
    scale = getattr(model.cfg, "embed_scale", None)
    if scale is None:
        return model.W_E
    return model.W_E * torch.tensor(scale, dtype=torch.float32).to(model.W_E.dtype)


# ---------------------------------------------------------------------- weights to read circuits from
def prepare(model):
    """The model itself if it has no norm weights to fold, else a processed deep copy."""
    norm = model.cfg.normalization_type
    if norm in (None, "LNPre", "RMSPre"):
        return model
    if getattr(model.cfg, "post_ln", False):
        raise ValueError("weight-only circuits are defined for pre-LN models; this one is post-LN")
    prepared = copy.deepcopy(model)
    with warnings.catch_warnings():  # norms fold_ln leaves are what circuit_limits refuses on
        warnings.filterwarnings("ignore", message="fold_ln folded")
        prepared.process_weights(fold_ln=True, center_writing_weights=norm == "LN")
    return prepared


def _heads(tensor: torch.Tensor, layer, head) -> torch.Tensor:
    """Index a stacked [n_layers, n_heads, ...] weight by optional layer and head."""
    if layer is None:
        return tensor if head is None else tensor[:, head]
    return tensor[layer] if head is None else tensor[layer, head]


def direct_path(model) -> FactoredMatrix:
    """W_E W_U `[d_vocab, d_vocab_out]`: the logits a token predicts with no attention at all."""
    m = prepare(model)
    return FactoredMatrix(embedding(m), m.W_U)


def full_qk(model, layer: int | None = None, head: int | None = None) -> FactoredMatrix:
    """W_E W_Q W_K^T W_E^T `[..., dest token, source token]`: how much a destination token wants a source token.

    Token embeddings only (positions are left out, as in the paper).
    """
    require_exact(model, "QK", "full_qk")
    m = prepare(model)
    W_E = embedding(m)
    W_Q, W_K = _heads(m.W_Q, layer, head), _heads(m.W_K, layer, head)
    return FactoredMatrix(W_E @ W_Q, W_K.transpose(-2, -1) @ W_E.T)


def full_ov(model, layer: int | None = None, head: int | None = None) -> FactoredMatrix:
    """W_E W_V W_O W_U `[..., source token, output token]`: what attending to a token does to the logits."""
    require_exact(model, "OV", "full_ov")
    m = prepare(model)
    W_V, W_O = _heads(m.W_V, layer, head), _heads(m.W_O, layer, head)
    return FactoredMatrix(embedding(m) @ W_V, W_O @ m.W_U)


def k_composition_circuit(model, prev_layer: int, prev_head: int, layer: int, head: int) -> FactoredMatrix:
    """W_E W_Q^j W_K^jT (W_V^i W_O^i)^T W_E^T `[dest token, source token]`.

    Head j's query-key match between a destination token and a source token that reaches
    j's keys only through head i's output (i = `prev_layer.prev_head`, e.g. a
    previous-token head that writes the token before each position). A positive
    diagonal means "attend where the token written by head i equals mine": induction.
    """
    if prev_layer >= layer:
        raise ValueError(f"head {prev_layer}.{prev_head} must be in an earlier layer than {layer}.{head}")
    require_exact(model, "QKOV", "k_composition_circuit")
    m = prepare(model)
    W_E = embedding(m)
    # j's keys read i's output: (x_src W_V^i W_O^i) W_K^j, a [d_model, d_head] map.
    key_side = m.W_V[prev_layer, prev_head] @ (m.W_O[prev_layer, prev_head] @ m.W_K[layer, head])
    return FactoredMatrix(W_E @ m.W_Q[layer, head], key_side.T @ W_E.T)


# ---------------------------------------------------------------------- scores of a circuit
def eigenvalue_positivity(matrix: FactoredMatrix) -> torch.Tensor:
    """Re(sum of eigenvalues) / sum of |eigenvalues|: 1 for a pure copying (or matching) circuit, -1 for anti."""
    eig = matrix.eigenvalues
    return eig.real.sum(-1) / eig.abs().sum(-1)


def top1_diagonal_accuracy(matrix: FactoredMatrix, chunk: int = 2048) -> torch.Tensor:
    """Fraction of rows whose largest entry is on the diagonal (row i's argmax is column i).

    Rows are computed `chunk` at a time, so a 49k x 49k circuit never exists in memory.
    """
    if matrix.ldim != matrix.rdim:
        raise ValueError(f"diagonal accuracy needs a square matrix, got {matrix.ldim} x {matrix.rdim}")
    A, B = matrix.A, matrix.B
    hits = torch.zeros(A.shape[:-2], device=A.device, dtype=A.dtype)
    for start in range(0, matrix.ldim, chunk):
        rows = (A[..., start : start + chunk, :] @ B).argmax(-1)
        hits += (rows == torch.arange(start, start + rows.shape[-1], device=A.device)).sum(-1)
    return hits / matrix.ldim


# ---------------------------------------------------------------------- composition
@dataclass
class CompositionScores:
    """‖left right‖_F / (‖left‖_F ‖right‖_F) for every earlier head i and later head j.

    scores[l_i, h_i, l_j, h_j]; NaN where head i is not in an earlier layer than j.
    `baseline` is the mean score of random Gaussian matrices with the same factor
    shapes (about 1/sqrt(d_model) for full-rank ones), `baseline_std` its spread.
    """

    mode: str
    scores: torch.Tensor  # [n_layers, n_heads, n_layers, n_heads]
    baseline: float
    baseline_std: float

    def pairs(self) -> list[tuple[str, str, float]]:
        """(earlier head, later head, score), strongest first."""
        L, H = self.scores.shape[:2]
        out = []
        for li in range(L):
            for hi in range(H):
                for lj in range(li + 1, L):
                    for hj in range(H):
                        out.append((f"L{li}H{hi}", f"L{lj}H{hj}", float(self.scores[li, hi, lj, hj])))
        return sorted(out, key=lambda r: -r[2])


def _score(left: FactoredMatrix, right: FactoredMatrix) -> torch.Tensor:
    return (left @ right).norm() / (left.norm() * right.norm())


def _left_right(m, mode: str):
    ov = FactoredMatrix(m.W_V, m.W_O)  # [n_layers, n_heads, d_model, d_model]
    if mode == "Q":
        return ov, FactoredMatrix(m.W_Q, m.W_K.transpose(-2, -1))
    if mode == "K":
        return ov, FactoredMatrix(m.W_Q, m.W_K.transpose(-2, -1)).T
    if mode == "V":
        return ov, ov
    raise ValueError(f"mode must be 'Q', 'K' or 'V', got {mode!r}")


def composition_scores(model, mode: str, baseline_samples: int = 200, seed: int = 0) -> CompositionScores:
    """Q-, K- or V-composition of every head pair (i earlier than j), with its random baseline.

    Q: head i's output read by j's queries, ‖OV_i QK_j‖; K: by j's keys, ‖OV_i QK_j^T‖;
    V: by j's values, ‖OV_i OV_j‖ (TransformerLens' definitions).
    """
    require_exact(model, "OV" if mode == "V" else "QKOV", "composition_scores")
    m = prepare(model)
    left, right = _left_right(m, mode)
    L, H = m.cfg.n_layers, m.cfg.n_heads
    scores = torch.full((L, H, L, H), float("nan"))
    for li in range(L):
        for lj in range(li + 1, L):
            # Broadcast: [H, 1, d, d] @ [1, H, d, d] -> every pair of heads at once.
            l_fm = FactoredMatrix(left.A[li][:, None], left.B[li][:, None])
            r_fm = FactoredMatrix(right.A[lj][None], right.B[lj][None])
            scores[li, :, lj, :] = _score(l_fm, r_fm).detach().float().cpu()
    mean, std = random_baseline(m.cfg.d_model, m.cfg.d_head, mode, baseline_samples, seed)
    return CompositionScores(mode, scores, mean, std)


def random_baseline(d_model: int, d_head: int, mode: str, samples: int = 200, seed: int = 0) -> tuple[float, float]:
    """Mean and std of the composition score of Gaussian factors with a head's shapes."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(samples, *shape, generator=g, dtype=torch.float64)

    left = FactoredMatrix(rand(d_model, d_head), rand(d_head, d_model))
    right = FactoredMatrix(rand(d_model, d_head), rand(d_head, d_model))
    if mode == "K":
        right = right.T
    elif mode not in ("Q", "V"):
        raise ValueError(f"mode must be 'Q', 'K' or 'V', got {mode!r}")
    s = _score(left, right)
    return float(s.mean()), float(s.std())


# ---------------------------------------------------------------------- skip-trigrams
@dataclass
class SkipTrigram:
    head: str
    source: int  # attended-to token
    destination: int  # current token
    out: int  # promoted next token
    qk: float  # standardised preference of destination for source
    ov: float  # standardised boost of out when source is attended
    score: float  # qk * ov


def skip_trigrams(model, layer: int = 0, k: int = 10, per_token: int = 4,
                  exclude: "set[int] | None" = None) -> dict[str, list[SkipTrigram]]:
    """The strongest `[source] ... [destination] -> [out]` triples of each head in `layer`.

    The paper reads a one-layer model's heads as skip-trigram tables: the full QK
    circuit says which source tokens a destination attends to, the full OV circuit what
    attending to a source does to the next-token logits. Both are centred (softmax and
    logits ignore a per-row constant) and standardised; a triple scores qk x ov. For
    each source, its `per_token` strongest destinations and outputs are combined, and
    the `k` best triples per head are kept. Tokens in `exclude` (default: the special
    tokens, whose rows are barely trained) never appear in a triple.
    """
    if exclude is None:
        from interp.probing import special_token_ids

        exclude = special_token_ids(model)
    keep = torch.ones(model.cfg.d_vocab, dtype=torch.bool)
    keep[list(exclude)] = False
    out: dict[str, list[SkipTrigram]] = {}
    for head in range(model.cfg.n_heads):
        qk = full_qk(model, layer, head).AB  # [dest, src]
        ov = full_ov(model, layer, head).AB  # [src, out]
        qk = qk - qk.mean(-1, keepdim=True)
        ov = ov - ov.mean(-1, keepdim=True)
        qk, ov = qk / qk.std(), ov / ov.std()
        qk = qk.masked_fill(~keep[:, None] | ~keep[None, :], float("-inf"))
        ov = ov.masked_fill(~keep[:, None] | ~keep[None, :], float("-inf"))
        best_dest = qk.T.topk(per_token, dim=-1)  # [src, per_token]
        best_out = ov.topk(per_token, dim=-1)  # [src, per_token]
        cand = best_dest.values[:, :, None] * best_out.values[:, None, :]  # [src, dest_k, out_k]
        valid = (best_dest.values[:, :, None] > 0) & (best_out.values[:, None, :] > 0) & keep[:, None, None]
        cand = torch.where(valid, cand, torch.full_like(cand, float("-inf")))
        top = cand.flatten().topk(k)
        n = per_token
        triples = []
        for score, flat in zip(top.values.tolist(), top.indices.tolist()):
            src, rest = divmod(flat, n * n)
            di, oi = divmod(rest, n)
            dest, tok_out = int(best_dest.indices[src, di]), int(best_out.indices[src, oi])
            triples.append(SkipTrigram(f"L{layer}H{head}", src, dest, tok_out,
                                       float(qk[dest, src]), float(ov[src, tok_out]), score))
        out[f"L{layer}H{head}"] = triples
    return out
