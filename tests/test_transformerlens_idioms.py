"""A TransformerLens user's everyday idioms (issue 16, point 1), against TransformerLens 4.3 itself.

The oracle: TransformerLens' TransformerBridge booted on the same saved checkpoint (the
random GPT-2 and LLaMA of conftest, and SmolLM2), its run_with_cache, and its
ActivationCache methods on that cache. Ours run on our model loaded from the same
directory. Plus the invariants TransformerLens documents: decompose_resid sums to the
stream; logit attributions of a decomposition sum to the logit difference (final norm's
scale frozen, the unembedding biases aside).
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import models
from conftest import PROMPTS

TOL = dict(atol=1e-4, rtol=1e-4)


def bridge(directory, processed: bool):
    from transformer_lens.model_bridge import TransformerBridge

    tl = TransformerBridge.boot_transformers(str(directory), device="cpu")
    if processed:
        tl.enable_compatibility_mode(disable_warnings=True)  # fold_ln, centre writing weights and unembed, fold b_V
    else:
        tl.enable_compatibility_mode(disable_warnings=True, no_processing=True)
    return tl


def ours(directory, processed: bool):
    model = models.load(directory)
    if processed:
        model.process_weights(fold_ln=True, center_writing_weights=model.cfg.normalization_type == "LN",
                              center_unembed=True, fold_value_biases=True)
    return model


@pytest.fixture(scope="module", params=[("gpt2_dir", False), ("llama_dir", False), ("llama_dir", True),
                                        ("gpt2_dir", True)], ids=["gpt2", "llama", "llama-processed", "gpt2-processed"])
def pair(request):
    name, processed = request.param
    directory = request.getfixturevalue(name)
    tl, model = bridge(directory, processed), ours(directory, processed)
    tokens = model.to_tokens(PROMPTS[:2], padding_side="right")[:, :7]  # equal-length rows
    _, tl_cache = tl.run_with_cache(tokens)
    _, cache = model.run_with_cache(tokens)
    return tl, tl_cache, model, cache, tokens


def same_as_tl(pair, method: str, **kwargs) -> torch.Tensor:
    """Call `method` on both caches with labels; the labels must match exactly and the stacks to TOL."""
    _, tl_cache, _, cache, _ = pair
    mine, labels = getattr(cache, method)(**kwargs, return_labels=True)
    theirs, tl_labels = getattr(tl_cache, method)(**kwargs, return_labels=True)
    assert labels == tl_labels
    assert_close(mine, theirs, **TOL)
    return mine


def test_the_runs_agree(pair):
    tl, tl_cache, model, cache, tokens = pair
    for name in ("blocks.0.hook_resid_pre", "blocks.1.hook_resid_post", "blocks.1.attn.hook_z", "ln_final.hook_scale",
                 "blocks.1.ln2.hook_scale", "blocks.0.mlp.hook_post", "hook_embed"):
        assert_close(cache[name], tl_cache[name], **TOL, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("kwargs", [{}, {"incl_mid": True}, {"apply_ln": True}, {"layer": 1, "apply_ln": True},
                                    {"layer": 1, "mlp_input": True, "apply_ln": True}, {"pos_slice": -1},
                                    {"pos_slice": (1, 4), "apply_ln": True, "incl_mid": True}])
def test_accumulated_resid(pair, kwargs):
    same_as_tl(pair, "accumulated_resid", **kwargs)


@pytest.mark.parametrize("kwargs", [{}, {"mode": "attn"}, {"mode": "mlp", "incl_embeds": False},
                                    {"layer": 1, "mlp_input": True}, {"apply_ln": True}, {"layer": 1, "apply_ln": True},
                                    {"pos_slice": [0, 2]}])
def test_decompose_resid(pair, kwargs):
    same_as_tl(pair, "decompose_resid", **kwargs)


def test_decompose_resid_sums_to_the_stream(pair):
    _, _, model, cache, _ = pair
    for layer in range(model.cfg.n_layers + 1):
        total = cache.decompose_resid(layer).sum(0)
        stream = cache["resid_pre", layer] if layer < model.cfg.n_layers else cache["resid_post", -1]
        assert_close(total, stream, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs", [{}, {"incl_remainder": True}, {"layer": 1, "apply_ln": True}, {"pos_slice": -1}])
def test_stack_head_results(pair, kwargs):
    same_as_tl(pair, "stack_head_results", **kwargs)


@pytest.mark.parametrize("kwargs", [{"layer": 2}, {"layer": 1, "neuron_slice": (3, 9), "incl_remainder": True},
                                    {"layer": 2, "pos_slice": -2, "apply_ln": True}])
def test_stack_neuron_results(pair, kwargs):
    same_as_tl(pair, "stack_neuron_results", **kwargs)
    _, tl_cache, _, cache, _ = pair
    assert_close(cache.get_neuron_results(1, neuron_slice=[0, 5]), tl_cache.get_neuron_results(1, neuron_slice=[0, 5]),
                 **TOL)


@pytest.mark.parametrize("expand_neurons", [True, False])
def test_full_resid_decomposition_sums_and_agrees(pair, expand_neurons):
    mine = same_as_tl(pair, "get_full_resid_decomposition", expand_neurons=expand_neurons)
    cache = pair[3]
    assert_close(mine.sum(0), cache["resid_post", -1], atol=1e-4, rtol=1e-4)


def test_logit_attrs(pair):
    tl, tl_cache, model, cache, tokens = pair
    stack = cache.decompose_resid(pos_slice=-1)
    right, wrong = tokens[:, 1], tokens[:, 2]  # one answer per prompt
    mine = cache.logit_attrs(stack, right, wrong, pos_slice=-1)
    theirs = tl_cache.logit_attrs(tl_cache.decompose_resid(pos_slice=-1), right, wrong, pos_slice=-1)
    assert_close(mine, theirs, **TOL)
    heads = cache.stack_head_results(pos_slice=-1)
    assert_close(cache.logit_attrs(heads, right, pos_slice=-1),
                 tl_cache.logit_attrs(tl_cache.stack_head_results(pos_slice=-1), right, pos_slice=-1), **TOL)


def test_logit_attributions_sum_to_the_logit_difference(pair):
    """With the final norm's scale frozen (apply_ln_to_stack) and its weight folded, the attributions of a
    decomposition of the final stream sum to the logit difference less the unembedding biases' difference."""
    tl, tl_cache, model, cache, tokens = pair
    if not model.cfg.normalization_type.endswith("Pre"):
        return  # the unfolded models: the norm's weight is outside W_U (TransformerLens' own warning)
    logits = model(tokens)[:, -1]
    right, wrong = tokens[:, 1], tokens[:, 2]
    rows = torch.arange(len(tokens))
    diff = logits[rows, right] - logits[rows, wrong]
    attrs = cache.logit_attrs(cache.decompose_resid(pos_slice=-1), right, wrong, pos_slice=-1)
    bias = model.b_U[right] - model.b_U[wrong]
    assert_close(attrs.sum(0) + bias, diff, atol=1e-4, rtol=1e-4)


def test_head_and_neuron_helpers(pair):
    tl, tl_cache, model, cache, tokens = pair
    cache.compute_head_results()
    tl_cache.compute_head_results()
    assert_close(cache["result", 1], tl_cache["result", 1], **TOL)
    assert_close(cache.stack_activation("pattern"), tl_cache.stack_activation("pattern"), **TOL)
    assert_close(cache.stack_activation("scale", 2, "ln1"), tl_cache.stack_activation("scale", 2, "ln1"), **TOL)
    assert_close(model.accumulated_bias(2, include_mlp_biases=True), tl.accumulated_bias(2, include_mlp_biases=True),
                 **TOL)
    assert_close(model.tokens_to_residual_directions(tokens[0]), tl.tokens_to_residual_directions(tokens[0]), **TOL)
    assert_close(cache.apply_ln_to_stack(cache.decompose_resid(1), 1),
                 tl_cache.apply_ln_to_stack(tl_cache.decompose_resid(1), 1), **TOL)


def test_cache_keys_and_act_names(pair):
    from transformer_lens.utilities import get_act_name

    tl, tl_cache, model, cache, tokens = pair
    for args in (("resid_pre", 1), ("pattern", 0), ("z", 1, "attn"), ("scale", 1, "ln2"), ("normalized", 0, "ln1"),
                 ("post", 1), ("attn_out", 0), ("mlp_out", 1), ("q", 0), ("resid_post", 1)):
        name = get_act_name(*args)
        assert name in cache.keys(), name
        assert_close(cache[name], tl_cache[name], **TOL)
    assert_close(cache["resid_post", -1], cache["resid_post", model.cfg.n_layers - 1], atol=0, rtol=0)
    single = model.run_with_cache(tokens[:1])[1].remove_batch_dim()
    assert single["resid_pre", 0].shape == tokens[:1].shape[1:] + (model.cfg.d_model,)
    assert single.accumulated_resid().shape == (model.cfg.n_layers + 1, tokens.shape[1], model.cfg.d_model)
    assert set(cache.to("cpu").keys()) == set(cache.keys()) and len(cache.values()) == len(cache.items())


# ---------------------------------------------------------------------- model idioms
def test_token_helpers(llama):
    text = PROMPTS[0]
    ids = llama.to_tokens(text)[0]
    token = int(ids[3])
    word = llama.to_single_str_token(token)
    assert llama.to_single_token(word) == token
    assert llama.get_token_position(token, ids) == int((ids == token).nonzero()[0])
    assert llama.get_token_position(word, text, mode="last") == int((ids == token).nonzero()[-1])
    with pytest.raises(ValueError, match="does not occur"):
        llama.get_token_position(token, ids[:3])
    assert llama.tokens_to_residual_directions(word).shape == (llama.cfg.d_model,)


def test_hook_layer_and_name(llama):
    seen = {}

    def record(t, hook):
        seen[hook.name] = hook.layer()

    llama.run_with_hooks(PROMPTS[0], fwd_hooks=[(lambda n: n.startswith("blocks."), record)])
    assert seen and all(layer == int(name.split(".")[1]) for name, layer in seen.items())
    assert "blocks.1.attn.hook_pattern" in seen or "blocks.1.attn.hook_z" in seen
    with pytest.raises(ValueError, match="not inside a block"):
        llama.hook_dict["hook_embed"].layer()


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_use_attn_result(request, name):
    model = request.getfixturevalue(name)
    _, before = model.run_with_cache(PROMPTS[0])
    assert "blocks.0.attn.hook_result" not in before
    model.set_use_attn_result(True)
    try:
        _, cache = model.run_with_cache(PROMPTS[0])
        result = cache["result", 0]
        assert_close(result.sum(2) + model.blocks[0].attn.b_O, cache["attn_out", 0], atol=1e-5, rtol=1e-5)
    finally:
        model.set_use_attn_result(False)


@pytest.mark.parametrize("switch,names", [("set_use_split_qkv_input", ("hook_q_input", "hook_k_input", "hook_v_input")),
                                          ("set_use_attn_in", ("hook_attn_in",))])
def test_per_head_inputs(llama, switch, names):
    """The per-head copies change nothing until edited; editing one head's copy moves that head alone."""
    plain, base = llama.run_with_cache(PROMPTS[0])
    getattr(llama, switch)(True)
    try:
        assert all(f"blocks.0.{n}" in llama.hook_dict for n in names)
        out, cache = llama.run_with_cache(PROMPTS[0])
        assert_close(out, plain, atol=1e-5, rtol=1e-5)
        h, kv = llama.cfg.n_heads, llama.cfg.n_kv_heads
        assert cache[f"blocks.0.{names[0]}"].shape[-2:] == (h, llama.cfg.d_model)
        if switch == "set_use_split_qkv_input":
            assert cache["blocks.0.hook_k_input"].shape[-2] == kv

        def zero_head_1(x, hook):
            x = x.clone()
            x[:, :, 1] = 0.0
            return x

        with llama.hooks(fwd_hooks=[(f"blocks.0.{names[0]}", zero_head_1)]):
            _, edited = llama.run_with_cache(PROMPTS[0], names_filter="blocks.0.attn.hook_q")
        changed = (edited["blocks.0.attn.hook_q"] - base["blocks.0.attn.hook_q"]).abs().amax((0, 1, 3))
        assert changed[1] > 1e-3 and float(changed[[0, 2, 3]].max()) < 1e-5
    finally:
        getattr(llama, switch)(False)
    assert "blocks.0.hook_q_input" not in llama.hook_dict


def test_hook_mlp_in_edits_the_mlp_input_only(llama):
    llama.set_use_hook_mlp_in(True)
    try:
        plain, base = llama.run_with_cache(PROMPTS[0])
        with llama.hooks(fwd_hooks=[("blocks.0.hook_mlp_in", lambda x, hook: x * 0.5)]):
            _, cache = llama.run_with_cache(PROMPTS[0])
        assert not torch.allclose(cache["mlp_out", 0], base["mlp_out", 0])
        assert_close(cache["resid_post", 0], cache["resid_mid", 0] + cache["mlp_out", 0], atol=1e-6, rtol=1e-6)
        assert_close(cache["resid_mid", 0], base["resid_mid", 0], atol=0, rtol=0)
    finally:
        llama.set_use_hook_mlp_in(False)


def test_generate_takes_transformerlens_keywords(llama):
    greedy = llama.generate(PROMPTS[0], max_new_tokens=5, verbose=False, stop_at_eos=True, use_past_kv_cache=False,
                            prepend_bos=False, return_type="input")
    assert isinstance(greedy, str) and greedy == llama.generate(PROMPTS[0], max_new_tokens=5)
    ids = llama.generate(PROMPTS[0], max_new_tokens=5, return_type="tokens", do_sample=True, temperature=0.7, top_k=5,
                         freq_penalty=1.0, seed=0)
    assert ids.shape[-1] == llama.to_tokens(PROMPTS[0]).shape[-1] + 5
    tokens = llama.to_tokens(PROMPTS[0])
    assert torch.equal(llama.generate(tokens, max_new_tokens=3, return_type="input"),
                       llama.generate(tokens, max_new_tokens=3))
    with pytest.raises(ValueError, match="freq_penalty"):
        llama.generate(PROMPTS[0], max_new_tokens=1, freq_penalty=-1.0)


# ---------------------------------------------------------------------- families where an idiom has no meaning
def test_idioms_refuse_where_they_have_no_meaning(bert, family, llama):
    _, cache = bert.run_with_cache("a short sentence")
    for call in (cache.decompose_resid, lambda: cache.accumulated_resid(layer=2, apply_ln=True)):
        with pytest.raises(ValueError, match="post-LN"):
            call()
    name, _, model, _ = family
    _, cache = model.run_with_cache(torch.randint(3, 1000, (1, 6)))
    if model.cfg.parallel_attn_mlp:
        with pytest.raises(ValueError, match="no resid_mid"):
            cache.accumulated_resid(incl_mid=True)
    elif model.cfg.post_sublayer_norm:
        with pytest.raises(ValueError, match="ln1_post"):
            cache.get_full_resid_decomposition()
    if not model.cfg.post_ln:
        assert_close(cache.decompose_resid().sum(0), cache[model.block_output_hook_name(model.cfg.n_layers - 1)],
                     atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_smollm2_idioms_equal_transformerlens(smollm2):
    """The logit-lens and direct-logit-attribution idioms on the real SmolLM2 (massive activations included)."""
    from models.registry import resolve

    tl = bridge(resolve("smollm2-135m"), processed=False)
    prompt = "When Mary and John went to the store, John gave a drink to"
    tokens = smollm2.to_tokens(prompt)
    _, tl_cache = tl.run_with_cache(tokens)
    _, cache = smollm2.run_with_cache(tokens)
    mary, john = smollm2.to_single_token(" Mary"), smollm2.to_single_token(" John")
    scale = dict(atol=1e-3, rtol=1e-4)  # entries of ~24,000 in the stream: float32 rounding, as in the parity tests
    assert_close(cache.accumulated_resid(apply_ln=True, pos_slice=-1),
                 tl_cache.accumulated_resid(apply_ln=True, pos_slice=-1), **scale)
    heads, tl_heads = cache.stack_head_results(pos_slice=-1), tl_cache.stack_head_results(pos_slice=-1)
    assert_close(heads, tl_heads, **scale)
    assert_close(cache.logit_attrs(heads, mary, john, pos_slice=-1),
                 tl_cache.logit_attrs(tl_heads, mary, john, pos_slice=-1), **scale)
    assert_close(cache.decompose_resid(apply_ln=True, pos_slice=-1),
                 tl_cache.decompose_resid(apply_ln=True, pos_slice=-1), **scale)
