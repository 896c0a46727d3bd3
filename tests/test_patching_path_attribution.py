"""Path patching and attribution patching against computations written here.

Path patching is redone with plain torch hooks on the `transformers` twin (the harness
of test_patching.py): freeze every head's z, swap in the senders', record the receivers'
inputs, patch them into a fresh run. Attribution patching is redone with the twin's own
autograd. AtP*'s query/key fix is exact where the metric is linear in the attention
pattern (the last layer of a norm-free attention-only model), so there it must equal
exact patching.
"""

from __future__ import annotations

import pytest
import torch

import models
from interp.patching import (
    PatchResult, activation_patch, attribution_patch, attribution_sweeps, compare, effects, logit_diff, path_patch,
)
from test_patching import HF, Setup, _load_hf  # noqa: F401  (the HF harness)

TOL = dict(atol=1e-4, rtol=1e-5)


@pytest.fixture(scope="module")
def llama_s(llama, llama_dir):
    return Setup(llama, HF(_load_hf(llama_dir)))


@pytest.fixture(scope="module")
def gpt2_s(gpt2, gpt2_dir):
    return Setup(gpt2, HF(_load_hf(gpt2_dir)))


# ---------------------------------------------------------------------- attribution
def hf_attribution(s: Setup, kind, by, direction):
    """(a_src - a_base) . d(metric)/da on the HF twin, summed to the grid's cells, plus the base metric."""
    hf = s.hf
    L = s.model.cfg.n_layers
    base, source = (s.corrupted, s.clean) if direction == "denoise" else (s.clean, s.corrupted)
    src = hf.record(source, kind, range(L))
    acts, grads = {}, {}

    def grab(layer):
        def fn(act):
            acts[layer] = act
            act.register_hook(lambda g: grads.__setitem__(layer, g))
            return act

        return fn

    handles = [hf.attach(kind, layer, grab(layer)) for layer in range(L)]
    try:
        logits = hf.hf(input_ids=base).logits
        metric = s.diff(logits, torch.arange(base.shape[0]))
        metric.sum().backward()
    finally:
        for h in handles:
            h.remove()
    hf.hf.zero_grad(set_to_none=True)
    cells = []
    for layer in range(L):
        prod = (src[layer] - acts[layer].detach()) * grads[layer]
        if kind == "pattern":  # [b, head, dest, src]
            cells.append(prod if by == "dest_src" else prod.sum(-1))
        elif by in ("layer_pos", "layer"):  # [b, pos, d]
            cells.append(prod.sum(-1) if by == "layer_pos" else prod.sum((-1, -2)))
        else:  # [b, pos, head, d] -> [b, head, pos]
            per = prod.sum(-1).transpose(1, 2)
            cells.append(per if by == "head_pos" else per.sum(-1))
    delta = torch.stack(cells, 1).detach()
    return metric.detach().view(-1, *([1] * (delta.dim() - 1))) + delta


LINEAR_CASES = [("resid_pre", "layer_pos"), ("resid_mid", "layer"), ("attn_out", "layer_pos"), ("mlp_out", "layer_pos"),
                ("z", "head_pos"), ("v", "head_pos"), ("pattern", "dest_src")]


@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("kind,by", LINEAR_CASES)
def test_attribution_matches_autograd_on_the_transformers_model(llama_s, kind, by, direction):
    s = llama_s
    got = attribution_patch(s.model, s.clean, s.corrupted, kind=kind, by=by, metric=s.metric(), direction=direction,
                            qk_fix=False)
    torch.testing.assert_close(got.per_prompt, hf_attribution(s, kind, by, direction).float(), **TOL)
    assert got.forwards == 2 and got.extra["backwards"] == 1


def test_attribution_of_head_results_equals_that_of_their_z(llama_s):
    # result_h = z_h W_O[h], so (d result_h) . g = (d z_h) W_O[h] . g = (d z_h) . (g W_O[h]^T): the same number.
    s = llama_s
    via_result = attribution_patch(s.model, s.clean, s.corrupted, kind="result", by="head_pos", metric=s.metric())
    via_z = attribution_patch(s.model, s.clean, s.corrupted, kind="z", by="head_pos", metric=s.metric())
    torch.testing.assert_close(via_result.per_prompt, via_z.per_prompt, **TOL)


def test_attribution_normalises_like_exact_patching(llama_s):
    s = llama_s
    raw = attribution_patch(s.model, s.clean, s.corrupted, kind="z", by="head", metric=s.metric())
    norm = attribution_patch(s.model, s.clean, s.corrupted, kind="z", by="head", metric=s.metric(normalized=True))
    lo, hi = s.corrupted_diff.view(-1, 1, 1), s.clean_diff.view(-1, 1, 1)
    torch.testing.assert_close(norm.per_prompt, (raw.per_prompt - lo) / (hi - lo), **TOL)


def test_one_attribution_pass_serves_every_grid(llama_s):
    s = llama_s
    sweeps = [("resid_pre", "layer_pos"), ("z", "head"), ("q", "head_pos"), ("k", "head_pos")]
    together = attribution_sweeps(s.model, s.clean, s.corrupted, sweeps=sweeps, metric=s.metric())
    for kind, by in sweeps:
        alone = attribution_patch(s.model, s.clean, s.corrupted, kind=kind, by=by, metric=s.metric())
        torch.testing.assert_close(together[(kind, by)].per_prompt, alone.per_prompt, **TOL)  # explicit vs fused attention


@pytest.mark.parametrize("corruption", ["prompts", "noise"])
@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_attribution_with_the_source_in_the_graph_equals_a_separate_source_forward(llama_s, monkeypatch,
                                                                                  corruption, direction):
    # Small batches run the source rows in the graph's forward; large ones run them apart.
    import interp.patching.attribution as attribution
    from test_patching import CLEAN
    from interp.patching import GaussianNoise

    s = llama_s
    args = dict(corrupted=s.corrupted) if corruption == "prompts" else dict(noise=GaussianNoise("the", seed=4))
    metric = s.metric()
    sweeps = [("resid_pre", "layer_pos"), ("z", "head_pos"), ("q", "head_pos"), ("k", "head")]
    clean = s.clean if corruption == "prompts" else CLEAN
    merged = attribution_sweeps(s.model, clean, sweeps=sweeps, metric=metric, direction=direction, **args)
    monkeypatch.setattr(attribution, "MERGE_TOKENS", 0)
    apart = attribution_sweeps(s.model, clean, sweeps=sweeps, metric=metric, direction=direction, **args)
    for sweep in sweeps:
        torch.testing.assert_close(merged[sweep].per_prompt, apart[sweep].per_prompt, **TOL)
        torch.testing.assert_close(merged[sweep].clean_metric, apart[sweep].clean_metric, **TOL)
        torch.testing.assert_close(merged[sweep].corrupted_metric, apart[sweep].corrupted_metric, **TOL)
    assert not torch.equal(merged[sweeps[0]].clean_metric, merged[sweeps[0]].corrupted_metric)


def _sharp_attention_model(n_kv_heads, rotary, std):
    """Norm-free attention-only model with weights large enough for peaked (non-uniform) attention."""
    torch.manual_seed(0)
    cfg = models.TransformerConfig(n_layers=2, d_model=32, n_heads=4, d_head=8, d_vocab=50, n_ctx=32, d_mlp=None,
                                   n_kv_heads=n_kv_heads, normalization_type=None,
                                   positional_embedding_type="rotary" if rotary else "standard", model_name="sharp")
    model = models.HookedTransformer(cfg)
    model.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


# std 0.5 makes attention one-hot-like (scores in the hundreds): the key fix must stay exact there too.
@pytest.mark.parametrize("n_kv,rotary,std", [(4, False, 0.2), (2, True, 0.2), (2, True, 0.5)])
@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("kind,by", [("q", "head_pos"), ("k", "head_pos"), ("q", "head"), ("k", "head")])
def test_atp_star_is_exact_where_the_metric_is_linear_in_the_pattern(n_kv, rotary, std, direction, kind, by):
    # Last layer, no norm, no MLP: logits = W_U (resid + sum_h A_h V_h W_O), linear in each pattern A_h,
    # so recomputing the softmax exactly leaves nothing to approximate.
    model = _sharp_attention_model(n_kv, rotary, std)
    g = torch.Generator().manual_seed(1)
    clean, corrupted = torch.randint(50, (3, 7), generator=g), torch.randint(50, (3, 7), generator=g)
    metric = logit_diff([1, 2, 3], [4, 5, 6])
    exact = activation_patch(model, clean, corrupted, kind=kind, by=by, metric=metric, direction=direction,
                             layers=[1], progress=False)
    star = attribution_patch(model, clean, corrupted, kind=kind, by=by, metric=metric, direction=direction, layers=[1])
    plain = attribution_patch(model, clean, corrupted, kind=kind, by=by, metric=metric, direction=direction,
                              layers=[1], qk_fix=False)
    torch.testing.assert_close(star.per_prompt, exact.per_prompt, **TOL)
    star_err = float((star.per_prompt - exact.per_prompt).abs().max())
    plain_err = float((plain.per_prompt - exact.per_prompt).abs().max())
    assert plain_err > 1e-4 and plain_err > 100 * star_err  # the plain linear estimate is not exact
    assert star.extra["method"] == "attribution (AtP*)"


def test_compare_matches_hand_computed_statistics():
    def result(values):
        t = torch.tensor(values, dtype=torch.float32)[None]  # one prompt, grid [2, 3]
        return PatchResult("z", "head", ("layer", "head"), {"layer": ["L0", "L1"], "head": ["H0", "H1", "H2"]}, t,
                           "m", "denoise", torch.tensor([1.0]), torch.tensor([0.0]), False)

    a = result([[0.1, 0.5, -0.2], [0.9, 0.0, 0.3]])
    b = result([[0.2, 0.4, -0.1], [0.3, 0.1, 0.8]])
    x, y = torch.tensor([0.1, 0.5, -0.2, 0.9, 0.0, 0.3]), torch.tensor([0.2, 0.4, -0.1, 0.3, 0.1, 0.8])
    stats = compare(a, b, k=2)
    assert stats["pearson"] == pytest.approx(float(torch.corrcoef(torch.stack([x, y]))[0, 1]), abs=1e-6)
    # ranks by hand: x -> [2, 4, 0, 5, 1, 3], y -> [2, 4, 0, 3, 1, 5]
    rx, ry = torch.tensor([2., 4, 0, 5, 1, 3]), torch.tensor([2., 4, 0, 3, 1, 5])
    assert stats["spearman"] == pytest.approx(float(torch.corrcoef(torch.stack([rx, ry]))[0, 1]), abs=1e-6)
    assert stats["top_k"] == 0.5 and stats["k"] == 2  # exact's top two |effect|: 0.9, 0.5; approx's: 0.8, 0.4 -> only 0.5's cell shared
    with pytest.raises(ValueError, match="different grids"):
        compare(a, result([[0.0, 1.0]]))


def test_effects_are_changes_from_the_base_run():
    t = torch.tensor([[0.25, 1.0]])
    mk = lambda direction, normalized: PatchResult("z", "head", ("head",), {"head": ["H0", "H1"]}, t, "m", direction,  # noqa: E731
                                                   torch.tensor([2.0]), torch.tensor([-1.0]), normalized)
    torch.testing.assert_close(effects(mk("denoise", True)), t)
    torch.testing.assert_close(effects(mk("noise", True)), t - 1)
    torch.testing.assert_close(effects(mk("denoise", False)), t + 1)
    torch.testing.assert_close(effects(mk("noise", False)), t - 2)


# ---------------------------------------------------------------------- path patching
def hf_path(s: Setup, senders, receivers=None, direction="noise", freeze_mlps=False, sender_positions=None):
    """Path patching by hand on the HF twin. receivers: None (final residual) or [(layer, kind, index)] with kind
    q (a query head) or k / v (a KV head), patched in step 2 with what step 1 recorded."""
    hf = s.hf
    L = s.model.cfg.n_layers
    base, source = (s.clean, s.corrupted) if direction == "noise" else (s.corrupted, s.clean)
    z_base, z_src = hf.record(base, "z", range(L)), hf.record(source, "z", range(L))
    mlp_base = hf.record(base, "mlp_out", range(L)) if freeze_mlps else {}

    def frozen(layer):
        def fn(z):
            out = z_base[layer].clone()
            for sl, sh in senders:
                if sl == layer:
                    pos = slice(None) if sender_positions is None else list(sender_positions)
                    out[:, pos, sh] = z_src[layer][:, pos, sh]
            return out

        return fn

    edits = [("z", layer, frozen(layer)) for layer in range(L)]
    edits += [("mlp_out", layer, (lambda m, l=layer: mlp_base[l].clone())) for layer in mlp_base]
    idx = torch.arange(base.shape[0])
    if receivers is None:
        return s.diff(hf.run(base, edits), idx)
    recorded = {}

    def rec(layer, kind):
        def fn(act):
            recorded[(layer, kind)] = act.detach().clone()
            return act

        return fn

    kinds = {(layer, kind) for layer, kind, _ in receivers}
    hf.run(base, edits + [(kind, layer, rec(layer, kind)) for layer, kind in kinds])

    def put(layer, kind):
        def fn(act):
            act = act.clone()
            for rl, rk, i in receivers:
                if (rl, rk) == (layer, kind):
                    act[:, :, i] = recorded[(layer, kind)][:, :, i]
            return act

        return fn

    return s.diff(hf.run(base, [(kind, layer, put(layer, kind)) for layer, kind in kinds]), idx)


@pytest.mark.parametrize("direction", ["noise", "denoise"])
@pytest.mark.parametrize("sender", [(0, 1), (1, 3)])
def test_path_to_the_final_residual_matches_hand_hooks(llama_s, sender, direction):
    s = llama_s
    one = path_patch(s.model, s.clean, s.corrupted, senders=[sender], metric=s.metric(), direction=direction,
                     progress=False)
    every = path_patch(s.model, s.clean, s.corrupted, senders="each", metric=s.metric(), direction=direction,
                       progress=False, batch_size=5)
    want = hf_path(s, [sender], direction=direction)
    torch.testing.assert_close(one.per_prompt, want, **TOL)
    torch.testing.assert_close(every.per_prompt[:, sender[0], sender[1]], want, **TOL)
    assert every.shape == (2, 4)


@pytest.mark.parametrize("freeze_mlps", [False, True])
def test_path_into_a_query_matches_hand_hooks(llama_s, freeze_mlps):
    s = llama_s
    got = path_patch(s.model, s.clean, s.corrupted, senders=[(0, 0), (0, 2)], receivers=[(1, 3)], receiver_inputs="q",
                     metric=s.metric(), freeze_mlps=freeze_mlps, progress=False)
    want = hf_path(s, [(0, 0), (0, 2)], [(1, "q", 3)], freeze_mlps=freeze_mlps)
    torch.testing.assert_close(got.per_prompt, want, **TOL)


def test_path_into_a_whole_kv_group_matches_patching_the_shared_projection(llama_s):
    # LLaMA twin: 4 query heads, 2 KV heads -> heads 2 and 3 share KV head 1. Patching both heads' k and v
    # inputs is patching KV head 1's k_proj/v_proj output.
    s = llama_s
    got = path_patch(s.model, s.clean, s.corrupted, senders=[(0, 1)], receivers=[(1, 2), (1, 3)], receiver_inputs="kv",
                     metric=s.metric(), progress=False)
    want = hf_path(s, [(0, 1)], [(1, "k", 1), (1, "v", 1)])
    torch.testing.assert_close(got.per_prompt, want, **TOL)


@pytest.mark.parametrize("inputs", ["k", "v", "qkv"])
def test_path_into_one_head_of_gpt2_matches_hand_hooks(gpt2_s, inputs):
    s = gpt2_s
    got = path_patch(s.model, s.clean, s.corrupted, senders=[(0, 2)], receivers=[(1, 1)], receiver_inputs=inputs,
                     metric=s.metric(), progress=False, sender_positions=[1, 2, 3])
    want = hf_path(s, [(0, 2)], [(1, k, 1) for k in inputs], sender_positions=[1, 2, 3])
    torch.testing.assert_close(got.per_prompt, want, **TOL)


def test_path_patching_with_no_senders_changes_nothing(llama_s):
    # Every head frozen at its own base value is the base run: the clean metric, whatever the receivers.
    s = llama_s
    got = path_patch(s.model, s.clean, s.corrupted, senders=[(0, 0)], receivers="resid", metric=s.metric(),
                     sender_positions=[], progress=False)
    torch.testing.assert_close(got.per_prompt, s.clean_diff, **TOL)


def test_path_patching_rejects_impossible_paths(llama_s):
    s = llama_s
    common = dict(metric=s.metric(), progress=False)
    with pytest.raises(ValueError, match="not below the receivers"):
        path_patch(s.model, s.clean, s.corrupted, senders=[(1, 0)], receivers=[(1, 2)], **common)
    with pytest.raises(ValueError, match="receiver_inputs"):
        path_patch(s.model, s.clean, s.corrupted, senders=[(0, 0)], receivers=[(1, 2)], receiver_inputs="x", **common)
    with pytest.raises(ValueError, match="outside the model"):
        path_patch(s.model, s.clean, s.corrupted, senders=[(0, 9)], **common)
    with pytest.raises(ValueError, match="corrupted prompts or noise"):
        path_patch(s.model, s.clean, None, senders=[(0, 0)], **common)


# ---------------------------------------------------------------------- TransformerLens' own patching on our model
@pytest.mark.parametrize("fn_name,kind,by", [
    ("get_act_patch_resid_pre", "resid_pre", "layer_pos"),
    ("get_act_patch_attn_head_out_by_pos", "z", "head_pos"),
    ("get_act_patch_attn_head_v_all_pos", "v", "head"),
    ("get_act_patch_attn_head_pattern_dest_src_pos", "pattern", "dest_src"),
])
def test_transformer_lens_patching_agrees_on_our_model(llama_s, fn_name, kind, by):
    # TL 4.3's patching functions only need run_with_hooks, a cache indexed by hook name and cfg: ours serve.
    tlp = pytest.importorskip("transformer_lens.patching")
    s = llama_s
    clean, corrupted = s.clean[:1], s.corrupted[:1]
    _, clean_cache = s.model.run_with_cache(clean)
    a, b = int(s.a[0]), int(s.b[0])
    want = getattr(tlp, fn_name)(s.model, corrupted, clean_cache, lambda logits: logits[0, -1, a] - logits[0, -1, b])
    if by == "head_pos":  # TL's grid is [layer, pos, head]
        want = want.permute(0, 2, 1)
    ours = activation_patch(s.model, clean, corrupted, kind=kind, by=by, metric=logit_diff(a, b), progress=False)
    torch.testing.assert_close(ours.mean, want.float(), **TOL)
