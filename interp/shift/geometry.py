"""How far a word's vector moves, and how context-specific it becomes (Ethayarajh 2019).

All functions take a `WordTrace` and return per-layer tensors (`[n_layers + 1]` or
`[n_layers + 1, n, n]`). Ethayarajh's three measures, at each layer l:

  self-similarity   mean cosine between the word's vectors in different contexts
  intra-sentence    mean cosine between each token of a context and the context's mean
  MEV               share of the variance of the word's vectors [n, d] that the first
                    principal component explains, sigma_1^2 / sum sigma_i^2 (uncentred, as
                    in the paper)

Each comes with its anisotropy baseline: the same statistic for random tokens of other
contexts at the same layer (vectors of any token are far from orthogonal in most
models), and `adjusted = raw - baseline`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from interp.shift.trace import WordTrace


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.double(), dim=-1)


def static_cosine(trace: WordTrace) -> torch.Tensor:
    """cos(v_l, v_0) per context and layer: [n, n_layers + 1]."""
    v = _unit(trace.vectors)  # [n, L + 1, d]
    return (v * v[:, :1]).sum(-1).float()


def shift_norm(trace: WordTrace, relative: bool = False) -> torch.Tensor:
    """||v_l - v_0|| per context and layer [n, n_layers + 1]; relative: divided by ||v_l||."""
    v = trace.vectors.double()
    shift = (v - v[:, :1]).norm(dim=-1)
    return (shift / v.norm(dim=-1).clamp_min(1e-12) if relative else shift).float()


def pairwise_cosine(trace: WordTrace) -> torch.Tensor:
    """Cosine between every two contexts' vectors at every layer: [n_layers + 1, n, n]."""
    v = _unit(trace.vectors).transpose(0, 1)  # [L + 1, n, d]
    return (v @ v.transpose(1, 2)).float()


def _mean_offdiag(sim: torch.Tensor) -> torch.Tensor:
    """Mean of each [n, n] matrix's off-diagonal entries: [..., n, n] -> [...]."""
    n = sim.shape[-1]
    if n < 2:
        raise ValueError("self-similarity needs the word in at least 2 contexts")
    return (sim.sum((-1, -2)) - sim.diagonal(dim1=-2, dim2=-1).sum(-1)) / (n * (n - 1))


def self_similarity(trace: WordTrace) -> torch.Tensor:
    """Ethayarajh's SelfSim: mean cosine over pairs of distinct contexts, [n_layers + 1]."""
    return _mean_offdiag(pairwise_cosine(trace).double()).float()


def intra_sentence_similarity(trace: WordTrace) -> torch.Tensor:
    """Ethayarajh's IntraSim: mean over contexts of mean_i cos(token_i, the context's mean vector), [n_layers + 1].

    Tokens are those the baselines draw from (no special tokens, no decoder sink) plus the word itself.
    """
    per_context = []
    for stream, mask, ps in zip(trace.streams, trace.baseline_mask, trace.read_positions):
        keep = mask.clone()
        keep[ps] = True
        tokens = stream[:, keep].double()  # [L + 1, k, d]
        mean = tokens.mean(1, keepdim=True)
        per_context.append((_unit(tokens) * _unit(mean)).sum(-1).mean(-1))
    return torch.stack(per_context).mean(0).float()


def mev(vectors: torch.Tensor) -> torch.Tensor:
    """Maximum explainable variance of [..., n, d] (uncentred): sigma_1^2 / sum_i sigma_i^2, [...]."""
    x = vectors.double()
    # sigma_i^2 are the eigenvalues of the small Gram matrix X X^T [n, n]; its trace is sum sigma_i^2.
    gram = x @ x.transpose(-1, -2)
    top = torch.linalg.eigvalsh(gram)[..., -1]
    return (top / gram.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(1e-300)).float()


def max_explainable_variance(trace: WordTrace) -> torch.Tensor:
    """MEV of the word's vectors across contexts at each layer, [n_layers + 1]."""
    return mev(trace.vectors.transpose(0, 1))


def _pool(trace: WordTrace) -> list[tuple[int, int]]:
    """(context, position) of every token the baselines may draw, the read positions excluded."""
    pool = []
    for i, (mask, ps) in enumerate(zip(trace.baseline_mask, trace.read_positions)):
        keep = mask.clone()
        keep[ps] = False
        pool.extend((i, p) for p in keep.nonzero()[:, 0].tolist())
    return pool


@dataclass
class Baselines:
    """Anisotropy baselines at each layer [n_layers + 1]: random tokens of other contexts."""

    cosine: torch.Tensor  # mean cosine between two random tokens of different contexts
    mev: torch.Tensor  # mean MEV of n random tokens, each from a different context
    n_pairs: int
    n_draws: int


def anisotropy_baselines(trace: WordTrace, n_pairs: int = 2000, n_draws: int = 50, seed: int = 0) -> Baselines:
    """Cosine and MEV baselines from tokens of the contexts other than the word (Ethayarajh's adjustment)."""
    pool = _pool(trace)
    n_ctx = len(trace.contexts)
    owners = torch.tensor([c for c, _ in pool])
    if n_ctx < 2 or len(set(owners.tolist())) < 2:
        raise ValueError("the anisotropy baselines need tokens from at least 2 contexts")
    g = torch.Generator().manual_seed(seed)
    vecs = torch.stack([trace.streams[c][:, p] for c, p in pool], dim=1).double()  # [L + 1, m, d]
    units = _unit(vecs)
    # Random pairs of tokens from different contexts.
    a = torch.randint(len(pool), (4 * n_pairs,), generator=g)
    b = torch.randint(len(pool), (4 * n_pairs,), generator=g)
    ok = owners[a] != owners[b]
    a, b = a[ok][:n_pairs], b[ok][:n_pairs]
    cosine = (units[:, a] * units[:, b]).sum(-1).mean(-1)
    # MEV of as many random tokens as the word has contexts, one per context (so n matches).
    by_context = [torch.nonzero(owners == c)[:, 0] for c in range(n_ctx)]
    have = [c for c in range(n_ctx) if len(by_context[c])]
    draws = []
    for _ in range(n_draws):
        pick = torch.stack([by_context[c][torch.randint(len(by_context[c]), (1,), generator=g)][0] for c in have])
        draws.append(mev(vecs[:, pick]))
    return Baselines(cosine.float(), torch.stack(draws).mean(0), int(len(a)), n_draws)


@dataclass
class Geometry:
    """Per-layer geometry of a word's vectors; every tensor is [n_layers + 1] unless noted."""

    static_cosine: torch.Tensor  # [n, L + 1]
    shift_norm: torch.Tensor  # [n, L + 1]
    relative_shift: torch.Tensor  # [n, L + 1]
    pairwise: torch.Tensor  # [L + 1, n, n]
    self_similarity: torch.Tensor
    intra_sentence: torch.Tensor
    mev: torch.Tensor
    baselines: Baselines

    @property
    def adjusted_self_similarity(self) -> torch.Tensor:
        return self.self_similarity - self.baselines.cosine

    @property
    def adjusted_intra_sentence(self) -> torch.Tensor:
        return self.intra_sentence - self.baselines.cosine

    @property
    def adjusted_mev(self) -> torch.Tensor:
        return self.mev - self.baselines.mev


def geometry(trace: WordTrace, n_pairs: int = 2000, n_draws: int = 50, seed: int = 0) -> Geometry:
    return Geometry(static_cosine(trace), shift_norm(trace), shift_norm(trace, relative=True), pairwise_cosine(trace),
                    self_similarity(trace), intra_sentence_similarity(trace), max_explainable_variance(trace),
                    anisotropy_baselines(trace, n_pairs, n_draws, seed))
