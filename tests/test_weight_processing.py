"""Weight processing (models/weight_processing.py): each step against an unprocessed model
loaded from the same checkpoint, checking exactly what its docstring promises to preserve.

Session fixtures are shared, so nothing here processes one in place: processed models
are loaded afresh (`models.load(dir, fold_ln=True, ...)`) or deep-copied first.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.testing import assert_close

import models
from conftest import PROMPTS, TOL
from models.components import Norm
from models.weight_processing import WeightProcessingError

EXACT = dict(atol=0.0, rtol=0.0)


# ---------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def gpt2_hf(gpt2_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(gpt2_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def llama_hf(llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()


def _tokens(model, prompts=PROMPTS):
    """A right-padded token batch of `prompts` and its mask (compare only the real positions)."""
    tok = model.tokenize(prompts, padding_side="right")
    return tok.tokens, tok.attention_mask


def _run(model, prompts=PROMPTS, names=None):
    tokens, mask = _tokens(model, prompts)
    logits, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=names)
    return logits, cache, mask


def _resid_names(name: str) -> bool:
    return name.endswith(("hook_resid_pre", "hook_resid_mid", "hook_resid_post"))


def _qkv_names(name: str) -> bool:
    return name.endswith(("attn.hook_q", "attn.hook_k", "attn.hook_v"))


def _real(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Only the real (unpadded) positions of a [batch, pos, ...] tensor."""
    return t[mask.bool()]


def _randomize_(model: models.HookedTransformer, seed: int) -> None:
    """Random norm weights/biases and biases, so that no folding term can hide (copies only!)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.2
            if name.rsplit(".", 1)[-1] == "w":
                p.copy_(1.0 + noise)
            else:
                p.add_(noise)


def _attn_only_ln_random(attn_only_ln, seed=5):
    model = copy.deepcopy(attn_only_ln)
    _randomize_(model, seed)
    return model


def _norms(model):
    return [m for m in model.modules() if isinstance(m, Norm)]


# ---------------------------------------------------------------------- default: off
def test_default_load_is_unprocessed_gpt2(gpt2, gpt2_hf):
    sd = gpt2_hf.state_dict()
    cfg = gpt2.cfg
    d, h, dh = cfg.d_model, cfg.n_heads, cfg.d_head
    assert cfg.normalization_type == "LN"
    for l in range(cfg.n_layers):
        c_attn = sd[f"transformer.h.{l}.attn.c_attn.weight"]  # [d, 3d]: q | k | v
        c_attn_b = sd[f"transformer.h.{l}.attn.c_attn.bias"]
        c_proj = sd[f"transformer.h.{l}.attn.c_proj.weight"]  # [d, d]
        for head in range(h):
            cols = slice(head * dh, (head + 1) * dh)
            assert_close(gpt2.W_Q[l, head], c_attn[:, cols], **EXACT)
            assert_close(gpt2.W_K[l, head], c_attn[:, d:][:, cols], **EXACT)
            assert_close(gpt2.W_V[l, head], c_attn[:, 2 * d:][:, cols], **EXACT)
            assert_close(gpt2.b_Q[l, head], c_attn_b[cols], **EXACT)
            assert_close(gpt2.b_V[l, head], c_attn_b[2 * d:][cols], **EXACT)
            assert_close(gpt2.W_O[l, head], c_proj[cols, :], **EXACT)
        assert_close(gpt2.b_O[l], sd[f"transformer.h.{l}.attn.c_proj.bias"], **EXACT)
        assert_close(gpt2.W_in[l], sd[f"transformer.h.{l}.mlp.c_fc.weight"], **EXACT)
        assert_close(gpt2.W_out[l], sd[f"transformer.h.{l}.mlp.c_proj.weight"], **EXACT)
        assert_close(gpt2.blocks[l].ln1.w, sd[f"transformer.h.{l}.ln_1.weight"], **EXACT)
        assert_close(gpt2.blocks[l].ln1.b, sd[f"transformer.h.{l}.ln_1.bias"], **EXACT)
        assert_close(gpt2.blocks[l].ln2.w, sd[f"transformer.h.{l}.ln_2.weight"], **EXACT)
    assert_close(gpt2.W_E, sd["transformer.wte.weight"], **EXACT)
    assert_close(gpt2.W_pos, sd["transformer.wpe.weight"], **EXACT)
    assert_close(gpt2.ln_final.w, sd["transformer.ln_f.weight"], **EXACT)
    assert_close(gpt2.ln_final.b, sd["transformer.ln_f.bias"], **EXACT)
    # Tied: the unembedding is the embedding, transposed.
    assert gpt2.unembed.tied
    assert_close(gpt2.W_U, gpt2.W_E.T, **EXACT)
    assert_close(gpt2.W_U, sd["lm_head.weight"].T, **EXACT)
    assert torch.count_nonzero(gpt2.b_U) == 0


def test_default_load_is_unprocessed_llama_gqa(llama, llama_hf):
    sd = llama_hf.state_dict()
    cfg = llama.cfg
    h, kv, dh = cfg.n_heads, cfg.n_kv_heads, cfg.d_head
    assert (h, kv) == (4, 2) and cfg.normalization_type == "RMS"
    for l in range(cfg.n_layers):
        p = f"model.layers.{l}."
        q, k, v, o = (sd[p + f"self_attn.{n}_proj.weight"] for n in "qkvo")  # nn.Linear: [out, in]
        for head in range(h):
            group = head // (h // kv)  # the KV head this query head reads
            assert_close(llama.W_Q[l, head], q[head * dh:(head + 1) * dh].T, **EXACT)
            assert_close(llama.W_K[l, head], k[group * dh:(group + 1) * dh].T, **EXACT)
            assert_close(llama.W_V[l, head], v[group * dh:(group + 1) * dh].T, **EXACT)
            assert_close(llama.W_O[l, head], o[:, head * dh:(head + 1) * dh].T, **EXACT)
        for g in range(kv):
            assert_close(llama._W_K[l, g], k[g * dh:(g + 1) * dh].T, **EXACT)
        assert_close(llama.W_gate[l], sd[p + "mlp.gate_proj.weight"].T, **EXACT)
        assert_close(llama.W_in[l], sd[p + "mlp.up_proj.weight"].T, **EXACT)
        assert_close(llama.W_out[l], sd[p + "mlp.down_proj.weight"].T, **EXACT)
        assert_close(llama.blocks[l].ln1.w, sd[p + "input_layernorm.weight"], **EXACT)
        assert_close(llama.blocks[l].ln2.w, sd[p + "post_attention_layernorm.weight"], **EXACT)
    assert_close(llama.ln_final.w, sd["model.norm.weight"], **EXACT)
    assert not llama.unembed.tied
    assert_close(llama.W_U, sd["lm_head.weight"].T, **EXACT)
    assert not torch.equal(llama.W_U, llama.W_E.T)


def test_load_without_flags_matches_explicit_false(gpt2_dir, gpt2):
    explicit = models.load(gpt2_dir, fold_ln=False, center_writing_weights=False, center_unembed=False,
                           fold_value_biases=False)
    for (name, a), (name_b, b) in zip(gpt2.state_dict().items(), explicit.state_dict().items()):
        assert name == name_b
        assert_close(a, b, **EXACT)


# ---------------------------------------------------------------------- fold_ln
def _check_fold_ln(ref, folded, prompts=PROMPTS, tokens=None):
    names = lambda n: _resid_names(n) or _qkv_names(n)  # noqa: E731
    if tokens is None:
        ref_logits, ref_cache, mask = _run(ref, prompts, names)
        logits, cache, _ = _run(folded, prompts, names)
    else:
        ref_logits, ref_cache = ref.run_with_cache(tokens, names_filter=names)
        logits, cache = folded.run_with_cache(tokens, names_filter=names)
        mask = torch.ones(tokens.shape, dtype=torch.long)
    assert_close(_real(logits, mask), _real(ref_logits, mask), **TOL)
    resid = [n for n in ref_cache.keys() if _resid_names(n)]
    qkv = [n for n in ref_cache.keys() if _qkv_names(n)]
    assert len(resid) >= 2 * ref.cfg.n_layers and len(qkv) == 3 * ref.cfg.n_layers
    for name in resid + qkv:
        assert_close(_real(cache[name], mask), _real(ref_cache[name], mask), **TOL, msg=name)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_fold_ln_preserves_logits_resid_and_qkv(family, request):
    ref = request.getfixturevalue(family)
    folded = models.load(request.getfixturevalue(f"{family}_dir"), fold_ln=True)
    _check_fold_ln(ref, folded)
    expected = {"gpt2": "LNPre", "llama": "RMSPre"}[family]
    assert folded.cfg.normalization_type == expected
    norms = _norms(folded)
    assert len(norms) == 2 * folded.cfg.n_layers + 1
    assert all(n.w is None and n.b is None for n in norms)
    assert not [n for n, _ in folded.named_parameters() if ".ln" in n or n.startswith("ln")]
    # The shared fixture was not touched.
    assert ref.cfg.normalization_type == {"gpt2": "LN", "llama": "RMS"}[family]
    assert ref.blocks[0].ln1.w is not None


def test_fold_ln_weights_by_hand_llama(llama, llama_dir):
    """RMSNorm: folding is just scaling the rows (d_model) of every reader by the norm weight."""
    folded = models.load(llama_dir, fold_ln=True)
    for l in range(llama.cfg.n_layers):
        w1, w2 = llama.blocks[l].ln1.w, llama.blocks[l].ln2.w
        assert_close(folded.W_Q[l], llama.W_Q[l] * w1[None, :, None])
        assert_close(folded._W_K[l], llama._W_K[l] * w1[None, :, None])
        assert_close(folded._W_V[l], llama._W_V[l] * w1[None, :, None])
        assert_close(folded.W_in[l], llama.W_in[l] * w2[:, None])
        assert_close(folded.W_gate[l], llama.W_gate[l] * w2[:, None])
        assert_close(folded.W_O[l], llama.W_O[l], **EXACT)  # writers untouched
    assert_close(folded.W_U, llama.W_U * llama.ln_final.w[:, None])


def test_fold_ln_weights_by_hand_gpt2(gpt2, gpt2_dir):
    """LayerNorm: scale by w, add b_ln @ W to the bias, and centre W over d_model."""
    folded = models.load(gpt2_dir, fold_ln=True)
    for l in range(gpt2.cfg.n_layers):
        ln1 = gpt2.blocks[l].ln1
        W = gpt2.W_Q[l] * ln1.w[None, :, None]
        assert_close(folded.W_Q[l], W - W.mean(1, keepdim=True))
        assert_close(folded.b_Q[l], gpt2.b_Q[l] + torch.einsum("d,hdk->hk", ln1.b, gpt2.W_Q[l]))
        ln2 = gpt2.blocks[l].ln2
        assert_close(folded.b_in[l], gpt2.b_in[l] + ln2.b @ gpt2.W_in[l])
    assert_close(folded.b_U, gpt2.ln_final.b @ gpt2.W_U)
    # The embedding keeps its values; the unembedding got its own, folded copy.
    assert not folded.unembed.tied
    assert_close(folded.W_E, gpt2.W_E, **EXACT)


def test_fold_ln_attn_only_ln_deepcopy(attn_only_ln):
    ref = _attn_only_ln_random(attn_only_ln)
    folded = copy.deepcopy(ref).process_weights(fold_ln=True)
    tokens = torch.randint(0, ref.cfg.d_vocab, (3, 12), generator=torch.Generator().manual_seed(0))
    _check_fold_ln(ref, folded, tokens=tokens)
    assert folded.cfg.normalization_type == "LNPre"
    assert all(n.w is None and n.b is None for n in _norms(folded))
    # The session fixture keeps its norms and its config.
    assert attn_only_ln.cfg.normalization_type == "LN" and attn_only_ln.blocks[0].ln1.w is not None


def test_fold_ln_load_equals_process_weights(gpt2_dir):
    a = models.load(gpt2_dir, fold_ln=True)
    b = models.load(gpt2_dir).process_weights(fold_ln=True)
    assert a.state_dict().keys() == b.state_dict().keys()
    for k in a.state_dict():
        assert_close(a.state_dict()[k], b.state_dict()[k], **EXACT)


def test_fold_ln_post_ln_bert_raises(bert_dir):
    with pytest.raises(WeightProcessingError, match="post-LN"):
        models.load(bert_dir, fold_ln=True)


def test_fold_ln_twice_raises(gpt2_dir):
    folded = models.load(gpt2_dir, fold_ln=True)
    with pytest.raises(WeightProcessingError):
        folded.process_weights(fold_ln=True)


def test_fold_ln_norm_free_raises(attn_only):
    model = copy.deepcopy(attn_only)
    with pytest.raises(WeightProcessingError, match="LN or RMS"):
        model.process_weights(fold_ln=True)
    assert isinstance(WeightProcessingError("x"), ValueError)


# ---------------------------------------------------------------------- center_writing_weights
def test_center_writing_weights_gpt2(gpt2, gpt2_dir):
    centred = models.load(gpt2_dir, center_writing_weights=True)
    ref_logits, ref_cache, mask = _run(gpt2, names=_resid_names)
    logits, cache, _ = _run(centred, names=_resid_names)
    assert_close(_real(logits, mask), _real(ref_logits, mask), **TOL)
    names = list(ref_cache.keys())
    assert len(names) == 3 * gpt2.cfg.n_layers
    for name in names:
        ref = ref_cache[name]
        expected = ref - ref.sum(-1, keepdim=True) / ref.shape[-1]
        assert_close(cache[name], expected, **TOL, msg=name)
        # and the unprocessed stream did have a mean to remove
        assert ref.mean(-1).abs().max() > 1e-3
    zero = dict(atol=1e-6, rtol=0)
    for W in (centred.W_E, centred.W_pos, centred.W_O, centred.W_out, centred.b_O, centred.b_out):
        assert_close(W.mean(-1), torch.zeros(W.shape[:-1]), **zero)
    # Tied W_U had to keep the uncentred embedding.
    assert not centred.unembed.tied
    assert_close(centred.W_U, gpt2.W_U, **EXACT)


def test_center_writing_weights_rms_raises(llama_dir):
    with pytest.raises(WeightProcessingError, match="RMS"):
        models.load(llama_dir, center_writing_weights=True)


def test_center_writing_weights_bert_post_ln(bert, bert_dir):
    centred = models.load(bert_dir, center_writing_weights=True)
    names = lambda n: n.endswith("hook_normalized_resid_post")  # noqa: E731
    ref_logits, ref_cache, mask = _run(bert, names=names)
    logits, cache, _ = _run(centred, names=names)
    assert_close(_real(logits, mask), _real(ref_logits, mask), **TOL)
    assert len(ref_cache.keys()) == bert.cfg.n_layers
    for name in ref_cache.keys():
        assert_close(_real(cache[name], mask), _real(ref_cache[name], mask), **TOL, msg=name)
    zero = dict(atol=1e-6, rtol=0)
    for W in (centred.W_E, centred.W_pos, centred.token_type_embed.W_token_type, centred.W_O, centred.W_out):
        assert_close(W.mean(-1), torch.zeros(W.shape[:-1]), **zero)


def test_center_writing_weights_without_final_norm_is_refused_or_exact():
    torch.manual_seed(0)
    cfg = models.TransformerConfig(n_layers=1, d_model=32, n_heads=4, d_head=8, d_vocab=50, n_ctx=32, d_mlp=None,
                                   normalization_type="LN", final_norm=False, model_name="ln-no-final-norm")
    model = models.HookedTransformer(cfg)
    model.requires_grad_(False)
    _randomize_(model, seed=7)
    tokens = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(1))
    ref = model(tokens).log_softmax(-1)
    try:
        copy.deepcopy(model).process_weights(center_writing_weights=True)
    except WeightProcessingError:
        return  # refusing is a correct answer
    centred = copy.deepcopy(model).process_weights(center_writing_weights=True)
    assert_close(centred(tokens).log_softmax(-1), ref, **TOL)


# ---------------------------------------------------------------------- center_unembed
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_center_unembed(family, request):
    ref = request.getfixturevalue(family)
    centred = models.load(request.getfixturevalue(f"{family}_dir"), center_unembed=True)
    tokens, mask = _tokens(ref)
    ref_logits = ref(tokens, attention_mask=mask)
    logits = centred(tokens, attention_mask=mask)
    assert_close(_real(logits.log_softmax(-1), mask), _real(ref_logits.log_softmax(-1), mask), **TOL)
    diff = _real(logits - ref_logits, mask)  # [n_real, d_vocab]
    spread = diff.max(-1).values - diff.min(-1).values
    assert spread.max() < 1e-4
    # ... the constant is minus the mean logit of the unprocessed model
    assert_close(diff[:, 0], -_real(ref_logits, mask).mean(-1), atol=1e-4, rtol=1e-5)
    assert not torch.allclose(logits, ref_logits, atol=1e-3)  # something did shift
    zero = dict(atol=1e-6, rtol=0)
    assert_close(centred.W_U.mean(-1), torch.zeros(centred.cfg.d_model), **zero)
    assert_close(centred.b_U.mean(), torch.tensor(0.0), **zero)
    assert_close(centred.W_E, ref.W_E, **EXACT)


def test_center_unembed_unties_gpt2(gpt2, gpt2_dir):
    centred = models.load(gpt2_dir, center_unembed=True)
    assert gpt2.unembed.tied and not centred.unembed.tied
    assert_close(centred.W_E, gpt2.W_E, **EXACT)
    assert_close(centred.W_U, gpt2.W_E.T - gpt2.W_E.T.mean(-1, keepdim=True), atol=1e-6, rtol=0)
    assert "unembed.W_U" in dict(centred.named_parameters())
    # Editing the embedding no longer moves the unembedding.
    before = centred.W_U.clone()
    with torch.no_grad():
        centred.embed.W_E.add_(1.0)
    assert_close(centred.W_U, before, **EXACT)


def test_center_unembed_headless_raises(bert_headless_dir):
    with pytest.raises(WeightProcessingError):
        models.load(bert_headless_dir, center_unembed=True)


# ---------------------------------------------------------------------- fold_value_biases
def test_fold_value_biases_gpt2(gpt2, gpt2_dir):
    folded = models.load(gpt2_dir, fold_value_biases=True)
    tokens, mask = _tokens(gpt2)
    assert_close(_real(folded(tokens, attention_mask=mask), mask), _real(gpt2(tokens, attention_mask=mask), mask), **TOL)
    assert gpt2.b_V.abs().max() > 0.05  # there was something to fold
    assert torch.count_nonzero(folded.b_V) == 0 and torch.count_nonzero(folded._b_V) == 0
    cfg = gpt2.cfg
    for l in range(cfg.n_layers):
        expected = gpt2.b_O[l].clone()
        for h in range(cfg.n_heads):
            expected += gpt2.b_V[l, h] @ gpt2.W_O[l, h]
        assert_close(folded.b_O[l], expected)
    assert_close(folded.W_O, gpt2.W_O, **EXACT)
    assert_close(folded.W_V, gpt2.W_V, **EXACT)


def test_fold_value_biases_gqa(llama):
    """GQA: query head h reads KV head h // (n_heads / n_kv_heads), so each b_V counts for its group."""
    ref = copy.deepcopy(llama)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for block in ref.blocks:
            block.attn._b_V.copy_(torch.randn(block.attn._b_V.shape, generator=gen))
            block.attn.b_O.copy_(torch.randn(block.attn.b_O.shape, generator=gen) * 0.1)
    folded = copy.deepcopy(ref).process_weights(fold_value_biases=True)
    tokens, mask = _tokens(ref)
    ref_logits = ref(tokens, attention_mask=mask)
    assert not torch.allclose(ref_logits, llama(tokens, attention_mask=mask), atol=1e-2)  # the biases matter
    assert_close(_real(folded(tokens, attention_mask=mask), mask), _real(ref_logits, mask), **TOL)
    cfg = ref.cfg
    n_rep = cfg.n_heads // cfg.n_kv_heads
    for l, block in enumerate(ref.blocks):
        raw = block.attn._b_V  # [n_kv_heads, d_head]
        expected = block.attn.b_O.clone()
        for h in range(cfg.n_heads):
            expected += raw[h // n_rep] @ block.attn.W_O[h]
        assert_close(folded.blocks[l].attn.b_O, expected)
        assert torch.count_nonzero(folded.blocks[l].attn._b_V) == 0
    assert torch.count_nonzero(llama._b_V) == 0  # fixture untouched


def test_fold_value_biases_bert(bert, bert_dir):
    folded = models.load(bert_dir, fold_value_biases=True)
    tokens, mask = _tokens(bert)
    assert_close(_real(folded(tokens, attention_mask=mask), mask), _real(bert(tokens, attention_mask=mask), mask), **TOL)
    assert torch.count_nonzero(folded.b_V) == 0


# ---------------------------------------------------------------------- all together
def test_all_four_gpt2(gpt2, gpt2_dir):
    processed = models.load(gpt2_dir, fold_ln=True, center_writing_weights=True, center_unembed=True,
                            fold_value_biases=True)
    tokens, mask = _tokens(gpt2)
    ref = gpt2(tokens, attention_mask=mask).log_softmax(-1)
    got = processed(tokens, attention_mask=mask).log_softmax(-1)
    assert_close(_real(got, mask), _real(ref, mask), **TOL)
    assert processed.cfg.normalization_type == "LNPre"
    assert torch.count_nonzero(processed.b_V) == 0
    assert_close(processed.W_E.mean(-1), torch.zeros(processed.cfg.d_vocab), atol=1e-6, rtol=0)
    assert_close(processed.W_U.mean(-1), torch.zeros(processed.cfg.d_model), atol=1e-6, rtol=0)


def test_processed_untied_model_saves_and_reloads(llama_dir, tmp_path):
    processed = models.load(llama_dir, fold_ln=True, center_unembed=True, fold_value_biases=True)
    processed.save(tmp_path)
    again = models.load(tmp_path)
    assert again.cfg.normalization_type == "RMSPre"
    tokens, mask = _tokens(processed)
    assert_close(again(tokens, attention_mask=mask), processed(tokens, attention_mask=mask), **EXACT)


def test_processed_tied_model_saves_and_reloads(gpt2_dir, tmp_path):
    processed = models.load(gpt2_dir, center_unembed=True)
    assert not processed.unembed.tied
    processed.save(tmp_path)
    again = models.load(tmp_path)
    tokens, mask = _tokens(processed)
    assert_close(again(tokens, attention_mask=mask), processed(tokens, attention_mask=mask), **EXACT)


# ---------------------------------------------------------------------- real model
@pytest.mark.slow
def test_smollm2_fold_ln_center_unembed(smollm2):
    processed = models.load("smollm2-135m", fold_ln=True, center_unembed=True)
    assert processed.cfg.normalization_type == "RMSPre"
    assert smollm2.cfg.normalization_type == "RMS"  # the session fixture is untouched
    for prompt in PROMPTS:
        tokens = smollm2.to_tokens(prompt)
        ref = smollm2(tokens).log_softmax(-1)
        got = processed(tokens).log_softmax(-1)
        assert_close(got, ref, atol=1e-4, rtol=1e-5, msg=prompt)
