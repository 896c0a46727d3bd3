"""Figures (issue 16): every result's `.plot()` is a matplotlib Figure, pages inline it as SVG.

Results are built directly from their dataclasses (no model needed) except the shift study
and the next-token predictions, which run on the small random LLaMA of conftest.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _patch_result(direction="noise", axes=("layer", "pos"), shape=(3, 4), normalized=False, n=2, seed=0):
    from interp.patching.result import PatchResult

    gen = torch.Generator().manual_seed(seed)
    labels = {a: [f"{a[0].upper()}{i}" for i in range(k)] for a, k in zip(axes, shape)}
    return PatchResult(kind="resid_pre", by="layer_pos", axes=tuple(axes), labels=labels,
                       per_prompt=torch.randn(n, *shape, generator=gen), metric="logit_diff", direction=direction,
                       clean_metric=torch.full((n,), 3.0), corrupted_metric=torch.full((n,), -1.0),
                       normalized=normalized)


def _head_scores(L=2, H=4, name="induction"):
    from interp.probing.detectors import HeadScores

    return HeadScores(name, "test", torch.rand(3, L, H, generator=torch.Generator().manual_seed(1)))


def _flow():
    from interp.probing.flow import FlowScores

    return FlowScores("flow", "test", torch.rand(2, 2, 4), source="tower", target="Eiffel")


def _icl():
    from interp.probing.icl import ICLResult

    return ICLResult("m", seq_len=5, n_repeats=2, loss_per_position=torch.rand(9), loss_per_repeat=torch.rand(2),
                     loss_std_per_repeat=torch.rand(2))


def _linear_probe(control=True):
    from interp.probing.linear import LinearProbeResult

    nan = torch.full((3,), float("nan"))
    return LinearProbeResult(hook="resid_post", layers=[0, 1, 2], train_accuracy=torch.tensor([0.6, 0.9, 1.0]),
                             test_accuracy=torch.tensor([0.5, 0.8, 0.9]),
                             control_accuracy=torch.tensor([0.5, 0.55, 0.5]) if control else nan, chance=0.5,
                             classes=["a", "b"], n_train=12, n_test=4)


def _routing():
    from interp.routing import RoutingResult

    w = torch.zeros(4, 2, 4)
    w[:, :, 0], w[:, :, 2] = 0.7, 0.3
    return RoutingResult("mole", ["a", "b", "c", "d"], ["animal", "animal", "chem", "chem"], [0, 1], w)


def _census():
    from analyses.heads import HeadCensus

    scores = {"induction": _head_scores(), "previous_token": _head_scores(name="previous_token")}
    return HeadCensus("m", True, scores, _icl(), ["a", "b"], torch.rand(2, 4, 2, 2), ["a", "b"],
                      torch.rand(2, 4, 2, 2))


def _circuits():
    from analyses.circuits_summary import CircuitSummary

    return CircuitSummary("m", torch.rand(3, 4) * 2 - 1, torch.rand(3, 4) * 2 - 1, {}, 0.0)


def _framework():
    from analyses.framework import FrameworkResult

    z = torch.rand(2, 4)
    return FrameworkResult("attn-only-1l", "attn-only-2l", {}, [], [], None, None, z[:1], z, z, (0, 1), [(1, 2)],
                           z, z * 2 - 1, z, {}, {}, [], 0.0, [])


def _seq2seq():
    from analyses.seq2seq import Seq2SeqResult

    return Seq2SeqResult("translation-2l", 10, 1.0, torch.rand(2, 5), torch.rand(2, 5), torch.rand(2, 4, 3), 0.5, 0.1,
                         torch.rand(6, 6), {})


def _patching_study():
    from analyses.patching_study import PairSet, PatchingStudy

    pairs = PairSet("p", ["a b"], ["a c"], [" x"], [" y"])
    maps = {"resid_pre/denoise": _patch_result("denoise"), "resid_pre/noise": _patch_result("noise")}
    return PatchingStudy("m", pairs, torch.ones(1), -torch.ones(1), maps, {}, {}, {}, [])


@pytest.fixture(scope="module")
def shift_results(llama):
    from interp.shift.study import shift_study

    contexts = ["A mole dug", "The mole of gas", "One mole of salt", "A furry mole"]
    senses = shift_study(llama, "mole", contexts, ["animal", "chem", "chem", "animal"], probe_folds=2)
    plain = shift_study(llama, "mole", contexts)
    return senses, plain


BUILDERS = {
    "PatchResult layer_pos noise": lambda: _patch_result("noise"),
    "PatchResult layer denoise": lambda: _patch_result("denoise", ("layer",), (3,)),
    "PatchResult head_pos ablate": lambda: _patch_result("ablate:mean", ("layer", "head", "pos"), (2, 3, 4)),
    "PatchResult dest_src": lambda: _patch_result("noise", ("layer", "head", "dest", "src"), (2, 2, 3, 3)),
    "PatchResult set": lambda: _patch_result("noise", (), ()),
    "HeadScores": _head_scores,
    "HeadScores deep": lambda: _head_scores(L=12, H=3),
    "FlowScores": _flow,
    "ICLResult": _icl,
    "LinearProbeResult": _linear_probe,
    "LinearProbeResult no control": lambda: _linear_probe(control=False),
    "RoutingResult": _routing,
    "HeadCensus": _census,
    "CircuitSummary": _circuits,
    "FrameworkResult": _framework,
    "Seq2SeqResult": _seq2seq,
    "PatchingStudy": _patching_study,
}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_every_result_plots_a_figure(name):
    from matplotlib.figure import Figure

    result = BUILDERS[name]()
    fig = result.plot()
    assert isinstance(fig, Figure), type(fig)
    assert fig.axes
    html = result._repr_html_()
    assert "<svg" in html and "<?xml" not in html


def test_model_results_plot_figures(llama, shift_results, tmp_path):
    from matplotlib.figure import Figure

    from analyses.next_token import next_token_predictions
    from interp.shift.figures import figures

    nt = next_token_predictions(llama, "A mole dug", top_k=5)
    assert isinstance(nt.plot(), Figure) and len(nt.plot().axes[0].patches) == 5
    for result in shift_results:
        assert isinstance(result.plot(), Figure)
        assert all(isinstance(f, Figure) and isinstance(c, str) for f, c in figures(result))
        assert "<svg" in result._repr_html_()
    fig = shift_results[0].plot()  # restylable and savable in any format matplotlib writes
    fig.axes[0].set_title("restyled")
    fig.savefig(tmp_path / "shift.pdf")
    assert (tmp_path / "shift.pdf").read_bytes().startswith(b"%PDF")


def _plotted(fig):
    return torch.tensor(fig.axes[0].images[0].get_array().filled(float("nan")), dtype=torch.float32)


@pytest.mark.parametrize("normalized", [False, True])
def test_noising_map_shows_the_drop_from_the_clean_run(normalized):
    """Nothing changed = 0 = white: a noising map plots clean - patched, not the patched metric."""
    res = _patch_result("noise", normalized=normalized)
    clean = 1.0 if normalized else 3.0
    res.per_prompt[:] = clean
    res.per_prompt[:, 1, 2] = clean - 2.0  # one cell breaks the behaviour
    fig = res.plot()
    expected = torch.zeros(3, 4)
    expected[1, 2] = 2.0
    torch.testing.assert_close(_plotted(fig), expected)
    assert "clean - patched" in fig.axes[0].get_title()
    norm = fig.axes[0].images[0].norm
    assert norm.vmin == -norm.vmax and float(norm(0.0)) == pytest.approx(0.5)  # 0 is the colormap's centre
    r, g, b, _ = fig.axes[0].images[0].cmap(norm(0.0))
    assert min(r, g, b) > 0.9  # white-ish


def test_denoising_and_ablation_maps_are_effects_too():
    den = _patch_result("denoise")
    den.per_prompt[:] = -1.0  # = the corrupted run: nothing restored
    den.per_prompt[:, 0, 0] = 2.0
    plotted = _plotted(den.plot())
    assert plotted[0, 0] == 3.0 and (plotted.flatten()[1:] == 0).all()
    assert "patched - corrupted" in den.plot().axes[0].get_title()
    abl = _patch_result("ablate:zero")
    abl.per_prompt[:] = 3.0  # = the clean run
    assert (_plotted(abl.plot()) == 0).all()


def test_heatmap_colours_signed_data_diverging_and_non_negative_sequential():
    from interp.plots import DIVERGING, SEQUENTIAL, heatmap

    signed = heatmap(torch.tensor([[-0.5, 2.0], [0.1, 0.0]]))
    image = signed.axes[0].images[0]
    assert image.norm.vmin == -image.norm.vmax == -2.0 and image.cmap.name.startswith(DIVERGING)
    positive = heatmap(torch.tensor([[0.2, 0.9], [0.4, 0.1]]))
    image = positive.axes[0].images[0]
    assert image.norm.vmin == 0.0 and image.norm.vmax == pytest.approx(0.9) and image.cmap.name.startswith(SEQUENTIAL)
    # Asked for explicitly: a signed map of positive values is still centred at 0.
    image = heatmap(torch.tensor([[0.2, 0.9]]), signed=True).axes[0].images[0]
    assert image.norm.vmin == -image.norm.vmax


def test_heatmap_prints_values_only_when_they_fit():
    from interp.plots import heatmap

    small = heatmap(torch.tensor([[0.25, -1.0], [float("nan"), 0.5]]), ["a", "b"], ["x", "y"])
    assert sorted(t.get_text() for t in small.axes[0].texts) == ["-1.00", "0.25", "0.50"]  # NaN cell unlabelled
    big = heatmap(torch.rand(40, 40))
    assert not big.axes[0].texts


def test_page_inlines_figures_as_svg_without_a_prolog(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from interp.plots import to_svg
    from interp.report import Page

    svg = to_svg(_patch_result().plot())
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    assert "<?xml" not in svg and "<!DOCTYPE" not in svg and "<metadata>" not in svg and "<script" not in svg
    assert "svg.mpl *{" in svg  # matplotlib's global style rule cannot leak into the page

    user = plt.figure()  # a researcher's own pyplot figure is closed once rendered
    user.add_subplot().plot([0, 1], [1, 0])
    page = Page("figures")
    page.figure(_patch_result().plot(), "a map").figures([_icl().plot(), user, "<svg></svg>"])
    assert user.number not in plt.get_fignums()
    text = page.save(tmp_path / "p.html").read_text()
    assert text.count('<figure class="plot">') == 2 and text.count("<svg") == 4
    assert "<?xml" not in text and "<!DOCTYPE svg" not in text and "<script" not in text


def test_importing_the_packages_does_not_import_matplotlib():
    code = ("import sys, interp, models, analyses, interp.report, interp.plots, interp.patching, interp.probing, "
            "interp.routing, interp.shift.study, interp.shift.figures, analyses.next_token, analyses.heads, "
            "analyses.framework_report, analyses.heads_report, analyses.seq2seq, analyses.patching_study; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib'); "
            "assert not bad, bad")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
