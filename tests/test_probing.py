"""Head detectors, attention-flow probes, in-context learning and attention views.

Detectors are checked on hand-built patterns (analytic values), through the model with
patterns forced by a hook, and against TransformerLens 4.3's head_detector on our models.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

import models
from interp.positions import PositionNotFound, TokenizedPrompt, last_token, word
from interp.probing import (
    attention_flow,
    bos_mask,
    detect_heads,
    duplicate_token_mask,
    entropy,
    in_context_learning,
    induction_mask,
    local_mask,
    mask_score,
    previous_token_mask,
    random_tokens,
    repeated_random_tokens,
    special_token_ids,
)
from interp.views import cache_attention


def causal_uniform(n: int) -> torch.Tensor:
    return torch.tril(torch.ones(n, n)) / torch.arange(1, n + 1)[:, None]


def pure(mask: torch.Tensor) -> torch.Tensor:
    """A pattern putting all of each row's attention evenly on its mask (rows without a target on themselves)."""
    p = mask.float()
    empty = p.sum(-1) == 0
    p[empty, torch.arange(len(p))[empty]] = 1.0
    return p / p.sum(-1, keepdim=True)


# ---------------------------------------------------------------------- hand-built patterns
def test_pure_heads_score_one_and_uniform_scores_the_analytic_baseline():
    n = 12
    tokens = torch.tensor([7, 3, 5, 9, 3, 5, 9, 2, 3, 5, 8, 1])
    for mask_fn in (previous_token_mask, duplicate_token_mask, induction_mask, bos_mask):
        mask = mask_fn(tokens)
        assert_close(mask_score(pure(mask), mask), torch.tensor(1.0))
    uniform = causal_uniform(n)
    # Previous token under uniform causal attention: query q has q + 1 keys, one of them the target.
    expected = sum(1 / (q + 1) for q in range(1, n)) / (n - 1)
    assert_close(mask_score(uniform, previous_token_mask(tokens)), torch.tensor(expected))
    # TransformerLens' normalisation divides by every row: a pure previous-token head gets (n - 1) / n.
    assert_close(mask_score(pure(previous_token_mask(tokens)), previous_token_mask(tokens), normalize="all"),
                 torch.tensor((n - 1) / n))
    # Duplicates: the queries with earlier copies are 4 (3), 5 (5), 6 (9), 8 (3), 9 (5, twice earlier)...
    dup = duplicate_token_mask(tokens)
    rows = dup.any(-1)
    expected_dup = (dup.float().sum(-1)[rows] / torch.arange(1, n + 1)[rows]).mean()
    assert_close(mask_score(uniform, dup), expected_dup)


def test_masks_by_hand():
    t = torch.tensor([4, 6, 4, 6, 4])
    assert previous_token_mask(t).nonzero().tolist() == [[1, 0], [2, 1], [3, 2], [4, 3]]
    assert duplicate_token_mask(t).nonzero().tolist() == [[2, 0], [3, 1], [4, 0], [4, 2]]
    # induction: the token after each earlier copy (query 2 -> key 1, query 4 -> keys 1 and 3, query 3 -> key 2)
    assert induction_mask(t).nonzero().tolist() == [[2, 1], [3, 2], [4, 1], [4, 3]]
    assert local_mask(t, 2).nonzero().tolist() == [[1, 0], [2, 0], [2, 1], [3, 1], [3, 2], [4, 2], [4, 3]]
    assert local_mask(t, 1, causal=False).sum() == 8


def test_entropy_of_uniform_attention():
    n = 9
    assert_close(entropy(causal_uniform(n)), torch.tensor(sum(math.log(q + 1) for q in range(1, n)) / (n - 1)))
    assert_close(entropy(torch.full((n, n), 1 / n), first_query=0), torch.tensor(math.log(n)))


def test_excluding_bos_renormalises_the_row():
    p = torch.tensor([[1.0, 0, 0], [0.5, 0.5, 0], [0.6, 0.3, 0.1]])
    mask = previous_token_mask(torch.tensor([1, 2, 3]))
    # Query 1's only target is BOS, excluded, so the row drops out; query 2 puts 0.3 of its 0.4
    # non-BOS mass on its previous token.
    got = mask_score(p, mask, exclude_bos=True)
    assert_close(got, torch.tensor(0.3 / 0.4))


# ---------------------------------------------------------------------- through the model
def force_pattern(model, layer: int, head: int, pattern: torch.Tensor):
    def hook(p, hook):
        p = p.clone()
        p[:, head] = pattern.to(p.dtype)
        return p

    return model.hooks(fwd_hooks=[(f"blocks.{layer}.attn.hook_pattern", hook)])


def test_detect_heads_scores_forced_patterns(attn_only):
    tokens = repeated_random_tokens(attn_only, seq_len=5, n_repeats=3, batch=1, prepend_bos=False)
    seq = tokens[0]
    cases = {"previous_token": previous_token_mask, "induction": induction_mask, "duplicate_token": duplicate_token_mask}
    for name, mask_fn in cases.items():
        with force_pattern(attn_only, 1, 2, pure(mask_fn(seq))):
            scores = detect_heads(attn_only, tokens=tokens, detectors=[name])[name]
        assert_close(scores.mean[1, 2], torch.tensor(1.0))
        assert scores.top(1)[0][:2] == (1, 2)
    with force_pattern(attn_only, 0, 1, causal_uniform(seq.shape[0])):
        ent = detect_heads(attn_only, tokens=tokens, detectors=["entropy"])["entropy"].mean[0, 1]
    assert_close(ent, entropy(causal_uniform(seq.shape[0])))


@pytest.mark.parametrize("fixture", ["llama", "gpt2"])
def test_detectors_agree_with_transformer_lens_head_detector(request, fixture):
    from transformer_lens.head_detector import detect_head

    model = request.getfixturevalue(fixture)
    prompts = ["The cat sat on the mat and the cat sat again", "one two three one two three one two"]
    for ours, theirs in (("previous_token", "previous_token_head"), ("duplicate_token", "duplicate_token_head"),
                         ("induction", "induction_head")):
        for flags in ({}, {"exclude_bos": True}, {"exclude_current_token": True}):
            got = detect_heads(model, prompts=prompts, detectors=[ours], normalize="all", **flags)[ours].mean
            want = detect_head(model, prompts, theirs, **flags)
            assert_close(got, want.float(), atol=1e-5, rtol=1e-5, msg=f"{ours} {flags}")


def test_detectors_agree_with_tl_on_the_trained_model():
    from transformer_lens.head_detector import detect_head

    model = models.load("attn-only-2l")
    seq = "t5 t17 t9 t5 t17 t9 t33 t5 t17 t9"
    for ours, theirs in (("previous_token", "previous_token_head"), ("induction", "induction_head")):
        got = detect_heads(model, prompts=[seq], detectors=[ours], normalize="all")[ours].mean
        assert_close(got, detect_head(model, seq, theirs).float(), atol=1e-5, rtol=1e-5)


def test_random_token_datasets_are_reproducible_and_avoid_special_tokens(llama):
    a = random_tokens(llama, 4, 30, seed=3)
    assert torch.equal(a, random_tokens(llama, 4, 30, seed=3)) and not torch.equal(a, random_tokens(llama, 4, 30, seed=4))
    special = special_token_ids(llama)
    assert special and not any(int(t) in special for t in a[:, 1:].flatten())
    assert (a[:, 0] == llama.tokenizer.bos_token_id).all()
    rep = repeated_random_tokens(llama, 7, 3, batch=2, seed=1)
    assert rep.shape == (2, 22) and torch.equal(rep[:, 1:8], rep[:, 8:15]) and torch.equal(rep[:, 1:8], rep[:, 15:22])


# ---------------------------------------------------------------------- attention flow
def test_attention_flow_equals_hand_computation(llama):
    prompts = ["The Eiffel tower is tall", "Near the river stands the Eiffel tower today"]
    flow = attention_flow(llama, prompts, source=word("tower"), target=word("Eiffel"))
    for i, text in enumerate(prompts):
        tp = TokenizedPrompt.from_model(llama, text)
        src, tgt = word("tower")(tp), word("Eiffel")(tp)
        _, cache = llama.run_with_cache(tp.tokens[None])
        for layer in range(llama.cfg.n_layers):
            pat = cache["pattern", layer][0]  # [head, q, k]
            by_hand = torch.stack([pat[:, q][:, tgt].sum(-1) for q in src]).mean(0)
            assert_close(flow.per_prompt[i, layer], by_hand)
    assert flow.mean.shape == (2, 4) and flow.std.shape == (2, 4)


def test_attention_flow_is_zero_forward_in_causal_models_and_names_missing_words(llama):
    flow = attention_flow(llama, ["Eiffel built a tower"], source=word("Eiffel"), target=last_token())
    assert (flow.mean == 0).all()
    with pytest.raises(PositionNotFound, match="mole"):
        attention_flow(llama, ["no such word here"], source="mole", target=last_token())


def test_attention_flow_with_per_prompt_fields(llama):
    from interp.positions import field_word

    prompts = [{"text": "When Mary and John went out, John gave a drink to", "io": "Mary"},
               {"text": "When Anna and Tom went out, Tom gave a drink to", "io": "Anna"}]
    flow = attention_flow(llama, prompts, source=last_token(), target=field_word("io", occurrence=0))
    assert flow.per_prompt.shape == (2, 2, 4) and (flow.per_prompt >= 0).all()


# ---------------------------------------------------------------------- in-context learning
def test_in_context_learning_equals_hand_computed_loss(llama):
    result = in_context_learning(llama, seq_len=10, n_repeats=3, batch=4, seed=2)
    tokens = repeated_random_tokens(llama, 10, 3, 4, seed=2)
    logits = llama(tokens)
    logp = logits[:, :-1].log_softmax(-1)
    loss = -logp.gather(-1, tokens[:, 1:, None])[..., 0][:, 1:]  # skip predicting the first random token
    assert_close(result.loss_per_position, loss.mean(0))
    assert_close(result.loss_per_repeat[0], loss[:, :9].mean())
    assert_close(result.loss_per_repeat[2], loss[:, 19:29].mean())
    assert result.score == pytest.approx(float(result.loss_per_repeat[2] - result.loss_per_repeat[0]))
    with pytest.raises(ValueError, match="causal"):
        in_context_learning(_Encoder())


class _Encoder:
    class cfg:  # noqa: N801
        causal = False
        model_name = "encoder"

    unembed = None


# ---------------------------------------------------------------------- views and the census
def test_cache_views_pick_the_right_component(llama, bert):
    for model, causal in ((llama, True), (bert, False)):
        toks = model.to_str_tokens("The tower is tall")
        _, cache = model.run_with_cache("The tower is tall")
        grid = cache_attention(cache, 1, toks)
        assert grid.component == "AttentionHeads" and grid.props["maskUpperTri"] is causal
        assert len(grid.props["attention"]) == model.cfg.n_heads
        zoom = cache_attention(cache, 1, toks, head=2)
        assert zoom.component == "AttentionPattern" and zoom.props["attention"] == cache["pattern", 1][0, 2].tolist()
        colored = cache_attention(cache, 1, toks, head=2, query=-1)
        assert colored.component == "ColoredTokens"
        assert colored.props["values"] == cache["pattern", 1][0, 2, -1].tolist()


def test_census_on_the_two_layer_model_finds_the_framework_heads(tmp_path):
    from analyses.framework import framework_study
    from analyses.heads import head_census

    model = models.load("attn-only-2l")
    census = head_census(model)
    framework = framework_study(n_examples=16)
    assert census.top("previous_token", 1)[0][:2] == framework.previous_token_head
    assert set(census.heads_above("induction", 0.3)) == set(framework.induction_heads)
    index = census.save(tmp_path)
    page = index.read_text()
    assert page.count("var CircuitsVis=") == 1 and "<svg" in page
    assert census.icl.score < -2.0


@pytest.mark.slow
def test_smollm2_has_induction_heads_and_learns_in_context():
    from analyses.heads import head_census

    census = head_census(models.load("smollm2-135m"))
    layer, head, score, _ = census.top("induction", 1)[0]
    assert score >= 0.4
    first, second = census.icl.loss_per_repeat.tolist()
    assert second < 0.5 * first
