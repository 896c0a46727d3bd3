"""Generation (models/generate.py) and the KV cache it relies on (models/attention.py).

References are independent: a brute-force loop that reruns the `transformers` model on
the whole sequence and appends the argmax, `transformers`' own `generate`, and the same
loop over our model with `run_with_hooks` for steering hooks.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import models
from conftest import PROMPTS, TOL

N_NEW = 8
DECODERS = ["gpt2", "llama", "attn_only", "attn_only_ln"]


# ---------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def hf_models(gpt2_dir, llama_dir):
    from transformers import AutoModelForCausalLM

    return {
        name: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
        for name, d in (("gpt2", gpt2_dir), ("llama", llama_dir))
    }


def _prompt_tokens(model, i=0):
    """Token ids [1, pos] of a prompt: real text for models with a tokenizer, random ids otherwise."""
    if model.tokenizer is not None:
        return model.to_tokens(PROMPTS[i])
    gen = torch.Generator().manual_seed(100 + i)
    return torch.randint(0, model.cfg.d_vocab, (1, 5 + 3 * i), generator=gen)


def _brute_force_hf(hf, tokens, n_new=N_NEW):
    seq = tokens.clone()
    with torch.no_grad():
        for _ in range(n_new):
            nxt = hf(seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    return seq


def _brute_force_ours(model, tokens, fwd_hooks=(), n_new=N_NEW):
    seq = tokens.clone()
    with torch.no_grad():
        for _ in range(n_new):
            logits = model.run_with_hooks(seq, fwd_hooks=list(fwd_hooks))
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq


def _no_hooks_left(model):
    return all(not hp._hooks["fwd"] and not hp._hooks["bwd"] for hp in model.hook_dict.values())


# ---------------------------------------------------------------------- greedy against transformers
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_greedy_equals_hf_brute_force_and_hf_generate(family, request, hf_models):
    model, hf = request.getfixturevalue(family), hf_models[family]
    for i in range(2):
        tokens = _prompt_tokens(model, i)
        ours = model.generate(tokens, N_NEW, stop_at_eos=False)
        assert ours.shape == (1, tokens.shape[1] + N_NEW)
        assert torch.equal(ours, _brute_force_hf(hf, tokens))
        with torch.no_grad():
            theirs = hf.generate(tokens, attention_mask=torch.ones_like(tokens), do_sample=False,
                                 max_new_tokens=N_NEW, min_new_tokens=N_NEW)
        assert torch.equal(ours, theirs)


# ---------------------------------------------------------------------- KV cache on / off
@pytest.mark.parametrize("family", DECODERS)
def test_kv_cache_on_and_off_agree(family, request):
    model = request.getfixturevalue(family)
    for i in range(2):
        tokens = _prompt_tokens(model, i)
        with_cache = model.generate(tokens, N_NEW, stop_at_eos=False, use_kv_cache=True)
        without = model.generate(tokens, N_NEW, stop_at_eos=False, use_kv_cache=False)
        assert torch.equal(with_cache, without)
        assert torch.equal(with_cache, _brute_force_ours(model, tokens))
    # A batch of token rows (no padding) is each row on its own.
    batch = torch.cat([_prompt_tokens(model, 0)[:, :5], _prompt_tokens(model, 2)[:, :5]])
    out = model.generate(batch, N_NEW, stop_at_eos=False)
    assert torch.equal(out, model.generate(batch, N_NEW, stop_at_eos=False, use_kv_cache=False))
    for row in range(2):
        assert torch.equal(out[row], model.generate(batch[row:row + 1], N_NEW, stop_at_eos=False)[0])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_left_padded_batch_equals_each_prompt_alone(family, request):
    model = request.getfixturevalue(family)
    prompts = ["Hello", PROMPTS[0], PROMPTS[1], PROMPTS[2]]
    lengths = {model.to_tokens(p).shape[1] for p in prompts}
    assert len(lengths) == len(prompts)  # really different lengths, so rows are padded
    batch = {use: model.generate(prompts, N_NEW, stop_at_eos=False, use_kv_cache=use, return_type="tokens")
             for use in (True, False)}
    assert torch.equal(batch[True], batch[False])
    assert batch[True].shape == (len(prompts), max(lengths) + N_NEW)
    texts = model.generate(prompts, N_NEW, stop_at_eos=False)
    for i, prompt in enumerate(prompts):
        alone = model.generate(model.to_tokens(prompt), N_NEW, stop_at_eos=False)[0]
        assert torch.equal(batch[True][i, -alone.shape[0]:], alone), prompt  # left padding: the row ends with it
        assert texts[i] == model.to_string(alone)


# ---------------------------------------------------------------------- sampling
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_sampling_seeded_reproducible_and_seed_dependent(family, request):
    model = request.getfixturevalue(family)
    tokens = _prompt_tokens(model)
    runs = {seed: model.generate(tokens, N_NEW, do_sample=True, seed=seed, stop_at_eos=False) for seed in (1, 2, 3)}
    assert torch.equal(runs[1], model.generate(tokens, N_NEW, do_sample=True, seed=1, stop_at_eos=False))
    assert not torch.equal(runs[1], runs[2]) and not torch.equal(runs[2], runs[3])
    greedy = model.generate(tokens, N_NEW, stop_at_eos=False)
    assert not torch.equal(runs[1], greedy)  # the logits are far from one-hot
    # Same seed, same samples whether or not the KV cache is used.
    assert torch.equal(runs[1], model.generate(tokens, N_NEW, do_sample=True, seed=1, stop_at_eos=False,
                                               use_kv_cache=False))
    # top_k restricts the draws to the k best tokens of each step.
    top5 = model.generate(tokens, N_NEW, do_sample=True, seed=4, top_k=5, stop_at_eos=False)
    with torch.no_grad():
        logits = model(top5[:, :-1])[0, tokens.shape[1] - 1:]
    for step, tok in enumerate(top5[0, tokens.shape[1]:]):
        assert int(tok) in logits[step].topk(5).indices.tolist()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("kwargs", [dict(top_k=1), dict(temperature=0), dict(temperature=0.0, top_k=50),
                                    dict(top_p=1e-6)], ids=["top_k=1", "temperature=0", "temp0_topk", "top_p=1e-6"])
def test_degenerate_sampling_is_greedy(family, kwargs, request):
    model = request.getfixturevalue(family)
    tokens = _prompt_tokens(model)
    greedy = model.generate(tokens, N_NEW, stop_at_eos=False)
    for seed in (0, 1):
        assert torch.equal(model.generate(tokens, N_NEW, do_sample=True, seed=seed, stop_at_eos=False, **kwargs),
                           greedy)


# ---------------------------------------------------------------------- hooks during generation
def _steering(model, seed=0, scale=4.0):
    vec = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(seed)) * scale

    def steer(x, hook):
        return x + vec

    return steer


@pytest.mark.parametrize("family", ["gpt2", "llama", "attn_only_ln"])
@pytest.mark.parametrize("use_kv_cache", [True, False])
def test_hooks_active_during_generation(family, use_kv_cache, request):
    model = request.getfixturevalue(family)
    tokens = _prompt_tokens(model)
    hooks = [("ln_final.hook_normalized", _steering(model))]
    reference = _brute_force_ours(model, tokens, fwd_hooks=hooks)
    plain = model.generate(tokens, N_NEW, stop_at_eos=False, use_kv_cache=use_kv_cache)
    assert not torch.equal(reference, plain)  # the steering changes what is generated
    with model.hooks(fwd_hooks=hooks):
        steered = model.generate(tokens, N_NEW, stop_at_eos=False, use_kv_cache=use_kv_cache)
    assert torch.equal(steered, reference)
    assert _no_hooks_left(model)
    via_arg = model.generate(tokens, N_NEW, stop_at_eos=False, use_kv_cache=use_kv_cache, fwd_hooks=hooks)
    assert torch.equal(via_arg, reference)
    assert _no_hooks_left(model)
    assert torch.equal(model.generate(tokens, N_NEW, stop_at_eos=False, use_kv_cache=use_kv_cache), plain)


def test_hooks_see_one_new_position_per_step_with_kv_cache(gpt2):
    tokens = _prompt_tokens(gpt2)
    shapes = {True: [], False: []}
    for use_kv_cache in (True, False):
        def record(x, hook, out=shapes[use_kv_cache]):
            out.append(tuple(x.shape))

        gpt2.generate(tokens, 4, stop_at_eos=False, use_kv_cache=use_kv_cache,
                      fwd_hooks=[("blocks.0.hook_resid_pre", record)])
    n, d = tokens.shape[1], gpt2.cfg.d_model
    assert shapes[True] == [(1, n, d)] + [(1, 1, d)] * 3
    assert shapes[False] == [(1, n + i, d) for i in range(4)]
    assert _no_hooks_left(gpt2)


def test_fwd_hooks_removed_even_when_generation_fails(gpt2):
    def boom(x, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        gpt2.generate(_prompt_tokens(gpt2), 2, fwd_hooks=[("blocks.0.hook_resid_post", boom)])
    assert _no_hooks_left(gpt2)


# ---------------------------------------------------------------------- input and output types
def test_string_input_returns_string_starting_with_prompt(gpt2):
    prompt = PROMPTS[0]
    out = gpt2.generate(prompt, N_NEW, stop_at_eos=False)
    assert isinstance(out, str) and out.startswith(prompt) and len(out) > len(prompt)
    # ... and the continuation is the tokens' continuation.
    tokens = gpt2.generate(gpt2.to_tokens(prompt), N_NEW, stop_at_eos=False)
    assert out == gpt2.to_string(tokens[0])


def test_list_input_returns_list(llama):
    out = llama.generate(PROMPTS[:3], 4, stop_at_eos=False)
    assert isinstance(out, list) and len(out) == 3
    assert all(isinstance(t, str) and t.startswith(p) for t, p in zip(out, PROMPTS[:3]))
    assert llama.generate(PROMPTS[:1], 4, stop_at_eos=False) == [llama.generate(PROMPTS[0], 4, stop_at_eos=False)]


def test_token_input_returns_tokens(gpt2):
    tokens = _prompt_tokens(gpt2)
    out = gpt2.generate(tokens, N_NEW, stop_at_eos=False)
    assert out.dtype == torch.long and out.shape == (1, tokens.shape[1] + N_NEW)
    assert torch.equal(out[:, :tokens.shape[1]], tokens)
    one_dim = gpt2.generate(tokens[0], N_NEW, stop_at_eos=False)  # 1-D ids: batch of one
    assert torch.equal(one_dim, out)
    as_list = gpt2.generate(tokens[0].tolist(), N_NEW, stop_at_eos=False)
    assert torch.equal(as_list, out)
    batch = torch.cat([tokens[:, :4], tokens[:, 3:7]])
    assert gpt2.generate(batch, 3, stop_at_eos=False).shape == (2, 7)
    as_text = gpt2.generate(tokens, N_NEW, stop_at_eos=False, return_type="str")
    assert as_text == [gpt2.to_string(out[0])]
    assert torch.equal(gpt2.generate(PROMPTS[0], N_NEW, stop_at_eos=False, return_type="tokens"), out)


def test_generation_stops_at_context(gpt2):
    tokens = _prompt_tokens(gpt2)
    out = gpt2.generate(tokens, 1000, stop_at_eos=False)
    assert out.shape == (1, gpt2.cfg.n_ctx)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_stop_at_eos(family, request):
    model = request.getfixturevalue(family)
    tokens = _prompt_tokens(model)
    greedy = model.generate(tokens, N_NEW, stop_at_eos=False)
    n = tokens.shape[1]
    second = int(greedy[0, n + 1])
    assert second not in greedy[0, n:n + 1].tolist()
    # Stop right after the second generated token.
    out = model.generate(tokens, N_NEW, eos_token_id=second)
    assert torch.equal(out, greedy[:, :n + 2])
    # stop_at_eos=False ignores it.
    assert torch.equal(model.generate(tokens, N_NEW, eos_token_id=second, stop_at_eos=False), greedy)
    # A string result ends before the EOS token.
    text = model.generate(PROMPTS[0], N_NEW, eos_token_id=second)
    assert text == model.to_string(greedy[0, :n + 1])


def test_no_stop_at_eos_string_keeps_everything_generated(gpt2):
    tokens = _prompt_tokens(gpt2)
    n = tokens.shape[1]
    greedy = gpt2.generate(tokens, N_NEW, stop_at_eos=False)
    eos = int(greedy[0, n])  # the first generated token
    text = gpt2.generate(PROMPTS[0], N_NEW, eos_token_id=eos, stop_at_eos=False)
    assert text == gpt2.to_string(greedy[0])


def test_stop_at_eos_in_batch_pads_finished_rows(gpt2):
    a = _prompt_tokens(gpt2, 0)[:, :5]
    b = _prompt_tokens(gpt2, 2)[:, :5]
    ga = gpt2.generate(a, N_NEW, stop_at_eos=False)
    gb = gpt2.generate(b, N_NEW, stop_at_eos=False)
    eos = int(ga[0, 5])  # row a's first new token
    assert eos not in gb[0, 5:].tolist()
    out = gpt2.generate(torch.cat([a, b]), N_NEW, eos_token_id=eos)
    assert torch.equal(out[1], gb[0])  # row b runs to the end
    assert torch.equal(out[0, :6], ga[0, :6])
    assert (out[0, 6:] == eos).all()  # row a is padded after its EOS


def test_generate_on_encoder_raises(bert):
    with pytest.raises(ValueError, match="causal"):
        bert.generate("The capital of France is [MASK].", 3)


# ---------------------------------------------------------------------- KV cache at the forward level
@pytest.mark.parametrize("family", ["gpt2", "llama", "attn_only_ln"])
def test_kv_cache_prefix_then_suffix_equals_full(family, request):
    model = request.getfixturevalue(family)
    tokens = _prompt_tokens(model, 2)
    n = tokens.shape[1]
    k = n // 2
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_kv_cache()
        prefix_logits = model(tokens[:, :k], past_kv=cache)
        assert cache.length == k
        suffix_logits = model(tokens[:, k:], past_kv=cache)
    assert cache.length == n
    assert_close(prefix_logits, full[:, :k], **TOL)
    assert_close(suffix_logits, full[:, k:], **TOL)
    # One token at a time, as generation does.
    with torch.no_grad():
        cache = models.KVCache(model.cfg.n_layers)
        steps = torch.cat([model(tokens[:, i:i + 1], past_kv=cache) for i in range(n)], dim=1)
    assert_close(steps, full, **TOL)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_kv_cache_frozen_copy_is_not_extended(family, request):
    model = request.getfixturevalue(family)
    tokens = _prompt_tokens(model, 2)
    k = 4
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_kv_cache()
        model(tokens[:, :k], past_kv=cache)
        keys_before = [t.clone() for t in cache.keys]
        frozen = cache.frozen_copy()
        assert frozen.frozen and frozen.length == k
        first = model(tokens[:, k:], past_kv=frozen)
        assert frozen.length == k and cache.length == k
        assert all(t.shape[2] == k for t in frozen.keys + frozen.values + cache.keys + cache.values)
        for before, after in zip(keys_before, cache.keys):
            assert torch.equal(before, after)
        # The same frozen prefix serves another continuation, and the first one again.
        other = model(tokens[:, k:k + 2].flip(1), past_kv=frozen)
        again = model(tokens[:, k:], past_kv=frozen)
    assert_close(first, full[:, k:], **TOL)
    assert torch.equal(first, again)
    with torch.no_grad():
        ref_other = model(torch.cat([tokens[:, :k], tokens[:, k:k + 2].flip(1)], dim=1))[:, k:]
    assert_close(other, ref_other, **TOL)


# ---------------------------------------------------------------------- the real model
@pytest.mark.slow
def test_smollm2_greedy_matches_hf_and_knows_paris(smollm2, smollm2_hf):
    prompt = "The Eiffel Tower is located in the city of"
    tokens = smollm2.to_tokens(prompt)
    ours = smollm2.generate(tokens, 10)
    with torch.no_grad():
        theirs = smollm2_hf.generate(tokens, attention_mask=torch.ones_like(tokens), do_sample=False,
                                     max_new_tokens=10)
    assert torch.equal(ours, theirs)
    text = smollm2.generate(prompt, 10)
    assert text.startswith(prompt) and "Paris" in text[len(prompt):]
    assert torch.equal(smollm2.generate(tokens, 10, use_kv_cache=False), ours)
