"""`interp.gradients` and the gradient-flow study, checked against `torch.autograd` run by hand on the
`transformers` models and on plain PyTorch RNNs (one loss, one backward per target, in the test)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import models
from family_specs import build_hf, randomize_
from interp import attach
from interp.gradients import GradientError, gradient_map, residual_gradients, step_gradients

TOL = dict(atol=1e-5, rtol=1e-5)
VOCAB, T = 1000, 10
TARGETS = [0, 4, 8]


def _tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(5, VOCAB, (T,), generator=torch.Generator().manual_seed(seed))


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=32, vocab_size=VOCAB,
                                          bos_token_id=1, eos_token_id=2))
    randomize_(hf, seed=1)
    return hf.eval()


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                      max_position_embeddings=32, tie_word_embeddings=False,
                                      attn_implementation="eager"))
    randomize_(hf, seed=2)
    return hf.eval()


def _bert(head: bool):
    from transformers import BertConfig, BertForMaskedLM, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                     vocab_size=VOCAB, max_position_embeddings=32, type_vocab_size=2, attn_implementation="eager")
    hf = BertForMaskedLM(cfg) if head else BertModel(cfg, add_pooling_layer=False)
    randomize_(hf, seed=3)
    return hf.eval()


def _layers(hf):
    return next(m for m in hf.modules() if isinstance(m, nn.ModuleList) and len(m) == hf.config.num_hidden_layers)


def _hf_grads(hf, tokens, target, kind, mask_id=3, record=()):
    """By hand: one forward and one backward of the loss at `target`; gradients w.r.t. every layer's input,
    the last layer's output, the token embedding's output and each (name, tensor) that `record` captures."""
    ids = tokens.clone()
    if kind == "masked":
        ids[target] = mask_id
    layers = _layers(hf)
    seen, handles = {}, []
    handles.append(hf.get_input_embeddings().register_forward_hook(lambda m, a, o: seen.__setitem__("embed", o)))
    handles.append(layers[-1].register_forward_hook(
        lambda m, a, o: seen.__setitem__("final", o[0] if isinstance(o, tuple) else o)))
    for name, module, which in record:
        if which == "in":
            handles.append(module.register_forward_pre_hook(lambda m, a, name=name: seen.__setitem__(name, a[0])))
        else:
            handles.append(module.register_forward_hook(
                lambda m, a, o, name=name: seen.__setitem__(name, o[0] if isinstance(o, tuple) else o)))
    try:
        out = hf(ids[None], output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    if kind == "next_token":
        loss = nn.functional.cross_entropy(out.logits[0, target], tokens[target + 1])
    elif getattr(out, "logits", None) is not None:
        loss = nn.functional.cross_entropy(out.logits[0, target], tokens[target])
    else:  # headless: the tied readout
        loss = nn.functional.cross_entropy(out.last_hidden_state[0, target] @ hf.get_input_embeddings().weight.T,
                                           tokens[target])
    n = hf.config.num_hidden_layers
    inputs = list(out.hidden_states[:n]) + [seen["final"], seen["embed"]] + [seen[name] for name, _, _ in record]
    grads = torch.autograd.grad(loss, inputs, retain_graph=True)
    return loss, [g[0] for g in grads], seen  # batch of one: [pos, d]


CASES = {"gpt2": (_gpt2, "next_token"), "llama": (_llama, "next_token"),
         "gpt_neox (parallel)": (lambda: build_hf("gpt_neox", seed=5), "next_token"),
         "bert (post-LN, MLM head)": (lambda: _bert(True), "masked"),
         "bert (headless, tied readout)": (lambda: _bert(False), "masked")}


@pytest.mark.parametrize("case", list(CASES))
def test_residual_gradients_equal_autograd_on_the_transformers_model(case):
    build, kind = CASES[case]
    hf = build()
    model = models.load(hf)
    tokens = _tokens()
    targets = TARGETS if kind == "next_token" else [1, 5, 9]
    res = residual_gradients(model, tokens, targets, keep_grads=True, mask_token_id=3, chunk_size=2)
    assert res.loss == kind
    n = model.cfg.n_layers
    for row, t in enumerate(targets):
        loss, grads, _ = _hf_grads(hf, tokens, t, kind)
        torch.testing.assert_close(res.losses[row], loss.detach(), **TOL)
        for layer in range(n):
            ours = res.grads[f"blocks.{layer}.hook_resid_pre"][row]
            torch.testing.assert_close(ours, grads[layer], **TOL)
            torch.testing.assert_close(res.norms[1 + layer, row], grads[layer].norm(dim=-1), **TOL)
        torch.testing.assert_close(res.grads[res.sites[-1]][row], grads[n], **TOL)
        torch.testing.assert_close(res.grads["hook_embed"][row], grads[n + 1], **TOL)
        if kind == "next_token":  # a causal model: nothing after the target gets a gradient
            assert float(res.norms[:, row, t + 1:].sum()) == 0.0
            assert float(res.norms[0, row, : t + 1].min()) > 0
    # the split sums to the total, as vectors
    assert res.split_error < 1e-5
    for layer in range(n):
        total = res.grads[f"blocks.{layer}.hook_resid_pre"]
        parts = [res.grads[f"blocks.{layer}.hook_resid_pre:{p}"] for p in ("residual", "attn", "mlp")]
        torch.testing.assert_close(sum(parts), total, **TOL)
        torch.testing.assert_close(res.grads[f"blocks.{layer}.hook_resid_pre:block"], parts[1] + parts[2], **TOL)


def _input_of(hf, tokens, t, kind, layer, record):
    """Like _hf_grads, also recording the layer's own input tensor (for VJPs into it)."""
    blk = _layers(hf)[layer]
    return _hf_grads(hf, tokens, t, kind, record=[("x", blk, "in")] + record)


def test_split_parts_equal_hand_vjps_in_a_pre_norm_block():
    hf = _llama()
    model = models.load(hf)
    tokens, layer, t = _tokens(1), 0, 8
    res = residual_gradients(model, tokens, [t], keep_grads=True)
    blk = _layers(hf)[layer]
    record = [("mid", blk.post_attention_layernorm, "in"), ("attn_out", blk.self_attn, "out"),
              ("mlp_out", blk.mlp, "out"), ("post", blk, "out")]
    _, grads, seen = _input_of(hf, tokens, t, "next_token", layer, record)
    g_mid, g_post = grads[-4], grads[-1]
    hand = {"residual": g_post,
            "attn": torch.autograd.grad(seen["attn_out"], seen["x"], g_mid[None], retain_graph=True)[0][0],
            "mlp": torch.autograd.grad(seen["mlp_out"], seen["mid"], g_post[None], retain_graph=True)[0][0]}
    for part, value in hand.items():
        torch.testing.assert_close(res.grads[f"blocks.{layer}.hook_resid_pre:{part}"][0], value, **TOL)
        torch.testing.assert_close(res.parts[("residual", "block", "attn", "mlp").index(part), 0, 0],
                                   value.norm(dim=-1), **TOL)
    assert float(hand["attn"].norm()) > 1e-3 and float(hand["mlp"].norm()) > 1e-3  # neither part is trivially 0


def test_split_parts_equal_hand_vjps_in_a_parallel_block():
    hf = build_hf("gpt_neox", seed=5)
    model = models.load(hf)
    tokens, layer, t = _tokens(2), 1, 7
    res = residual_gradients(model, tokens, [t], keep_grads=True)
    blk = _layers(hf)[layer]
    _, grads, seen = _input_of(hf, tokens, t, "next_token", layer,
                               [("attn_out", blk.attention, "out"), ("mlp_out", blk.mlp, "out"),
                                ("post", blk, "out")])
    g_post = grads[-1]
    hand = {"residual": g_post,
            "attn": torch.autograd.grad(seen["attn_out"], seen["x"], g_post[None], retain_graph=True)[0][0],
            "mlp": torch.autograd.grad(seen["mlp_out"], seen["x"], g_post[None], retain_graph=True)[0][0]}
    for part, value in hand.items():
        torch.testing.assert_close(res.grads[f"blocks.{layer}.hook_resid_pre:{part}"][0], value, **TOL)


def test_split_parts_equal_hand_vjps_in_a_post_ln_block():
    """BERT: x -> LN1(x + attn(x)) = m -> LN2(m + mlp(m)). residual = the skip through both norms,
    J_LN1^T dL/d(LN2 input); MLP = VJP of the MLP's output into LN1's input; attention = VJP into x."""
    hf = _bert(True)
    model = models.load(hf)
    tokens, layer, t = _tokens(3), 0, 4
    res = residual_gradients(model, tokens, [t], keep_grads=True, mask_token_id=3)
    blk = _layers(hf)[layer]
    ln1, ln2 = blk.attention.output.LayerNorm, blk.output.LayerNorm
    _, grads, seen = _input_of(hf, tokens, t, "masked", layer,
                               [("ln1_in", ln1, "in"), ("ln1_out", ln1, "out"),
                                ("attn_out", blk.attention.output.dense, "out"), ("mlp_out", blk.output.dense, "out"),
                                ("ln2_in", ln2, "in")])
    g_ln1_in, g_ln2_in = grads[-5], grads[-1]
    hand = {"residual": torch.autograd.grad(seen["ln1_out"], seen["ln1_in"], g_ln2_in[None], retain_graph=True)[0][0],
            "attn": torch.autograd.grad(seen["attn_out"], seen["x"], g_ln1_in[None], retain_graph=True)[0][0],
            "mlp": torch.autograd.grad(seen["mlp_out"], seen["ln1_in"], g_ln2_in[None], retain_graph=True)[0][0]}
    for part, value in hand.items():
        torch.testing.assert_close(res.grads[f"blocks.{layer}.hook_resid_pre:{part}"][0], value, **TOL)


def test_rows_of_several_sequences_equal_one_run_per_sequence():
    model = models.load(_gpt2())
    a, b = _tokens(4), _tokens(5)
    both = residual_gradients(model, torch.stack([a, b]), [2, 6], chunk_size=3)
    for i, seq in enumerate((a, b)):
        one = residual_gradients(model, seq, [2, 6])
        rows = both.sequence == i
        torch.testing.assert_close(both.norms[:, rows], one.norms, **TOL)
        torch.testing.assert_close(both.parts[:, :, rows], one.parts, **TOL)
    assert both.loss_positions.tolist() == [2, 6, 2, 6]


def test_by_distance_averages_the_pairs_at_each_distance():
    from interp.gradients import GradientMap

    norms = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)  # [site, row, pos]
    grads = GradientMap(["a", "b"], norms, torch.tensor([3, 1, 2]), torch.zeros(3), causal=True)
    table = grads.by_distance()
    for site in range(2):
        for d in range(4):
            values = [float(norms[site, r, t - d]) for r, t in enumerate([3, 1, 2]) if t - d >= 0]
            assert float(table[site, d]) == pytest.approx(sum(values) / len(values))
    both = GradientMap(["a", "b"], norms, torch.tensor([3, 1, 2]), torch.zeros(3), causal=False).by_distance()
    assert float(both[0, 1]) == pytest.approx((2 + 4 + 6 + 9 + 11) / 5)  # |t - s| = 1 on both sides
    torch.testing.assert_close(grads.at_distance(2)[0], torch.tensor([1.0, float("nan"), 8.0]), equal_nan=True)


# ---------------------------------------------------------------------- recurrent models through attach
class TinyRNNLM(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.rnn = (nn.LSTM if kind == "lstm" else nn.GRU)(8, 12, num_layers=2, batch_first=True)
        self.head = nn.Linear(12, 20)

    def forward(self, tokens):
        hidden, _ = self.rnn(self.embed(tokens))
        return self.head(hidden)


def _torch_hooks_left(module):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_step_gradients_equal_autograd_on_plain_rnns(kind):
    torch.manual_seed(0)
    model = TinyRNNLM(kind).eval()
    gen = torch.Generator().manual_seed(1)
    tokens, labels = torch.randint(0, 20, (3, 9), generator=gen), torch.randint(0, 20, (3,), generator=gen)
    positions = torch.tensor([8, 3, 6])
    grads = step_gradients(attach(model), tokens, labels, positions, keep_grads=True)
    assert grads.sites == ["hook_embed", "rnn"] and _torch_hooks_left(model) == 0
    for b in range(3):  # by hand: one row, one loss, one backward
        embedded = model.embed(tokens[b:b + 1]).detach().requires_grad_(True)
        hidden, _ = model.rnn(embedded)
        loss = nn.functional.cross_entropy(model.head(hidden)[0, positions[b]], labels[b])
        g_embed, g_hidden = torch.autograd.grad(loss, [embedded, hidden])
        torch.testing.assert_close(grads.grads["hook_embed"][b], g_embed[0], **TOL)
        torch.testing.assert_close(grads.grads["rnn"][b], g_hidden[0], **TOL)
        torch.testing.assert_close(grads.norms[0, b], g_embed[0].norm(dim=-1), **TOL)
        torch.testing.assert_close(grads.losses[b], loss.detach(), **TOL)
        t = int(positions[b])
        # the output sequence gets only the direct part (at the scored step); the input reaches every step <= t
        assert float(g_hidden[0, :t].abs().sum()) == 0 and float(g_hidden[0, t].abs().sum()) > 0
        assert float(g_embed[0, : t + 1].norm(dim=-1).min()) > 0 and float(g_embed[0, t + 1:].abs().sum()) == 0


def test_recurrent_sites_need_a_batch_first_rnn():
    class TimeFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.rnn = nn.Embedding(5, 4), nn.GRU(4, 4)

        def forward(self, x):
            return self.rnn(self.embed(x))[0]

    with pytest.raises(GradientError, match="batch_first"):
        step_gradients(attach(TimeFirst()), torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    with pytest.raises(GradientError, match="no nn.LSTM"):
        step_gradients(attach(nn.Sequential(nn.Embedding(5, 4))), torch.zeros(2, 3, dtype=torch.long),
                       torch.zeros(2, dtype=torch.long))


# ---------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def small():
    return models.load(_llama())


def _no_hooks(model):
    return all(not hp._hooks["fwd"] and not hp._hooks["bwd"] for hp in model.hook_dict.values())


def test_bad_input_errors_name_the_problem(small):
    tokens = _tokens()
    with pytest.raises(GradientError, match="layer 5 does not exist"):
        residual_gradients(small, tokens, layers=[5])
    with pytest.raises(GradientError, match=r"target position 9 is out of range.*0\.\.8"):
        residual_gradients(small, tokens, [9])
    with pytest.raises(GradientError, match="bidirectional model"):
        residual_gradients(small, tokens, loss="masked")
    with pytest.raises(GradientError, match="loss must be"):
        residual_gradients(small, tokens, loss="mse")
    with pytest.raises(GradientError, match="at least 2 tokens"):
        residual_gradients(small, tokens[:1])
    with pytest.raises(GradientError, match="loss position 10 is out of range"):
        gradient_map(small, tokens[None], ["hook_embed"], lambda out: out[:, 0, 0], [10])
    with pytest.raises(Exception, match="blocks.0.hook_resid_typo"):
        gradient_map(small, tokens[None], ["blocks.0.hook_resid_typo"], lambda out: out[:, 0, 0], [0])

    def failing(out):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        gradient_map(small, tokens[None], ["hook_embed", "blocks.1.hook_resid_pre"], failing, [3])
    assert _no_hooks(small)


def test_a_layer_subset_measures_those_layers_only(small):
    res = residual_gradients(small, _tokens(), [5], layers=[-1])
    assert res.layers == [1] and res.sites == ["hook_embed", "blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"]
    full = residual_gradients(small, _tokens(), [5])
    torch.testing.assert_close(res.norms[1], full.norms[2], **TOL)
    torch.testing.assert_close(res.parts[:, 0], full.parts[:, 1], **TOL)


# ---------------------------------------------------------------------- the recall task and the study
def test_recall_task_puts_the_key_exactly_n_positions_before_the_query():
    from analyses.recall_task import QUERY, RecallTask

    task = RecallTask(gaps=(1, 3, 7), n_keys=5, n_noise=6)
    gen = torch.Generator().manual_seed(0)
    tokens, keys, gaps = task.sample(300, gen)
    assert tokens.shape == (300, 9) and set(gaps.tolist()) == {1, 3, 7}
    assert (tokens[:, -1] == QUERY).all() and (tokens[:, :-1] != QUERY).all()
    is_key = (tokens >= 1) & (tokens <= 5)
    assert (is_key.sum(1) == 1).all()  # one key-type token per sequence
    where = is_key.float().argmax(1)
    assert ((task.length - 1) - where == gaps).all()  # the query sits exactly n positions after it
    assert (tokens[torch.arange(300), where] == keys).all()
    assert (tokens[~is_key & (tokens != QUERY)] > 5).all() and int(tokens.max()) < task.d_vocab
    fixed = task.sample(20, gen, gap=3)
    assert (fixed[2] == 3).all() and (fixed[0][:, task.length - 4] == fixed[1]).all()
    with pytest.raises(ValueError, match="gap 8 does not fit"):
        task.sample(1, gen, gap=8)


@pytest.mark.parametrize("which", ["transformer", "lstm"])
def test_recall_gradients_equal_a_hand_loop(which):
    from analyses.gradient_flow import recall_gradients
    from analyses.recall_task import RecallTask, build_models

    task = RecallTask(gaps=(1, 3, 6))
    model = build_models(task, seed=0)[which]
    got = recall_gradients(model, task, n_per_gap=4, seed=7)
    gen = torch.Generator().manual_seed(7)  # the same sequences, then autograd row by row, in float64
    ref = model.to(torch.float64)
    last = task.length - 1
    for g, gap in enumerate(task.gaps):
        tokens, keys, _ = task.sample(4, gen, gap)
        at_key, ratios = [], []
        for b in range(4):
            seen = {}
            handle = ref.embed.register_forward_hook(lambda m, a, o: seen.setdefault("e", o))  # the token embedding
            try:
                loss = nn.functional.cross_entropy(ref(tokens[b:b + 1])[0, -1], keys[b])
                (grad,) = torch.autograd.grad(loss, seen["e"])
            finally:
                handle.remove()
            norms = grad[0].norm(dim=-1)
            at_key.append(norms[last - gap])
            ratios.append(norms[last - gap] / norms[last - 1])
        torch.testing.assert_close(got["key_norm"][g], torch.stack(at_key).log().mean().exp(), rtol=1e-9, atol=0)
        torch.testing.assert_close(got["ratio"][g], torch.stack(ratios).log().mean().exp(), rtol=1e-9, atol=0)
    assert float(got["ratio"][0]) == pytest.approx(1.0)  # gap 1: the key is at distance 1


def _check_written(result, directory):
    page = (directory / "index.html").read_text()
    assert "Gradient flow" in page and "<svg" in page
    numbers = json.loads((directory / "gradient_flow.json").read_text())
    assert numbers == json.loads(json.dumps(result.to_dict()))
    for model in ("transformer", "lstm", "gru"):
        for phase in ("init", "trained"):
            assert set(numbers["ratio_distance_n_over_1"][model][phase]) == {str(g) for g in result.task.gaps}
            assert set(numbers["accuracy"][model][phase]) == {str(g) for g in result.task.gaps}
    assert numbers["train_seconds_total"] > 0 and set(numbers["claim"]) == {"init", "trained"}
    return numbers


def test_quick_study_writes_a_page_with_the_headline_numbers(tmp_path):
    from analyses.gradient_flow import gradient_flow_study

    result = gradient_flow_study(quick=True, steps=5, real_models=())
    numbers = _check_written(result, result.save(tmp_path).parent)
    assert all(numbers["ratio_distance_n_over_1"][m]["init"]["1"] == pytest.approx(1.0) for m in result.model_names)
    assert "gap 16" in result.headline() and len(result.plot()) == 3
    assert result.to_frame().shape[0] == 3 * 2 * len(result.task.gaps)


# ---------------------------------------------------------------------- the real models (slow)
@pytest.mark.slow
def test_smollm2_gradients_equal_autograd_on_the_transformers_model(smollm2, smollm2_hf):
    """In float64 copies: in float32 SmolLM2's massive activations (~24,000) leave both implementations'
    gradients ~1e-4 apart (transformers' own eager and sdpa forwards already differ by 1.8e-4)."""
    import copy

    ours_model, hf = copy.deepcopy(smollm2).to(torch.float64), copy.deepcopy(smollm2_hf).double()
    tokens = smollm2.to_tokens("The Eiffel Tower is located in the city of")[0]
    targets = [3, len(tokens) - 2]
    res = residual_gradients(ours_model, tokens, targets, keep_grads=True)
    for row, t in enumerate(targets):
        _, grads, _ = _hf_grads(hf, tokens, t, "next_token")
        for layer in range(30):
            torch.testing.assert_close(res.grads[f"blocks.{layer}.hook_resid_pre"][row], grads[layer], **TOL)
        torch.testing.assert_close(res.grads[res.sites[-1]][row], grads[30], **TOL)
        torch.testing.assert_close(res.grads["hook_embed"][row], grads[31], **TOL)
    assert res.split_error < 1e-9


@pytest.mark.slow
def test_minilm_gradients_equal_autograd_on_the_transformers_model(minilm, minilm_hf):
    tokens = minilm.to_tokens("The doctor decided to take a biopsy of the mole")[0]
    targets = [2, 6]
    res = residual_gradients(minilm, tokens, targets, keep_grads=True)
    assert res.loss == "masked" and minilm.tokenizer.mask_token_id == 103
    for row, t in enumerate(targets):
        _, grads, _ = _hf_grads(minilm_hf, tokens, t, "masked", mask_id=103)
        for layer in range(6):
            torch.testing.assert_close(res.grads[f"blocks.{layer}.hook_resid_pre"][row], grads[layer], **TOL)
        torch.testing.assert_close(res.grads[res.sites[-1]][row], grads[6], **TOL)


@pytest.mark.slow
def test_quick_study_with_the_real_models(tmp_path, smollm2, minilm):
    from analyses.gradient_flow import gradient_flow_study

    result = gradient_flow_study(quick=True, steps=5, real_models=[smollm2, minilm])
    numbers = _check_written(result, result.save(tmp_path).parent)
    assert set(numbers["real"]) == {"smollm2-135m", "minilm-l6"}
    smol = result.real["smollm2-135m"]
    assert smol.norms.shape == (32, 11, 12) and smol.parts.shape == (4, 30, 11, 12)  # embed + 30 + final
    assert len(numbers["real"]["minilm-l6"]["split_by_layer"]["residual"]) == 6
    assert "smollm2-135m on Wikipedia text" in (tmp_path / "index.html").read_text()
