"""interp.circuits and interp.paths against plain torch on raw weights (1e-5 relative)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.testing import assert_close

import models
from interp import circuits
from interp.factored_matrix import FactoredMatrix
from interp.paths import path_expansion

REL = dict(rtol=1e-5, atol=1e-6)


def _random_attn_only(n_layers=2, norm=None, seed=0, V=40, d=24, H=3, dh=8):
    torch.manual_seed(seed)
    cfg = models.TransformerConfig(n_layers=n_layers, d_model=d, n_heads=H, d_head=dh, d_vocab=V, n_ctx=16,
                                   d_mlp=None, normalization_type=norm, positional_embedding_type="standard")
    model = models.HookedTransformer(cfg).double()
    model.requires_grad_(False)
    with torch.no_grad():  # random everything, biases and norm weights included
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.5 if name.endswith(".w") else 0.3) + (1.0 if name.endswith(".w") else 0))
    return model


@pytest.fixture(scope="module")
def noln():
    return _random_attn_only()


@pytest.fixture(scope="module")
def ln():
    return _random_attn_only(norm="LN", seed=1)


def test_full_circuits_equal_einsum_on_raw_weights(noln):
    m = noln
    W_E, W_U = m.embed.W_E, m.unembed.W_U
    assert_close(circuits.direct_path(m).AB, torch.einsum("vd,dw->vw", W_E, W_U), **REL)
    for layer in range(2):
        attn = m.blocks[layer].attn
        for h in range(3):
            qk = torch.einsum("ad,dk,ek,be->ab", W_E, attn.W_Q[h], attn.W_K[h], W_E)
            ov = torch.einsum("ad,dk,ke,ew->aw", W_E, attn.W_V[h], attn.W_O[h], W_U)
            assert_close(circuits.full_qk(m, layer, h).AB, qk, **REL)
            assert_close(circuits.full_ov(m, layer, h).AB, ov, **REL)
    # Stacked forms index the same way.
    assert circuits.full_ov(m).shape == (2, 3, 40, 40)
    assert_close(circuits.full_ov(m)[1, 2].AB, circuits.full_ov(m, 1, 2).AB, **REL)


def test_k_composition_circuit_equals_einsum(noln):
    m = noln
    W_E = m.embed.W_E
    a0, a1 = m.blocks[0].attn, m.blocks[1].attn
    for i in range(3):
        for j in range(3):
            by_hand = torch.einsum("ad,dk,ek,fe,gf,bg->ab", W_E, a1.W_Q[j], a1.W_K[j], a0.W_O[i], a0.W_V[i], W_E)
            assert_close(circuits.k_composition_circuit(m, 0, i, 1, j).AB, by_hand, **REL)
    with pytest.raises(ValueError, match="earlier layer"):
        circuits.k_composition_circuit(m, 1, 0, 0, 0)


def test_circuits_through_layernorm_use_folded_weights(ln):
    """With LayerNorm, circuits are read off weights with the norms folded in and the scale taken as 1."""
    m = ln
    W_E = m.embed.W_E - m.embed.W_E.mean(-1, keepdim=True)  # LN removes the mean of what it reads
    ln0 = m.blocks[0].ln1
    W_V = m.blocks[0].attn.W_V * ln0.w[None, :, None]
    W_V = W_V - W_V.mean(1, keepdim=True)
    W_O = m.blocks[0].attn.W_O - m.blocks[0].attn.W_O.mean(-1, keepdim=True)
    W_U = m.unembed.W_U * m.ln_final.w[:, None]
    W_U = W_U - W_U.mean(0, keepdim=True)
    ov = torch.einsum("ad,dk,ke,ew->aw", W_E, W_V[1], W_O[1], W_U)
    assert_close(circuits.full_ov(m, 0, 1).AB, ov, **REL)
    assert m.cfg.normalization_type == "LN", "prepare() must not modify the model it reads"


def test_eigenvalue_positivity_and_diagonal_accuracy(noln):
    fm = circuits.full_ov(noln, 1, 0)
    dense = fm.AB
    eig = torch.linalg.eigvals(dense)
    assert_close(circuits.eigenvalue_positivity(fm), eig.real.sum() / eig.abs().sum(), rtol=1e-5, atol=1e-8)
    hits = (dense.argmax(-1) == torch.arange(dense.shape[0])).double().mean()
    assert_close(circuits.top1_diagonal_accuracy(fm, chunk=7), hits)
    # A pure copying circuit scores 1 on both; its negative scores -1 and 0.
    eye = FactoredMatrix(torch.eye(6, dtype=torch.float64), torch.eye(6, dtype=torch.float64) * 3)
    assert_close(circuits.eigenvalue_positivity(eye), torch.tensor(1.0, dtype=torch.float64))
    assert circuits.top1_diagonal_accuracy(eye) == 1.0
    assert_close(circuits.eigenvalue_positivity(eye * -1), torch.tensor(-1.0, dtype=torch.float64))


def test_composition_scores_equal_dense_formula_and_tl(noln):
    from transformer_lens import FactoredMatrix as TLFactoredMatrix
    from transformer_lens.utilities import composition_scores as tl_composition_scores

    m = noln
    a0, a1 = m.blocks[0].attn, m.blocks[1].attn
    fro = torch.linalg.matrix_norm
    for mode in "QKV":
        result = circuits.composition_scores(m, mode, baseline_samples=20)
        for i in range(3):
            ov_i = a0.W_V[i] @ a0.W_O[i]
            for j in range(3):
                qk_j = a1.W_Q[j] @ a1.W_K[j].T
                right = {"Q": qk_j, "K": qk_j.T, "V": a1.W_V[j] @ a1.W_O[j]}[mode]
                expected = fro(ov_i @ right) / (fro(ov_i) * fro(right))
                assert_close(result.scores[0, i, 1, j], expected.float(), rtol=1e-5, atol=0)
                left_tl = TLFactoredMatrix(a0.W_V[i], a0.W_O[i])
                right_tl = {"Q": TLFactoredMatrix(a1.W_Q[j], a1.W_K[j].T), "K": TLFactoredMatrix(a1.W_Q[j], a1.W_K[j].T).T,
                            "V": TLFactoredMatrix(a1.W_V[j], a1.W_O[j])}[mode]
                tl = tl_composition_scores(left_tl, right_tl)
                assert_close(result.scores[0, i, 1, j], tl.float(), rtol=1e-5, atol=0)
        assert torch.isnan(result.scores[1, :, 0, :]).all() and torch.isnan(result.scores[0, :, 0, :]).all()


def test_random_baseline_is_about_one_over_sqrt_d_model():
    for d, dh in ((64, 16), (128, 32), (256, 64)):
        mean, std = circuits.random_baseline(d, dh, "K", samples=100)
        assert abs(mean * d ** 0.5 - 1) < 0.1 and std < 0.2 * mean


def test_skip_trigram_extraction_finds_a_planted_triple():
    """A hand-built 1-layer model whose only strong circuit is 'a ... b -> c'."""
    V, a, b, c = 8, 2, 5, 7
    cfg = models.TransformerConfig(n_layers=1, d_model=V, n_heads=1, d_head=V, d_vocab=V, n_ctx=8, d_mlp=None,
                                   normalization_type=None, positional_embedding_type="standard")
    m = models.HookedTransformer(cfg)
    m.requires_grad_(False)
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        m.embed.W_E.copy_(torch.eye(V))
        m.unembed.W_U.copy_(torch.eye(V))
        m.blocks[0].attn.W_Q[0].copy_(torch.eye(V))
        m.blocks[0].attn._W_V[0].copy_(torch.eye(V))
        m.blocks[0].attn._W_K[0, a, b] = 5.0  # QK[b, a] = W_K^T[b, a]: b attends to a
        m.blocks[0].attn.W_O[0, a, c] = 5.0  # attending to a promotes c
    found = circuits.skip_trigrams(m, layer=0, k=3)["L0H0"]
    top = found[0]
    assert (top.source, top.destination, top.out) == (a, b, c)
    assert top.score > 0 and top.qk > 0 and top.ov > 0


@pytest.mark.parametrize("norm", [None, "LN"])
def test_path_expansion_is_exact_and_matches_einsum(norm):
    m = _random_attn_only(norm=norm, seed=3)
    tokens = torch.randint(0, 40, (2, 9))
    exp = path_expansion(m, tokens)
    assert_close(exp.total(), exp.logits, rtol=1e-5, atol=1e-4)
    assert len(exp.terms) == 1 + 1 + 3 + 3 + 9  # direct, bias, 3 + 3 heads, 9 virtual heads
    if norm is not None:
        return
    _, cache = m.run_with_cache(tokens)
    x0 = cache["hook_embed"] + cache["hook_pos_embed"]
    a0, a1 = m.blocks[0].attn, m.blocks[1].attn
    W_U = m.unembed.W_U
    p0, p1 = cache["pattern", 0], cache["pattern", 1]
    assert_close(exp.terms["direct"], x0 @ W_U, **REL)
    for h in range(3):
        single = torch.einsum("bqk,bkd,de,ef,fv->bqv", p0[:, h], x0, a0.W_V[h], a0.W_O[h], W_U)
        assert_close(exp.terms[f"L0H{h}"], single, **REL)
        single1 = torch.einsum("bqk,bkd,de,ef,fv->bqv", p1[:, h], x0, a1.W_V[h], a1.W_O[h], W_U)
        assert_close(exp.terms[f"L1H{h}"], single1, **REL)
    i, j = 2, 1
    virtual = torch.einsum("bqk,bkp,bpd,de,ef,fg,gh,hv->bqv", p1[:, j], p0[:, i], x0, a0.W_V[i], a0.W_O[i],
                           a1.W_V[j], a1.W_O[j], W_U)
    assert_close(exp.terms[f"L0H{i}->L1H{j}"], virtual, **REL)
    groups = exp.by_order()
    assert set(groups) == {"direct", "bias", "single heads", "virtual heads"}


def test_path_expansion_caps_the_order(attn_only):
    deep = _random_attn_only(n_layers=3, seed=4)
    exp = path_expansion(deep, torch.randint(0, 40, (1, 6)), max_order=2)
    assert "higher-order" in exp.terms and not any(n.count("->") >= 2 for n in exp.terms)
    assert_close(exp.total(), exp.logits, rtol=1e-5, atol=1e-4)


def test_path_expansion_refuses_models_with_mlps(gpt2):
    with pytest.raises(ValueError, match="attention-only"):
        path_expansion(gpt2, torch.tensor([[1, 2, 3]]))


def test_prepare_leaves_the_model_alone(ln):
    before = copy.deepcopy(ln.state_dict())
    circuits.full_qk(ln)
    circuits.composition_scores(ln, "K", baseline_samples=5)
    for k, v in ln.state_dict().items():
        assert torch.equal(v, before[k]), k
