"""Logit lens, tuned lens, lens readouts and nearest tokens (interp.shift.lens / tuned_lens).

Every expected value is computed here independently: the `transformers` twin's own norm
and lm_head, norms written out by hand, brute-force cosine loops, hand-counted ranks.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from conftest import PROMPTS, TOL
from interp.shift.lens import LensReadout, NoLensError, logit_lens, nearest_tokens, read_lens
from interp.shift.tuned_lens import TunedLens, generate_corpus, lens_kl, residual_streams, train_tuned_lens

TRAIN_TEXTS = [
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France.",
    "It is named after the engineer Gustave Eiffel, whose company designed and built the tower.",
    "A mole is a small mammal adapted to a subterranean lifestyle, with velvety fur and tiny eyes.",
    "In chemistry, the mole is the unit of amount of substance in the International System of Units.",
    "The doctor examined the mole on her arm and decided that a biopsy was not necessary.",
    "London is the capital and largest city of England and the United Kingdom, on the River Thames.",
    "Water boils at one hundred degrees Celsius at sea level, and freezes at zero degrees.",
    "The committee will meet again next Tuesday to discuss the budget for the coming year.",
    "She opened the window, looked at the rain and decided to stay at home with a good book.",
    "Photosynthesis converts light energy into chemical energy stored in glucose molecules.",
    "The old bridge across the river was closed for repairs after the winter floods last year.",
    "Mathematics is the study of numbers, shapes and patterns, and of the structures they form.",
]
HELD_OUT = [
    "The Statue of Liberty stands on Liberty Island in New York Harbor, a gift from the people of France.",
    "A spy who works inside an organisation for a rival is sometimes called a mole by journalists.",
    "The train to Manchester was delayed by forty minutes because of a signal failure near the station.",
    "Most birds build nests in spring, and many of them return to the same place every year.",
]


def _stream(model, text):
    """`[pos, n_layers + 1, d_model]`: resid_pre of every block, then the last block's output."""
    n = model.cfg.n_layers
    names = [f"blocks.{l}.hook_resid_pre" for l in range(n)] + [f"blocks.{n - 1}.hook_resid_post"]
    logits, cache = model.run_with_cache(text, names_filter=lambda name: name in names)
    return logits[0], torch.stack([cache[name][0] for name in names], dim=1)


def _hand_lens(model, h):
    """The model's head written out: RMSNorm / LayerNorm by formula, then h @ W_U + b_U."""
    cfg = model.cfg
    if model.ln_final is not None:
        w = model.ln_final.w
        if cfg.normalization_type == "RMS":
            h = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * w
        else:
            h = h - h.mean(-1, keepdim=True)
            h = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * w + model.ln_final.b
    return h @ model.W_U + model.b_U


def _hf(directory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager").eval()


# ---------------------------------------------------------------------- logit lens
@pytest.mark.parametrize("name", ["gpt2", "llama", "attn_only", pytest.param("smollm2", marks=pytest.mark.slow)])
def test_final_layer_lens_equals_logits(request, name):
    model = request.getfixturevalue(name)
    tokens = torch.randint(0, model.cfg.d_vocab, (1, 12)) if name == "attn_only" else model.to_tokens(PROMPTS[0])
    with torch.no_grad():
        logits, stream = _stream(model, tokens)
        assert_close(logit_lens(model, stream[:, -1]), logits, **TOL)
        # Any leading shape: one vector, and [batch, pos, d_model].
        assert_close(logit_lens(model, stream[3, -1]), logits[3], **TOL)
        assert_close(logit_lens(model, stream[None, :, -1]), logits[None], **TOL)


@pytest.mark.parametrize("name", ["gpt2", "llama", pytest.param("smollm2", marks=pytest.mark.slow)])
def test_lens_at_every_layer_matches_transformers(request, name):
    model = request.getfixturevalue(name)
    hf = request.getfixturevalue("smollm2_hf") if name == "smollm2" else _hf(request.getfixturevalue(f"{name}_dir"))
    norm = hf.transformer.ln_f if name == "gpt2" else hf.model.norm
    tokens = model.to_tokens(PROMPTS[2])
    n = model.cfg.n_layers
    with torch.no_grad():
        ref = hf(tokens, output_hidden_states=True)
        _, stream = _stream(model, tokens)
        for l in range(n):  # transformers' hidden_states[l] is block l's input, before any final norm
            expected = hf.lm_head(norm(ref.hidden_states[l][0]))
            assert_close(logit_lens(model, stream[:, l]), expected, **TOL, msg=lambda m: f"layer {l}: {m}")
        # Its last hidden state already has the final norm applied.
        assert_close(logit_lens(model, stream[:, n]), hf.lm_head(ref.hidden_states[n][0]), **TOL)
        assert_close(logit_lens(model, stream[:, n]), ref.logits[0], **TOL)


@pytest.mark.parametrize("name", ["bert", "bert_headless_dir", pytest.param("minilm", marks=pytest.mark.slow)])
def test_encoder_logit_lens_raises_pointing_to_nearest_tokens(request, name):
    import models

    model = models.load(request.getfixturevalue(name)) if name.endswith("_dir") else request.getfixturevalue(name)
    with pytest.raises(NoLensError, match="nearest_tokens"):
        logit_lens(model, torch.zeros(model.cfg.d_model))
    with pytest.raises(NoLensError, match="nearest_tokens"):
        read_lens(model, torch.zeros(2, model.cfg.d_model))
    with pytest.raises(NoLensError):
        TunedLens(model)


# ---------------------------------------------------------------------- nearest tokens
@pytest.mark.parametrize("name", ["bert", pytest.param("minilm", marks=pytest.mark.slow)])
def test_nearest_tokens_equals_brute_force(request, name):
    model = request.getfixturevalue(name)
    with torch.no_grad():
        _, cache = model.run_with_cache("the doctor removed the mole")
    vectors = torch.stack([cache["resid_pre", 0][0, :3], cache["resid_pre", 1][0, :3]])  # [2, 3, d_model]
    special = set(model.tokenizer.all_special_ids)
    got = nearest_tokens(model, vectors, k=4)
    assert got.ids.shape == got.similarities.shape == (2, 3, 4)
    W_E = model.W_E
    for i, j in [(0, 0), (1, 2)]:  # a Python loop over 30k rows: two vectors are enough
        v = vectors[i, j]
        sims = [(float(torch.dot(v, e) / (v.norm() * e.norm())), t) for t, e in enumerate(W_E) if t not in special]
        sims.sort(key=lambda st: -st[0])
        assert got.ids[i, j].tolist() == [t for _, t in sims[:4]]
        assert_close(got.similarities[i, j], torch.tensor([s for s, _ in sims[:4]]), atol=1e-5, rtol=1e-5)
        assert got.tokens[i][j] == model.to_str_tokens(got.ids[i, j])


def test_nearest_tokens_special_tokens_and_shapes(bert):
    cls = bert.tokenizer.cls_token_id
    v = bert.W_E[cls]  # [d_model]: the [CLS] embedding itself
    with_special = nearest_tokens(bert, v, k=3, exclude_special=False)
    assert with_special.ids.shape == (3,) and int(with_special.ids[0]) == cls
    assert_close(with_special.similarities[0], torch.tensor(1.0))
    assert cls not in nearest_tokens(bert, v, k=50).ids.tolist()
    # Any leading shape.
    assert nearest_tokens(bert, torch.randn(2, 2, 2, bert.cfg.d_model), k=2).ids.shape == (2, 2, 2, 2)
    assert json.dumps(with_special.to_dict())


# ---------------------------------------------------------------------- read_lens
def test_read_lens_topk_and_tracked_ranks(llama):
    with torch.no_grad():
        _, stream = _stream(llama, PROMPTS[0])
    vectors = stream[[2, 5, -1]]  # [3 targets, n_layers + 1, d_model]
    track = [" Paris", " the", " city"]
    out = read_lens(llama, vectors, k=5, track=track, targets=["a", "b", "c"])
    assert isinstance(out, LensReadout) and out.lens == "logit"
    assert out.top_ids.shape == out.top_probs.shape == (3, llama.cfg.n_layers + 1, 5)
    ids = [llama.to_single_token(t) for t in track]
    assert out.tracked_ids == ids
    for t in range(3):
        for s in range(llama.cfg.n_layers + 1):
            logits = _hand_lens(llama, vectors[t, s])
            probs, values = torch.softmax(logits, -1), logits.tolist()
            top = torch.topk(probs, 5)
            assert out.top_ids[t, s].tolist() == top.indices.tolist()
            assert_close(out.top_probs[t, s], top.values, atol=1e-5, rtol=1e-4)
            assert out.top_tokens[t][s] == [llama.to_str_tokens(torch.tensor([i]))[0] for i in top.indices.tolist()]
            for j, i in enumerate(ids):
                rank = 1 + sum(1 for x in values if x > values[i])
                assert int(out.tracked_ranks[t, s, j]) == rank
                assert_close(out.tracked_logprobs[t, s, j], torch.log(probs[i]), atol=1e-4, rtol=1e-4)
    frame = out.to_frame()
    assert len(frame) == 3 * (llama.cfg.n_layers + 1)
    assert {"target", "layer", "top1", "p5", "logprob[ Paris]", "rank[ Paris]"} <= set(frame.columns)
    assert json.loads(json.dumps(out.to_dict()))["tracked"] == track
    # One target's stack [n_slots, d_model] is accepted; multi-token strings are refused.
    assert read_lens(llama, vectors[0], k=2).top_ids.shape == (1, llama.cfg.n_layers + 1, 2)
    with pytest.raises(ValueError):
        read_lens(llama, vectors, track=[" Eiffel Tower"])


# ---------------------------------------------------------------------- tuned lens
def test_untrained_tuned_lens_is_the_logit_lens(llama, gpt2):
    for model in (llama, gpt2):
        lens = TunedLens(model)
        h = torch.randn(4, 7, model.cfg.d_model)
        for l in range(model.cfg.n_layers + 1):
            assert torch.equal(lens(h, l), logit_lens(model, h))
        with torch.no_grad():
            _, stream = _stream(model, PROMPTS[1])
        a, b = read_lens(model, stream), read_lens(model, stream, lens=lens)
        assert torch.equal(a.top_ids, b.top_ids) and b.lens == "tuned"


def _held_out_kl(model, lens, texts):
    """Mean KL(model's logits || lens logits) per layer, with F.kl_div, positions 1..end."""
    n = model.cfg.n_layers
    total, count = torch.zeros(n + 1), 0
    with torch.no_grad():
        for text in texts:
            logits, stream = _stream(model, text)
            target = logits[1:].log_softmax(-1)
            for l in range(n + 1):
                pred = (_hand_lens(model, stream[1:, l]) if lens is None else lens(stream[1:, l], l)).log_softmax(-1)
                total[l] += F.kl_div(pred, target, log_target=True, reduction="sum")
            count += target.shape[0]
    return total / count


@pytest.fixture(scope="module")
def llama_offset(llama):
    """The random LLaMA with a last block that only adds a constant vector b (W_O = W_out = 0,
    b_O = b): the last stream is h + b, so an affine translator can close the gap exactly,
    while random weights elsewhere give a lens nothing it could learn and generalise."""
    import copy

    model = copy.deepcopy(llama)
    with torch.no_grad():
        block = model.blocks[-1]
        block.attn.W_O.zero_()
        block.mlp.W_out.zero_()
        block.mlp.b_out.zero_()
        block.attn.b_O.copy_(torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(5)))
    return model


def _random_tokens(n, seed, length=64, d_vocab=49152):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, d_vocab, (length,), generator=gen) for _ in range(n)]


@pytest.mark.parametrize("init, lr, steps, ratio", [
    pytest.param("identity", 3e-2, 20, 0.6, marks=pytest.mark.slow),  # the paper's start: KL steps only
    ("least_squares", 1e-2, 4, 0.1),
])
def test_trained_tuned_lens_lowers_held_out_kl(llama_offset, init, lr, steps, ratio):
    model, n = llama_offset, llama_offset.cfg.n_layers
    held_out = _random_tokens(4, seed=1)
    streams = residual_streams(model, held_out)
    assert_close(streams[:, n], streams[:, n - 1] + model.blocks[-1].attn.b_O)  # the construction holds
    lens = train_tuned_lens(model, _random_tokens(10, seed=0), steps=steps, lr=lr, init=init, seed=0)
    before, after = _held_out_kl(model, None, held_out), _held_out_kl(model, lens, held_out)
    assert float(before[n - 1]) > 0.2  # the logit lens is really off before the last block
    assert float(after[n - 1]) < ratio * float(before[n - 1]), (before, after)
    assert float(after[0]) < float(before[0])
    assert_close(after[n], before[n])  # the last slot has no translator
    # lens_kl agrees with the KL computed here.
    assert_close(lens_kl(model, streams, lens), after.double(), atol=1e-4, rtol=1e-4)
    assert_close(lens_kl(model, streams), before.double(), atol=1e-4, rtol=1e-4)
    assert lens.info["init"] == init and lens.info["steps"] == steps and lens.info["n_tokens"] == 10 * 63


def test_tuned_lens_save_load_roundtrip(llama, attn_only, tmp_path):
    lens = train_tuned_lens(llama, TRAIN_TEXTS[:4], steps=3, seed=1)
    lens.save(tmp_path / "lens")
    meta = json.loads((tmp_path / "lens" / "tuned_lens.json").read_text())
    assert (meta["model_name"], meta["d_model"], meta["n_layers"]) == (llama.cfg.model_name, 64, 2)
    loaded = TunedLens.load(tmp_path / "lens", llama)
    h = torch.randn(5, llama.cfg.d_model)
    for l in range(llama.cfg.n_layers + 1):
        assert torch.equal(loaded(h, l), lens(h, l))
    assert loaded.info == json.loads(json.dumps(lens.info))
    with pytest.raises(ValueError, match="d_model=64"):
        TunedLens.load(tmp_path / "lens", attn_only)


def test_generate_corpus_samples_from_the_model(llama):
    prompts = ["The Eiffel Tower", "A mole is"]
    texts = generate_corpus(llama, prompts, n_tokens=24, seed=3)
    assert len(texts) >= 2 and texts[0].startswith(prompts[0]) and texts[1].startswith(prompts[1])
    assert sum(llama.to_tokens(t).shape[-1] for t in texts) >= 24
    assert texts == generate_corpus(llama, prompts, n_tokens=24, seed=3)
    assert texts != generate_corpus(llama, prompts, n_tokens=24, seed=4)


@pytest.mark.slow
def test_tuned_lens_on_smollm2_lowers_held_out_kl(smollm2):
    lens = train_tuned_lens(smollm2, TRAIN_TEXTS, steps=3, lr=1e-4, batch_tokens=32)
    before, after = _held_out_kl(smollm2, None, HELD_OUT[:2]), _held_out_kl(smollm2, lens, HELD_OUT[:2])
    middle = slice(5, 25)
    assert float(after[middle].mean()) < 0.5 * float(before[middle].mean()), (before, after)


def test_the_tuned_lens_defaults_to_the_bundled_wikipedia_text(llama):
    """With no texts, the first DEFAULT_DOCUMENTS Wikipedia summaries: the same lens as passing them."""
    from interp.collect import default_corpus
    from interp.shift.tuned_lens import DEFAULT_DOCUMENTS

    texts = list(default_corpus().texts[:DEFAULT_DOCUMENTS])
    by_default = train_tuned_lens(llama, steps=1, max_seq_len=32)
    given = train_tuned_lens(llama, texts, steps=1, max_seq_len=32)
    assert by_default.info["n_tokens"] == given.info["n_tokens"] > 1000
    for a, b in zip(by_default.translators, given.translators):
        assert torch.equal(a.weight, b.weight)
    with pytest.raises(ValueError, match="empty list"):
        train_tuned_lens(llama, [])
