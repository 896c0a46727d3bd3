"""analyses.attention_cost: the fits against known curves, the memory count against known allocations, and
the measured n^2 memory of each attention path against what that path must hold.

Timings themselves are not asserted (benchmarks/attention_cost.py prints them)."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from analyses.attention_cost import (LiveBytes, attention_cost, fit_curve, flop_counts, loglog_slope, nnls_quadratic,
                                     peak_bytes, smollm2_shape)
from models.config import TransformerConfig

LENGTHS = torch.tensor([64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384], dtype=torch.float64)


# ---------------------------------------------------------------------- fits
@pytest.mark.parametrize("power", [1.0, 1.5, 2.0])
def test_loglog_slope_recovers_a_power_law(power):
    y = 3e-4 * LENGTHS ** power
    assert loglog_slope(LENGTHS, y) == pytest.approx(power, abs=1e-12)


def test_quadratic_fit_recovers_known_terms_with_noise():
    a, b, c = 3e-4, 1e-7, 2e-3  # n* = 3000
    noise = 1 + 0.02 * torch.randn(len(LENGTHS), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fit = fit_curve(LENGTHS, (c + a * LENGTHS + b * LENGTHS ** 2) * noise)
    assert fit.linear == pytest.approx(a, rel=0.1)
    assert fit.quadratic == pytest.approx(b, rel=0.1)
    assert fit.crossover == pytest.approx(a / b, rel=0.15)
    # the slope over the longer half (n >= 1024) by hand: between 1 and 2, nearer 2 past n* = 3000
    upper = LENGTHS >= 1024
    assert fit.fit_from == 1024
    y = c + a * LENGTHS + b * LENGTHS ** 2
    by_hand = (torch.log(y[upper][-1]) - torch.log(y[upper][0])) / (torch.log(LENGTHS[upper][-1]) - math.log(1024))
    assert fit.exponent == pytest.approx(float(by_hand), abs=0.08)


def test_crossover_is_a_over_b_exactly_without_noise():
    a, b = 2.5e-4, 5e-8
    fit = fit_curve(LENGTHS, a * LENGTHS + b * LENGTHS ** 2)
    assert fit.constant == pytest.approx(0.0, abs=1e-9)
    assert fit.crossover == pytest.approx(a / b, rel=1e-6)  # 5000
    assert float(fit.predict(5000.0)) == pytest.approx(2 * a * 5000, rel=1e-6)  # the two terms equal there


def test_nnls_is_the_best_non_negative_solution():
    """Against a brute-force grid over the three non-negative coefficients: nothing on it does better."""
    n = torch.tensor([10.0, 20.0, 40.0, 80.0, 160.0], dtype=torch.float64)
    y = torch.tensor([8.0, 5.0, 5.0, 9.0, 25.0], dtype=torch.float64)  # a plain least-squares fit wants a < 0
    c, a, b = nnls_quadratic(n, y)
    assert min(c, a, b) >= 0 and a == 0.0  # on the boundary

    def loss(c, a, b):
        return float((((y - c - a * n - b * n * n) / y) ** 2).sum())

    best = loss(c, a, b)
    grid = itertools.product(torch.linspace(0, 10, 31).tolist(), torch.linspace(0, 0.2, 31).tolist(),
                             torch.linspace(0, 2e-3, 31).tolist())
    assert all(loss(gc, ga, gb) >= best - 1e-9 for gc, ga, gb in grid)


def test_no_quadratic_term_has_no_crossover():
    fit = fit_curve(LENGTHS, 1e-3 * LENGTHS)
    assert fit.quadratic == 0.0 and fit.crossover == math.inf
    assert fit.exponent == pytest.approx(1.0, abs=1e-9)


def test_a_negligible_quadratic_term_has_no_crossover():
    """b n^2 below 1% of the fit at the longest length is rounding, not a measurement: no n*. Just above, n* = a/b."""
    n_max = float(LENGTHS[-1])
    a = 1e-3
    for share, expect_inf in ((0.002, True), (0.05, False)):
        b = share * a * n_max / n_max ** 2 / (1 - share)  # b n_max^2 = share of (a n_max + b n_max^2)
        fit = fit_curve(LENGTHS, a * LENGTHS + b * LENGTHS ** 2)
        assert fit.quadratic == pytest.approx(b, rel=1e-4)
        assert (fit.crossover == math.inf) is expect_inf
        if not expect_inf:
            assert fit.crossover == pytest.approx(a / b, rel=1e-4)


def test_a_fit_needs_three_points():
    with pytest.raises(ValueError, match="at least 3"):
        fit_curve([64, 128, 256], [1.0, float("nan"), 2.0])


# ---------------------------------------------------------------------- memory
@pytest.mark.parametrize("n", [256, 1000])
def test_an_n_by_n_float32_matrix_counts_4_n_squared_bytes(n):
    assert peak_bytes(lambda: torch.empty(n, n)) == 4 * n * n
    assert peak_bytes(lambda: torch.zeros(n, n, dtype=torch.float64)) == 8 * n * n


def test_views_and_in_place_ops_do_not_count_again_and_frees_do():
    n = 500
    with LiveBytes() as tracker:
        x = torch.ones(n, n)
        x.t().mul_(2)  # a view, changed in place: no new storage
        x[:10].add_(1)
        assert tracker.current == 4 * n * n
        y = x + 1  # a new [n, n]
        assert tracker.current == 8 * n * n
        del x, y
        assert tracker.current == 0
        z = torch.ones(n, n).sum()  # a temporary freed within the expression
        del z
    assert tracker.peak == 8 * n * n


def test_tensors_from_before_do_not_count():
    weight = torch.randn(300, 300)
    assert peak_bytes(lambda: weight.t()) == 0  # a view of it
    assert peak_bytes(lambda: weight @ weight) == 4 * 300 * 300


# ---------------------------------------------------------------------- the measurement
TINY = TransformerConfig(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_head=8, d_vocab=50, n_ctx=512, d_mlp=64,
                         act_fn="silu", gated_mlp=True, normalization_type="RMS", positional_embedding_type="rotary",
                         model_name="tiny")


@pytest.fixture(scope="module")
def tiny_result():
    return attention_cost(TINY, (32, 64, 128, 256, 512), quick=True, threads=1)


def test_each_path_holds_the_n_squared_buffers_it_must(tiny_result):
    """Explicit: scores and pattern, [heads, n, n] float32 each, alive together; cached patterns: one per layer,
    plus the two being made at the last layer; fused: none (only tensors linear in n)."""
    h, layers, square = TINY.n_heads, TINY.n_layers, 4  # bytes per entry
    fits = tiny_result.memory_fits
    assert fits["explicit"].quadratic == pytest.approx(2 * h * square, rel=0.1)
    assert fits["fused+patterns"].quadratic == pytest.approx((layers + 1) * h * square, rel=0.1)
    assert fits["fused"].quadratic < 0.05 * fits["explicit"].quadratic
    n = 512
    peaks = dict(zip(tiny_result.paths, tiny_result.peak_bytes[:, -1].tolist()))
    one = h * n * n * square  # one layer's [heads, n, n] float32
    for path, squares in (("explicit", 2), ("fused+patterns", layers + 1)):
        assert squares * one <= peaks[path] <= squares * one + 1.5 * peaks["fused"]  # + what the fused forward holds


def test_flop_count_by_hand():
    a, b = flop_counts(TINY)
    d, h, kv, dh, m = 32, 4, 2, 8, 64
    per_layer = 2 * (d * h * dh + 2 * d * kv * dh + h * dh * d + 3 * d * m)
    assert a == 2 * per_layer and b == 2 * 4 * h * dh
    big_a, big_b = flop_counts(smollm2_shape(n_layers=1))
    assert big_a / big_b == pytest.approx(2 * (576 * 576 * 2 + 2 * 576 * 192 + 3 * 576 * 1536) / (4 * 576))


def test_result_object(tiny_result, tmp_path):
    r = tiny_result
    assert r.seconds.shape == r.peak_bytes.shape == (3, 5)
    assert bool((r.seconds > 0).all()) and bool((r.peak_bytes > 0).all())
    frame = r.to_frame()
    assert len(frame) == 15 and set(frame["path"]) == {"fused", "explicit", "fused+patterns"}
    data = json.loads(json.dumps(r.to_dict()))
    assert data["flops"]["crossover_full_square"] == pytest.approx(r.flops_linear / r.flops_quadratic)
    assert set(data["time_fits"]) == {"fused", "explicit", "fused+patterns"}
    assert "explicit n^" in r.headline() and "fused n^" in r.headline()
    page = r.save(tmp_path / "cost")
    assert page.name == "index.html" and "<svg" in page.read_text()
    assert json.loads((tmp_path / "cost" / "attention_cost.json").read_text())["lengths"] == [32, 64, 128, 256, 512]


def test_memory_limit_leaves_out_long_pattern_paths():
    r = attention_cost(TINY, (16, 32, 64, 128), quick=True, memory_limit=2 * 4 * 4 * 64 * 64, threads=1)
    assert r.skipped == {"explicit": [128], "fused+patterns": [64, 128]}
    assert math.isnan(float(r.seconds[1, -1])) and not math.isnan(float(r.seconds[0, -1]))


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="n_ctx"):
        attention_cost(TINY, (64, 1024), quick=True)
    with pytest.raises(ValueError, match="unknown attention paths"):
        attention_cost(TINY, (16, 32, 64), paths=("flash",), quick=True)
    with pytest.raises(TypeError, match="TransformerConfig"):
        attention_cost("smollm2-135m", (16, 32, 64), quick=True)
