"""Embedding-shift studies: the word's vectors against the `transformers` models' hidden states,
and every statistic against a loop or formula written here."""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from interp.probing.linear import fit_logistic_regression
from interp.shift import (
    WordNotFound, WordTrace, centroid_accuracy, geometry, probe_accuracy, sense_similarity, shift_attribution,
    shift_study, trace_word, trajectories,
)
from interp.shift.decompose import decompose
from interp.shift.geometry import anisotropy_baselines, intra_sentence_similarity, max_explainable_variance, \
    self_similarity, static_cosine
from interp.shift.senses import control_labels, fit_span_logistic

TOL = dict(atol=1e-4, rtol=1e-5)
MOLE = ["American shrew mole", "One mole of carbon dioxide", "The doctor decided to take a biopsy of the mole"]


# ---------------------------------------------------------------------- finding the word
def test_trace_reads_the_word_and_matches_transformers_hidden_states(llama, llama_dir):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32, attn_implementation="eager").eval()
    trace = trace_word(llama, "mole", MOLE + ["A mole tunnelled under the lawn"])
    assert trace.vectors.shape == (4, llama.cfg.n_layers + 1, llama.cfg.d_model)
    for i, text in enumerate(trace.contexts):
        ids = llama.to_tokens(text)
        hidden = hf(input_ids=ids, output_hidden_states=True).hidden_states  # embeddings, then each layer
        p = trace.read_positions[i][0]
        assert "mole" in trace.str_tokens[i][p].lower()
        for layer in range(llama.cfg.n_layers):  # HF's last entry has the final norm applied
            torch.testing.assert_close(trace.vectors[i, layer], hidden[layer][0, p], **TOL)


def test_post_ln_trace_matches_bert_hidden_states(bert, bert_dir):
    from transformers import BertModel

    hf = BertModel.from_pretrained(bert_dir, dtype=torch.float32, attn_implementation="eager").eval()
    trace = trace_word(bert, "mole", MOLE)
    for i, text in enumerate(MOLE):
        enc = bert.tokenize(text)
        hidden = hf(input_ids=enc.tokens, output_hidden_states=True).hidden_states
        p = trace.read_positions[i][0]
        for layer in range(bert.cfg.n_layers + 1):  # an encoder's stack is the block outputs throughout
            torch.testing.assert_close(trace.vectors[i, layer], hidden[layer][0, p], **TOL)
    assert not trace.causal and all(not m[0] for m in trace.baseline_mask)  # [CLS] is never a baseline token


def test_multi_token_words_pool_their_sub_tokens(llama):
    word = "Eiffel"  # " E" + "iffel" in SmolLM2's tokenizer
    contexts = ["We climbed the Eiffel tower", "Gustave Eiffel built it"]
    last = trace_word(llama, word, contexts)
    mean = trace_word(llama, word, contexts, pool="mean")
    first = trace_word(llama, word, contexts, pool="first")
    for i, text in enumerate(contexts):
        ps = last.word_positions[i]
        assert len(ps) == 2 and "".join(last.str_tokens[i][p] for p in ps).strip() == word
        _, cache = llama.run_with_cache(llama.to_tokens(text))
        stream = cache.residual_stream()[:, 0]  # [L + 1, pos, d]
        torch.testing.assert_close(last.vectors[i], stream[:, ps[-1]], **TOL)
        torch.testing.assert_close(first.vectors[i], stream[:, ps[0]], **TOL)
        torch.testing.assert_close(mean.vectors[i], stream[:, ps].mean(1), **TOL)
    assert any("sub-tokens" in n for n in last.notes)


def test_missing_word_and_bad_arguments_say_what_to_fix(llama):
    with pytest.raises(WordNotFound, match="'mole'.*fix or drop this context"):
        trace_word(llama, "mole", ["A mole here", "No such animal there"])
    with pytest.raises(WordNotFound):
        trace_word(llama, "mole", ["The molecule is small"])  # whole words only
    with pytest.raises(ValueError, match="2 contexts but 1 labels"):
        trace_word(llama, "mole", MOLE[:2], ["animal"])
    with pytest.raises(ValueError, match="pool"):
        trace_word(llama, "mole", MOLE, pool="max")


def test_read_end_reads_the_last_token_and_says_so(llama):
    trace = trace_word(llama, "mole", ["The mole of carbon", "The mole on her arm"], read="end")
    assert [ps for ps in trace.read_positions] == [[len(t) - 1] for t in trace.str_tokens]
    assert any("last token" in n for n in trace.notes)


# ---------------------------------------------------------------------- statistics on a synthetic trace
def _synthetic(n_per=(3, 3, 2), n_layers=3, d=16, pos=5, seed=0, cluster=1.0) -> WordTrace:
    g = torch.Generator().manual_seed(seed)
    labels = [s for s, k in zip("abc", n_per) for _ in range(k)]
    n = len(labels)
    centers = torch.randn(3, n_layers + 1, d, generator=g) * cluster
    streams, masks, read = [], [], []
    for i, lab in enumerate(labels):
        s = torch.randn(n_layers + 1, pos, d, generator=g)
        s[:, 2] += centers["abc".index(lab)]
        streams.append(s)
        m = torch.ones(pos, dtype=torch.bool)
        m[0] = False
        masks.append(m)
        read.append([2])
    vectors = torch.stack([s[:, 2] for s in streams])
    return WordTrace("w", [f"ctx {i}" for i in range(n)], labels, [[f"t{j}" for j in range(pos)]] * n,
                     [torch.arange(pos)] * n, read, read, vectors, streams, masks)


def test_geometry_matches_loops():
    t = _synthetic()
    n, L1 = t.vectors.shape[:2]
    for layer in range(L1):
        v = t.vectors[:, layer].double()
        pairs = [F.cosine_similarity(v[i], v[j], dim=0) for i, j in itertools.permutations(range(n), 2)]
        assert float(self_similarity(t)[layer]) == pytest.approx(float(sum(pairs) / len(pairs)), abs=1e-6)
        intra = []
        for s, m, r in zip(t.streams, t.baseline_mask, t.read_positions):
            keep = [p for p in range(len(m)) if m[p] or p in r]
            toks = s[layer, keep].double()
            intra.append(sum(F.cosine_similarity(tok, toks.mean(0), dim=0) for tok in toks) / len(keep))
        assert float(intra_sentence_similarity(t)[layer]) == pytest.approx(float(sum(intra) / n), abs=1e-6)
        eig = torch.linalg.eigvalsh(v.T @ v)  # uncentred: sigma_i^2 are the eigenvalues of X^T X
        assert float(max_explainable_variance(t)[layer]) == pytest.approx(float(eig.max() / eig.sum()), abs=1e-6)
        for i in range(n):
            assert float(static_cosine(t)[i, layer]) == pytest.approx(
                float(F.cosine_similarity(v[i], t.vectors[i, 0].double(), dim=0)), abs=1e-6)


def test_anisotropy_baseline_draws_tokens_of_different_contexts_only():
    # Every token of context i is the same vector e_i, and contexts are orthogonal: pairs from
    # one context would give cosine 1, pairs from two give 0.
    t = _synthetic(n_per=(3, 3, 3), d=16)
    for i, s in enumerate(t.streams):
        s.zero_()
        s[..., i] = 1.0
    base = anisotropy_baselines(t, n_pairs=500)
    assert torch.all(base.cosine == 0)
    # n random tokens, one per context, are n orthogonal unit vectors: MEV 1/n.
    assert torch.allclose(base.mev, torch.full_like(base.mev, 1 / 9))
    geo = geometry(t)
    torch.testing.assert_close(geo.adjusted_self_similarity, geo.self_similarity - base.cosine)


def test_centroid_accuracy_matches_a_leave_one_out_loop():
    for cluster in (0.0, 0.5, 3.0):
        t = _synthetic(cluster=cluster, seed=1)
        y = t.label_index()
        for layer in range(t.vectors.shape[1]):
            v = t.vectors[:, layer].double()
            right = 0.0
            for i in range(len(y)):
                scores = []
                for c in range(3):
                    members = [j for j in range(len(y)) if y[j] == c and j != i]
                    scores.append(float(F.cosine_similarity(v[i], v[members].mean(0), dim=0)))
                best = max(scores)
                tied = [c for c in range(3) if scores[c] >= best - 1e-9 * abs(best)]
                right += (y[i].item() in tied) / len(tied)
            assert float(centroid_accuracy(t)[layer]) == pytest.approx(right / len(y), abs=1e-6)


def test_identical_vectors_score_chance_not_zero_or_one():
    t = _synthetic()
    t.vectors[:, 0] = t.vectors[0, 0]  # e.g. SmolLM2's layer 0: one static vector for every context
    assert float(centroid_accuracy(t)[0]) == pytest.approx(1 / 3)


def test_sense_similarity_matches_loops():
    t = _synthetic(cluster=2.0)
    within, between = sense_similarity(t)
    y = t.label_index()
    for layer in range(t.vectors.shape[1]):
        v = t.vectors[:, layer].double()
        same = [F.cosine_similarity(v[i], v[j], dim=0) for i, j in itertools.permutations(range(len(y)), 2) if y[i] == y[j]]
        diff = [F.cosine_similarity(v[i], v[j], dim=0) for i, j in itertools.permutations(range(len(y)), 2) if y[i] != y[j]]
        assert float(within[layer]) == pytest.approx(float(sum(same) / len(same)), abs=1e-6)
        assert float(between[layer]) == pytest.approx(float(sum(diff) / len(diff)), abs=1e-6)


def test_span_logistic_equals_the_primal_probe():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(3, 20, 64, generator=g).double()
    y = torch.arange(20) % 3
    X[..., :3] += y[:, None]
    batched = fit_span_logistic(X, y.expand(3, -1), 3)
    new = torch.randn(3, 7, 64, generator=g).double()
    for b in range(3):
        primal = fit_logistic_regression(X[b], y, 3)
        torch.testing.assert_close(batched.W[b], primal.W, atol=1e-5, rtol=1e-4)
        assert torch.equal(batched(new)[b], primal.predict(new[b]))


def test_probe_accuracy_matches_a_fold_loop_and_the_control_is_balanced():
    t = _synthetic(n_per=(4, 4, 4), n_layers=1, cluster=0.7, seed=2)
    scores = probe_accuracy(t, folds=4, seed=0)
    y = t.label_index()
    # The same folds, rebuilt here, and the independent primal probe.
    g = torch.Generator().manual_seed(0)
    fold_of = torch.empty(len(y), dtype=torch.long)
    for c in range(3):
        members = (y == c).nonzero()[:, 0]
        fold_of[members[torch.randperm(len(members), generator=g)]] = torch.arange(len(members)) % 4
    ctl = control_labels(y, g)
    for layer in range(t.vectors.shape[1]):
        for target, got in ((y, scores.accuracy), (ctl, scores.control)):
            right = 0
            for f in range(4):
                test = fold_of == f
                probe = fit_logistic_regression(t.vectors[~test, layer], target[~test], 3)
                right += int((probe.predict(t.vectors[test, layer]) == target[test]).sum())
            assert float(got[layer]) == pytest.approx(right / len(y))
    for c in range(3):  # the control's labels are spread evenly over every sense
        assert torch.bincount(ctl[y == c], minlength=3).tolist() in ([2, 1, 1], [1, 2, 1], [1, 1, 2])


def test_trajectories_are_a_pca_of_per_layer_centred_unit_vectors():
    t = _synthetic()
    coords, share = trajectories(t)
    v = F.normalize(t.vectors.double(), dim=-1)
    v = v - v.mean(0, keepdim=True)
    flat = v.reshape(-1, v.shape[-1])
    eigval, eigvec = torch.linalg.eigh(flat.T @ flat)
    top = eigvec[:, -2:].flip(-1)  # the two largest
    got = coords.reshape(-1, 2).double()
    for k in range(2):  # a principal axis is defined up to sign
        ref = flat @ top[:, k]
        sign = torch.sign((got[:, k] * ref).sum())
        torch.testing.assert_close(got[:, k], sign * ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(share.double(), (eigval.flip(0)[:2] / eigval.sum()), atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------- attribution of a shift
def test_shift_attribution_sums_to_the_distance_and_matches_per_context_decompositions(llama):
    contexts = ["The chemist weighed one mole", "A small furry mole", "One mole of gas", "The garden mole"]
    labels = ["chem", "animal", "chem", "animal"]
    trace = trace_word(llama, "mole", contexts, labels)
    for layer in (1, llama.cfg.n_layers):
        att = shift_attribution(llama, trace, "chem", "animal", layer=layer, n_heads_shown=2)
        assert float(att.contribution.sum()) == pytest.approx(att.distance, rel=1e-4)
        v = trace.vectors[:, layer].double()
        diff = v[[0, 2]].mean(0) - v[[1, 3]].mean(0)
        assert att.distance == pytest.approx(float(diff.norm()), rel=1e-5)
        u = diff / diff.norm()
        # Each context alone (no padding), decomposed and projected by hand.
        proj = []
        for i, text in enumerate(contexts):
            dec = decompose(llama, llama.to_tokens(text), [trace.read_positions[i][0]], layer=layer)
            proj.append(dec.components[0].double() @ u)
        hand = (proj[0] + proj[2]) / 2 - (proj[1] + proj[3]) / 2
        torch.testing.assert_close(att.contribution.double(), hand, atol=1e-4, rtol=1e-4)
        assert len(att.attention) == 2
        for head in att.attention:
            _, cache = llama.run_with_cache(llama.to_tokens(contexts[0]))
            ref = cache["pattern", head.layer][0, head.head, trace.read_positions[0][0]]
            torch.testing.assert_close(head.weights[0], ref, **TOL)
            assert sum(w.sum() for w in head.weights) == pytest.approx(len(contexts), rel=1e-5)
    with pytest.raises(ValueError, match="no shift"):
        shift_attribution(llama, trace, "chem", "animal", layer=0)  # rotary: one static vector
    with pytest.raises(ValueError, match="senses"):
        shift_attribution(llama, trace, "chem", "plant")


def test_shift_study_result_saves_a_page_and_json(bert, tmp_path):
    contexts = ["A mole dug here", "The mole dug there", "One mole of salt", "A mole of gas"]
    result = shift_study(bert, "mole", contexts, ["animal", "animal", "chem", "chem"], probe_folds=2)
    frame = result.to_frame()
    assert len(frame) == bert.cfg.n_layers + 1 and "centroid_accuracy" in frame and "probe_control" in frame
    assert result.nearest is not None and result.lens is None  # an encoder: nearest embeddings, no logit lens
    assert result.attributions and result.attributions[-1].layer == bert.cfg.n_layers
    page = result.save(tmp_path)
    assert page.exists() and (tmp_path / f"{page.stem}.json").exists()
    assert "<svg" in page.read_text() and "CircuitsVis" in page.read_text()


# ---------------------------------------------------------------------- the real models
@pytest.mark.slow
def test_smollm2_static_vectors_are_identical_and_minilm_are_not(smollm2, minilm):
    contexts = MOLE + ["In the lab, one mole of salt"]
    s = trace_word(smollm2, "mole", contexts)
    assert all(torch.equal(s.vectors[0, 0], s.vectors[i, 0]) for i in range(len(contexts)))  # RoPE adds nothing
    m = trace_word(minilm, "mole", contexts)
    assert all(not torch.allclose(m.vectors[0, 0], m.vectors[i, 0]) for i in range(1, len(contexts)))


@pytest.mark.slow
def test_smollm2_final_logit_lens_at_the_word_equals_the_logits(smollm2, smollm2_hf):
    result = shift_study(smollm2, "tower", ["We climbed the Eiffel tower", "A miniature tower of blocks"],
                         track=[" Paris"], attribution_layers=[])
    for i, text in enumerate(result.trace.contexts):
        logits = smollm2_hf(input_ids=smollm2.to_tokens(text)).logits[0, result.trace.read_positions[i][0]]
        probs = logits.softmax(-1)
        top = probs.topk(5)
        assert result.lens.top_ids[i, -1].tolist() == top.indices.tolist()
        torch.testing.assert_close(result.lens.top_probs[i, -1], top.values, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["smollm2-135m", "minilm-l6"])
def test_mole_senses_separate_in_both_models(model_name, smollm2, minilm):
    from analyses.embedding_shift import run_builtin

    model = smollm2 if model_name == "smollm2-135m" else minilm
    r = run_builtin(model, "mole")
    acc = r.centroid_accuracy
    assert float(acc.max()) >= 0.9 and float(acc.max()) > float(acc[0])
    assert float(r.probe.accuracy.max()) > float(r.probe.control.max())
    if model_name == "smollm2-135m":
        assert float(acc[0]) == pytest.approx(1 / 3)  # one static vector: chance
    for att in r.attributions:
        assert float(att.contribution.sum()) == pytest.approx(att.distance, rel=1e-3)


@pytest.mark.slow
def test_interp_shift_cli_runs_a_users_word(tmp_path):
    contexts = tmp_path / "bank.txt"
    contexts.write_text("river\tWe sat on the grassy bank\nriver\tThe boat reached the muddy bank\n"
                        "money\tShe deposited cash at the bank\nmoney\tHe borrowed money from the bank\n")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "analyses.cli", "shift", "--models", "minilm-l6", "--word", "bank",
                           "--contexts-file", str(contexts), "--out", str(out)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert (out / "index.html").exists() and (out / "summary.json").exists()
    bad = subprocess.run([sys.executable, "-m", "analyses.cli", "shift", "--models", "minilm-l6", "--word", "bank",
                          "--context", "no such word", "--context", "the bank", "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 1 and "bank" in bad.stderr and "no such word" in bad.stderr


def test_a_tuned_lens_reads_the_same_vectors_and_untrained_equals_the_logit_lens(llama, tmp_path):
    from interp.shift.tuned_lens import TunedLens

    result = shift_study(llama, "mole", ["A mole dug", "The mole of gas", "One mole of salt", "A furry mole"],
                         ["animal", "chem", "chem", "animal"], tuned_lens=TunedLens(llama), probe_folds=2)
    assert result.tuned is not None
    assert torch.equal(result.tuned.top_ids, result.lens.top_ids)
    torch.testing.assert_close(result.tuned.top_probs, result.lens.top_probs)
    assert "tuned lens top-3" in result.save(tmp_path).read_text()


def test_contexts_file_lines_with_or_without_senses(tmp_path):
    from analyses.embedding_shift import read_contexts

    f = tmp_path / "c.txt"
    f.write_text("animal\tA mole dug\n\nchem\tOne mole of gas\n")
    assert read_contexts(str(f)) == (["A mole dug", "One mole of gas"], ["animal", "chem"])
    f.write_text("A mole dug\nOne mole of gas\n")
    assert read_contexts(str(f)) == (["A mole dug", "One mole of gas"], None)
    f.write_text("animal\tA mole dug\nOne mole of gas\n")
    with pytest.raises(ValueError, match="every line"):
        read_contexts(str(f))


def test_contexts_without_senses_still_give_geometry_attribution_and_a_report(llama, tmp_path):
    from analyses.embedding_shift import write_report

    contexts = ["A mole dug here", "One mole of gas", "The mole on her arm"]
    r = shift_study(llama, "mole", contexts)
    assert r.centroid_accuracy is None and r.probe is None
    assert r.attributions and (r.attributions[0].a, r.attributions[0].b) == ("context 0", "context 1")
    assert float(r.attributions[0].contribution.sum()) == pytest.approx(r.attributions[0].distance, rel=1e-4)
    page = write_report({("llama", "mole"): r}, tmp_path)
    assert "Summary" in page.read_text()
