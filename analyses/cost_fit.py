"""Fits of cost against sequence length (analyses/attention_cost.py): c + a n + b n^2 and the log-log slope.

`fit_curve` fits measurements y(n): `nnls_quadratic` (non-negative least squares on relative residuals, so small
and large n weigh alike) and `loglog_slope` over the longer half of the lengths, into a `Fit`, whose crossover
n* = a / b is where the quadratic term overtakes the linear one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# A fitted quadratic term smaller than this share of the fit at the longest measured length is not a
# measurement: a / b would extrapolate a rounding error (the fused path's memory once gave n* = 8.7e18).
MEASURABLE = 0.01


@dataclass
class Fit:
    exponent: float  # log-log slope over the fitted range
    constant: float  # c, a, b of c + a n + b n^2 (non-negative least squares, relative residuals)
    linear: float
    quadratic: float
    fit_from: int  # the slope is over lengths >= fit_from
    n_max: int = 0  # the longest length measured (0: unknown)

    @property
    def crossover(self) -> float:
        """n* = a / b, where b n^2 equals a n (inf: no quadratic term, or one below MEASURABLE of the fit at the
        longest length measured, whose ratio a / b would be noise; 0: no linear one)."""
        if self.quadratic <= 0:
            return math.inf
        if self.n_max and self.quadratic * self.n_max ** 2 < MEASURABLE * float(self.predict(self.n_max)):
            return math.inf
        return self.linear / self.quadratic

    def predict(self, n) -> torch.Tensor:
        n = torch.as_tensor(n, dtype=torch.float64)
        return self.constant + self.linear * n + self.quadratic * n * n

    def to_dict(self) -> dict:
        return {"exponent": self.exponent, "constant": self.constant, "linear": self.linear,
                "quadratic": self.quadratic, "crossover": _num(self.crossover), "fit_from": self.fit_from}


def loglog_slope(n, y) -> float:
    """Least-squares slope of log y on log n."""
    x, v = torch.log(torch.as_tensor(n, dtype=torch.float64)), torch.log(torch.as_tensor(y, dtype=torch.float64))
    x = x - x.mean()
    return float((x * (v - v.mean())).sum() / (x * x).sum())


def nnls_quadratic(n, y) -> tuple[float, float, float]:
    """(c, a, b) >= 0 minimising sum(((y - c - a n - b n^2) / y)^2): the least-squares solution on every subset of
    the three terms, the best of those that are non-negative (with three unknowns, that is exact NNLS)."""
    n = torch.as_tensor(n, dtype=torch.float64)
    y = torch.as_tensor(y, dtype=torch.float64)
    basis = torch.stack([torch.ones_like(n), n, n * n], dim=1) / y[:, None]
    target = torch.ones_like(y)
    best, best_loss = (0.0, 0.0, 0.0), float(target.pow(2).sum())
    for mask in range(1, 8):
        cols = [i for i in range(3) if mask >> i & 1]
        sol = torch.linalg.lstsq(basis[:, cols], target[:, None]).solution[:, 0]
        if bool((sol < 0).any()):
            continue
        coef = [0.0, 0.0, 0.0]
        for i, v in zip(cols, sol.tolist()):
            coef[i] = v
        loss = float((target - basis @ torch.tensor(coef, dtype=torch.float64)).pow(2).sum())
        if loss < best_loss:
            best, best_loss = tuple(coef), loss
    return best


def fit_curve(n, y) -> Fit:
    """Fit measurements y(n) (NaNs dropped): the slope over the longer half of the lengths, and c + a n + b n^2."""
    n = torch.as_tensor(n, dtype=torch.float64)
    y = torch.as_tensor(y, dtype=torch.float64)
    keep = torch.isfinite(y) & (y > 0)
    n, y = n[keep], y[keep]
    if len(n) < 3:
        raise ValueError(f"a fit needs at least 3 measured lengths, got {len(n)}; pass more lengths")
    upper = n[len(n) // 2:] if len(n) >= 6 else n[-3:]
    fit_from = float(upper[0])
    sel = n >= fit_from
    c, a, b = nnls_quadratic(n, y)
    return Fit(loglog_slope(n[sel], y[sel]), c, a, b, int(fit_from), int(n[-1]))


def _num(v: float):
    return v if math.isfinite(v) else None
