"""The offset-only model of attention heads (analyses/positional.py, point 2 of its docstring), fitted from sums.

On the keys other than the sequence's ends, pattern[q, k] = r[q] g[q - k] / sum_k' g[q - k'] (r[q]: the row's
mass there): what a head whose scores depend on q - k only produces. `PatternSums` accumulates, per sequence
length, what the fit reads (float64 sums over texts); `offset_fit` fits g by iterative proportional fitting and
returns an `OffsetFit`: the kernel, the mean weight by offset, R^2 of the model and of that plain mean, and the
mass on the end keys (`end_keys`), which the fit leaves out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def end_keys(allowed: torch.Tensor) -> torch.Tensor:
    """[n, n] bool: the valid entries on the sequence's end keys: key 0, and the last key where queries before it
    see it (an encoder). Each is the farthest key of its row, so a steep enough g[q - k] would "explain" a head
    that attends to [CLS], <s> or [SEP] whatever the offset; their mass is reported apart instead (`ends`)."""
    ends = torch.zeros_like(allowed)
    ends[:, 0] = True
    if bool(allowed[0, -1]):
        ends[:, -1] = True
    return ends & allowed


class PatternSums:
    """Per sequence length n, sums over texts of what offset_fit reads: P, P^2, r P, r and r^2, where r is a
    query's attention on the keys kept (valid and not an end key)."""

    def __init__(self) -> None:
        self.by_length: dict[int, dict] = {}

    def add(self, patterns: torch.Tensor, allowed: torch.Tensor, chunk: int = 2) -> None:
        """patterns: [texts, H, n, n], every text of length n; allowed: [n, n] the keys each query may see."""
        n = patterns.shape[-1]
        kept = (allowed & ~end_keys(allowed)).cpu()
        for start in range(0, patterns.shape[0], chunk):  # float64 products, a few texts at a time
            p = patterns[start:start + chunk].detach().cpu().double()
            r = (p * kept).sum(-1)  # [texts, H, n]
            sums = {"s1": p.sum(0), "s2": (p * p).sum(0), "rp": (r[..., None] * p).sum(0), "r": r.sum(0),
                    "rr": (r * r).sum(0), "t": p.shape[0]}
            if n not in self.by_length:
                self.by_length[n] = {**sums, "kept": kept}
            else:
                for key, value in sums.items():
                    self.by_length[n][key] += value

    def groups(self) -> list[dict]:
        return [v for _, v in sorted(self.by_length.items())]


@dataclass
class OffsetFit:
    """Offset statistics of H patterns (heads) over texts, on the kept keys; offsets[i] = q - k."""

    offsets: torch.Tensor  # [n_offsets]
    mean: torch.Tensor  # [H, n_offsets]: mean attention weight at each offset (nan: no (q, k) there)
    kernel: torch.Tensor  # [H, n_offsets]: the fitted g (max 1)
    r2: torch.Tensor  # [H]: R^2 of r[q] g[q - k] / sum_k' g[q - k'] (nan: a uniform head, nothing to explain)
    r2_raw: torch.Tensor  # [H]: R^2 of mean[q - k]
    ends: torch.Tensor  # [H]: mean attention on the end keys (rows with a kept key)
    iterations: int


def _offset_index(n: int, n_max: int) -> torch.Tensor:
    q = torch.arange(n)
    return q[:, None] - q[None] + n_max - 1  # [n, n] -> index into offsets -(n_max-1)..n_max-1


def _renormalised(kernel: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    """g[q - k] / (its sum over the row's kept keys) on the kept entries (flattened) of an [n, n] grid: [H, entries]."""
    g = kernel[:, idx]
    z = torch.zeros(g.shape[0], n, dtype=g.dtype).index_add_(1, rows, g)
    return g / z[:, rows].clamp(min=1e-300)


def offset_fit(groups: list[dict], max_iter: int = 300, tol: float = 1e-7) -> OffsetFit:
    """Fit the offset-only model (module docstring) to `PatternSums.groups()`, every length at once.

    Model: P_t[q, k] = r_t[q] g[q - k] / sum_k' g[q - k'] on the kept keys (r_t[q]: the row's own mass there).
    g by iterative proportional fitting: each offset gets the attention the head gives it in total. R^2 is of
    the variance within rows (around r_t[q] / kept keys of q), summed over texts from the sums alone.
    """
    n_max = max(int(g["kept"].shape[0]) for g in groups)
    H = groups[0]["s1"].shape[0]
    observed = torch.zeros(H, 2 * n_max - 1, dtype=torch.float64)
    count = torch.zeros(2 * n_max - 1, dtype=torch.float64)
    flat = []
    for g in groups:
        kept, n = g["kept"], g["kept"].shape[0]
        idx, rows = _offset_index(n, n_max)[kept], torch.arange(n)[:, None].expand(n, n)[kept]
        a1 = g["s1"][:, kept]
        observed.index_add_(1, idx, a1)
        count.index_add_(0, idx, torch.full(idx.shape, float(g["t"]), dtype=torch.float64))
        flat.append((g, idx, rows, n, a1))
    mean = observed / count
    kernel = torch.where(count > 0, mean, 0.0)
    iterations = 0
    for iterations in range(1, max_iter + 1):
        expected = torch.zeros_like(observed)
        for g, idx, rows, n, _ in flat:
            expected.index_add_(1, idx, g["r"][:, rows] * _renormalised(kernel, idx, rows, n))
        kernel = torch.where(expected > 0, kernel * observed / expected.clamp(min=1e-300), 0.0)
        kernel = kernel / kernel.amax(-1, keepdim=True).clamp(min=1e-300)
        if float((expected - observed).abs().sum(-1).max()) <= tol * float(observed.sum(-1).max()):
            break
    sse, sse_raw, sst, total = (torch.zeros(H, dtype=torch.float64) for _ in range(4))
    ends, n_rows = torch.zeros(H, dtype=torch.float64), 0
    for g, idx, rows, n, a1 in flat:
        kept = g["kept"]
        a2, arp = g["s2"][:, kept], g["rp"][:, kept]
        fitted = _renormalised(kernel, idx, rows, n)
        square = torch.zeros(H, n, dtype=torch.float64).index_add_(1, rows, fitted * fitted)
        sse += a2.sum(-1) - 2 * (fitted * arp).sum(-1) + (square * g["rr"]).sum(-1)
        sse_raw += a2.sum(-1) - 2 * (mean[:, idx] * a1).sum(-1) + g["t"] * mean[:, idx].pow(2).sum(-1)
        keys = kept.sum(-1).double()  # [n]
        has = keys > 0
        sst += a2.sum(-1) - (g["rr"][:, has] / keys[has]).sum(-1)
        total += a2.sum(-1)
        ends += g["t"] * int(has.sum()) - g["r"][:, has].sum(-1)
        n_rows += g["t"] * int(has.sum())
    sst = torch.where(sst > 1e-10 * total, sst, math.nan)  # a uniform head: nothing to explain
    return OffsetFit(torch.arange(-(n_max - 1), n_max), mean.float(), kernel.float(), (1 - sse / sst).float(),
                     (1 - sse_raw / sst).float(), (ends / n_rows).float(), iterations)
