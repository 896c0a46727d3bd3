"""The dictionary study's pieces (analyses.dictionary) on a small random model and dictionary, against direct
computations: the latents at the word from run_with_cache, and the decomposition's shares summing to the
latent's pre-activation."""

from __future__ import annotations

import pytest
import torch

from analyses import dictionary as study
from analyses.shift_data import STUDIES, flatten
from interp.sae import DictionaryConfig, SparseDictionary
from interp.shift.trace import trace_word


def random_sae(model, layer: int, seed: int = 0) -> SparseDictionary:
    d = model.cfg.d_model
    sae = SparseDictionary(DictionaryConfig("topk", d, 4 * d, f"blocks.{layer}.hook_resid_post", k=8,
                                            apply_b_dec_to_input=True))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return sae


def test_sense_features_are_the_latents_at_the_word(llama):
    sae = random_sae(llama, 1)
    got = study.sense_features(llama, sae, "mole", n_top=2)
    contexts, labels = flatten(STUDIES["mole"]["senses"])
    trace = trace_word(llama, "mole", contexts, labels)
    rows = []
    for tokens, read in zip(trace.token_ids, trace.read_positions):  # the stream after block 1, by a plain cache
        _, cache = llama.run_with_cache(tokens[None], names_filter="blocks.1.hook_resid_post")
        rows.append(cache["blocks.1.hook_resid_post"][0, read[-1]])
    with torch.no_grad():
        acts = sae.encode(torch.stack(rows))
    for i, sense in enumerate(got.senses):
        mean = acts[[j for j, l in enumerate(labels) if l == sense]].mean(0)
        torch.testing.assert_close(got.means[i], mean, atol=1e-5, rtol=1e-5)
        others = torch.stack([acts[[j for j, l in enumerate(labels) if l == s]].mean(0)
                              for s in got.senses if s != sense]).max(0).values
        for f, margin in zip(got.features[sense], got.margins[sense]):
            assert margin == pytest.approx(float((mean[f] - others[f]).detach()), abs=1e-5) and margin > 0


def test_writers_shares_sum_to_the_pre_activation(llama):
    sae = random_sae(llama, 1, seed=1)
    latents = [3, 17]
    shares = study.writers(llama, sae, "tower", "eiffel", latents, n_top=10_000)  # every component
    trace = trace_word(llama, "tower", STUDIES["tower"]["senses"]["eiffel"])
    with torch.no_grad():
        pre = sae.pre_activations(trace.vectors[:, 2])[:, latents].mean(0)  # after block 1
    bias = (sae.b_enc[latents] - sae.b_dec @ sae.W_enc[:, latents]).detach()  # what no component writes
    for j, f in enumerate(latents):
        assert sum(v for _, v in shares[f]) + float(bias[j]) == pytest.approx(float(pre[j]), abs=1e-3)


def test_the_study_runs_end_to_end_and_writes_its_page(llama, tmp_path):
    sae = random_sae(llama, 1, seed=2)
    result = study.dictionary_study(llama, sae, None, dashboard_tokens=1_000, eval_sequences=2, held_out_from=0,
                                    seq_len=32)
    assert len(result.factual) == 10 and result.factual_effects[0] == max(result.factual_effects, key=abs)
    page = result.save(tmp_path / "dictionary")
    text = page.read_text()
    assert "separate the senses of &#x27;mole&#x27;" in text and "factual-recall" in text
    for f in result.factual[:3]:
        assert (tmp_path / "dictionary" / "features" / f"feature-{f}.html").exists()
    with pytest.raises(ValueError, match="residual-stream SAE"):
        study.sense_features(llama, SparseDictionary(DictionaryConfig("relu", 64, 8, "blocks.1.hook_mlp_out")))


def test_readout_outputs_equal_zeroing_the_latent_by_hand(llama):
    """causal_outputs against the edit written by hand: with the error term, zeroing latent f at the last token
    subtracts a_f W_dec[f] from the stream there; the mean probability change over the contexts ranks tokens."""
    from analyses.dictionary_readout import causal_outputs
    from interp.sae.dashboard import feature_dashboards

    sae = random_sae(llama, 1, seed=3)
    boards = feature_dashboards(llama, sae, None, n_tokens=600, seq_len=32, features=[5, 9])
    name, left = "blocks.1.hook_resid_post", boards.context[0]
    for f in (5, 9):
        got = causal_outputs(llama, sae, boards, f, n_contexts=3, n_top=4)
        drops = []
        for window, value in zip(boards.top_tokens[boards.row(f), :3], boards.top_values[boards.row(f), :3]):
            if value != value:
                break
            ids = window[:left + 1]
            ids = ids[ids >= 0]
            if int(ids[0]) != llama.cfg.bos_token_id:
                ids = torch.cat([torch.tensor([llama.cfg.bos_token_id]), ids])

            def edit(x, hook):
                with torch.no_grad():
                    a = sae.encode(x[:, -1])[:, f]
                x = x.clone()
                x[:, -1] -= a[:, None] * sae.W_dec[f]
                return x

            with torch.no_grad():
                base = llama(ids[None])[0, -1].softmax(-1)
                edited = llama.run_with_hooks(ids[None], fwd_hooks=[(name, edit)])[0, -1].softmax(-1)
            drops.append(edited - base)
        mean = torch.stack(drops).mean(0)
        low = mean.topk(4, largest=False)
        assert [t for t, _ in got] == [llama.to_string(int(i)) for i in low.indices]
        assert [v for _, v in got] == pytest.approx(low.values.tolist(), abs=1e-5)


def test_readout_positions_equal_the_gradient_by_hand(llama):
    """prompt_positions' attribution per (pair, latent, position) = d metric / d latent at the corrupted run x
    (clean - corrupted activation), the gradient taken by hand through the latents written back in."""
    from analyses.dictionary_readout import prompt_positions
    from analyses.factual import factual_pairs
    from analyses.patching_study import answer_ids

    sae = random_sae(llama, 1, seed=4)
    latents = [2, 11, 40]
    got = prompt_positions(llama, sae, latents)
    pairs = factual_pairs()
    good, bad = answer_ids(llama, pairs.clean_answer), answer_ids(llama, pairs.corrupted_answer)
    name = "blocks.1.hook_resid_post"
    acts = {}
    for side, prompts in (("clean", pairs.clean), ("corrupted", pairs.corrupted)):
        tokens = llama.to_tokens(prompts)
        store = {}

        def through(x, hook, store=store):
            with torch.no_grad():
                z = sae.encode(x)
            z = z.detach().requires_grad_(True)
            store["z"] = z
            return x + (sae.decode(z) - sae.decode(z).detach())  # the value of x, the gradient of recons

        logits = llama.run_with_hooks(tokens, fwd_hooks=[(name, through)])
        metric = (logits[torch.arange(len(prompts)), -1, good] - logits[torch.arange(len(prompts)), -1, bad]).sum()
        metric.backward()
        acts[side] = (store["z"].detach(), store["z"].grad)
    expected = (acts["corrupted"][1] * (acts["clean"][0] - acts["corrupted"][0]))[..., latents].transpose(1, 2)
    torch.testing.assert_close(got["attribution"], expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got["clean_acts"], acts["clean"][0][..., latents].transpose(1, 2), atol=1e-5,
                               rtol=1e-5)
