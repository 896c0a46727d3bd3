"""interp.sae.evaluate: every number of evaluate_dictionary against a hand computation on a tiny model: the
reconstruction metrics from run_with_cache activations, the cross-entropies and KLs from forwards with a plain
hook written by hand (an SAE, and a transcoder replacing an MLP), feature frequencies, the result's frame,
figure and page."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import models
from family_specs import randomize_
from interp.collect import ActivationDataset
from interp.sae import DictionaryConfig, SparseDictionary
from interp.sae.evaluate import METRICS, evaluate_dictionary

SEQ = 16
RESID = "blocks.0.hook_resid_post"
MLP_IN, MLP_OUT = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"


@pytest.fixture(scope="module")
def model(smollm2_tokenizer):
    torch.manual_seed(0)
    cfg = models.TransformerConfig(n_layers=2, d_model=32, n_heads=4, d_head=8, d_vocab=len(smollm2_tokenizer),
                                   n_ctx=32, d_mlp=48, model_name="sae-eval-tiny")
    m = models.HookedTransformer(cfg, tokenizer=smollm2_tokenizer).requires_grad_(False)
    randomize_(m, std=0.2)
    return m


def dictionary(architecture="topk", d_sae=64, k=6, seed=0, **cfg) -> SparseDictionary:
    torch.manual_seed(seed)
    sae = SparseDictionary(DictionaryConfig(architecture=architecture, d_in=32, d_sae=d_sae, hook_name=RESID,
                                            k=k if architecture == "topk" else None, **cfg))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return sae.requires_grad_(False)


@pytest.fixture(scope="module")
def tokens(smollm2_tokenizer):
    g = torch.Generator().manual_seed(0)
    t = torch.randint(2, 1000, (6, SEQ), generator=g)
    t[:, 0] = smollm2_tokenizer.bos_token_id
    t[2, 7] = smollm2_tokenizer.bos_token_id  # a document boundary inside a row
    return t


def by_hand(model, sae, tokens, bos):
    """Every number, from the model's own activations and plain hooks written here."""
    cfg = sae.cfg
    keep = tokens != bos
    _, cache = model.run_with_cache(tokens, names_filter=[cfg.hook_name, cfg.writes_to])
    x_in, target = cache[cfg.hook_name], cache[cfg.writes_to]
    acts = sae.encode(x_in)
    x_hat = sae.decode(acts, x_in)
    x, xh, a = target[keep].double(), x_hat[keep].double(), acts[keep]
    err = (x - xh).pow(2).sum(-1)
    centred = (x - x.mean(0)).pow(2).sum(-1)

    def replace(tensor, hook):  # what the dictionary writes, where the token is not BOS
        return torch.where(keep[..., None], x_hat, tensor)

    def zero(tensor, hook):
        return torch.where(keep[..., None], torch.zeros_like(tensor), tensor)

    clean = model(tokens)
    spliced = model.run_with_hooks(tokens, fwd_hooks=[(cfg.writes_to, replace)])
    zeroed = model.run_with_hooks(tokens, fwd_hooks=[(cfg.writes_to, zero)])
    pred = keep[:, :-1]

    def ce(logits):
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
        return float(loss[pred.flatten()].mean())

    def kl(logits):
        div = F.kl_div(logits[:, :-1].log_softmax(-1), clean[:, :-1].log_softmax(-1), log_target=True,
                       reduction="none").sum(-1)
        return float(div[pred].mean())

    return {"l0": float((a > 0).sum(-1).float().mean()), "explained_variance": float(1 - err.sum() / centred.sum()),
            "mse": float(F.mse_loss(xh, x)), "l2_error": float(err.mean()),
            "cosine": float(F.cosine_similarity(x, xh, dim=-1).mean()),
            "ce_clean": ce(clean), "ce_spliced": ce(spliced), "ce_zero_ablation": ce(zeroed),
            "kl_spliced": kl(spliced), "kl_zero_ablation": kl(zeroed),
            "frequency": (a > 0).float().mean(0), "n_tokens": int(keep.sum())}


def check(result, expected):
    for name in ("l0", "explained_variance", "mse", "l2_error", "cosine", "ce_clean", "ce_spliced",
                 "ce_zero_ablation", "kl_spliced", "kl_zero_ablation"):
        assert getattr(result, name) == pytest.approx(expected[name], rel=1e-4, abs=1e-6), name
    torch.testing.assert_close(result.frequency, expected["frequency"])
    assert result.n_tokens == expected["n_tokens"]
    assert result.delta_ce == pytest.approx(expected["ce_spliced"] - expected["ce_clean"], rel=1e-4)
    recovered = (expected["ce_zero_ablation"] - expected["ce_spliced"]) / (expected["ce_zero_ablation"]
                                                                           - expected["ce_clean"])
    assert result.ce_loss_recovered == pytest.approx(recovered, rel=1e-4)


def test_sae_metrics_equal_hand_computation(model, tokens, smollm2_tokenizer):
    sae = dictionary(normalize_activations="expected_average_only_in", norm_scaling_factor=0.7,
                     apply_b_dec_to_input=True)
    result = evaluate_dictionary(model, sae, tokens, batch_size=4)  # 6 rows in batches of 4: a short last batch
    check(result, by_hand(model, sae, tokens, smollm2_tokenizer.bos_token_id))
    assert result.n_predictions == int((tokens[:, :-1] != smollm2_tokenizer.bos_token_id).sum())
    assert result.ce["spliced"].shape == (6, SEQ - 1) and result.ce["spliced"][:, 0].isnan().all()
    assert result.l0_per_token.shape == (6, SEQ) and result.l0_per_token[2, 7].isnan()


def test_transcoder_metrics_equal_hand_computation(model, tokens, smollm2_tokenizer):
    """A transcoder reads the MLP's input and replaces its output: its metrics are against the MLP output."""
    torch.manual_seed(1)
    sae = SparseDictionary(DictionaryConfig(architecture="relu", d_in=32, d_sae=48, hook_name=MLP_IN,
                                            out_hook_name=MLP_OUT, skip=True)).requires_grad_(False)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    result = evaluate_dictionary(model, sae, tokens)
    check(result, by_hand(model, sae, tokens, smollm2_tokenizer.bos_token_id))
    assert result.reads == MLP_IN and result.writes == MLP_OUT


def test_bos_kept_when_asked(model, tokens):
    sae = dictionary()
    result = evaluate_dictionary(model, sae, tokens, exclude_bos=False)
    expected = by_hand(model, sae, tokens, bos=-1)  # no token is -1: every position counts
    check(result, expected)
    assert result.n_tokens == tokens.numel()


def test_dead_dense_and_density(model, tokens):
    sae = dictionary(d_sae=64, k=6)
    with torch.no_grad():
        sae.b_enc[:4] = -100.0  # never in the top k: dead
        sae.b_enc[4:6] = 100.0  # always in it: dense
    result = evaluate_dictionary(model, sae, tokens, dense_threshold=0.5)
    assert set(result.dead.tolist()) >= {0, 1, 2, 3} and {4, 5} <= set(result.dense.tolist())
    assert result.dead_fraction == pytest.approx(float((result.frequency == 0).float().mean()))
    assert result.dense_fraction == pytest.approx(float((result.frequency > 0.5).float().mean()))
    edges, counts, never = result.density_histogram(bins=10)
    assert never == len(result.dead) and int(counts.sum()) == 64 - never and edges[-1] == 0
    frame = result.to_frame()
    assert set(frame["metric"]) == set(METRICS) and frame.set_index("metric")["value"]["l0"] == result.l0
    assert result.to_frame("latent")["dead"].sum() == len(result.dead)


def test_figure_and_page(model, tokens, tmp_path):
    result = evaluate_dictionary(model, dictionary(), tokens)
    from matplotlib.figure import Figure

    assert isinstance(result.plot(), Figure)
    page = result.save(tmp_path, "eval")
    html = page.read_text()
    assert "explained_variance" in html and "<svg" in html and "ce_loss_recovered" in html
    data = json.loads((tmp_path / "eval.json").read_text())
    assert data["delta_ce"] == pytest.approx(result.delta_ce) and len(data["frequency"]) == 64


def test_corpus_input_skips_the_training_sequences(model, tmp_path):
    """Text is packed as collect_activations packs it; skip_sequences holds a collection's rows out."""
    from interp.collect import collect_activations, default_corpus

    corpus = list(default_corpus().texts[:20])
    ds = collect_activations(model, corpus, [RESID], tmp_path / "acts", seq_len=SEQ, max_sequences=8,
                             batch_size=4, progress=False)
    sae = dictionary()
    held_out = evaluate_dictionary(model, sae, corpus, seq_len=SEQ, n_sequences=3, skip_sequences=8)
    rows = ActivationDataset(tmp_path / "acts").tokens()
    from interp.collect import pack
    from interp.collect.packing import document_ids
    from interp.collect.corpus import load_corpus

    packed = torch.from_numpy(pack(document_ids(load_corpus(corpus), model.tokenizer), SEQ, 1, 11)).long()
    assert torch.equal(packed[:8], rows)
    by_tokens = evaluate_dictionary(model, sae, packed[8:11])
    assert held_out.summary() == by_tokens.summary()
    assert evaluate_dictionary(model, sae, ds, n_sequences=2).n_tokens == int((rows[:2] != 1).sum())


def test_bad_input(model, tokens):
    wrong = SparseDictionary(DictionaryConfig(architecture="relu", d_in=32, d_sae=8,
                                              hook_name="blocks.7.hook_resid_post"))
    with pytest.raises(ValueError, match="blocks.7.hook_resid_post.*does not have"):
        evaluate_dictionary(model, wrong, tokens)
    with pytest.raises(ValueError, match="none left after skipping"):
        evaluate_dictionary(model, dictionary(), ["a short text"], seq_len=4, skip_sequences=50)


def test_several_dictionaries_share_the_clean_forward(model, tokens):
    """A list gives a list, each result what it is alone; the clean forward runs once per batch."""
    saes = [dictionary(seed=1), dictionary(seed=2, architecture="relu")]
    together = evaluate_dictionary(model, saes, tokens, batch_size=6)
    for sae, result in zip(saes, together):
        assert result.summary() == evaluate_dictionary(model, sae, tokens, batch_size=6).summary()
    calls = []
    handle = model.hook_dict["hook_embed"].add_hook(lambda t, hook: calls.append(1), read_only=True)
    try:
        evaluate_dictionary(model, saes, tokens, batch_size=6)
    finally:
        handle.remove()
    assert len(calls) == 1 + 2 + 1  # clean, a spliced forward each, one zero ablation (the same hook)
