"""A lazily multiplied low-rank matrix ``A @ B``.

Same names and semantics as TransformerLens' ``FactoredMatrix`` (the reference; none of
its code is used), so that ``model.QK[l, h]`` / ``model.OV[l, h]`` behave as users expect.
Row-vector maths: ``x @ M`` multiplies ``x @ A`` first. Shapes: ``A: [..., ldim, mdim]``,
``B: [..., mdim, rdim]``, the product ``[..., ldim, rdim]``; ``k = min(ldim, mdim, rdim)``.

Beyond TransformerLens: ``trace()`` and ``rank()``.
"""

from __future__ import annotations

import numbers
import operator
import warnings
from functools import cached_property
from typing import Any

import torch
from torch import Tensor

__all__ = ["FactoredMatrix"]


def _linalg_dtype(x: Tensor) -> Tensor:
    # torch.linalg has no 16-bit SVD/QR/eig kernels.
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _mT(x: Tensor) -> Tensor:
    return x.transpose(-2, -1)


def _one_row(item: Any) -> Any:
    """An integer index on a matrix axis keeps that axis (as length 1), so the result
    is still a matrix and can stay factored."""
    if isinstance(item, bool) or (isinstance(item, Tensor) and (item.ndim or item.dtype == torch.bool)):
        return item
    try:
        i = operator.index(item)
    except TypeError:
        return item
    return slice(i, i + 1 if i != -1 else None)


def _axes_used(item: Any) -> int:
    if item is None or item is Ellipsis:
        return 0
    if isinstance(item, (list, tuple)):
        t = torch.as_tensor(item)
        return t.ndim if t.dtype == torch.bool else 1
    if isinstance(item, Tensor) and item.dtype in (torch.bool, torch.uint8):
        return item.ndim
    dtype = getattr(item, "dtype", None)  # numpy boolean masks, without importing numpy
    if dtype is not None and str(dtype) in ("bool", "uint8"):
        return item.ndim
    return 1


class FactoredMatrix:
    """The matrix ``A @ B`` kept as its factors; SVD, eigenvalues and norms come from
    small ``mdim``-sized problems and never form the ``[ldim, rdim]`` product."""

    def __init__(self, A: Tensor, B: Tensor):
        """``A: [..., ldim, mdim]``, ``B: [..., mdim, rdim]``; leading dims broadcast."""
        if A.ndim < 2 or B.ndim < 2 or A.shape[-1] != B.shape[-2]:
            raise ValueError(
                "FactoredMatrix factors must be matrices agreeing on the inner dimension "
                f"(A: [..., ldim, mdim], B: [..., mdim, rdim]); got A {tuple(A.shape)}, B {tuple(B.shape)}"
            )
        try:
            lead = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
        except RuntimeError as e:
            raise ValueError(
                f"FactoredMatrix leading dims do not broadcast: A {tuple(A.shape)}, B {tuple(B.shape)}"
            ) from e
        self.ldim, self.mdim, self.rdim = A.shape[-2], A.shape[-1], B.shape[-1]
        self.has_leading_dims = A.ndim > 2 or B.ndim > 2
        self.shape = torch.Size(lead + (self.ldim, self.rdim))
        # Broadcast views cost no memory and make indexing leading dims uniform.
        self._A = A.broadcast_to(lead + (self.ldim, self.mdim))
        self._B = B.broadcast_to(lead + (self.mdim, self.rdim))

    # Read-only, so the cached SVD can never go stale.
    @property
    def A(self) -> Tensor:
        """``[..., ldim, mdim]``"""
        return self._A

    @property
    def B(self) -> Tensor:
        """``[..., mdim, rdim]``"""
        return self._B

    @property
    def pair(self) -> tuple[Tensor, Tensor]:
        return self._A, self._B

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def AB(self) -> Tensor:
        """The materialised product ``[..., ldim, rdim]``: may be large."""
        return self._A @ self._B

    @property
    def BA(self) -> Tensor:
        """``B @ A``, ``[..., mdim, mdim]``; only meaningful when ``ldim == rdim``."""
        if self.ldim != self.rdim:
            raise ValueError(f"BA needs ldim == rdim, but this FactoredMatrix has shape {tuple(self.shape)}")
        return self._B @ self._A

    @property
    def T(self) -> FactoredMatrix:
        """The transpose ``B^T @ A^T``, ``[..., rdim, ldim]``."""
        return FactoredMatrix(_mT(self._B), _mT(self._A))

    # -- products ---------------------------------------------------------------
    def __matmul__(self, other: Tensor | FactoredMatrix) -> Tensor | FactoredMatrix:
        """``other``: ``[rdim]`` gives a tensor ``[..., ldim]``; ``[..., rdim, n]`` or a
        FactoredMatrix gives a FactoredMatrix ``[..., ldim, n]``."""
        if isinstance(other, FactoredMatrix):
            return (self @ other.A) @ other.B
        if not isinstance(other, Tensor):
            return NotImplemented
        if other.ndim == 0 or other.shape[-2 if other.ndim >= 2 else -1] != self.rdim:
            raise ValueError(f"Cannot multiply FactoredMatrix of shape {tuple(self.shape)} by {tuple(other.shape)}")
        if other.ndim == 1:
            return (self._A @ (self._B @ other.unsqueeze(-1))).squeeze(-1)
        # Keep whichever inner dimension is smaller, as TransformerLens does.
        if self.rdim > self.mdim:
            return FactoredMatrix(self._A, self._B @ other)
        return FactoredMatrix(self.AB, other)

    def __rmatmul__(self, other: Tensor | FactoredMatrix) -> Tensor | FactoredMatrix:
        """``other``: ``[ldim]`` gives a tensor ``[..., rdim]``; ``[..., n, ldim]`` gives a
        FactoredMatrix ``[..., n, rdim]``."""
        if isinstance(other, FactoredMatrix):
            return other.A @ (other.B @ self)
        if not isinstance(other, Tensor):
            return NotImplemented
        if other.ndim == 0 or other.shape[-1] != self.ldim:
            raise ValueError(f"Cannot multiply {tuple(other.shape)} by FactoredMatrix of shape {tuple(self.shape)}")
        if other.ndim == 1:
            return ((other.unsqueeze(-2) @ self._A) @ self._B).squeeze(-2)
        if self.ldim > self.mdim:
            return FactoredMatrix(other @ self._A, self._B)
        return FactoredMatrix(other, self.AB)

    def __mul__(self, scalar: float | Tensor) -> FactoredMatrix:
        """Scale by a number or one-element tensor (folded into ``A``)."""
        if isinstance(scalar, Tensor):
            if scalar.numel() != 1:
                raise ValueError(
                    f"FactoredMatrix * needs a scalar, got a tensor of shape {tuple(scalar.shape)}; use @ for matrix products"
                )
        elif not isinstance(scalar, numbers.Number):
            return NotImplemented
        return FactoredMatrix(self._A * scalar, self._B)

    __rmul__ = __mul__

    # -- spectra ------------------------------------------------------------------
    @cached_property
    def _svd(self) -> tuple[Tensor, Tensor, Tensor]:
        # A = Qa Ra and B^T = Qb Rb, so AB = Qa (Ra Rb^T) Qb^T: only the small
        # [min(ldim, mdim), min(mdim, rdim)] middle matrix needs an SVD.
        Qa, Ra = torch.linalg.qr(_linalg_dtype(self._A))
        Qb, Rb = torch.linalg.qr(_mT(_linalg_dtype(self._B)))
        Um, S, Vhm = torch.linalg.svd(Ra @ _mT(Rb), full_matrices=False)
        return Qa @ Um, S, Qb @ _mT(Vhm)

    def svd(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(U, S, V)`` with ``U: [..., ldim, k]``, ``S: [..., k]`` (descending),
        ``V: [..., rdim, k]`` and ``AB == U @ S.diag_embed() @ V.mT``. As in TransformerLens the
        third element is V, not torch's Vh. Cached; 16-bit factors are computed in float32."""
        return self._svd

    @property
    def U(self) -> Tensor:
        return self._svd[0]

    @property
    def S(self) -> Tensor:
        return self._svd[1]

    @property
    def V(self) -> Tensor:
        return self._svd[2]

    @property
    def Vh(self) -> Tensor:
        """Deprecated alias that returns ``V`` (not its transpose), as in TransformerLens."""
        warnings.warn("FactoredMatrix.Vh returns V, as in TransformerLens; use .V (or .V.mT for "
                      "the true Vh)", DeprecationWarning, stacklevel=2)
        return self._svd[2]

    @property
    def eigenvalues(self) -> Tensor:
        """Eigenvalues of ``BA`` (complex, ``[..., mdim]``): AB's nonzero eigenvalues plus
        zeros, since ``BAv = λv`` implies ``AB(Av) = λ(Av)``. Needs ``ldim == rdim``."""
        return torch.linalg.eigvals(_linalg_dtype(self.BA))

    def norm(self) -> Tensor:
        """Frobenius norm ``[...]``: from the singular values when they are cached, else as
        ``sqrt(sum((A^T A) * (B B^T)))`` (= trace(B^T A^T A B)), two small matrix products
        and no decomposition (composition scores take thousands of norms)."""
        if "_svd" in self.__dict__:
            return self.S.pow(2).sum(-1).sqrt()
        A, B = _linalg_dtype(self._A), _linalg_dtype(self._B)
        return ((_mT(A) @ A) * (B @ _mT(B))).sum((-2, -1)).clamp(min=0).sqrt()

    def trace(self) -> Tensor:
        """(Not in TransformerLens.) ``tr(AB) = sum_ij A_ij B_ji``, ``[...]``, in
        O(ldim * mdim). Needs ``ldim == rdim``."""
        if self.ldim != self.rdim:
            raise ValueError(f"trace needs ldim == rdim, but this FactoredMatrix has shape {tuple(self.shape)}")
        return (self._A * _mT(self._B)).sum((-2, -1))

    def rank(self, rtol: float | None = None, atol: float = 0.0) -> Tensor:
        """(Not in TransformerLens.) Numerical rank ``[...]`` (int64, at most ``k``): the number
        of singular values above ``max(atol, rtol * S.max())``; the default ``rtol`` is
        ``eps * max(ldim, rdim)``, torch.linalg.matrix_rank's."""
        S = self.S
        if rtol is None:
            rtol = torch.finfo(S.dtype).eps * max(self.ldim, self.rdim)
        top = S.amax(-1, keepdim=True) if S.shape[-1] else S.new_zeros(S.shape[:-1] + (1,))
        return (S > torch.clamp(rtol * top, min=atol)).sum(-1)

    # -- reshaping ------------------------------------------------------------------
    def make_even(self) -> FactoredMatrix:
        """The same matrix as ``(U sqrt(S)) @ (sqrt(S) V^T)``: inner dim ``k``, each factor
        carrying half of every singular value, with orthogonal columns / rows."""
        root = self.S.sqrt()
        return FactoredMatrix(self.U * root[..., None, :], root[..., :, None] * _mT(self.V))

    def collapse_l(self) -> Tensor:
        """``S V^T``, ``[..., k, rdim]``: the matrix with its left orthogonal factor ``U``
        dropped (``AB == U @ collapse_l()``)."""
        return self.S[..., :, None] * _mT(self.V)

    def collapse_r(self) -> Tensor:
        """``U S``, ``[..., ldim, k]`` (``AB == collapse_r() @ V^T``)."""
        return self.U * self.S[..., None, :]

    def unsqueeze(self, k: int) -> FactoredMatrix:
        """Insert a leading axis at ``k`` (indices as for the factors, so ``k`` should
        address a leading position)."""
        return FactoredMatrix(self._A.unsqueeze(k), self._B.unsqueeze(k))

    def get_corner(self, k: int = 3) -> Tensor:
        """The top-left ``k`` entries along every axis, forming only a ``k x k`` product."""
        corner = self._A[..., :k, :] @ self._B[..., :, :k]
        return corner[tuple(slice(k) for _ in range(corner.ndim))]

    def to(self, *args: Any, **kwargs: Any) -> FactoredMatrix:
        """Move / cast both factors, as ``Tensor.to``."""
        return FactoredMatrix(self._A.to(*args, **kwargs), self._B.to(*args, **kwargs))

    def __getitem__(self, idx: Any) -> FactoredMatrix:
        """Index leading dims, rows (via ``A``) and columns (via ``B``) without forming AB.

        An integer on a row/column axis keeps it with length 1, so the result stays a
        FactoredMatrix. Row and column indices apply independently (outer indexing).
        ``None`` may appear anywhere, ``...`` once.
        """
        idx = idx if isinstance(idx, tuple) else (idx,)
        ellipses = [i for i, item in enumerate(idx) if item is Ellipsis]
        if len(ellipses) > 1:
            raise IndexError("an index can only have a single ellipsis ('...')")
        used = sum(_axes_used(item) for item in idx)
        if used > self.ndim:
            raise IndexError(f"too many indices for FactoredMatrix of shape {tuple(self.shape)}: {idx}")
        if ellipses:
            e = ellipses[0]
            idx = idx[:e] + (slice(None),) * (self.ndim - used) + idx[e + 1:]
        n_lead = self.ndim - 2
        lead: list[Any] = []
        row: Any = slice(None)
        col: Any = slice(None)
        late_newaxes: list[int] = []  # None after the row index: 1 before the column, 2 after
        axis = 0
        for item in idx:
            if item is None and axis > n_lead:
                late_newaxes.append(axis - n_lead)
            elif axis < n_lead:
                if axis + _axes_used(item) > n_lead:
                    raise IndexError("a multi-axis mask cannot span leading and matrix axes of a FactoredMatrix")
                lead.append(item)
            elif axis == n_lead and item is None:
                lead.append(None)
            elif axis == n_lead:
                row = _one_row(item)
            else:
                col = _one_row(item)
            axis += _axes_used(item)
        A, B = self._A[tuple(lead)], self._B[tuple(lead)]
        result = FactoredMatrix(A[..., row, :], B[..., :, col])
        for where in late_newaxes:
            if where == 1:  # rows become a leading axis; each matrix is a single row
                result = FactoredMatrix(result.A.unsqueeze(-2), result.B.unsqueeze(-3))
            else:  # [..., l, r, 1]: rows lead, and each matrix is a column of B^T A_i
                result = FactoredMatrix(_mT(result.B).unsqueeze(-3), result.A.unsqueeze(-1))
        return result

    def __repr__(self) -> str:
        return f"FactoredMatrix: Shape({self.shape}), Hidden Dim({self.mdim})"

    __str__ = __repr__
