"""Mixture-of-experts models (issue 15, part 1): routing hooks, expert and router sites, routing statistics.

Parity of logits, blocks, patterns, resumed patching and generation runs for these
families in tests/test_families.py (they are specs there). Here: the router's decisions
equal `transformers`' router module's, with margins no float noise can flip; the
constructed object (fused expert tensors) and the saved directory (one nn.Linear per
expert) convert to the same model; expert ablation and router-logit patching through the
engine equal brute-force loops of plain torch hooks on the `transformers` model.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import models
from family_specs import build_hf, decoder_layers
from interp.patching import activation_patch, logit_diff

TOL = dict(atol=1e-4, rtol=1e-5)
MOE = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]


def _load(name, directory, tokenizer):
    from transformers import AutoModelForCausalLM

    build_hf(name).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    hf = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager", dtype=torch.float32).eval()
    return name, hf, models.load(directory, tokenizer=tokenizer), directory


@pytest.fixture(scope="module", params=MOE)
def moe(request, tmp_path_factory, family_tokenizer):
    return _load(request.param, tmp_path_factory.mktemp(request.param), family_tokenizer)


@pytest.fixture(scope="module")
def qwen2_moe(tmp_path_factory, family_tokenizer):
    """The family with a shared expert and a dense layer (mlp_only_layers=[1])."""
    return _load("qwen2_moe", tmp_path_factory.mktemp("qwen2_moe_only"), family_tokenizer)


def _tokens(n=12, seed=3):
    return torch.randint(3, 1000, (2, n), generator=torch.Generator().manual_seed(seed))


def _routers(hf):
    return {l: layer.mlp.gate for l, layer in enumerate(decoder_layers(hf)) if hasattr(layer.mlp, "experts")}


def _renormalises(hf) -> bool:
    return hf.config.model_type == "mixtral" or bool(getattr(hf.config, "norm_topk_prob", False))


def hand_route(logits, k, renormalise):
    """transformers' routing written out: softmax in float32, top-k, optionally renormalised."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, indices = probs.topk(k, dim=-1)
    if renormalise:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, indices


# ---------------------------------------------------------------------- routing hooks
def test_router_decisions_equal_transformers_with_margins(moe):
    name, hf, model, _ = moe
    tokens = _tokens()
    seen = {}
    handles = [router.register_forward_hook(lambda m, a, out, l=l: seen.__setitem__(l, out))
               for l, router in _routers(hf).items()]
    try:
        with torch.no_grad():
            hf(tokens)
    finally:
        for h in handles:
            h.remove()
    _, cache = model.run_with_cache(tokens)
    k = model.cfg.experts_per_token
    assert sorted(seen) == [l for l in range(model.cfg.n_layers) if model.cfg.is_moe(l)]
    for layer, (logits, scores, indices) in seen.items():
        ours = cache[f"blocks.{layer}.mlp.hook_router_logits"]
        assert ours.shape == (*tokens.shape, model.cfg.num_experts)
        assert_close(ours.reshape(-1, model.cfg.num_experts), logits, **TOL)
        assert torch.equal(cache[f"blocks.{layer}.mlp.hook_expert_indices"].reshape(-1, k), indices)
        assert_close(cache[f"blocks.{layer}.mlp.hook_expert_weights"].reshape(-1, k).float(), scores.float(), **TOL)
        ranked = logits.sort(-1, descending=True).values  # the top-k of softmax is the top-k of the logits
        assert (ranked[:, k - 1] - ranked[:, k]).min() > 1e-3, "top-k margins far above float noise"
        assert cache[f"blocks.{layer}.mlp.hook_expert_out"].shape == (*tokens.shape, k, model.cfg.d_model)


def test_shared_expert_output_equals_transformers(qwen2_moe):
    name, hf, model, _ = qwen2_moe
    assert model.cfg.d_mlp_shared == 56
    tokens = _tokens()
    layer = next(l for l in range(model.cfg.n_layers) if model.cfg.is_moe(l))
    mlp = decoder_layers(hf)[layer].mlp
    seen = {}
    h = mlp.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    try:
        with torch.no_grad():
            hf(tokens)
            x = seen["x"].reshape(-1, model.cfg.d_model)
            expected = torch.sigmoid(mlp.shared_expert_gate(x)) * mlp.shared_expert(x)
    finally:
        h.remove()
    _, cache = model.run_with_cache(tokens, names_filter=f"blocks.{layer}.mlp.hook_shared_expert_out")
    assert_close(cache[f"blocks.{layer}.mlp.hook_shared_expert_out"].reshape(expected.shape), expected, **TOL)


def test_editing_router_logits_reroutes_and_zeroing_an_expert_removes_it(moe):
    _, _, model, _ = moe
    tokens = _tokens()
    layer = next(l for l in range(model.cfg.n_layers) if model.cfg.is_moe(l))
    pre = f"blocks.{layer}.mlp."

    def ban(logits, hook):
        return logits.index_fill(-1, torch.tensor([0]), float("-inf"))

    _, cache = model.run_with_cache(tokens, names_filter=pre + "hook_expert_indices")
    assert (cache[pre + "hook_expert_indices"] == 0).any(), "expert 0 is used before the edit"
    with model.hooks(fwd_hooks=[(pre + "hook_router_logits", ban)]):
        _, edited = model.run_with_cache(tokens, names_filter=pre + "hook_expert_indices")
    assert not (edited[pre + "hook_expert_indices"] == 0).any()
    # hook_experts: each expert's weighted share; the MLP's output is their sum (plus any shared expert).
    names = [pre + "hook_experts", f"blocks.{layer}.hook_mlp_out"] + \
        ([pre + "hook_shared_expert_out"] if model.cfg.d_mlp_shared else [])
    _, cache = model.run_with_cache(tokens, names_filter=names)
    shared = cache[pre + "hook_shared_expert_out"] if model.cfg.d_mlp_shared else 0
    assert_close(cache[pre + "hook_experts"].sum(2) + shared, cache[f"blocks.{layer}.hook_mlp_out"], **TOL)
    zeroed = model.run_with_hooks(tokens, fwd_hooks=[(pre + "hook_experts", lambda t, hook: t.index_fill(2, torch.tensor([0]), 0.0))])
    assert not torch.allclose(zeroed, model(tokens))


def test_object_and_directory_see_different_names_and_convert_alike(moe):
    from models.loading import read_weights

    name, hf, model, directory = moe
    on_disk, in_memory = set(read_weights(directory)), set(hf.state_dict())
    assert on_disk != in_memory, "transformers 5 fuses the experts in memory only"
    assert any("experts.gate_up_proj" in k for k in in_memory)
    assert not any("experts.gate_up_proj" in k for k in on_disk)
    tokens = _tokens()
    assert_close(models.load(hf)(tokens), model(tokens), atol=0, rtol=0)


# ---------------------------------------------------------------------- experts and routers as patching sites
def _metric_pair(hf, clean, corrupted):
    with torch.no_grad():
        gap = hf(clean).logits[:, -1] - hf(corrupted).logits[:, -1]
    a, b = gap.argmax(-1), gap.argmin(-1)

    def hand(logits, prompt):
        rows = torch.arange(len(prompt))
        return logits[rows, -1, a[prompt]] - logits[rows, -1, b[prompt]]

    return a, b, hand


def test_expert_ablation_equals_torch_hooks(moe):
    """Zeroing expert e's contribution at (layer, position): the engine's 'expert' site against a pre-hook that
    sets that expert's routing weight to 0 in transformers' experts module."""
    name, hf, model, _ = moe
    clean = _tokens(10)
    a, b, hand = _metric_pair(hf, clean, _tokens(10, seed=4))
    result = activation_patch(model, clean, kind="expert", by="head_pos", ablation="zero", metric=logit_diff(a, b),
                              progress=False)
    layers = [l for l in range(model.cfg.n_layers) if model.cfg.is_moe(l)]
    E, n_pos = model.cfg.num_experts, clean.shape[1]
    assert result.per_prompt.shape == (2, len(layers), E, n_pos)
    assert result.labels["head"] == [f"E{e}" for e in range(E)]
    sites = [(l, e, p) for l in layers for e in range(E) for p in range(n_pos)]
    rows = [(s, pr) for s in range(len(sites)) for pr in range(2)]
    tokens = clean[torch.tensor([pr for _, pr in rows])]
    layer_mods = decoder_layers(hf)

    def zeroer(layer):
        def pre(module, args):
            hidden, index, weights = args
            weights = weights.clone().view(len(rows), n_pos, -1)
            index = index.view(len(rows), n_pos, -1)
            for r, (s, _) in enumerate(rows):
                l, e, p = sites[s]
                if l == layer:
                    weights[r, p] = torch.where(index[r, p] == e, torch.zeros_like(weights[r, p]), weights[r, p])
            return hidden, index.reshape(-1, index.shape[-1]), weights.reshape(-1, weights.shape[-1])
        return pre

    handles = [layer_mods[l].mlp.experts.register_forward_pre_hook(zeroer(l)) for l in layers]
    try:
        with torch.no_grad():
            logits = hf(tokens).logits
    finally:
        for h in handles:
            h.remove()
    values = hand(logits, torch.tensor([pr for _, pr in rows]))
    expected = torch.zeros(2, len(sites))
    for (s, pr), v in zip(rows, values):
        expected[pr, s] = v
    assert_close(result.per_prompt, expected.view(2, len(layers), E, n_pos), **TOL)


def test_router_logit_patching_equals_torch_hooks(moe):
    """Clean router logits patched into the corrupted run at (layer, position): the routing is recomputed from
    them (a re-route where the top-k changes), against a forward hook on transformers' router module."""
    name, hf, model, _ = moe
    clean, corrupted = _tokens(10), _tokens(10)
    corrupted[:, 3] = (clean[:, 3] + 11) % 997 + 3
    corrupted[:, 7] = (clean[:, 7] + 29) % 997 + 3
    a, b, hand = _metric_pair(hf, clean, corrupted)
    result = activation_patch(model, clean, corrupted, kind="router_logits", by="layer_pos", metric=logit_diff(a, b),
                              progress=False)
    assert result.extra["resumed"]
    routers = _routers(hf)
    source = {}
    handles = [r.register_forward_hook(lambda m, args, out, l=l: source.__setitem__(l, out[0].detach().clone()))
               for l, r in routers.items()]
    with torch.no_grad():
        hf(clean)
    for h in handles:
        h.remove()
    layers, n_pos, k = sorted(routers), clean.shape[1], model.cfg.experts_per_token
    sites = [(l, p) for l in layers for p in range(n_pos)]
    rows = [(s, pr) for s in range(len(sites)) for pr in range(2)]
    prompts = torch.tensor([pr for _, pr in rows])

    def patcher(layer):
        def hook(module, args, out):
            logits = out[0].clone().view(len(rows), n_pos, -1)
            src = source[layer].view(2, n_pos, -1)
            for r, (s, pr) in enumerate(rows):
                l, p = sites[s]
                if l == layer:
                    logits[r, p] = src[pr, p]
            logits = logits.view(-1, logits.shape[-1])
            weights, indices = hand_route(logits, k, _renormalises(hf))
            return logits, weights.to(out[1].dtype), indices
        return hook

    handles = [routers[l].register_forward_hook(patcher(l)) for l in layers]
    try:
        with torch.no_grad():
            logits = hf(corrupted[prompts]).logits
    finally:
        for h in handles:
            h.remove()
    values = hand(logits, prompts)
    expected = torch.zeros(2, len(sites))
    for (s, pr), v in zip(rows, values):
        expected[pr, s] = v
    assert_close(result.per_prompt, expected.view(2, len(layers), n_pos), **TOL)


def test_expert_sites_refuse_dense_layers(qwen2_moe):
    name, _, model, _ = qwen2_moe
    dense = [l for l in range(model.cfg.n_layers) if not model.cfg.is_moe(l)]
    assert dense == [1]
    with pytest.raises(ValueError, match="dense MLPs"):
        activation_patch(model, _tokens(), kind="expert", by="head", ablation="zero", layers=dense,
                         metric=logit_diff(3, 4), progress=False)


# ---------------------------------------------------------------------- routing statistics
def test_word_routing_reads_the_routers_choice(moe, tmp_path):
    from analyses.shift_data import STUDIES, flatten
    from interp.routing import word_routing

    _, _, model, _ = moe
    contexts, labels = flatten(STUDIES["mole"]["senses"])
    contexts, labels = contexts[:3] + contexts[-3:], labels[:3] + labels[-3:]
    result = word_routing(model, "mole", contexts, labels)
    layers = [l for l in range(model.cfg.n_layers) if model.cfg.is_moe(l)]
    assert result.layers == layers and result.weights.shape == (6, len(layers), model.cfg.num_experts)
    assert (result.fired.sum(-1) == model.cfg.experts_per_token).all()
    # Independently: the word's last token, run alone, and the router's indices there.
    tok = model.tokenize(contexts[4])
    pos = max(i for i, (s, e) in enumerate(tok.offsets[0]) if contexts[4][s:e] == "mole")
    assert result.positions[4] == pos
    _, cache = model.run_with_cache(tok.tokens)
    for li, layer in enumerate(layers):
        chosen = set(cache[f"blocks.{layer}.mlp.hook_expert_indices"][0, pos].tolist())
        assert chosen == set(result.fired[4, li].nonzero().flatten().tolist())
    assert set(result.by_sense()) == set(labels)
    assert len(result.to_frame()) == 6 * len(layers) * model.cfg.experts_per_token
    page = result.save(tmp_path)
    assert page.exists() and "<svg" in page.read_text()


def test_dense_models_have_no_routing(family_tokenizer, llama):
    from interp.routing import NotMoEError, word_routing

    with pytest.raises(NotMoEError):
        word_routing(llama, "the", ["the cat"])


def test_other_routing_schemes_are_refused():
    import transformers

    from models.convert import UnsupportedArchitectureError, convert_hf

    hf = transformers.MixtralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=64, num_local_experts=4, num_experts_per_tok=2,
                                    pad_token_id=0, bos_token_id=1, eos_token_id=2)
    hf.scoring_func = "sigmoid"
    with pytest.raises(UnsupportedArchitectureError, match="scoring_func.*sigmoid"):
        convert_hf(hf, {}, "deepseek-like")
