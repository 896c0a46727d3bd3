"""TransformerLens' cache methods on each stack of an encoder-decoder (issue 16, "encoder-decoder stacks
where they apply"): `cache.encoder` and `cache.decoder`.

TransformerLens' own cache methods do not reach its T5 (they look for `blocks.{l}` names), so the
oracle is `transformers`: each stack's `accumulated_resid` is its `*_hidden_states` (the last entry
through the final norm for T5, as `transformers` returns it), on random checkpoints of all five
encoder-decoder families with a left-padded source. The decompositions are checked by their
invariants: the components (cross-attention included, heads computed from hook_z and W_O) sum to
the stream each sublayer reads; with the final norm's weight set to one (so the frozen scale is the
whole norm), decoder logit attributions sum to the logit difference, T5's output scale included.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import models
from family_specs import ENCDEC_SPECS, saved_seq2seq, seq2seq_batch

TOL = dict(atol=1e-4, rtol=1e-4)
PRE_LN = ("t5", "flan_t5")


def _load(directory, tokenizer, unit_final_norm: bool = False):
    model = models.load(directory, tokenizer=tokenizer)
    if unit_final_norm:
        with torch.no_grad():
            model.decoder.ln_final.w.fill_(1.0)
    return model


def _run(model, hf=None):
    src, mask, tgt = seq2seq_batch()
    tgt[:, 0] = model.cfg.decoder_start_token_id
    logits, cache = model.run_with_cache(src, decoder_input_ids=tgt, attention_mask=mask)
    ref = None
    if hf is not None:
        with torch.no_grad():
            ref = hf(input_ids=src, attention_mask=mask, decoder_input_ids=tgt, output_hidden_states=True)
    return logits, cache, ref, tgt


@pytest.fixture(scope="module", params=list(ENCDEC_SPECS))
def run(request, tmp_path_factory, family_tokenizer):
    name = request.param
    directory = tmp_path_factory.mktemp(name)
    hf, model = saved_seq2seq(name, directory, family_tokenizer)
    logits, cache, ref, _ = _run(model, hf)
    return name, model, cache, ref, directory, family_tokenizer


def test_views_share_the_tensors_and_count_their_own_layers(run):
    name, model, cache, _, _, _ = run
    for stack in ("encoder", "decoder"):
        view = getattr(cache, stack)
        assert len(view) == sum(k.startswith(stack + ".") for k in cache)
        n = len(getattr(model, stack).blocks)
        assert view.model.cfg.n_layers == n
        assert view["resid_pre", 0] is cache[f"{stack}.blocks.0.hook_resid_pre"]
        assert view["resid_post", -1] is cache[f"{stack}.blocks.{n - 1}.hook_resid_post"]
    with pytest.raises(ValueError, match="cache.encoder or cache.decoder"):
        cache.accumulated_resid()


def test_accumulated_resid_is_transformers_hidden_states(run):
    name, model, cache, ref, _, _ = run
    for stack, hidden in (("encoder", ref.encoder_hidden_states), ("decoder", ref.decoder_hidden_states)):
        view = getattr(cache, stack)
        mine, labels = view.accumulated_resid(return_labels=True)
        n = view.model.cfg.n_layers
        assert labels == [f"{l}_pre" for l in range(n)] + ["final_post"]
        assert_close(mine[:n], torch.stack(hidden[:n]), **TOL)
        if name in PRE_LN:  # transformers returns the last one through the final norm
            assert_close(view.accumulated_resid(apply_ln=True)[n], hidden[n], **TOL)
        else:
            assert_close(mine[n], hidden[n], **TOL)


@pytest.mark.parametrize("stack", ["encoder", "decoder"])
def test_decompositions_sum_to_the_stream_each_sublayer_reads(run, stack):
    name, model, cache, _, _, _ = run
    view = getattr(cache, stack)
    if name not in PRE_LN:
        for call in (view.decompose_resid, view.get_full_resid_decomposition,
                     lambda: view.accumulated_resid(layer=1, apply_ln=True)):
            with pytest.raises(ValueError, match="post-LN"):
                call()
        return
    n, cross = view.model.cfg.n_layers, stack == "decoder"
    for layer in range(n + 1):
        stream = view["resid_pre", layer] if layer < n else view["resid_post", n - 1]
        assert_close(view.decompose_resid(layer).sum(0), stream, **TOL)
        for expand in (True, False):
            assert_close(view.get_full_resid_decomposition(layer, expand_neurons=expand).sum(0), stream, **TOL)
    mlp_reads = view["blocks.1.hook_resid_mid_cross" if cross else "blocks.1.hook_resid_mid"]
    parts, labels = view.decompose_resid(1, mlp_input=True, return_labels=True)
    expected = ["embed", "0_attn_out"] + (["0_cross_attn_out"] if cross else []) + ["0_mlp_out", "1_attn_out"] \
        + (["1_cross_attn_out"] if cross else [])
    assert labels == expected
    assert_close(parts.sum(0), mlp_reads, **TOL)
    assert_close(view.get_full_resid_decomposition(1, mlp_input=True).sum(0), mlp_reads, **TOL)
    # The MLP's norm (ln3 after cross-attention) at its cached scale: what the MLP reads, before its weight.
    norm = "ln3" if cross else "ln2"
    assert_close(view.decompose_resid(1, mlp_input=True, apply_ln=True).sum(0), view[f"blocks.1.{norm}.hook_normalized"],
                 **TOL)
    assert_close(view.decompose_resid(1, apply_ln=True).sum(0), view["blocks.1.ln1.hook_normalized"], **TOL)
    _, accumulated = view.accumulated_resid(1, incl_mid=True, mlp_input=True, return_labels=True)
    assert accumulated == ["0_pre", "0_mid"] + (["0_mid_cross"] if cross else []) + ["1_pre", "1_mid"] \
        + (["1_mid_cross"] if cross else [])


def test_cross_attention_heads(run):
    name, model, cache, _, _, _ = run
    dec = cache.decoder
    heads, labels = dec.stack_head_results(1, return_labels=True)
    h = model.cfg.n_heads
    assert labels == [f"L0H{i}" for i in range(h)] + [f"L0H{i}_cross" for i in range(h)]
    cross = dec.cross_head_results(0)
    assert_close(heads[h:], cross.movedim(-2, 0))
    b_O = model.decoder.blocks[0].cross_attn.b_O
    assert_close(cross.sum(-2) + b_O, dec["blocks.0.hook_cross_attn_out"], **TOL)
    with pytest.raises(ValueError, match="no cross-attention"):
        cache.encoder.cross_head_results(0)
    dec.compute_head_results()  # written through to the whole cache, and seen by a new view
    assert "decoder.blocks.1.cross_attn.hook_result" in cache
    assert_close(cache.decoder["blocks.1.cross_attn.hook_result"], dec.cross_head_results(1))


def test_decoder_logit_attributions_sum_to_the_logit_difference(run):
    name, _, _, _, directory, tokenizer = run
    if name not in PRE_LN:
        return
    model = _load(directory, tokenizer, unit_final_norm=True)  # the frozen scale is then the whole final norm
    logits, cache, _, tgt = _run(model)
    right, wrong = tgt[:, 1], tgt[:, 2]
    rows = torch.arange(len(tgt))
    diff = logits[rows, -1, right] - logits[rows, -1, wrong]
    dec = cache.decoder
    for stack in (dec.decompose_resid(pos_slice=-1), dec.get_full_resid_decomposition(pos_slice=-1),
                  dec.accumulated_resid(pos_slice=-1)[-1:]):
        attrs = dec.logit_attrs(stack, right, wrong, pos_slice=-1)
        assert_close(attrs.sum(0), diff, **TOL)
    with pytest.raises(ValueError, match="no unembedding"):
        cache.encoder.logit_attrs(cache.encoder.decompose_resid(pos_slice=-1), right, pos_slice=-1)


def test_decoder_only_caches_have_no_stacks(llama):
    _, cache = llama.run_with_cache("one two three")
    with pytest.raises(AttributeError, match="not an encoder-decoder"):
        cache.decoder
