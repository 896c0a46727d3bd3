"""Everything built on the hooks, on every decoder family (issue 14, point 4).

The residual identities the hook names promise; weight processing exact where the
registry says it is and refused where it says not; circuits exact or refused; path
patching's freezing and receiver recomputation (soft-caps, windows, q/k norms) checked
by identities that hold exactly; attribution patching equal to a gradient taken with
plain torch autograd on the `transformers` model; the head census and the shift study
run, and the decomposition behind the shift study sums to the residual stream.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.testing import assert_close

from family_specs import SPECS, decoder_layers, padded_batch
from interp.patching import activation_patch, attribution_patch, logit_diff, path_patch

TOL = dict(atol=1e-4, rtol=1e-5)


def _tokens(name, n=None):
    gen = torch.Generator().manual_seed(7)
    return torch.randint(3, 1000, (2, n or SPECS[name].tokens), generator=gen)


# ---------------------------------------------------------------------- hook names mean the same everywhere
def test_attn_and_mlp_out_are_what_the_stream_adds(family):
    _, _, model, _ = family
    _, cache = model.run_with_cache(_tokens(family[0]))
    cfg = model.cfg
    for l in range(cfg.n_layers):
        pre, attn, mlp, post = (cache[f"blocks.{l}.hook_{n}"] for n in ("resid_pre", "attn_out", "mlp_out", "resid_post"))
        if cfg.post_ln:
            assert_close(cache[f"blocks.{l}.hook_resid_mid"], pre + attn, **TOL)
            continue
        if cfg.parallel_attn_mlp:
            assert f"blocks.{l}.hook_resid_mid" not in model.hook_dict
            assert_close(post, pre + attn + mlp, **TOL)
        else:
            mid = cache[f"blocks.{l}.hook_resid_mid"]
            assert_close(mid, pre + attn, **TOL)  # also after OLMo 2's / Gemma 2's post-attention norm
            assert_close(post, mid + mlp, **TOL)
    if cfg.qk_norm:
        assert "blocks.0.attn.q_norm.hook_normalized" in model.hook_dict
        assert "blocks.0.attn.k_norm.hook_scale" in model.hook_dict


def test_resid_mid_sites_exist_exactly_in_sequential_blocks(family):
    name, _, model, _ = family
    clean = _tokens(name)
    if model.cfg.parallel_attn_mlp:
        with pytest.raises(ValueError, match="no resid_mid"):
            activation_patch(model, clean, clean, kind="resid_mid", metric=logit_diff(3, 4), progress=False)
        return
    # Patching a run with itself changes nothing: every cell is the unpatched metric.
    same = activation_patch(model, clean, clean, kind="resid_mid", by="layer", metric=logit_diff(3, 4), progress=False)
    assert_close(same.per_prompt, same.clean_metric[:, None].expand_as(same.per_prompt), **TOL)


# ---------------------------------------------------------------------- weight processing
def test_fold_ln_is_exact_where_the_registry_says(family):
    from models.convert import family_of
    from models.weight_processing import WeightProcessingError

    name, hf, model, _ = family
    claim = family_of(hf.config.model_type).fold_ln
    tokens, mask, _ = padded_batch(name)
    before = model(tokens, attention_mask=mask)
    folded = copy.deepcopy(model)
    if name == "opt_350m_style" or claim.startswith(("refused", "nothing")):
        with pytest.raises(WeightProcessingError):
            folded.process_weights(fold_ln=True)
        return
    if model.cfg.post_sublayer_norm or model.cfg.qk_norm:
        with pytest.warns(UserWarning, match="keep their weights"):
            folded.process_weights(fold_ln=True)
    else:
        folded.process_weights(fold_ln=True)
    assert_close(folded(tokens, attention_mask=mask), before, **TOL)
    for block in folded.blocks:  # norms before a reader are folded; norms after a sublayer keep their weights
        assert block.ln1 is None or block.ln1.w is None
        if getattr(block, "ln1_post", None) is not None:
            assert block.ln1_post.w is not None


@pytest.mark.filterwarnings("ignore:fold_ln folded")
def test_folded_model_saves_and_reloads(family, tmp_path):
    import models

    name, _, model, _ = family
    from models.weight_processing import WeightProcessingError

    folded = copy.deepcopy(model)
    if model.cfg.post_ln or model.cfg.normalization_type not in ("LN", "RMS"):
        with pytest.raises(WeightProcessingError):  # OPT-350m's post-LN, OLMo's weightless norms
            folded.process_weights(fold_ln=True)
        return
    folded.process_weights(fold_ln=True)
    folded.save(tmp_path)
    tokens, mask, _ = padded_batch(name)
    assert_close(models.load(tmp_path)(tokens, attention_mask=mask), folded(tokens, attention_mask=mask), atol=0, rtol=0)


def test_other_processing_is_exact_or_refused(family):
    from models.weight_processing import WeightProcessingError

    name, _, model, _ = family
    cfg = model.cfg
    tokens, mask, _ = padded_batch(name)
    logprobs = model(tokens, attention_mask=mask).log_softmax(-1)
    for step in ("center_unembed", "fold_value_biases", "center_writing_weights"):
        m = copy.deepcopy(model)
        refused = {
            "center_unembed": cfg.output_logits_soft_cap is not None,
            "fold_value_biases": cfg.clip_qkv is not None,
            "center_writing_weights": cfg.normalization_type not in ("LN", "LNPre") or not cfg.pre_norm
            or (cfg.post_ln and not cfg.embed_ln),
        }[step]
        if refused:
            with pytest.raises(WeightProcessingError):
                m.process_weights(**{step: True})
            continue
        m.process_weights(**{step: True})
        assert_close(m(tokens, attention_mask=mask).log_softmax(-1), logprobs, **TOL, msg=lambda s: f"{step}: {s}")


# ---------------------------------------------------------------------- circuits
def test_qk_circuit_is_the_dot_product_or_refused(family):
    from interp.circuits import CircuitError, circuit_limits

    name, _, model, _ = family
    if "QK" in circuit_limits(model.cfg):
        with pytest.raises(CircuitError, match="not defined"):
            model.QK
        return
    cfg = model.cfg
    tokens = _tokens(name)[:1]
    _, cache = model.run_with_cache(tokens)
    n_rep = cfg.n_heads // cfg.n_kv_heads
    for l in range(cfg.n_layers):
        block = model.blocks[l]
        if block.ln1 is not None and not cfg.post_ln:  # what attention reads: ln1's output, from its hook and weights
            x = cache[f"blocks.{l}.ln1.hook_normalized"][0]
            x = x * block.ln1.effective_weight if block.ln1.w is not None else x
            x = x + block.ln1.b if block.ln1.b is not None else x
        else:
            x = cache[f"blocks.{l}.hook_resid_pre"][0]
        q = cache["q", l][0] - block.attn.b_Q  # [pos, heads, d_head], before rotary and soft-cap
        k = cache["k", l][0] - block.attn._b_K
        for h in range(cfg.n_heads):
            dots = q[:, h] @ k[:, h // n_rep].T
            assert_close(x @ model.QK[l, h].AB @ x.T, dots, atol=1e-4, rtol=1e-4)


def test_circuit_functions_refuse_what_is_not_exact(family):
    from interp import circuits
    from interp.circuits import CircuitError, circuit_limits

    _, _, model, _ = family
    limits = circuit_limits(model.cfg)
    model.OV  # always defined (documented before a post-attention norm)
    if model.cfg.post_ln:
        return
    for fn, needs in ((circuits.full_ov, "OV"), (circuits.full_qk, "QK")):
        if needs in limits:
            with pytest.raises(CircuitError, match=needs):
                fn(model, 0, 0)
        else:
            assert fn(model, 0, 0).AB.shape == (model.cfg.d_vocab, model.cfg.d_vocab)
    if limits:
        with pytest.raises(CircuitError):
            circuits.composition_scores(model, "K", baseline_samples=4)
    else:
        assert circuits.composition_scores(model, "K", baseline_samples=4).scores.shape[0] == model.cfg.n_layers


# ---------------------------------------------------------------------- path and attribution patching
def _pair(name):
    clean = _tokens(name)
    corrupted = clean.clone()
    corrupted[:, 5] = (clean[:, 5] + 17) % 997 + 3
    return clean, corrupted


def test_path_patching_identities(family):
    """Senders in the last layer with the residual stream as receiver are a plain z patch of those heads;
    senders at positions where nothing was corrupted leave every receiver exactly as in the base run,
    which holds only if the receivers' patterns are recomputed as the forward computes them."""
    name, _, model, _ = family
    clean, corrupted = _pair(name)
    last = model.cfg.n_layers - 1
    metric = logit_diff(11, 12)
    heads = activation_patch(model, clean, corrupted, kind="z", by="head", metric=metric, direction="noise",
                             layers=[last], progress=False)
    for h in range(model.cfg.n_heads):
        path = path_patch(model, clean, corrupted, senders=[(last, h)], receivers="resid", metric=metric,
                          progress=False)
        assert_close(path.per_prompt, heads.per_prompt[:, 0, h], **TOL)
    untouched = path_patch(model, clean, corrupted, senders=[(0, h) for h in range(model.cfg.n_heads)],
                           receivers=[(last, h) for h in range(model.cfg.n_heads)], receiver_inputs="qkv",
                           sender_positions=[0, 1, 2], metric=metric, progress=False)
    assert_close(untouched.per_prompt, untouched.clean_metric, **TOL)


def test_attribution_equals_a_torch_gradient(family):
    """AtP's resid_pre estimate is (clean - corrupted) . d metric / d resid_pre at the corrupted run."""
    name, hf, model, _ = family
    clean, corrupted = _pair(name)
    a, b = torch.tensor([11, 13]), torch.tensor([12, 14])
    result = attribution_patch(model, clean, corrupted, kind="resid_pre", by="layer_pos", metric=logit_diff(a, b))

    layers = decoder_layers(hf)
    inputs = {}

    def grab(i):
        def pre(m, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            x = x.detach().requires_grad_(True)
            inputs[i] = x
            return ((x,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})
        return pre

    with torch.no_grad():
        clean_in = {}
        handles = [layer.register_forward_pre_hook(
            lambda m, args, kwargs, i=i: clean_in.__setitem__(i, (args[0] if args else kwargs["hidden_states"]).clone()),
            with_kwargs=True) for i, layer in enumerate(layers)]
        hf(clean)
        for handle in handles:
            handle.remove()
    expected = torch.zeros(2, len(layers), clean.shape[1])
    for target in range(len(layers)):  # one backward per layer: each layer's input a leaf of its own graph
        handle = layers[target].register_forward_pre_hook(grab(target), with_kwargs=True)
        try:
            with torch.enable_grad():
                logits = hf(corrupted).logits[:, -1]
                metric = (logits[torch.arange(2), a] - logits[torch.arange(2), b]).sum()
                grad, = torch.autograd.grad(metric, inputs[target])
        finally:
            handle.remove()
        expected[:, target] = ((clean_in[target] - inputs[target].detach()) * grad).sum(-1)
    estimate = result.per_prompt - result.corrupted_metric.view(-1, 1, 1)
    assert_close(estimate, expected, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------- studies
def test_head_census_runs(family):
    from analyses.heads import head_census

    _, _, model, _ = family
    census = head_census(model, n_random=2)
    for name, scores in census.scores.items():
        assert scores.mean.shape == (model.cfg.n_layers, model.cfg.n_heads), name
        assert torch.isfinite(scores.mean).all(), name


def test_shift_study_runs_and_its_decomposition_is_exact(family):
    from analyses.shift_data import STUDIES, flatten
    from interp.shift.decompose import decompose
    from interp.shift.study import shift_study

    _, _, model, _ = family
    contexts, labels = flatten(STUDIES["mole"]["senses"])
    contexts, labels = contexts[:3] + contexts[-3:], labels[:3] + labels[-3:]
    result = shift_study(model, "mole", contexts, labels, probe_folds=2)
    assert result.attributions, "the sense contrast was attributed to components"
    tok = model.tokenize(contexts[:2], padding_side="right")
    for layer in (1, model.cfg.n_layers):
        parts = decompose(model, tok.tokens, [3, 4], layer=layer, attention_mask=tok.attention_mask)
        assert_close(parts.components.sum(1), parts.resid, atol=1e-4, rtol=1e-4)
