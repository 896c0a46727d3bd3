"""interp.factored_matrix.FactoredMatrix against (a) plain torch on the materialised
product A @ B and (b) TransformerLens 4.3's FactoredMatrix on the same factors."""

from __future__ import annotations

import pytest
import torch

from interp.factored_matrix import FactoredMatrix

F64 = dict(atol=1e-8, rtol=1e-8)
F32 = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def TL():
    # Importing transformer_lens takes seconds: once per module.
    from transformer_lens import FactoredMatrix as TLFactoredMatrix

    return TLFactoredMatrix


def _factors(shape_a, shape_b, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape_a, generator=g, dtype=torch.float64).to(dtype),
            torch.randn(shape_b, generator=g, dtype=torch.float64).to(dtype))


def _qk(dtype):
    # TransformerLens layout: W_Q, W_K [n_layers, n_heads, d_model, d_head]; QK = W_Q W_K^T.
    W_Q, W_K = _factors((2, 3, 8, 4), (2, 3, 8, 4), dtype, 3)
    return W_Q, W_K.transpose(-2, -1)


CASES = {
    "square_f64": lambda: _factors((6, 3), (3, 6), torch.float64, 0),
    "wide_f64": lambda: _factors((7, 3), (3, 5), torch.float64, 1),  # ldim != rdim
    "tall_inner_f64": lambda: _factors((4, 6), (6, 5), torch.float64, 2),  # mdim > ldim, rdim
    "qk_batched_f64": lambda: _qk(torch.float64),
    "broadcast_f64": lambda: _factors((3, 1, 5, 2), (4, 2, 6), torch.float64, 4),
    "square_f32": lambda: _factors((9, 4), (4, 9), torch.float32, 5),
    "qk_batched_f32": lambda: _qk(torch.float32),
}
SQUARE = [k for k in CASES if k.startswith(("square", "qk", "tall"))]  # ldim == rdim ...
SQUARE.remove("tall_inner_f64")  # ... except this one (4 x 5)


def tol(x: torch.Tensor) -> dict:
    return F64 if x.dtype in (torch.float64, torch.complex128) else F32


def close(actual, expected, **kw):
    kw = kw or tol(actual)
    torch.testing.assert_close(actual, expected.to(actual.dtype), **kw)


@pytest.fixture(params=list(CASES))
def case(request):
    A, B = CASES[request.param]()
    return A, B


@pytest.fixture(params=SQUARE)
def square(request):
    return CASES[request.param]()


def _k(fm):
    return min(fm.ldim, fm.mdim, fm.rdim)


# -- construction and simple views ------------------------------------------------------
def test_construction_matches_torch_and_tl(case, TL):
    A, B = case
    fm, ref = FactoredMatrix(A, B), TL(A, B)
    lead = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
    assert fm.shape == (A @ B).shape == ref.shape == lead + (A.shape[-2], B.shape[-1])
    assert (fm.ldim, fm.mdim, fm.rdim, fm.ndim) == (ref.ldim, ref.mdim, ref.rdim, ref.ndim)
    assert fm.has_leading_dims == ref.has_leading_dims
    assert fm.A.shape == ref.A.shape and fm.B.shape == ref.B.shape
    assert fm.pair[0] is fm.A and fm.pair[1] is fm.B
    close(fm.AB, A @ B, atol=0, rtol=0)
    close(fm.AB, ref.AB, atol=0, rtol=0)
    assert repr(fm) == repr(ref) == str(fm)


def test_inner_dim_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"A \(5, 3\), B \(4, 6\)"):
        FactoredMatrix(torch.zeros(5, 3), torch.zeros(4, 6))
    with pytest.raises(ValueError, match=r"A \(2, 5, 3\), B \(4, 3, 6\)"):
        FactoredMatrix(torch.zeros(2, 5, 3), torch.zeros(4, 3, 6))  # leading dims clash


def test_BA_and_square_only_ops_reject_non_square(TL):
    A, B = CASES["wide_f64"]()
    fm = FactoredMatrix(A, B)
    for attr in ("BA", "eigenvalues"):
        with pytest.raises(ValueError, match=r"ldim == rdim.*\(7, 5\)"):
            getattr(fm, attr)
    with pytest.raises(ValueError, match=r"ldim == rdim"):
        fm.trace()
    with pytest.raises(AssertionError):  # TL refuses too, with an assert
        TL(A, B).BA


def test_BA(square, TL):
    A, B = square
    fm = FactoredMatrix(A, B)
    close(fm.BA, B @ A, atol=0, rtol=0)
    close(fm.BA, TL(A, B).BA, atol=0, rtol=0)


def test_transpose(case, TL):
    A, B = case
    fm = FactoredMatrix(A, B)
    assert fm.T.shape == fm.shape[:-2] + (fm.rdim, fm.ldim)
    close(fm.T.AB, (A @ B).transpose(-2, -1))
    close(fm.T.A, TL(A, B).T.A, atol=0, rtol=0)
    close(fm.T.B, TL(A, B).T.B, atol=0, rtol=0)


# -- SVD --------------------------------------------------------------------------------
def _signs_agree(X, Y, S, kw):
    """Columns of X and Y are the same up to sign where the singular value is clearly nonzero."""
    live = S > 1e-6 * S.amax(-1, keepdim=True)
    overlap = (X.transpose(-2, -1) @ Y).diagonal(dim1=-2, dim2=-1).abs()
    close(overlap[live], torch.ones_like(overlap[live]), **kw)


def test_svd_matches_torch_and_tl(case, TL):
    A, B = case
    fm, ref = FactoredMatrix(A, B), TL(A, B)
    kw = tol(A)
    AB64 = A.double() @ B.double()
    U, S, V = fm.svd()
    k = _k(fm)
    assert U.shape == fm.shape[:-2] + (fm.ldim, k) and V.shape == fm.shape[:-2] + (fm.rdim, k)
    assert S.shape == fm.shape[:-2] + (k,)
    assert (U.shape, S.shape, V.shape) == tuple(t.shape for t in ref.svd())
    # (a) reconstruction, singular values and singular subspaces of the materialised product
    close(U @ torch.diag_embed(S) @ V.transpose(-2, -1), AB64, **kw)
    close(S, torch.linalg.svdvals(AB64)[..., :k], **kw)
    eye = torch.eye(k, dtype=U.dtype).expand(U.shape[:-2] + (k, k))
    close(U.transpose(-2, -1) @ U, eye, **kw)
    close(V.transpose(-2, -1) @ V, eye, **kw)
    U_ref, S_ref, Vh_ref = torch.linalg.svd(AB64, full_matrices=False)
    _signs_agree(U, U_ref[..., :k].to(U.dtype), S, kw)
    _signs_agree(V, Vh_ref[..., :k, :].transpose(-2, -1).to(V.dtype), S, kw)
    # (b) TransformerLens
    U_tl, S_tl, V_tl = ref.svd()
    close(S, S_tl, **kw)
    _signs_agree(U, U_tl, S, kw)
    _signs_agree(V, V_tl, S, kw)


def test_svd_is_cached_and_properties_agree(case):
    fm = FactoredMatrix(*case)
    U, S, V = fm.svd()
    assert fm.svd()[0] is U and fm.U is U and fm.S is S and fm.V is V
    with pytest.warns(DeprecationWarning, match="returns V"):
        assert fm.Vh is V  # TL's alias: V, not V^T


def test_spectral_methods_never_form_the_product(monkeypatch):
    A, B = _factors((50, 3), (3, 40), torch.float64, 6)
    fm = FactoredMatrix(A, B)
    seen = []
    real_svd, real_eig = torch.linalg.svd, torch.linalg.eigvals
    monkeypatch.setattr(torch.linalg, "svd", lambda x, **kw: seen.append(x.shape) or real_svd(x, **kw))
    monkeypatch.setattr(torch.linalg, "eigvals", lambda x: seen.append(x.shape) or real_eig(x))
    monkeypatch.setattr(FactoredMatrix, "AB", property(lambda self: pytest.fail("AB was formed")))
    fm.svd(), fm.norm(), fm.rank(), fm.make_even(), fm.collapse_l(), fm.collapse_r()
    fm.get_corner(), fm @ torch.ones(40, dtype=A.dtype), torch.ones(50, dtype=A.dtype) @ fm
    sq = FactoredMatrix(A, B[:, :3].T @ A.T)  # 50 x 50, rank 3
    sq.eigenvalues, sq.trace()
    assert seen and all(max(s[-2:]) <= 3 for s in seen), seen


def test_svd_of_16bit_factors_runs_in_float32(TL):
    A, B = _factors((6, 3), (3, 6), torch.bfloat16, 7)
    fm = FactoredMatrix(A, B)
    assert fm.S.dtype == torch.float32
    close(fm.S, torch.linalg.svdvals(A.double() @ B.double())[:3], atol=1e-5, rtol=1e-5)
    close(fm.S, TL(A, B).S, atol=1e-5, rtol=1e-5)


# -- eigenvalues, norm, trace, rank ------------------------------------------------------
def _match_multisets(got: torch.Tensor, want: torch.Tensor, rel: float):
    """Pair every eigenvalue with its nearest unused reference value (zeros pad the shorter)."""
    n = max(len(got), len(want))
    got = torch.cat([got, got.new_zeros(n - len(got))]).to(torch.complex128)
    want = torch.cat([want.to(torch.complex128), want.new_zeros(n - len(want)).to(torch.complex128)])
    scale = max(1.0, want.abs().max().item())
    left = list(want)
    for g in got:
        d = torch.stack(left) - g
        j = int(d.abs().argmin())
        assert d[j].abs().item() <= rel * scale, (g, want)
        left.pop(j)


def test_eigenvalues_match_torch_and_tl(square, TL):
    A, B = square
    fm = FactoredMatrix(A, B)
    ev = fm.eigenvalues
    assert ev.is_complex() and ev.shape == fm.shape[:-2] + (fm.mdim,)
    ev_tl = TL(A, B).eigenvalues
    ev_ref = torch.linalg.eigvals(A.double() @ B.double())  # [..., ldim]: mdim nonzero + zeros
    rel = tol(A)["atol"]
    for i in range(ev.reshape(-1, fm.mdim).shape[0]):
        _match_multisets(ev.reshape(-1, fm.mdim)[i], ev_ref.reshape(-1, fm.ldim)[i], rel)
        _match_multisets(ev.reshape(-1, fm.mdim)[i], ev_tl.reshape(-1, fm.mdim)[i], rel)


def test_norm(case, TL):
    A, B = case
    fm = FactoredMatrix(A, B)
    n = fm.norm()
    assert n.shape == fm.shape[:-2]
    close(n, torch.linalg.matrix_norm(A.double() @ B.double(), "fro"))
    close(n, TL(A, B).norm())


def test_trace(square, TL):
    A, B = square
    t = FactoredMatrix(A, B).trace()
    close(t, torch.diagonal(A.double() @ B.double(), dim1=-2, dim2=-1).sum(-1))
    close(t, TL(A, B).eigenvalues.sum(-1).real)  # TL has no trace(); sum of its eigenvalues


def test_rank(TL):
    A, B = _factors((2, 8, 5), (2, 5, 7), torch.float64, 8)
    A[1, :, 4] = A[1, :, 0] - 2 * A[1, :, 1]  # second matrix has rank 4
    fm = FactoredMatrix(A, B)
    r = fm.rank()
    assert r.dtype == torch.int64 and r.tolist() == [5, 4]
    assert r.tolist() == torch.linalg.matrix_rank(A @ B).tolist()
    S_tl = TL(A, B).S
    assert r.tolist() == (S_tl > 1e-10 * S_tl.amax(-1, keepdim=True)).sum(-1).tolist()
    assert fm.rank(atol=1e6).tolist() == [0, 0]
    assert FactoredMatrix(torch.zeros(4, 2), torch.zeros(2, 4)).rank().item() == 0


# -- products ---------------------------------------------------------------------------
def test_matmul_vectors(case, TL):
    A, B = case
    fm, ref = FactoredMatrix(A, B), TL(A, B)
    v, w = torch.randn(fm.rdim, dtype=A.dtype), torch.randn(fm.ldim, dtype=A.dtype)
    close(fm @ v, (A @ B) @ v)
    close(fm @ v, ref @ v)
    close(w @ fm, w @ (A @ B))
    close(w @ fm, w @ ref)
    assert (fm @ v).shape == fm.shape[:-1] and (w @ fm).shape == fm.shape[:-2] + (fm.rdim,)


@pytest.mark.parametrize("n", [2, 9])
def test_matmul_matrices_keeps_tl_inner_dim(case, TL, n):
    A, B = case
    fm, ref = FactoredMatrix(A, B), TL(A, B)
    right = torch.randn(fm.rdim, n, dtype=A.dtype)
    lead = fm.shape[-3] if fm.ndim > 2 else 3  # a leading dim of its own, broadcasting with fm's
    left = torch.randn(lead, n, fm.ldim, dtype=A.dtype)
    for ours, theirs, dense in ((fm @ right, ref @ right, (A @ B) @ right),
                                (left @ fm, left @ ref, left @ (A @ B))):
        assert isinstance(ours, FactoredMatrix)
        assert ours.mdim == theirs.mdim and ours.shape == theirs.shape == dense.shape
        close(ours.AB, dense)
        close(ours.AB, theirs.AB)


def test_matmul_factored_by_factored(case, TL):
    A, B = case
    C, D = _factors((B.shape[-1], 2), (2, 5), A.dtype, 9)
    ours = FactoredMatrix(A, B) @ FactoredMatrix(C, D)
    theirs = TL(A, B) @ TL(C, D)
    assert ours.mdim == theirs.mdim == 2
    close(ours.AB, (A @ B) @ (C @ D))
    close(ours.AB, theirs.AB)
    reflected = FactoredMatrix(C, D).__rmatmul__(FactoredMatrix(A, B))
    assert reflected.mdim == 2
    close(reflected.AB, (A @ B) @ (C @ D))


def test_matmul_shape_errors():
    fm = FactoredMatrix(torch.zeros(5, 2), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"\(5, 4\) by \(5, 3\)"):
        fm @ torch.zeros(5, 3)
    with pytest.raises(ValueError, match=r"\(3,\) by FactoredMatrix of shape \(5, 4\)"):
        torch.zeros(3) @ fm


@pytest.mark.parametrize("scalar", [3, -0.5, torch.tensor(2.5), torch.tensor([1.5])])
def test_scalar_multiplication(case, TL, scalar):
    A, B = case
    fm = FactoredMatrix(A, B)
    for scaled in (fm * scalar, scalar * fm):
        assert isinstance(scaled, FactoredMatrix)
        close(scaled.AB, (A @ B) * scalar)
        close(scaled.A, (TL(A, B) * scalar).A)
    with pytest.raises(ValueError, match="scalar"):
        fm * torch.ones(2, 2)


# -- indexing and reshaping ---------------------------------------------------------------
E = Ellipsis
# (index, the same selection on the dense product, with integer row/column indices kept as length 1)
INDICES = [
    ((0,), (0,)),
    ((-1,), (-1,)),
    ((1, 2), (1, 2)),
    ((slice(None), 1), (slice(None), 1)),
    ((0, 1, slice(2, 5), slice(1, 3)), (0, 1, slice(2, 5), slice(1, 3))),
    ((E, 2, slice(None)), (E, slice(2, 3), slice(None))),
    ((E, 3), (E, slice(3, 4))),
    ((E, 1, 2), (E, slice(1, 2), slice(2, 3))),
    ((E, -1, -1), (E, slice(-1, None), slice(-1, None))),
    ((0, 0, 4, slice(None)), (0, 0, slice(4, 5), slice(None))),
    ((E, [0, 2, 5], slice(None)), (E, [0, 2, 5], slice(None))),
    ((torch.tensor([1, 0]),), (torch.tensor([1, 0]),)),
    ((None,), (None,)),
    ((slice(None), None), (slice(None), None)),
    ((E, None, slice(None), slice(None)), (E, None, slice(None), slice(None))),
    ((E, 0, None, slice(None)), (E, slice(0, 1), None, slice(None))),
    ((E, None), (E, None)),
]


@pytest.mark.parametrize("idx,dense_idx", INDICES, ids=[str(i) for i, _ in INDICES])
def test_getitem_matches_dense_and_tl(TL, idx, dense_idx):
    A, B = _qk(torch.float64)  # [2, 3, 8, 8] with mdim 4
    ours = FactoredMatrix(A, B)[idx]
    dense = (A @ B)[dense_idx]
    assert isinstance(ours, FactoredMatrix) and ours.shape == dense.shape
    close(ours.AB, dense)
    theirs = TL(A, B)[idx]
    assert ours.shape == theirs.shape
    close(ours.AB, theirs.AB)


def test_getitem_errors():
    fm = FactoredMatrix(*_qk(torch.float64))
    with pytest.raises(IndexError, match="too many indices"):
        fm[0, 0, 0, 0, 0]
    with pytest.raises(IndexError, match="single ellipsis"):
        fm[..., 0, ...]


def test_unsqueeze(case, TL):
    A, B = case
    for k in (0, 1) if A.ndim > 2 else (0,):
        ours, theirs = FactoredMatrix(A, B).unsqueeze(k), TL(A, B).unsqueeze(k)
        assert ours.shape == theirs.shape == (A @ B).unsqueeze(k).shape
        close(ours.AB, (A @ B).unsqueeze(k))


def _rows_up_to_sign(X, Y, kw):
    sign = torch.sign((X * Y).sum(-1, keepdim=True))
    close(X * sign, Y, **kw)


def test_collapse_l_and_r(case, TL):
    A, B = case
    fm, ref = FactoredMatrix(A, B), TL(A, B)
    kw, AB = tol(A), A.double() @ B.double()
    L, R = fm.collapse_l(), fm.collapse_r()
    k = _k(fm)
    assert L.shape == fm.shape[:-2] + (k, fm.rdim) and R.shape == fm.shape[:-2] + (fm.ldim, k)
    close(fm.U @ L, AB, **kw)
    close(R @ fm.V.transpose(-2, -1), AB, **kw)
    # Orthogonal factors dropped: only A B's Gram matrices survive, sign-free.
    close(L.transpose(-2, -1) @ L, AB.transpose(-2, -1) @ AB, **kw)
    close(R @ R.transpose(-2, -1), AB @ AB.transpose(-2, -1), **kw)
    _rows_up_to_sign(L, ref.collapse_l(), kw)
    _rows_up_to_sign(R.transpose(-2, -1), ref.collapse_r().transpose(-2, -1), kw)


def test_make_even(case, TL):
    A, B = case
    fm, ref = FactoredMatrix(A, B), TL(A, B)
    kw = tol(A)
    even = fm.make_even()
    k = _k(fm)
    assert isinstance(even, FactoredMatrix) and even.mdim == k
    close(even.AB, A.double() @ B.double(), **kw)
    S = torch.diag_embed(fm.S)
    close(even.A.transpose(-2, -1) @ even.A, S, **kw)  # sqrt(S) on each side
    close(even.B @ even.B.transpose(-2, -1), S, **kw)
    theirs = ref.make_even()
    _rows_up_to_sign(even.B, theirs.B, kw)
    _rows_up_to_sign(even.A.transpose(-2, -1), theirs.A.transpose(-2, -1), kw)


@pytest.mark.parametrize("k", [2, 3])
def test_get_corner(case, TL, k):
    A, B = case
    corner = FactoredMatrix(A, B).get_corner(k)
    AB = A @ B
    close(corner, AB[tuple(slice(k) for _ in range(AB.ndim))])
    close(corner, TL(A, B).get_corner(k))


def test_to_dtype_and_device(case):
    A, B = case
    fm = FactoredMatrix(A, B)
    half = fm.to(torch.float32)
    assert half.A.dtype == half.B.dtype == torch.float32 and half.A.device.type == "cpu"
    close(half.AB, (A @ B).float(), **F32)
    moved = fm.to("cpu", dtype=torch.float64)
    assert moved.AB.dtype == torch.float64
    close(moved.AB.to(A.dtype), A @ B)


# ---------------------------------------------------------------------- on the models' own circuits
@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_model_QK_and_OV_agree_with_tl(request, family, TL):
    """model.QK / model.OV are W_Q W_K^T and W_V W_O per head (GQA: KV heads repeated), and TL's
    FactoredMatrix on the same weights gives the same spectra."""
    model = request.getfixturevalue(family)
    n_rep = model.cfg.n_heads // model.cfg.n_kv_heads
    for layer in range(model.cfg.n_layers):
        attn = model.blocks[layer].attn
        for head in range(model.cfg.n_heads):
            W_Q, W_K = attn.W_Q[head], attn._W_K[head // n_rep]  # the stored KV head this query head reads
            W_V, W_O = attn._W_V[head // n_rep], attn.W_O[head]
            for ours, (A, B) in ((model.QK[layer, head], (W_Q, W_K.T)), (model.OV[layer, head], (W_V, W_O))):
                theirs = TL(A, B)
                torch.testing.assert_close(ours.AB, A @ B)
                torch.testing.assert_close(ours.AB, theirs.AB)
                torch.testing.assert_close(ours.norm(), theirs.norm())
                torch.testing.assert_close(ours.S, theirs.S, atol=1e-5, rtol=1e-4)
                _match_multisets(ours.eigenvalues, theirs.eigenvalues, rel=1e-3)
