"""Feature dashboards (interp.sae.dashboard, issue 18 part 5) against brute force on a tiny random model.

Brute force: pack the same corpus, run the whole model with run_with_cache, encode every token, sort.
The streaming stores (running top-k merge, coarsening histogram grid, keyed band samples) must give
exactly what sorting and counting everything at once gives, and the band samples must be exactly the
smallest keys of each band when the same keys are drawn. The pages must be self-contained and work in
headless Chromium (search, sort, follow a link, read the highlighted tokens' values).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from interp.collect import collect_activations, default_corpus, load_corpus
from interp.collect.packing import document_ids, pack
from interp.sae import DictionaryConfig, SparseDictionary
from interp.sae import dashboard_stats
from interp.sae.dashboard import feature_dashboards
from interp.sae.dashboard_pages import page_name

SEQ = 16
TOKENS = 1600
HOOK = "blocks.0.hook_resid_post"
OPTIONS = dict(n_tokens=TOKENS, seq_len=SEQ, batch_size=3, top_k=6, context=(5, 2), n_bands=4, band_samples=3,
               n_logits=7, progress=False)


@pytest.fixture(scope="module")
def texts():
    return list(default_corpus().texts[:15])


@pytest.fixture(scope="module")
def model(smollm2_tokenizer):
    from test_collect import tiny  # the 2-layer model with SmolLM2's tokenizer that interp.collect is tested on

    model = tiny(smollm2_tokenizer, model_name="dashboard-tiny")
    with torch.no_grad():  # a final norm whose weight bites, so folding it in is checked
        model.ln_final.w.uniform_(0.5, 1.5)
        model.ln_final.b.normal_(0, 0.1)
    return model


def random_dictionary(d_in=32, d_sae=24, hook=HOOK, seed=1, bias=-0.3, **cfg) -> SparseDictionary:
    sae = SparseDictionary(DictionaryConfig(cfg.pop("architecture", "relu"), d_in, d_sae, hook, **cfg))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(sae.W_enc.shape, generator=gen))
        sae.b_enc.fill_(bias)
        sae.W_dec.copy_(torch.randn(sae.W_dec.shape, generator=gen))
        sae.b_dec.copy_(torch.randn(sae.b_dec.shape, generator=gen) * 0.1)
    return sae


@pytest.fixture(scope="module")
def sae():
    return random_dictionary()


def brute_force(model, sae, texts, features=None):
    """(tokens [S, P], acts [S, P, F] with BOS positions NaN, flat [S*P, F] with BOS positions 0)."""
    tok = model.tokenizer
    tokens = torch.from_numpy(pack(document_ids(load_corpus(texts), tok), SEQ, tok.bos_token_id,
                                   math.ceil(TOKENS / SEQ))).long()
    _, cache = model.run_with_cache(tokens, names_filter=[sae.cfg.hook_name])
    acts = sae.encode(cache[sae.cfg.hook_name].flatten(2)).detach()
    if features is not None:
        acts = acts[..., features]
    counted = tokens != tok.bos_token_id
    flat = acts.masked_fill(~counted[..., None], 0.0).reshape(-1, acts.shape[-1])
    return tokens, acts.masked_fill(~counted[..., None], math.nan), flat


def window(tokens, acts, index, f, context):
    """Brute-force token ids and activations around flat index `index` for feature column f."""
    left, right = context
    P = tokens.shape[1]
    s, p = divmod(int(index), P)
    ids, vals = [], []
    for q in range(p - left, p + right + 1):
        inside = 0 <= q < P
        ids.append(int(tokens[s, q]) if inside else -1)
        vals.append(float(acts[s, q, f]) if inside else math.nan)
    return torch.tensor(ids), torch.tensor(vals)


@pytest.fixture(scope="module")
def dash(model, sae, texts, tmp_path_factory):
    out = tmp_path_factory.mktemp("dash")
    return feature_dashboards(model, sae, texts, out_dir=out, **OPTIONS), out


# ---------------------------------------------------------------------- the statistics
def test_top_contexts_equal_brute_force(dash, model, sae, texts):
    d, _ = dash
    tokens, acts, flat = brute_force(model, sae, texts)
    k = OPTIONS["top_k"]
    for f in range(sae.cfg.d_sae):
        values, index = flat[:, f].sort(descending=True, stable=True)
        n = int((values > 0).sum().clamp(max=k))
        torch.testing.assert_close(d.top_values[f, :n], values[:n], atol=1e-6, rtol=1e-6)
        assert d.top_index[f, :n].tolist() == index[:n].tolist(), f
        assert d.top_values[f, n:].isnan().all() and (d.top_index[f, n:] == -1).all()
        for j in range(n):
            ids, vals = window(tokens, acts, index[j], f, OPTIONS["context"])
            assert d.top_tokens[f, j].tolist() == ids.tolist()
            torch.testing.assert_close(d.top_acts[f, j], vals, atol=1e-6, rtol=1e-6, equal_nan=True)


def test_density_counts_and_histogram_by_hand(dash, model, sae, texts):
    d, _ = dash
    tokens, _, flat = brute_force(model, sae, texts)
    bos = tokens == model.tokenizer.bos_token_id  # row starts and document boundaries
    assert d.n_tokens == int((~bos).sum()) and int(bos.sum()) > tokens.shape[0]
    fired = (flat > 0).sum(0)
    assert d.fired.tolist() == fired.tolist() and (fired < d.n_tokens).all()
    dead = fired == 0
    assert dead.sum() == 1  # latent 10 never fires here: its statistics must say so, not break
    assert d.hist_width[dead].isnan().all() and d.band_edges[dead].isnan().all() and d.mean_activation[dead].isnan().all()
    assert (d.hist_counts[dead] == 0).all() and (d.band_counts[dead] == 0).all() and (d.band_index[dead] == -1).all()
    assert (d.max_activation[dead] == 0).all() and d.top_values[dead].isnan().all()
    torch.testing.assert_close(d.density, fired.double() / d.n_tokens)
    torch.testing.assert_close(d.max_activation, flat.max(0).values)
    torch.testing.assert_close(d.mean_activation, flat.sum(0) / fired, atol=1e-6, rtol=1e-5, equal_nan=True)
    for f in (~dead).nonzero()[:, 0].tolist():
        v = flat[flat[:, f] > 0, f]
        width = float(d.hist_width[f])
        assert math.log2(width).is_integer()  # the grid is powers of two: bins nest when it coarsens
        assert width * d.hist_counts.shape[1] / 2 <= float(v.max()) < width * d.hist_counts.shape[1]
        expected = torch.bincount((v / width).floor().long(), minlength=d.hist_counts.shape[1])
        assert d.hist_counts[f].tolist() == expected.tolist()


def test_bands_partition_the_firing_tokens(dash, model, sae, texts):
    d, _ = dash
    tokens, acts, flat = brute_force(model, sae, texts)
    for f in (d.fired > 0).nonzero()[:, 0].tolist():
        edges = d.band_edges[f]
        v = flat[:, f]
        assert edges[0] == 0 and edges[-1] > v.max() and (edges[1:] > edges[:-1]).all()
        assert (edges[1:-1] / v.max() - torch.arange(1, 4) / 4).abs().max() <= 1 / 32  # near equal fractions
        assert edges[-1] - edges[-2] > 0 and edges[-1] <= 17 / 16 * v.max()
        for b in range(edges.numel() - 1):
            inside = (v > 0) & (v >= edges[b]) & (v < edges[b + 1])
            assert int(d.band_counts[f, b]) == int(inside.sum())
            shown = d.band_index[f, b][d.band_index[f, b] >= 0]
            assert len(shown) == min(int(inside.sum()), OPTIONS["band_samples"]) == len(set(shown.tolist()))
            assert inside[shown].all()
            torch.testing.assert_close(d.band_values[f, b, :len(shown)], v[shown])
            assert (d.band_values[f, b, :len(shown)].diff() <= 0).all()  # highest first
            for s, index in enumerate(shown.tolist()):
                ids, vals = window(tokens, acts, index, f, OPTIONS["context"])
                assert d.band_tokens[f, b, s].tolist() == ids.tolist()
                torch.testing.assert_close(d.band_acts[f, b, s], vals, equal_nan=True)


def test_band_samples_are_the_smallest_keys_despite_streaming(model, sae, texts, monkeypatch):
    """One sequence per chunk and a merge every few events: the grid coarsens and the buffer is merged
    many times, and each band's sample is still exactly the per_band smallest of the keys drawn."""
    monkeypatch.setattr(dashboard_stats, "COMPACT_MIN", 4)
    options = {**OPTIONS, "batch_size": 1, "band_samples": 2}
    d = feature_dashboards(model, sae, texts, **options, seed=5)
    _, _, flat = brute_force(model, sae, texts)
    gen = torch.Generator().manual_seed(5)
    rows, feats, keys = [], [], []
    for start in range(0, flat.shape[0], SEQ):  # the keys the store draws: per chunk, in nonzero order
        r, f = (flat[start:start + SEQ] > 0).nonzero(as_tuple=True)
        if r.numel():
            rows.append(r + start)
            feats.append(f)
            keys.append(torch.rand(r.shape, generator=gen))
    rows, feats, keys = torch.cat(rows), torch.cat(feats), torch.cat(keys)
    values = flat[rows, feats]
    for f in range(sae.cfg.d_sae):
        for b in range(options["n_bands"]):
            lo, hi = d.band_edges[f, b], d.band_edges[f, b + 1]
            mine = (feats == f) & (values >= lo) & (values < hi)
            expected = rows[mine][keys[mine].argsort()[:2]]
            assert sorted(d.band_index[f, b][d.band_index[f, b] >= 0].tolist()) == sorted(expected.tolist()), (f, b)


def test_logits_are_w_dec_through_the_final_norm_and_w_u(dash, model, sae):
    d, _ = dash
    D = sae.W_dec.detach()
    D = (D - D.mean(-1, keepdim=True)) * model.ln_final.w  # LayerNorm: centred, then its weight
    logits = D @ model.W_U
    top = logits.topk(OPTIONS["n_logits"], dim=-1)
    bottom = logits.topk(OPTIONS["n_logits"], dim=-1, largest=False)
    torch.testing.assert_close(d.logit_top, top.values)
    torch.testing.assert_close(d.logit_bottom, bottom.values)
    assert d.logit_top_ids.tolist() == top.indices.tolist() and d.logit_bottom_ids.tolist() == bottom.indices.tolist()
    assert "ln_final's weight folded in" in d.logit_note and "scale" in d.logit_note
    assert d.text(d.logit_top_ids[0, :1]) == [model.tokenizer.decode([int(d.logit_top_ids[0, 0])])]


def test_transcoder_and_feature_subset(model, texts):
    """A transcoder reads ln2's output and writes hook_mlp_out: its contexts come from its input hook, its
    logits straight from W_dec (MLP-output space is added to the stream as it is)."""
    tc = random_dictionary(hook="blocks.1.ln2.hook_normalized", out_hook_name="blocks.1.hook_mlp_out",
                           architecture="topk", k=4, d_sae=20, bias=0.0)
    features = [3, 7, 11, 19]
    d = feature_dashboards(model, tc, texts, features=features, **OPTIONS)
    assert d.features.tolist() == features and d.out_hook_name == "blocks.1.hook_mlp_out"
    _, _, flat = brute_force(model, tc, texts, features)
    for i in range(len(features)):
        values = flat[:, i].sort(descending=True).values[:OPTIONS["top_k"]]
        torch.testing.assert_close(d.top_values[i], values.masked_fill(values <= 0, math.nan), equal_nan=True)
    assert d.fired.tolist() == (flat > 0).sum(0).tolist()
    D = tc.W_dec.detach()[features]
    logits = ((D - D.mean(-1, keepdim=True)) * model.ln_final.w) @ model.W_U
    torch.testing.assert_close(d.logit_top, logits.topk(OPTIONS["n_logits"], dim=-1).values)
    assert "transcoder" in d.logit_note and "MLP-output" in d.logit_note


def test_mlp_hidden_layer_dictionary_maps_through_w_out(model, texts):
    sae = random_dictionary(d_in=48, hook="blocks.1.mlp.hook_post", bias=-0.5)
    d = feature_dashboards(model, sae, texts, features=[0, 1], **OPTIONS)
    D = sae.W_dec.detach()[[0, 1]] @ model.blocks[1].mlp.W_out
    logits = ((D - D.mean(-1, keepdim=True)) * model.ln_final.w) @ model.W_U
    torch.testing.assert_close(d.logit_top, logits.topk(OPTIONS["n_logits"], dim=-1).values)


def test_activation_dataset_gives_the_same_dashboards(dash, model, sae, texts, tmp_path):
    """Stored activations are read instead of running the model; a collection without the BOS position
    (positions=slice(1, None)) gives the same numbers, since BOS is left out anyway."""
    d, _ = dash
    for positions, name in ((None, "all"), (slice(1, None), "no-bos")):
        ds = collect_activations(model, texts, [HOOK], tmp_path / name, seq_len=SEQ, batch_size=4,
                                 max_tokens=TOKENS, positions=positions, progress=False)
        e = feature_dashboards(model, sae, ds, **OPTIONS)
        assert e.n_tokens == d.n_tokens and e.fired.tolist() == d.fired.tolist()
        assert e.top_index.tolist() == d.top_index.tolist()
        torch.testing.assert_close(e.top_values, d.top_values, equal_nan=True, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(e.top_acts, d.top_acts, equal_nan=True, atol=1e-5, rtol=1e-5)
        assert e.band_counts.tolist() == d.band_counts.tolist()
        assert e.band_index.tolist() == d.band_index.tolist()  # same chunks, same keys


def test_bad_input_is_named(model, sae, texts, tmp_path):
    from interp.names import HookNameError

    with pytest.raises(HookNameError, match="blocks.0.hook_resid_psot.*closest: blocks.0.hook_resid_post"):
        feature_dashboards(model, random_dictionary(hook="blocks.0.hook_resid_psot"), texts, **OPTIONS)
    with pytest.raises(ValueError, match="48 features per token but the dictionary reads d_in=32"):
        feature_dashboards(model, random_dictionary(hook="blocks.0.mlp.hook_post"), texts, **OPTIONS)
    with pytest.raises(ValueError, match=r"latent ids in 0\.\.23"):
        feature_dashboards(model, sae, texts, **{**OPTIONS, "features": [3, 24]})
    with pytest.raises(ValueError, match="use 1 to 16"):
        feature_dashboards(model, sae, texts, **{**OPTIONS, "n_bands": 17})
    ds = collect_activations(model, texts[:2], ["blocks.1.hook_resid_post"], tmp_path / "other", seq_len=SEQ,
                             progress=False)
    with pytest.raises(KeyError, match="not the dictionary's hook 'blocks.0.hook_resid_post'"):
        feature_dashboards(model, sae, ds, **OPTIONS)


def test_result_frame_plot_and_files(dash, sae):
    d, out = dash
    frame = d.to_frame()
    assert list(frame["feature"]) == list(range(sae.cfg.d_sae)) and frame["log10_density"].lt(0).all()
    assert d.plot(3).axes and d.plot().axes
    from safetensors.torch import load_file

    saved = load_file(str(out / "dashboards.safetensors"))
    torch.testing.assert_close(saved["top_acts"], d.top_acts, equal_nan=True)


# ---------------------------------------------------------------------- the pages
URL_ATTR = re.compile(r"""\b(?:src|href)\s*=\s*["']?([^"'\s>]+)""", re.I)


def test_pages_are_self_contained(dash, sae):
    d, out = dash
    pages = sorted(out.glob("*.html"))
    assert {p.name for p in pages} == {"index.html"} | {page_name(f) for f in range(sae.cfg.d_sae)}
    for page in pages:
        text = page.read_text(encoding="utf-8")
        targets = URL_ATTR.findall(text)
        # Only the other pages, and fragments inside the page (matplotlib's SVG reuses its tick marks).
        assert not [t for t in targets if not (t.startswith("#") or t.endswith(".html") and (out / t).is_file())], \
            (page, targets)
        assert "<script src" not in text and "http://" not in text.replace("http://www.w3.org", "")
        assert "https://" not in text
    index = (out / "index.html").read_text(encoding="utf-8")
    assert all(f'href="{page_name(f)}"' in index for f in range(sae.cfg.d_sae))
    page = (out / page_name(2)).read_text(encoding="utf-8")
    maxima = re.findall(r'<span class="t max"[^>]*data-act="([^"]+)"', page.split('id="top"')[1].split("<h2>")[0])
    torch.testing.assert_close(torch.tensor([float(v) for v in maxima]), d.top_values[2][d.top_values[2] == d.top_values[2]],
                               rtol=1e-5, atol=0)
    assert "<svg" in page and "Activation bands" in page


@pytest.fixture(scope="module")
def browser():
    from test_browser import _require_chromium

    _require_chromium()
    from browser import Browser

    with Browser() as b:
        yield b


def test_index_search_sort_and_feature_page_in_chromium(dash, browser):
    from selenium.webdriver.common.by import By

    from browser import is_local

    d, out = dash
    result = browser.render(out / "index.html")
    assert result["remote_requests"] == [] and result["console_errors"] == [], result
    assert result["svgs"] == result["svgs_sized"] == 1
    driver = browser.driver
    rows = driver.find_elements(By.CSS_SELECTOR, "#features tbody tr")
    assert len(rows) == len(d.features) and all(r.is_displayed() for r in rows)

    # Sort by max activation (descending on the first click).
    driver.find_element(By.XPATH, "//th[text()='max activation']").click()
    order = [int(r.get_attribute("data-feature")) for r in driver.find_elements(By.CSS_SELECTOR, "#features tbody tr")]
    assert order == d.max_activation.argsort(descending=True, stable=True).tolist()

    # Search by the token feature 5's top contexts peak on most often.
    word = d.top_activating_tokens(5, n=1)[0].strip().lower()
    driver.find_element(By.ID, "search").send_keys(word)
    visible = [r for r in driver.find_elements(By.CSS_SELECTOR, "#features tbody tr") if r.is_displayed()]
    expected = [f for f in d.features.tolist()
                if word in "|".join(d.top_activating_tokens(f) + d.text(d.logit_top_ids[f, :5])).lower()]
    assert 5 in expected and sorted(int(r.get_attribute("data-feature")) for r in visible) == sorted(expected)
    assert driver.find_element(By.ID, "shown").text == str(len(expected))

    # Follow the link to feature 5's page: its top contexts' outlined tokens carry their values.
    next(r for r in visible if r.get_attribute("data-feature") == "5").find_element(By.TAG_NAME, "a").click()
    assert Path(driver.current_url).name == page_name(5)
    peaks = driver.find_elements(By.CSS_SELECTOR, "#top .t.max")
    values = d.top_values[5][d.top_values[5] == d.top_values[5]]
    assert len(peaks) == len(values) > 0
    for peak, value in zip(peaks, values.tolist()):
        assert float(peak.get_attribute("data-act")) == pytest.approx(value, rel=1e-5)
        assert peak.get_attribute("title").endswith(f"{value:.4g}")
        assert "rgba(230, 85, 13" in peak.value_of_css_property("background-color")
    shaded = driver.find_elements(By.CSS_SELECTOR, "#top .t[data-act]")
    assert len(shaded) > len(peaks)  # the other tokens of each context carry theirs too
    assert all(is_local(u) for u in browser._requests())
