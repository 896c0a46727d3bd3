"""`interp.attach`: hooks on models the toolkit did not build, checked against plain torch hooks."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from interp.attach import attach


class TinyGPT(nn.Module):
    """A small GPT written in plain PyTorch, as a user would."""

    def __init__(self, vocab=50, d=32, n_layers=2, n_heads=4, n_ctx=16):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(n_ctx, d)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(d, n_heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(n_layers))
        self.ln_f, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        mask = nn.Transformer.generate_square_subsequent_mask(idx.shape[1])
        for block in self.blocks:
            x = block(x, src_mask=mask, is_causal=True)
        return self.head(self.ln_f(x))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = TinyGPT()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = torch.randint(0, 50, (8, 12))
    for _ in range(5):  # a few real training steps
        loss = nn.functional.cross_entropy(model(data[:, :-1]).flatten(0, 1), data[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _torch_hooks_left(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_cache_equals_plain_torch_hooks_and_patching_equals_a_hand_patch(tiny):
    idx = torch.randint(0, 50, (3, 10))
    seen = {}
    handles = [b.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, o.detach().clone()))
               for i, b in enumerate(tiny.blocks)]
    with torch.no_grad():
        ref = tiny(idx)
    for h in handles:
        h.remove()
    hooked = attach(tiny)
    with torch.no_grad():
        out, cache = hooked.run_with_cache(idx, names_filter=["blocks.0", "blocks.1"])
    assert torch.equal(out, ref)
    for i in range(2):
        assert torch.equal(cache[f"blocks.{i}"], seen[i])
    assert not cache["blocks.0"].requires_grad  # stored copies never carry a graph

    def zero_pos3(t, hook):
        t = t.clone()
        t[:, 3] = 0
        return t

    h = tiny.blocks[0].register_forward_hook(lambda m, a, o: zero_pos3(o, None))
    with torch.no_grad():
        hand = tiny(idx)
    h.remove()
    with torch.no_grad():
        patched = hooked.run_with_hooks(idx, fwd_hooks=[("blocks.0", zero_pos3)])
    assert torch.equal(patched, hand) and not torch.equal(patched, ref)
    assert _torch_hooks_left(tiny) == 0


def test_nothing_is_left_after_detach_or_an_exception_and_other_hooks_survive(tiny):
    idx = torch.randint(0, 50, (2, 8))
    calls = []
    theirs = tiny.blocks[1].register_forward_hook(lambda m, a, o: calls.append(1))
    with torch.no_grad():
        before = tiny(idx)
    hooked = attach(tiny)

    def boom(t, hook):
        raise RuntimeError("user hook failed")

    with pytest.raises(RuntimeError, match="user hook failed"):
        hooked.run_with_hooks(idx, fwd_hooks=[("blocks.1", boom)])
    assert _torch_hooks_left(tiny) == 1  # only the user's own hook
    hooked.add_hook("blocks.0", lambda t, hook: t * 2)
    assert _torch_hooks_left(tiny) == 2
    assert hooked.detach() is tiny
    assert _torch_hooks_left(tiny) == 1
    with torch.no_grad():
        assert torch.equal(tiny(idx), before)
    assert calls  # their hook kept firing
    theirs.remove()
    assert all(p.requires_grad for p in tiny.parameters())  # never frozen
    assert dict(attach(tiny).state_dict()) == {}  # the wrapper owns no copy of the weights


def test_unknown_names_list_close_real_ones(tiny):
    with pytest.raises(Exception, match="blocks.0"):
        attach(tiny).run_with_hooks(torch.zeros(1, 4, dtype=torch.long), fwd_hooks=[("blocks.O", lambda t, h: t)])


class Twice(nn.Module):
    """One submodule called twice, an in-place edit after it, and structured outputs."""

    @dataclass
    class Out:
        hidden: torch.Tensor
        extra: torch.Tensor

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.pair = PairModule()

    def forward(self, x):
        a = self.lin(x)
        b = self.lin(a)
        a.mul_(10)  # in place, after `lin` returned it
        first, second = self.pair(b)
        return Twice.Out(first + second + a, second)


class PairModule(nn.Module):
    def forward(self, x):
        return x + 1, {"doubled": x * 2}["doubled"]


def test_calls_elements_and_in_place_edits():
    torch.manual_seed(0)
    model = Twice()
    x = torch.randn(2, 4)
    hooked = attach(model)
    with torch.no_grad():
        a = model.lin(x)
        b = model.lin(a)
        _, cache = hooked.run_with_cache(x, names_filter=["lin#0", "lin#1", "pair[1]", "pair"])
    assert torch.equal(cache["lin#0"], a)  # a copy: the later a.mul_(10) did not reach it
    assert torch.equal(cache["lin#1"], b)
    assert torch.equal(cache["pair[1]"], b * 2) and torch.equal(cache["pair"], b + 1)  # plain name: first tensor
    with torch.no_grad():
        out = hooked.run_with_hooks(x, fwd_hooks=[("lin#1", lambda t, hook: torch.zeros_like(t))])
    assert torch.equal(out.extra, torch.zeros(2, 4))  # only the second call was replaced
    with torch.no_grad():
        out = hooked.run_with_hooks(x, fwd_hooks=[("pair[0]", lambda t, hook: t * 0)])
    assert torch.equal(out.hidden, b * 2 + a * 10)
    assert _torch_hooks_left(model) == 0


def test_inputs_on_request(tiny):
    idx = torch.randint(0, 50, (2, 6))
    hooked = attach(tiny, inputs=True)
    with torch.no_grad():
        _, cache = hooked.run_with_cache(idx, names_filter=["blocks.0", "blocks.1.input"])
    torch.testing.assert_close(cache["blocks.1.input"], cache["blocks.0"])


def test_batched_equals_one_by_one(tiny):
    idx = torch.randint(0, 50, (3, 7))
    hooked = attach(tiny)
    with torch.no_grad():
        _, batch = hooked.run_with_cache(idx, names_filter=["blocks.1"])
        for i in range(3):
            _, one = hooked.run_with_cache(idx[i:i + 1], names_filter=["blocks.1"])
            torch.testing.assert_close(batch["blocks.1"][i:i + 1], one["blocks.1"], atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_transformers_smollm2_block_outputs_equal_hidden_states(smollm2_hf, smollm2):
    ids = smollm2.to_tokens("The Eiffel Tower is located in the city of")
    with torch.no_grad():
        smollm2_hf(input_ids=ids, output_hidden_states=True)
    theirs = _torch_hooks_left(smollm2_hf)
    hooked = attach(smollm2_hf)
    n = smollm2_hf.config.num_hidden_layers
    names = [f"model.layers.{i}" for i in range(n)] + ["model.norm"]
    with torch.no_grad():
        out, cache = hooked.run_with_cache(input_ids=ids, names_filter=names, output_hidden_states=True)
    hidden = out.hidden_states
    for i in range(n - 1):
        assert torch.equal(cache[f"model.layers.{i}"], hidden[i + 1])
    assert torch.equal(cache["model.norm"], hidden[n])  # transformers' last entry is after the final norm
    assert _torch_hooks_left(smollm2_hf) == theirs


@pytest.mark.slow
def test_transformers_minilm_block_outputs_equal_hidden_states(minilm_hf, minilm):
    ids = minilm.tokenize("American shrew mole").tokens
    hooked = attach(minilm_hf)
    names = [f"encoder.layer.{i}" for i in range(minilm_hf.config.num_hidden_layers)]
    with torch.no_grad():
        out, cache = hooked.run_with_cache(input_ids=ids, names_filter=names, output_hidden_states=True)
    for i, name in enumerate(names):
        assert torch.equal(cache[name], out.hidden_states[i + 1])


@pytest.mark.parametrize("by", ["layer_pos", "layer"])
def test_patching_through_attach_equals_the_converted_model(llama, llama_dir, by):
    from transformers import AutoModelForCausalLM

    from interp.patching import activation_patch, logit_diff

    hf = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32, attn_implementation="eager").eval()
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 1000, (2, 6), generator=g)
    corrupted = clean.clone()
    corrupted[:, 2] = torch.randint(0, 1000, (2,), generator=g)
    metric = logit_diff(torch.tensor([5, 7]), torch.tensor([9, 11]))
    hooked = attach(hf)
    assert hooked.cfg.n_layers == llama.cfg.n_layers and hooked.cfg.causal
    via_attach = activation_patch(hooked, clean, corrupted, kind="model.layers.{layer}", by=by, metric=metric,
                                  progress=False)
    converted = activation_patch(llama, clean, corrupted, kind="resid_post", by=by, metric=metric, progress=False)
    torch.testing.assert_close(via_attach.per_prompt, converted.per_prompt, atol=1e-4, rtol=1e-5)
    lo = via_attach.corrupted_metric.view(-1, *([1] * (via_attach.per_prompt.dim() - 1)))
    assert (via_attach.per_prompt - lo).abs().max() > 0.1  # the patches do something
    assert _torch_hooks_left(hf) == 0
    from interp.tokens import NoTokenizerError

    with pytest.raises(NoTokenizerError, match="token ids"):
        activation_patch(hooked, ["some text"], ["more text"], kind="model.layers.{layer}", metric=metric)


def test_an_unconverted_architecture_gpt_neox_caches_its_hidden_states():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32)
    hf = GPTNeoXForCausalLM(cfg).eval()
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        hf(input_ids=ids, output_hidden_states=True)
    theirs = _torch_hooks_left(hf)  # transformers installs output-capturing hooks of its own
    hooked = attach(hf)
    names = [f"gpt_neox.layers.{i}" for i in range(3)]
    with torch.no_grad():
        out, cache = hooked.run_with_cache(input_ids=ids, names_filter=names + ["gpt_neox.final_layer_norm"],
                                           output_hidden_states=True)
    for i in range(2):
        assert torch.equal(cache[names[i]], out.hidden_states[i + 1])
    assert torch.equal(cache["gpt_neox.final_layer_norm"], out.hidden_states[3])
    assert hooked.cfg.n_layers == 3 and hooked.cfg.causal
    assert _torch_hooks_left(hf) == theirs  # ours are gone, theirs untouched


def test_activation_patching_on_a_users_own_model_equals_a_hand_loop(tiny):
    from interp.patching import activation_patch, logit_diff

    g = torch.Generator().manual_seed(3)
    clean = torch.randint(0, 50, (1, 6), generator=g)
    corrupted = clean.clone()
    corrupted[0, 1] = (clean[0, 1] + 7) % 50
    metric = logit_diff(3, 4)
    got = activation_patch(attach(tiny), clean, corrupted, kind="blocks.{layer}", by="layer_pos", metric=metric,
                           progress=False)
    with torch.no_grad():
        acts = {}
        hs = [b.register_forward_hook(lambda m, a, o, i=i: acts.__setitem__(i, o.clone()))
              for i, b in enumerate(tiny.blocks)]
        tiny(clean)
        for h in hs:
            h.remove()
        for layer in range(2):
            for pos in range(6):
                def put(m, a, o, layer=layer, pos=pos):
                    o = o.clone()
                    o[:, pos] = acts[layer][:, pos]
                    return o

                h = tiny.blocks[layer].register_forward_hook(put)
                logits = tiny(corrupted)
                h.remove()
                want = float(logits[0, -1, 3] - logits[0, -1, 4])
                assert float(got.per_prompt[0, layer, pos]) == pytest.approx(want, abs=1e-5)


def test_attention_patterns_where_the_model_exposes_them(llama, llama_dir, tiny):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.randint(0, 1000, (2, 7), generator=torch.Generator().manual_seed(0))
    patterns = attach(hf).attention_patterns(input_ids=ids)
    _, cache = llama.run_with_cache(ids)
    for layer, pattern in enumerate(patterns):
        torch.testing.assert_close(pattern, cache["pattern", layer], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="does not expose attention patterns"):
        attach(tiny).attention_patterns(torch.zeros(1, 4, dtype=torch.long))
    from transformers import AutoTokenizer

    view = attach(hf, tokenizer=AutoTokenizer.from_pretrained(llama_dir)).attention_view("The mole dug", layer=1)
    assert view.component == "AttentionHeads" and len(view.props["attention"]) == hf.config.num_attention_heads
    sdpa = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    try:  # transformers may fall back to eager attention itself when asked for weights
        fused = attach(sdpa).attention_patterns(input_ids=ids)
    except ValueError as e:
        assert "attn_implementation='eager'" in str(e)
    else:
        torch.testing.assert_close(fused[0], patterns[0], atol=1e-5, rtol=1e-5)


def test_t5_encoder_blocks_cache_and_hooks_in_any_order():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0)
    t5 = T5ForConditionalGeneration(cfg).eval()
    hooked = attach(t5)
    assert not hooked.cfg.causal  # an encoder-decoder's encoder sees both sides
    ids, dec = torch.randint(0, 100, (2, 6)), torch.zeros(2, 3, dtype=torch.long)
    names = ["encoder.final_layer_norm", "encoder.block.0", "decoder.block.1[0]"]  # any order, any depth
    with torch.no_grad():
        out, cache = hooked.run_with_cache(input_ids=ids, decoder_input_ids=dec, names_filter=names,
                                           output_hidden_states=True)
    assert torch.equal(cache["encoder.block.0"], out.encoder_hidden_states[1])
    assert torch.equal(cache["encoder.final_layer_norm"], out.encoder_hidden_states[2])  # the last entry is normed
    assert cache["decoder.block.1[0]"].shape == (2, 3, 32)


def test_caching_builds_no_graph_unless_gradients_are_asked_for(tiny):
    idx = torch.randint(0, 50, (2, 5))
    hooked = attach(tiny)
    assert all(p.requires_grad for p in tiny.parameters())  # the user's model trains
    out, cache = hooked.run_with_cache(idx, names_filter=["blocks.0"])
    assert out.grad_fn is None and not cache["blocks.0"].requires_grad
    out, cache = hooked.run_with_cache(idx, names_filter=["blocks.0"], incl_bwd=True,
                                       backward_metric=lambda logits: logits[:, -1, 0].sum())
    assert cache["blocks.0_grad"].shape == cache["blocks.0"].shape and cache["blocks.0_grad"].abs().sum() > 0
    tiny.zero_grad(set_to_none=True)  # the user's parameters got .grad from the backward they asked for


def test_probing_features_from_an_attached_model_equal_the_converted_ones(llama, llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from interp.positions import word
    from interp.probing.linear import collect_features

    hf = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    hooked = attach(hf, tokenizer=AutoTokenizer.from_pretrained(llama_dir))
    examples = ["The mole dug a tunnel", "One mole of gas", "A mole on her arm was removed"]
    assert hooked.to_str_tokens(examples[0]) == llama.to_str_tokens(examples[0])
    ours = collect_features(hooked, examples, hook="model.layers.{layer}", position=word("mole"))
    converted = collect_features(llama, examples, hook="resid_post", position=word("mole"))
    torch.testing.assert_close(ours, converted, atol=1e-4, rtol=1e-5)


def test_head_detectors_on_an_attached_model_equal_the_converted_model(llama, llama_dir):
    from transformers import AutoModelForCausalLM

    from interp.probing.detectors import detect_heads, repeated_random_tokens

    hf = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32, attn_implementation="eager").eval()
    hooked = attach(hf)
    tokens = repeated_random_tokens(llama, seq_len=6, n_repeats=2, batch=3)
    ours, converted = detect_heads(hooked, tokens=tokens), detect_heads(llama, tokens=tokens)
    assert set(ours) == set(converted)
    for name in ours:
        torch.testing.assert_close(ours[name].per_prompt, converted[name].per_prompt, atol=1e-5, rtol=1e-5)
