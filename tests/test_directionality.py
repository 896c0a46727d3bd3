"""Encoder vs decoder (analyses/directionality.py): attention shares against a brute-force loop over patterns
from a plain `run_with_cache`, one sentence at a time; self-similarity against cosines computed by hand."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from analyses.directionality import (NoAttentionPatterns, attention_destinations, contextuality, destination_shares,
                                     directionality_study)
from interp.shift import WordNotFound

# Two pairs of sentences with equal token lengths in both tokenizers, so batching by length is exercised.
SENTENCES = [
    "The cat sat on the mat.",
    "The dog lay on the rug.",
    "In the garden, the little burrowing mole dug tunnels under the lawn all night.",
    "Signals from the broadcast tower reach listeners two hundred kilometres away.",
    "Paris is the capital of France.",
]
MOLE = ["The farmer set a trap for the mole that was ruining his vegetable beds.",
        "The dermatologist examined the dark mole on her shoulder.",
        "In the chemistry lab, we weighed exactly one mole of sodium chloride."]


def _special_ids(model) -> set[int]:
    """The ids the tokenizer adds ([CLS]/[SEP], or BOS), read from the tokenizer, not from character offsets."""
    tok = model.tokenizer
    ids = (getattr(tok, f"{name}_token_id", None) for name in ("cls", "sep", "bos"))
    return {i for i in ids if i is not None}


def brute_force(model, sentences, prepend_bos=None, n_bins=10):
    """(shares [L, H, 4], uniform baseline [4], by-position [L, bins, 4], attention on the first word [L]) by a
    loop over every content query (its keys listed per category by position and token id) of patterns cached one
    sentence at a time."""
    L, H = model.cfg.n_layers, model.cfg.n_heads
    causal = model.cfg.causal
    ids = _special_ids(model)
    sums, uniform = torch.zeros(L, H, 4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    bins, bin_counts = torch.zeros(L, n_bins, 4, dtype=torch.float64), torch.zeros(n_bins)
    first_word, n, n_later = torch.zeros(L, dtype=torch.float64), 0, 0
    for s in sentences:
        tokens = model.to_tokens(s, prepend_bos=prepend_bos)
        _, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("attn.hook_pattern"))
        pattern = torch.stack([cache[f"blocks.{l}.attn.hook_pattern"][0] for l in range(L)]).double()  # [L, H, q, k]
        special = [int(t) in ids for t in tokens[0]]
        content = [q for q in range(len(special)) if not special[q]]
        for i, q in enumerate(content):
            b = min(int(i / (len(content) - 1) * n_bins), n_bins - 1)
            bin_counts[b] += 1
            keys = [[k for k in range(len(special)) if not special[k] and k < q], [q],
                    [k for k in range(len(special)) if not special[k] and k > q],
                    [k for k in range(len(special)) if special[k]]]
            n_visible = len(special) if not causal else q + 1
            for cat, ks in enumerate(keys):
                mass = pattern[:, :, q, ks].sum(-1)  # [L, H]
                sums[..., cat] += mass
                bins[:, b, cat] += mass.mean(1)
                uniform[cat] += sum(1 for k in ks if not causal or k <= q) / n_visible
            n += 1
            if i > 0:
                first_word += pattern[:, :, q, content[0]].mean(1)
                n_later += 1
    return sums / n, uniform / n, bins / bin_counts.clamp_min(1)[:, None], first_word / n_later


def _check_against_brute_force(model, sentences, prepend_bos=None):
    got = attention_destinations(model, sentences, prepend_bos=prepend_bos)
    shares, uniform, by_position, first_word = brute_force(model, sentences, prepend_bos)
    torch.testing.assert_close(got.shares, shares, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.baseline, uniform, atol=1e-9, rtol=0)
    torch.testing.assert_close(got.by_position, by_position, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.first_word, first_word, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.shares.sum(-1), torch.ones(got.shares.shape[:2], dtype=torch.float64))
    return got


# ---------------------------------------------------------------------- tiny random models (fast)
def test_shares_equal_brute_force_tiny_encoder(bert):
    got = _check_against_brute_force(bert, SENTENCES)
    assert got.special_tokens == ["[CLS]", "[SEP]"] and not got.causal
    assert (got.layer_shares[:, 2] > 0.05).all()  # a random encoder attends forward


def test_shares_equal_brute_force_tiny_decoder(llama):
    for bos in (True, None):
        got = _check_against_brute_force(llama, SENTENCES, prepend_bos=bos)
        assert (got.shares[..., 2] == 0).all() and got.future_max == 0
    assert got.special_tokens == [] and (got.shares[..., 3] == 0).all()  # no BOS: nothing is special


def test_every_query_shares_sum_to_one(bert):
    tokens = bert.to_tokens(SENTENCES[2])
    _, cache = bert.run_with_cache(tokens, names_filter="blocks.1.attn.hook_pattern")
    special = torch.isin(tokens, torch.tensor(sorted(_special_ids(bert))))
    shares = destination_shares(cache["blocks.1.attn.hook_pattern"], special)  # [1, H, q, 4]
    torch.testing.assert_close(shares.sum(-1), torch.ones(shares.shape[:3], dtype=torch.float64))
    # the [CLS] and [SEP] columns, summed by hand, are the special share
    pattern = cache["blocks.1.attn.hook_pattern"][0].double()
    content = ~special[0]
    torch.testing.assert_close(shares[0, ..., 3], pattern[..., 0] + pattern[..., -1])
    torch.testing.assert_close(shares[0][:, content, 1], pattern.diagonal(dim1=-2, dim2=-1)[:, content])
    torch.testing.assert_close(shares[0][:, ~content, 1], torch.zeros(pattern.shape[0], 2, dtype=torch.float64))


def test_bad_input_named_errors(bert, llama, minilm_hf):
    import interp

    with pytest.raises(WordNotFound, match="mole"):
        directionality_study(bert, llama, SENTENCES[:2], words={"mole": MOLE[:2] + ["A cat sat on the mat."]})
    with pytest.raises(WordNotFound, match="giraffe"):
        directionality_study(bert, llama, SENTENCES[:2], words=["giraffe"])
    hooked = interp.attach(minilm_hf)
    try:
        with pytest.raises(NoAttentionPatterns, match="hook_pattern.*models.load"):
            attention_destinations(hooked, SENTENCES[:1])
        with pytest.raises(NoAttentionPatterns):
            directionality_study(hooked, llama, SENTENCES[:1])
    finally:
        hooked.detach()
    with pytest.raises(ValueError, match="causal"):
        directionality_study(llama, bert, SENTENCES[:1])
    with pytest.raises(ValueError, match="no sentences"):
        attention_destinations(bert, [])


def _by_hand_self_similarity(model, word_id, contexts, layer, prepend_bos=None):
    """Mean cosine over pairs of contexts of the residual stream entering block `layer` at the word's token."""
    vectors = []
    for c in contexts:
        tokens = model.to_tokens(c, prepend_bos=prepend_bos)
        seen = {}
        handle = model.blocks[layer].hook_resid_pre.register_forward_hook(lambda m, i, o: seen.update(v=o.detach()))
        try:
            model(tokens, return_type=None)
        finally:
            handle.remove()
        (pos,) = (tokens[0] == word_id).nonzero()[:, 0].tolist()
        vectors.append(seen["v"][0, pos].double())
    unit = F.normalize(torch.stack(vectors), dim=-1)
    sim = unit @ unit.T
    n = len(contexts)
    return float((sim.sum() - sim.trace()) / (n * (n - 1)))


def test_self_similarity_by_hand_tiny(bert, llama):
    for model, bos, word_id in ((bert, None, bert.tokenizer.convert_tokens_to_ids("mole")),
                                (llama, True, llama.to_tokens(" mole", prepend_bos=False)[0, 0])):
        got = contextuality(model, {"mole": MOLE}, prepend_bos=bos)
        for layer in (0, 1):
            assert float(got.self_similarity[0, layer]) == pytest.approx(
                _by_hand_self_similarity(model, word_id, MOLE, layer, bos), abs=1e-5)


# ---------------------------------------------------------------------- the real models
@pytest.fixture(scope="module")
def quick(minilm, smollm2):
    return directionality_study(minilm, smollm2, quick=True)


@pytest.mark.slow
def test_real_models_equal_brute_force(quick, minilm, smollm2):
    sentences = quick.sentences[::3]  # a third of them keeps the loop short
    enc = _check_against_brute_force(minilm, sentences)
    dec = _check_against_brute_force(smollm2, sentences, prepend_bos=True)
    assert enc.special_tokens == ["[CLS]", "[SEP]"] and dec.special_tokens == ["<|im_start|>"]
    assert (dec.shares[..., 2] == 0).all()
    assert smollm2.cfg.default_prepend_bos is None  # why the study prepends BOS itself (decoder_bos=True)


@pytest.mark.slow
def test_special_token_detection(quick, minilm, smollm2):
    from interp.positions import TokenizedPrompt

    for model, bos, expect in ((minilm, None, {0: "[CLS]", -1: "[SEP]"}), (smollm2, True, {0: "<|im_start|>"})):
        p = TokenizedPrompt.from_model(model, SENTENCES[0], bos)
        special = [i for i, (a, b) in enumerate(p.offsets) if b <= a]  # the study's definition
        assert special == sorted(i % len(p) for i in expect)
        assert {p.str_tokens[i] for i in expect.keys()} == set(expect.values())
        assert [int(p.tokens[i]) in _special_ids(model) for i in range(len(p))] == [i in special for i in range(len(p))]
    assert quick.attention["encoder"].special_tokens == ["[CLS]", "[SEP]"]
    assert quick.attention["decoder"].special_tokens == ["<|im_start|>"]


@pytest.mark.slow
def test_real_self_similarity_side_by_side(quick, minilm, smollm2):
    contexts = quick.words["mole"]
    w = quick.context["encoder"].words.index("mole")
    for role, model, bos, word_id, layer in (
            ("encoder", minilm, None, minilm.tokenizer.convert_tokens_to_ids("mole"), 3),
            ("decoder", smollm2, True, smollm2.to_tokens(" mole", prepend_bos=False)[0, 0], 15)):
        assert float(quick.context[role].self_similarity[w, layer]) == pytest.approx(
            _by_hand_self_similarity(model, word_id, contexts, layer, bos), abs=1e-5)
    assert quick.context["encoder"].words == quick.context["decoder"].words
    assert quick.context["decoder"].relative_depth[15] == pytest.approx(0.5)


@pytest.mark.slow
def test_quick_run_writes_page_and_numbers(quick, tmp_path):
    assert {"mole", "tower"} < set(quick.words) and len(quick.words) == 3  # + one corpus word
    corpus_word = [w for w in quick.words if w not in ("mole", "tower")][0]
    assert len(quick.words[corpus_word]) >= 8
    path = quick.save(tmp_path / "dir")
    html = path.read_text()
    assert path.name == "index.html" and "<svg" in html and "Like with like" in html and "minilm-l6" in html
    data = json.loads((tmp_path / "dir" / "directionality.json").read_text())
    assert data == json.loads(json.dumps(quick.to_dict()))
    enc, dec = data["attention"]["encoder"], data["attention"]["decoder"]
    assert len(enc["layer_shares"]) == 6 and len(dec["layer_shares"]) == 30
    assert all(abs(sum(row) - 1) < 1e-6 for row in enc["layer_shares"] + dec["layer_shares"])
    assert max(row[2] for row in dec["layer_shares"]) == 0 and min(row[2] for row in enc["layer_shares"]) > 0.05
    assert len(data["contextuality"]["decoder"]["adjusted_mean"]) == 31
    frame = quick.to_frame()
    assert set(frame["model"]) == {"minilm-l6", "smollm2-135m"} and len(frame) == 6 * 13 + 30 * 10
    assert len(quick.to_frame("position")) == (6 + 30) * 10
    assert len(quick.to_frame("contextuality")) == 3 * (7 + 31)
    assert "<svg" in quick._repr_html_()
    assert "minilm-l6" in quick.headline() and "forward" in quick.headline()
    for which in ("shares", "position", "contextuality"):
        assert quick.plot(which).axes
