"""Encoder-decoder models (issue 15, part 2): T5, flan-T5, BART, Marian against `transformers` eager.

Random checkpoints built from the config classes (every parameter randomised), saved and
reloaded: encoder and decoder block outputs, every self- and cross-attention pattern and
the logits equal `transformers` (atol 1e-4, rtol 1e-5) through both attention paths, on a
batch whose sources are left-padded and whose decoder inputs (18 tokens) are long enough
for T5's causal and bidirectional buckets to differ. Greedy generation equals
`generate`; patching in both stacks equals brute force with plain torch hooks.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import models
from family_specs import ENCDEC_SPECS, build_seq2seq, saved_seq2seq, seq2seq_batch
from interp.patching import logit_diff, seq2seq_patch

TOL = dict(atol=1e-4, rtol=1e-5)


@pytest.fixture(scope="module", params=list(ENCDEC_SPECS))
def seq2seq(request, tmp_path_factory, family_tokenizer):
    name = request.param
    directory = tmp_path_factory.mktemp(name)
    hf, model = saved_seq2seq(name, directory, family_tokenizer)
    return name, hf, model, directory


def _stacks(hf):
    """(encoder layers, decoder layers) of a transformers encoder-decoder."""
    if hasattr(hf, "encoder") and hasattr(hf.encoder, "block"):  # T5
        return hf.encoder.block, hf.decoder.block
    return hf.model.encoder.layers, hf.model.decoder.layers


def _batch(model):
    src, mask, tgt = seq2seq_batch()
    tgt[:, 0] = model.cfg.decoder_start_token_id
    return src, mask, tgt


def hf_reference(hf, src, mask, tgt):
    outputs = {}
    handles = []
    for stack, layers in zip(("encoder", "decoder"), _stacks(hf)):
        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_hook(
                lambda m, a, o, key=(stack, i): outputs.__setitem__(key, o[0] if isinstance(o, tuple) else o)))
    try:
        with torch.no_grad():
            ref = hf(input_ids=src, attention_mask=mask, decoder_input_ids=tgt, output_attentions=True)
    finally:
        for h in handles:
            h.remove()
    return ref, outputs


@pytest.mark.parametrize("path", ["sdpa", "explicit"])
def test_matches_transformers(seq2seq, path):
    name, hf, model, _ = seq2seq
    src, mask, tgt = _batch(model)
    ref, outputs = hf_reference(hf, src, mask, tgt)
    model.set_attention_implementation("explicit" if path == "explicit" else "auto")
    try:
        logits, cache = model.run_with_cache(src, tgt, attention_mask=mask)
        plain = model(src, tgt, attention_mask=mask)
    finally:
        model.set_attention_implementation("auto")
    real = mask.bool()
    assert_close(logits, ref.logits, **TOL)
    assert_close(plain, ref.logits, **TOL)
    out = "hook_normalized_resid_post" if model.cfg.post_ln else "hook_resid_post"
    for stack, n in (("encoder", model.cfg.n_layers), ("decoder", model.cfg.n_decoder_layers)):
        for layer in range(n):
            mine = cache[f"{stack}.blocks.{layer}.{out}"]
            rows = real if stack == "encoder" else torch.ones(tgt.shape, dtype=torch.bool)
            assert_close(mine[rows], outputs[(stack, layer)][rows], **TOL, msg=lambda m: f"{stack} block {layer}: {m}")
    patterns = {"encoder.blocks.{}.attn": ref.encoder_attentions, "decoder.blocks.{}.attn": ref.decoder_attentions,
                "decoder.blocks.{}.cross_attn": ref.cross_attentions}
    for template, theirs in patterns.items():
        for layer, expected in enumerate(theirs):
            mine = cache[template.format(layer) + ".hook_pattern"]
            rows = real if template.startswith("encoder") else torch.ones(tgt.shape, dtype=torch.bool)
            # Keys at padded source positions: both give them nothing; compare the rest.
            cols = real[:, None, None, :] if "encoder" in template or "cross" in template else \
                torch.ones(1, 1, 1, tgt.shape[1], dtype=torch.bool)
            assert_close(torch.where(cols, mine, 0).permute(0, 2, 1, 3)[rows],
                         torch.where(cols, expected, 0).permute(0, 2, 1, 3)[rows], **TOL,
                         msg=lambda m: f"{template.format(layer)}: {m}")
            if "cross" in template:  # padded source positions get no attention
                assert float(mine.masked_select(~real[:, None, None, :].expand_as(mine)).abs().max()) == 0.0


def test_hook_names_of_both_stacks(seq2seq):
    name, _, model, _ = seq2seq
    names = set(model.hook_dict)
    for expected in ("encoder.hook_embed", "decoder.hook_embed", "encoder.blocks.0.hook_resid_pre",
                     "encoder.blocks.1.attn.hook_pattern", "decoder.blocks.0.attn.hook_pattern",
                     "decoder.blocks.0.cross_attn.hook_q", "decoder.blocks.0.cross_attn.hook_k",
                     "decoder.blocks.0.cross_attn.hook_attn_scores", "decoder.blocks.2.cross_attn.hook_z",
                     "decoder.blocks.0.hook_cross_attn_out", "decoder.blocks.0.hook_resid_mid_cross",
                     "decoder.blocks.0.hook_mlp_out"):
        assert expected in names, expected
    assert not any(n.startswith("encoder.") and "cross" in n for n in names)
    if model.cfg.positional_embedding_type == "relative":
        assert {"encoder.hook_position_bias", "decoder.hook_position_bias"} <= names
    else:
        assert {"encoder.hook_pos_embed", "decoder.hook_pos_embed"} <= names


@pytest.mark.parametrize("name", ["t5", "flan_t5"])
def test_t5_padded_source_equals_each_source_alone(name):
    """T5's buckets see only distances, so a padded source gives what it gives alone. (Learned and sinusoidal
    positions count the padding in BART and Marian, as transformers does, so there it would not.)"""
    model = models.load(build_seq2seq(name))
    src, mask, tgt = _batch(model)
    batched = model(src, tgt, attention_mask=mask)
    for i in range(len(src)):
        assert_close(batched[i], model(src[i][mask[i].bool()][None], tgt[i][None])[0], **TOL)


def test_decoder_input_is_required(seq2seq):
    _, _, model, _ = seq2seq
    src, _, _ = _batch(model)
    with pytest.raises(models.DecoderInputError, match="decoder_input_ids"):
        model(src)


def test_greedy_generation_equals_transformers(seq2seq):
    name, hf, model, _ = seq2seq
    src, mask, _ = _batch(model)
    with torch.no_grad():
        ref = hf.generate(input_ids=src, attention_mask=mask, max_new_tokens=12, do_sample=False, num_beams=1,
                          no_repeat_ngram_size=0, forced_bos_token_id=None, forced_eos_token_id=None, min_length=0,
                          use_cache=False)  # transformers sizes T5's cache by the encoder's 2 layers, not the decoder's 3
    ours = model.generate(src, attention_mask=mask, max_new_tokens=12)
    assert torch.equal(ours, ref)
    assert torch.equal(model.generate(src, attention_mask=mask, max_new_tokens=12, use_kv_cache=False), ref)


def test_text_goes_through_the_tokenizer(seq2seq, family_tokenizer):
    name, hf, model, _ = seq2seq
    text, target = "The mole dug a tunnel under the lawn .", "One mole of gas"
    src = family_tokenizer(text, return_tensors="pt").input_ids
    tgt = torch.cat([torch.tensor([[model.cfg.decoder_start_token_id]]),
                     family_tokenizer(target, add_special_tokens=False, return_tensors="pt").input_ids], dim=1)
    with torch.no_grad():
        expected = hf(input_ids=src, decoder_input_ids=tgt).logits
    assert_close(model(text, target), expected, **TOL)
    assert isinstance(model.generate(text, max_new_tokens=3), str)


def test_cross_attention_circuit_is_the_dot_product(seq2seq):
    """decoder.cross_QK[l, h] is a bilinear form of the decoder's normalised stream against the encoder's output."""
    name, _, model, _ = seq2seq
    src, mask, tgt = _batch(model)
    src, tgt = src[:1], tgt[:1]
    _, cache = model.run_with_cache(src, tgt)
    memory = model.encode(src)[0]
    for layer, block in enumerate(model.decoder.blocks):
        q = cache[f"decoder.blocks.{layer}.cross_attn.hook_q"][0] - block.cross_attn.b_Q  # [pos, heads, d_head]
        k = cache[f"decoder.blocks.{layer}.cross_attn.hook_k"][0] - block.cross_attn.b_K
        if model.cfg.post_ln:
            x = cache[f"decoder.blocks.{layer}.ln1.hook_normalized"][0] * block.ln1.w + block.ln1.b
        else:
            x = cache[f"decoder.blocks.{layer}.ln2.hook_normalized"][0] * block.ln2.w
        for h in range(model.cfg.n_heads):
            assert_close(x @ model.decoder.cross_QK[layer, h].AB @ memory.T, q[:, h] @ k[:, h].T, atol=1e-4, rtol=1e-4)
    assert model.encoder.QK.shape == (model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_model, model.cfg.d_model)
    with pytest.raises(ValueError, match="no cross-attention"):
        model.encoder.cross_OV


def test_t5_buckets_equal_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    from models.encoder_decoder import relative_bucket

    relative = torch.arange(-300, 300)[None] - torch.zeros(1, 1, dtype=torch.long)
    for bidirectional in (True, False):
        for buckets, distance in ((32, 128), (8, 20)):
            ours = relative_bucket(relative, bidirectional, buckets, distance)
            theirs = T5Attention._relative_position_bucket(relative, bidirectional, buckets, distance)
            assert torch.equal(ours, theirs)
    causal = relative_bucket(-torch.arange(18), False, 32, 128)
    both = relative_bucket(-torch.arange(18), True, 32, 128)
    assert not torch.equal(causal, both), "18 positions reach the buckets where the two schemes differ"


def test_untied_flan_head_and_output_scale():
    """flan-T5's head is its own matrix and the decoder output is not rescaled; transformers 5 forces T5 to tie,
    so the untied head is put in by hand on the constructed model, and converted from it."""
    hf = build_seq2seq("flan_t5")
    with torch.no_grad():
        hf.lm_head.weight = torch.nn.Parameter(torch.randn_like(hf.lm_head.weight) * 0.1)
    model = models.load(hf)
    assert not model.cfg.tied_embeddings and model.cfg.output_scale is None
    src, mask, tgt = seq2seq_batch()
    with torch.no_grad():
        expected = hf(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits
    assert_close(model(src, tgt, attention_mask=mask), expected, **TOL)
    t5 = models.load(build_seq2seq("t5"))
    assert t5.cfg.tied_embeddings and t5.cfg.output_scale == pytest.approx(64 ** -0.5)


def test_sinusoidal_positions_are_sin_cos_halves():
    """Marian's table (the paper's formula, cos in the second half, not interleaved), against transformers' module
    and the formula by hand."""
    import math

    from transformers.models.marian.modeling_marian import MarianSinusoidalPositionalEmbedding

    from models.encoder_decoder import sinusoidal_table

    table = sinusoidal_table(64, 64)
    assert torch.equal(table, MarianSinusoidalPositionalEmbedding(64, 64).create_weight())
    for pos, j in ((5, 3), (17, 0), (40, 31)):
        angle = pos / 10000 ** (2 * j / 64)
        assert float(table[pos, j]) == pytest.approx(math.sin(angle), abs=1e-6)
        assert float(table[pos, 32 + j]) == pytest.approx(math.cos(angle), abs=1e-6)


# ---------------------------------------------------------------------- patching in both stacks
@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("stack", ["encoder", "decoder"])
def test_patching_equals_torch_hooks(seq2seq, stack, direction):
    """resid_pre of each stack by (layer, position), clean source into the corrupted run (denoise) or corrupted
    into clean (noise), against a pre-hook on transformers' layers that overwrites the same row and position."""
    name, hf, model, _ = seq2seq
    src, _, tgt = _batch(model)
    clean, tgt = src[:2, :10].clone(), tgt[:2, :8]
    corrupted = clean.clone()
    corrupted[:, 3] = (clean[:, 3] + 7) % 997 + 3
    with torch.no_grad():
        gap = hf(input_ids=clean, decoder_input_ids=tgt).logits[:, -1] - \
            hf(input_ids=corrupted, decoder_input_ids=tgt).logits[:, -1]
    a, b = gap.argmax(-1), gap.argmin(-1)
    result = seq2seq_patch(model, clean, corrupted, tgt, stack=stack, kind="resid_pre", metric=logit_diff(a, b),
                           direction=direction, progress=False)
    base, src_run = (corrupted, clean) if direction == "denoise" else (clean, corrupted)
    layers = dict(zip(("encoder", "decoder"), _stacks(hf)))[stack]
    source = {}
    handles = [layer.register_forward_pre_hook(
        lambda m, args, kwargs, i=i: source.__setitem__(i, (args[0] if args else kwargs["hidden_states"]).clone()),
        with_kwargs=True) for i, layer in enumerate(layers)]
    with torch.no_grad():
        hf(input_ids=src_run, decoder_input_ids=tgt)
    for h in handles:
        h.remove()
    n_pos = clean.shape[1] if stack == "encoder" else tgt.shape[1]
    sites = [(l, p) for l in range(len(layers)) for p in range(n_pos)]
    rows = [(s, pr) for s in range(len(sites)) for pr in range(2)]
    prompts = torch.tensor([pr for _, pr in rows])

    def editor(layer):
        def pre(m, args, kwargs):
            x = (args[0] if args else kwargs["hidden_states"]).clone()
            for r, (s, pr) in enumerate(rows):
                if sites[s][0] == layer:
                    x[r, sites[s][1]] = source[layer][pr, sites[s][1]]
            return ((x,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})
        return pre

    handles = [layer.register_forward_pre_hook(editor(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            logits = hf(input_ids=base[prompts], decoder_input_ids=tgt[prompts]).logits[:, -1]
    finally:
        for h in handles:
            h.remove()
    values = logits[torch.arange(len(rows)), a[prompts]] - logits[torch.arange(len(rows)), b[prompts]]
    expected = torch.zeros(2, len(sites))
    for (s, pr), v in zip(rows, values):
        expected[pr, s] = v
    assert_close(result.per_prompt, expected.view(2, len(layers), n_pos), **TOL)
    if stack == "encoder":  # an encoder patch reaches the decoder through cross-attention
        unpatched = result.corrupted_metric if direction == "denoise" else result.clean_metric
        assert (result.per_prompt - unpatched.view(-1, 1, 1)).abs().max() > 1e-3
