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
