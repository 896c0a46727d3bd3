"""analyses.positional: the offset-only fit against loops over hand-made patterns, each scheme's positions against
their formulas and the models' own tables, and a quick study that writes its page."""

from __future__ import annotations

import json
import math

import pytest
import torch

import models
from analyses.positional import (PatternSums, end_keys, head_offsets, offset_fit, positional_study, rotary_kernel,
                                 scheme_of)
from models.rotary import apply_rotary


def causal(n):
    return torch.ones(n, n, dtype=torch.bool).tril()


def fit_of(patterns, allowed):
    sums = PatternSums()
    sums.add(patterns, allowed)
    return offset_fit(sums.groups())


def brute_force(patterns, allowed, kernel):
    """R^2 of the offset-only model and of the plain mean by offset, the ends share, the mean by offset, and the
    model's and the data's attention per offset: loops over every text, query and key."""
    T, H, n, _ = patterns.shape
    kept = allowed & ~end_keys(allowed)
    by_offset = {}
    for t in range(T):
        for q in range(n):
            for k in range(n):
                if kept[q, k]:
                    by_offset.setdefault(q - k, []).append(patterns[t, :, q, k].double())
    mean = {o: torch.stack(v).mean(0) for o, v in by_offset.items()}
    sse, sse_raw, sst = (torch.zeros(H, dtype=torch.float64) for _ in range(3))
    ends, rows = torch.zeros(H, dtype=torch.float64), 0
    model_mass = {o: torch.zeros(H, dtype=torch.float64) for o in by_offset}
    offsets = torch.arange(-(n - 1), n)
    g = {int(o): kernel[:, i].double() for i, o in enumerate(offsets)}
    for t in range(T):
        for q in range(n):
            keys = [k for k in range(n) if kept[q, k]]
            if not keys:
                continue
            row = patterns[t, :, q].double()
            r = sum(row[:, k] for k in keys)
            z = sum(g[q - k] for k in keys)
            ends += 1 - r
            rows += 1
            for k in keys:
                pred = torch.where(z > 0, r * g[q - k] / z, 0.0)  # z = 0: no mass anywhere g lives (r = 0 too)
                model_mass[q - k] += pred
                sse += (row[:, k] - pred) ** 2
                sse_raw += (row[:, k] - mean[q - k]) ** 2
                sst += (row[:, k] - r / len(keys)) ** 2
    return 1 - sse / sst, 1 - sse_raw / sst, ends / rows, mean, model_mass, by_offset


def previous_token(n):
    p = torch.zeros(n, n)
    p[0, 0] = 1
    p[torch.arange(1, n), torch.arange(n - 1)] = 1
    return p


def relative_softmax(n, scores, allowed):
    """A head whose scores depend on q - k only: softmax over the allowed keys of scores[q - k + n - 1]."""
    offset = torch.arange(n)[:, None] - torch.arange(n)[None] + n - 1
    return scores[offset].masked_fill(~allowed, -math.inf).softmax(-1)


# ---------------------------------------------------------------------- the offset-only fit
def test_positional_heads_score_one_random_ones_low_and_the_sums_match_loops():
    n, T = 12, 6
    allowed = causal(n)
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(2 * n - 1, generator=gen)
    noise = torch.rand(T, n, n, generator=gen).masked_fill(~allowed, 0)
    heads = [previous_token(n).expand(T, n, n), relative_softmax(n, scores, allowed).expand(T, n, n),
             noise / noise.sum(-1, keepdim=True)]
    patterns = torch.stack(heads, dim=1)  # [T, 3 heads, n, n]
    fit = fit_of(patterns, allowed)
    assert fit.r2[:2].tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    assert float(fit.r2[2]) < 0.2
    r2, r2_raw, ends, mean, model_mass, data = brute_force(patterns, allowed, fit.kernel)
    assert fit.r2.tolist() == pytest.approx(r2.tolist(), abs=1e-5)
    assert fit.r2_raw.tolist() == pytest.approx(r2_raw.tolist(), abs=1e-5)
    assert fit.ends.tolist() == pytest.approx(ends.tolist(), abs=1e-6)
    assert float(fit.ends[0]) == pytest.approx(1 / (n - 1))  # only query 1's previous token is an end key
    for o, values in mean.items():
        assert fit.mean[:, int((fit.offsets == o).nonzero())].tolist() == pytest.approx(values.tolist(), abs=1e-6)
    # the fitted g puts on every offset the attention the heads put there (the maximum-likelihood condition)
    for o in model_mass:
        observed = torch.stack(data[o]).sum(0)
        assert model_mass[o].tolist() == pytest.approx(observed.tolist(), abs=1e-4)
    # a relative head's fitted g is exp(its scores), up to scale, on the offsets the fit sees (0 .. n - 2)
    ratio = fit.kernel[1, n - 1:2 * n - 2] / fit.kernel[1, n - 1]
    assert ratio.tolist() == pytest.approx(torch.exp(scores[n - 1:2 * n - 2] - scores[n - 1]).tolist(), rel=1e-3)


def test_bidirectional_ends_are_first_and_last_key_and_lengths_combine():
    gen = torch.Generator().manual_seed(1)
    scores = torch.randn(2 * 9 - 1, generator=gen)
    sums = PatternSums()
    for n in (6, 9):  # one relative head read at two lengths: still one g
        full = torch.ones(n, n, dtype=torch.bool)
        ends = end_keys(full)
        assert ends[:, 0].all() and ends[:, -1].all() and int(ends.sum()) == 2 * n
        sums.add(relative_softmax(n, scores[9 - n:9 + n - 1], full)[None, None].expand(3, 1, n, n), full)
    fit = offset_fit(sums.groups())
    assert float(fit.r2[0]) == pytest.approx(1.0, abs=1e-6)
    assert end_keys(causal(5)).sum() == 5  # a causal row's last key is itself, not an end


def test_a_uniform_head_has_nothing_to_explain():
    n = 8
    uniform = causal(n).float() / causal(n).float().sum(-1, keepdim=True)
    fit = fit_of(uniform[None, None].expand(2, 1, n, n), causal(n))
    assert math.isnan(float(fit.r2[0]))


# ---------------------------------------------------------------------- what each scheme adds
@pytest.fixture(scope="module")
def translation():
    return models.load("translation-2l")


@pytest.fixture(scope="module")
def attn_only_2l():
    return models.load("attn-only-2l")


def test_sinusoidal_table_is_the_formula_and_what_the_model_adds(translation):
    d, n = translation.cfg.d_model, translation.cfg.n_ctx
    table = torch.zeros(n, d, dtype=torch.float64)
    for p in range(n):
        for i in range(d // 2):  # [sin | cos] halves, as Marian and the model store it
            angle = p / 10000 ** (2 * i / d)
            table[p, i], table[p, d // 2 + i] = math.sin(angle), math.cos(angle)
    W_pos = translation.encoder.pos_embed.W_pos
    torch.testing.assert_close(W_pos.double(), table, atol=1e-6, rtol=0)
    src = torch.tensor([[5, 6, 7, 8, 9, 2]])
    _, cache = translation.run_with_cache(src, torch.tensor([[1]]), names_filter="encoder.hook_pos_embed")
    torch.testing.assert_close(cache["encoder.hook_pos_embed"][0].double(), table[:6], atol=1e-6, rtol=0)
    scheme = scheme_of(translation)
    unit = table / table.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(scheme.similarity.double(), unit @ unit.T, atol=1e-5, rtol=0)
    assert scheme.kind == "sinusoidal" and scheme.offset_share == pytest.approx(1.0, abs=1e-6)
    assert scheme.position_norm == pytest.approx(math.sqrt(d / 2), rel=1e-5)  # every row: d/2 (sin^2 + cos^2)


def test_learned_similarity_is_the_cosine_of_W_pos(attn_only_2l):
    scheme = scheme_of(attn_only_2l, n_positions=40)
    W = attn_only_2l.W_pos.detach()
    for i, j in [(0, 0), (0, 1), (3, 17), (39, 2)]:
        cos = float(W[i] @ W[j] / (W[i].norm() * W[j].norm()))
        assert float(scheme.similarity[i, j]) == pytest.approx(cos, abs=1e-5)
    assert scheme.similarity.shape == (40, 40) and scheme.kind == "learned"
    assert scheme.position_norm == pytest.approx(float(W[:8].norm(dim=-1).mean()), rel=1e-5)  # its 8-token probe
    assert 0 < scheme.offset_share < 1  # learned: not a function of i - j alone


@pytest.mark.slow
def test_rotary_adds_nothing_and_its_kernel_is_cos_of_offsets(smollm2):
    cfg = smollm2.cfg
    assert "hook_pos_embed" not in smollm2.hook_dict
    _, cache = smollm2.run_with_cache("The Eiffel Tower is in Paris.",
                                      names_filter=["hook_embed", "blocks.0.hook_resid_pre"])
    assert torch.equal(cache["blocks.0.hook_resid_pre"], cache["hook_embed"])
    scheme = scheme_of(smollm2, n_positions=48)
    assert scheme.kind == "rotary" and scheme.position_norm == 0.0
    theta = [cfg.rotary_base ** (-2 * k / cfg.d_head) for k in range(cfg.d_head // 2)]
    for i, j in [(0, 0), (5, 0), (0, 5), (47, 13), (20, 21)]:
        by_hand = sum(math.cos((i - j) * t) for t in theta) / len(theta)
        assert float(scheme.similarity[i, j]) == pytest.approx(by_hand, abs=1e-5)
    # what the rotation does: the cosine of R_i x and R_j x for x with equal energy in every pair
    positions = torch.arange(48)[None]
    cos, sin = smollm2.rotary(positions, torch.float32)
    x = torch.ones(1, 48, 1, cfg.d_head)
    rotated = torch.nn.functional.normalize(apply_rotary(x, cos, sin)[0, :, 0].double(), dim=-1)
    kernel = rotary_kernel(smollm2.rotary.inv_freq, 48).double()
    torch.testing.assert_close(rotated @ rotated.T, kernel, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------- on the models
def test_previous_token_head_of_attn_only_2l_is_found_and_ranks_first(attn_only_2l):
    """L0H1 is the model card's previous-token head; on the first 32 tokens it attends to the previous one."""
    h = head_offsets(attn_only_2l, n_texts=8, seq_len=32)
    row, head, score = h.previous_token_head()
    assert (row, head) == ("L0", 1) and score > 0.8
    assert h.rank("L0", 1) == 1 and float(h.r2[0, 1]) > 0.9
    tokens_seen = h.mean_by_offset[0, 1]
    assert float(tokens_seen[h.offsets == 1]) == pytest.approx(score)


@pytest.mark.slow
def test_quick_study_writes_its_page(attn_only_2l, translation, tmp_path):
    result = positional_study(attn_only_2l, translation, quick=True)
    assert set(result.schemes) == {"attn-only-2l", "translation-2l"}
    assert result.heads["translation-2l"].rows == ["enc L0", "enc L1", "dec L0", "dec L1"]
    frame = result.to_frame()
    assert len(frame) == 2 * 4 + 4 * 4
    assert frame["end keys"].between(0, 1).all()
    page = result.save(tmp_path / "positional")
    text = page.read_text()
    assert page.name == "index.html" and text.count("<svg") >= 3
    data = json.loads((tmp_path / "positional" / "positional.json").read_text())
    assert data["heads"]["attn-only-2l"]["previous_token_head"]["layer"] == "L0"
    assert "sinusoidal" in result.headline()
    with pytest.raises(ValueError, match="similarity"):
        result.plot("nope")
