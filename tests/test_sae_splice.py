"""Splicing dictionaries into the model (interp.sae.splice) and features as patching sites.

Every check is against a computation written here: the dictionaries are applied by ordinary hooks
that call `encode` / `decode` (never the splice), edits are made on those latents, gradients are
taken with torch.autograd by hand, and path patching is redone as two plain runs.
Tiny random models and dictionaries (float32), so the whole file runs in seconds.
"""

from __future__ import annotations

import pytest
import torch

import models
from interp.patching import activation_patch, attribution_patch, logit_diff, path_patch
from interp.sae import DictionaryConfig, DimensionMismatchError, HookNotInModelError, SparseDictionary
from interp.sae.splice import SpliceError, run_with_cache_with_saes, run_with_hooks_with_saes, run_with_saes, splice

TOL = dict(atol=1e-4, rtol=1e-5)
EXACT = dict(atol=1e-5, rtol=0)
CORRECT, WRONG = 3, 7
SAE_HOOK = "blocks.0.hook_resid_post"
TC_IN, TC_OUT = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"


def tiny_model(seed: int = 0, **overrides) -> models.HookedTransformer:
    """2 layers, LayerNorm, learned positions, GELU MLP; every weight random so no path is negligible."""
    torch.manual_seed(seed)
    cfg = models.TransformerConfig(**{**dict(n_layers=2, d_model=16, n_heads=2, d_head=8, d_vocab=50, n_ctx=16,
                                             d_mlp=32, model_name="tiny-sae"), **overrides})
    model = models.HookedTransformer(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if ".ln" in name and name.endswith(".w") else 0.3 * noise)
    return model.requires_grad_(False)


def dictionary(architecture: str, hook: str, out_hook: str | None = None, d_in: int = 16, d_sae: int = 24,
               seed: int = 1, **cfg) -> SparseDictionary:
    """A dictionary with random weights; biases shifted down so that many latents are zero on a token."""
    sae = SparseDictionary(DictionaryConfig(architecture, d_in, d_sae, hook, out_hook_name=out_hook, **cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            torch.nn.init.normal_(p, std=0.3, generator=g)
        sae.b_enc -= 0.5
        if hasattr(sae, "threshold"):
            sae.threshold.copy_(sae.threshold.abs())
    return sae.requires_grad_(False)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def sae():
    return dictionary("relu", SAE_HOOK, seed=1)


@pytest.fixture(scope="module")
def transcoder():
    return dictionary("topk", TC_IN, TC_OUT, k=6, seed=2)


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(5)
    clean = torch.randint(0, 50, (2, 6), generator=g)
    corrupted = clean.clone()
    corrupted[:, 2] = (clean[:, 2] + 11) % 50  # one corrupted token: positions 0-1 stay equal in both runs
    corrupted[1, 4] = (clean[1, 4] + 5) % 50
    return clean, corrupted


def diff(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1, CORRECT] - logits[:, -1, WRONG]


METRIC = logit_diff(CORRECT, WRONG)


# ---------------------------------------------------------------------- the dictionaries by hand
def by_hand(model, tokens, dicts, edits=None, error=True, hooks=(), record=None):
    """model(tokens) with each dictionary applied by ordinary hooks written here.

    edits: {index in dicts: fn(acts [b, pos, d_sae]) -> acts}; record: a dict receiving each
    dictionary's latents (index -> acts) and input (("in", index) -> x). `hooks` run before them.
    """
    edits = edits or {}
    record = {} if record is None else record
    captured = {}
    spliced = []

    def apply(i, sae, x_in, y):
        acts = sae.encode(x_in)
        record[i], record[("in", i)] = acts, x_in
        clean = sae.decode(acts, x_in)
        out = sae.decode(edits[i](acts) if i in edits else acts, x_in)
        return out + (y - clean) if error else out

    for i, sae in enumerate(dicts):
        cfg = sae.cfg
        if cfg.is_transcoder:
            spliced.append((cfg.hook_name, lambda x, hook, i=i: captured.__setitem__(i, x)))
            spliced.append((cfg.out_hook_name, lambda y, hook, i=i, sae=sae: apply(i, sae, captured.pop(i), y)))
        else:
            spliced.append((cfg.hook_name, lambda x, hook, i=i, sae=sae: apply(i, sae, x, x)))
    with model.hooks(fwd_hooks=list(hooks) + spliced):
        return model(tokens)


def set_latent(pos, feature, value):
    """An edit writing value [b, pos] or [b] into one latent at `pos` (None: every position)."""
    def edit(acts):
        acts = acts.clone()
        if pos is None:
            acts[:, :, feature] = value
        else:
            acts[:, pos, feature] = value
        return acts

    return edit


# ---------------------------------------------------------------------- splicing
@pytest.mark.parametrize("which", ["sae", "transcoder", "both"])
def test_error_term_leaves_the_logits_unchanged(model, sae, transcoder, prompts, which):
    dicts = {"sae": [sae], "transcoder": [transcoder], "both": [sae, transcoder]}[which]
    tokens = prompts[0]
    plain = model(tokens)
    with splice(model, dicts, use_error_term=True):
        spliced = model(tokens)
    torch.testing.assert_close(spliced, plain, **EXACT)
    # ...and the dictionaries matter: without the error term the output moves.
    assert (run_with_saes(model, tokens, dicts, use_error_term=False) - plain).abs().max() > 1e-2


@pytest.mark.parametrize("which", ["sae", "transcoder", "both"])
def test_without_the_error_term_the_reconstruction_is_written_in(model, sae, transcoder, prompts, which):
    dicts = {"sae": [sae], "transcoder": [transcoder], "both": [sae, transcoder]}[which]
    tokens = prompts[0]
    expected = by_hand(model, tokens, dicts, error=False)
    with model.saes(dicts, use_error_term=False):
        spliced = model(tokens)
    torch.testing.assert_close(spliced, expected, **EXACT)


def test_use_error_term_none_keeps_each_dictionarys_own(model, sae, transcoder, prompts):
    tokens = prompts[0]
    transcoder.use_error_term = True
    try:
        out = run_with_saes(model, tokens, [sae, transcoder])  # sae: off (its default), transcoder: on
    finally:
        transcoder.use_error_term = False
    expected = by_hand(model, tokens, [sae], error=False)
    torch.testing.assert_close(out, expected, **EXACT)


@pytest.mark.parametrize("error", [True, False])
def test_edits_to_features_propagate(model, sae, transcoder, prompts, error):
    tokens = prompts[0]
    record = {}
    by_hand(model, tokens, [sae, transcoder], record=record)
    f_sae = int(record[0][0, 3].argmax())  # a latent active at position 3
    f_tc = int(record[1][1, 5].argmax())

    def zero(acts, hook):
        acts = acts.clone()
        acts[:, 3, f_sae] = 0.0
        return acts

    def double(acts, hook):
        return acts * torch.where(torch.arange(acts.shape[-1]) == f_tc, 2.0, 1.0)

    expected = by_hand(model, tokens, [sae, transcoder], error=error,
                       edits={0: set_latent(3, f_sae, 0.0), 1: lambda a: a * torch.where(torch.arange(a.shape[-1]) == f_tc, 2.0, 1.0)})
    hooks = [(f"{SAE_HOOK}.hook_sae_acts_post", zero), (f"{TC_IN}.hook_sae_acts_post", double)]
    with model.saes([sae, transcoder], use_error_term=error):
        edited = model.run_with_hooks(tokens, fwd_hooks=hooks)
    torch.testing.assert_close(edited, expected, **EXACT)
    if error:  # the edit is all that moves the output
        assert (edited - model(tokens)).abs().max() > 1e-3
    torch.testing.assert_close(run_with_hooks_with_saes(model, tokens, [sae, transcoder], use_error_term=error,
                                                        fwd_hooks=hooks), expected, **EXACT)


def _clean_state(model, saes) -> dict:
    return {
        "names": sorted(model.hook_dict),
        "hooks": sum(len(p._hooks["fwd"]) + len(p._hooks["bwd"]) + len(p._forward_hooks) for p in model.hook_dict.values()),
        "sae_names": [sorted((n, p.name) for n, p in s.hook_dict.items()) for s in saes],
        "error_terms": [s.use_error_term for s in saes],
        "registry": "_spliced_dictionaries" in model.__dict__,
    }


def test_hook_points_are_the_models_while_spliced_and_gone_after(model, sae, transcoder, prompts):
    tokens = prompts[0]
    before = _clean_state(model, [sae, transcoder])
    acts_name = f"{SAE_HOOK}.hook_sae_acts_post"
    tc_name = f"{TC_IN}.hook_sae_acts_post"
    with splice(model, [sae, transcoder], use_error_term=True) as spliced:
        assert spliced is model
        for name in ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons",
                     "hook_sae_error", "hook_sae_output"):
            assert f"{SAE_HOOK}.{name}" in model.hook_dict and f"{TC_IN}.{name}" in model.hook_dict
        assert model.hook_dict[acts_name] is sae.hook_sae_acts_post
        _, cache = model.run_with_cache(tokens, names_filter=[acts_name, tc_name, SAE_HOOK, TC_IN,
                                                              f"{SAE_HOOK}.hook_sae_output"])
        # The model's own point keeps the model's activation (the dictionary's input).
        torch.testing.assert_close(cache[acts_name], sae.encode(cache[SAE_HOOK]), **EXACT)
        torch.testing.assert_close(cache[tc_name], transcoder.encode(cache[TC_IN]), **EXACT)
        torch.testing.assert_close(cache[f"{SAE_HOOK}.hook_sae_output"], cache[SAE_HOOK], **EXACT)
        _, everything = model.run_with_cache(tokens)  # names_filter=None includes the dictionaries' points
        assert acts_name in everything and f"{TC_IN}.hook_sae_error" in everything
        seen = []
        with model.hooks(fwd_hooks=[(acts_name, lambda t, hook: seen.append(hook.name))]):
            model(tokens)
        model.run_with_hooks(tokens, fwd_hooks=[(lambda n: n.endswith("hook_sae_recons"), lambda t, hook: seen.append(hook.name))])
        assert seen == [acts_name, f"{SAE_HOOK}.hook_sae_recons", f"{TC_IN}.hook_sae_recons"]
        model.reset_hooks()  # TransformerLens code does this; the splice stays
        torch.testing.assert_close(model.run_with_cache(tokens, names_filter=acts_name)[1][acts_name],
                                   cache[acts_name], **EXACT)
    assert _clean_state(model, [sae, transcoder]) == before
    # SAELens's call gives the same cache in one line.
    _, cache2 = run_with_cache_with_saes(model, tokens, [sae, transcoder], use_error_term=True, names_filter=acts_name)
    torch.testing.assert_close(cache2[acts_name], cache[acts_name], **EXACT)
    assert _clean_state(model, [sae, transcoder]) == before


def test_nothing_stays_attached_after_an_exception(model, sae, transcoder, prompts):
    before = _clean_state(model, [sae, transcoder])
    with pytest.raises(RuntimeError, match="inside"):
        with splice(model, [sae, transcoder], use_error_term=True):
            model(prompts[0])
            raise RuntimeError("inside the block")
    assert _clean_state(model, [sae, transcoder]) == before
    torch.testing.assert_close(model(prompts[0]), tiny_model()(prompts[0]), **EXACT)


def test_gradients_through_the_error_term_are_the_models(model, sae, prompts):
    # d output / d input of a dictionary spliced with its error term is the identity: backward hooks on the model's
    # point see the model's own gradient.
    def grads(spliced_in):
        with splice(model, [sae] if spliced_in else [], use_error_term=True):
            return model.run_with_cache(prompts[0], names_filter=["blocks.0.hook_resid_pre", SAE_HOOK],
                                        incl_bwd=True, backward_metric=lambda out: diff(out).sum())[1]

    plain, spliced = grads(False), grads(True)
    for name in ("blocks.0.hook_resid_pre_grad", f"{SAE_HOOK}_grad"):
        torch.testing.assert_close(spliced[name], plain[name], **EXACT)


def test_hook_z_dictionaries_read_heads_flattened(model, prompts):
    z_sae = dictionary("jumprelu", "blocks.1.attn.hook_z", d_in=16, d_sae=20, seed=4,  # 2 heads x d_head 8
                       reshape_activations="hook_z")
    with splice(model, [z_sae], use_error_term=True):
        out, cache = model.run_with_cache(prompts[0], names_filter=["blocks.1.attn.hook_z",
                                                                    "blocks.1.attn.hook_z.hook_sae_acts_post"])
    torch.testing.assert_close(out, model(prompts[0]), **EXACT)
    z = cache["blocks.1.attn.hook_z"]
    torch.testing.assert_close(cache["blocks.1.attn.hook_z.hook_sae_acts_post"], z_sae.encode(z.flatten(-2)), **EXACT)


# ---------------------------------------------------------------------- named errors
def test_a_dictionary_of_the_wrong_width_is_a_named_error(model, sae, prompts):
    wide = dictionary("relu", SAE_HOOK, d_in=24, seed=3)
    before = _clean_state(model, [wide])
    with pytest.raises(DimensionMismatchError, match=r"d_in is 24, but blocks\.0\.hook_resid_post .* is 16"):
        run_with_saes(model, prompts[0], [wide])
    assert _clean_state(model, [wide]) == before
    bad_out = dictionary("relu", TC_IN, TC_OUT, d_sae=8, d_out=12, seed=3)
    with pytest.raises(DimensionMismatchError, match="d_out is 12"):
        run_with_saes(model, prompts[0], [bad_out], use_error_term=True)
    # hook_q is [b, pos, heads, d_head]: the config does not say, a probe does.
    q_sae = dictionary("relu", "blocks.1.attn.hook_q", d_in=8, seed=3)
    with splice(model, [q_sae], use_error_term=True):
        torch.testing.assert_close(model(prompts[0]), tiny_model()(prompts[0]), **EXACT)
    with pytest.raises(DimensionMismatchError, match=r"blocks\.1\.attn\.hook_q"):
        run_with_saes(model, prompts[0], [dictionary("relu", "blocks.1.attn.hook_q", d_in=12, seed=3)])


def test_the_width_is_checked_again_at_first_use(model, prompts, monkeypatch):
    # Where check_fits cannot size a hook (no probe forward for the model), the first activation is checked.
    import interp.sae.splice as splice_module

    monkeypatch.setattr(splice_module, "check_fits", lambda sae, model: None)
    wide = dictionary("relu", SAE_HOOK, d_in=24, seed=3)
    before = _clean_state(model, [wide])
    with pytest.raises(DimensionMismatchError, match=r"blocks\.0\.hook_resid_post holds activations of shape "
                                                     r"\(2, 6, 16\).*d_in is 24"):
        run_with_saes(model, prompts[0], [wide])
    assert _clean_state(model, [wide]) == before


def test_an_unknown_hook_is_a_named_error(model, sae):
    lost = dictionary("relu", "blocks.0.hook_resid_psot", seed=3)
    with pytest.raises(HookNotInModelError, match=r"hook_resid_psot.*blocks\.0\.hook_resid_post"):
        with splice(model, [lost]):
            pass
    out_lost = dictionary("relu", TC_IN, "blocks.1.hook_mlp_outt", seed=3)
    with pytest.raises(HookNotInModelError, match="out_hook_name"):
        with splice(model, [out_lost]):
            pass
    twice = dictionary("relu", SAE_HOOK, seed=9)
    with pytest.raises(SpliceError, match="already spliced"):
        with splice(model, [sae, twice]):
            pass
    assert "_spliced_dictionaries" not in model.__dict__ and f"{SAE_HOOK}.hook_sae_input" not in model.hook_dict


def test_patching_needs_dictionaries(model, prompts):
    with pytest.raises(SpliceError, match="no dictionary is spliced"):
        activation_patch(model, *prompts, kind="sae_acts_post", by="feature_pos", metric=METRIC, progress=False)


# ---------------------------------------------------------------------- feature patching
def brute_force_features(model, dicts, base, source, by, feats, error=True):
    """One run per (dictionary, feature, [position,] prompt), the latent set to the source run's by hand."""
    src = {}
    by_hand(model, source, dicts, record=src, error=error)
    n, n_pos = base.shape
    positions = list(range(n_pos)) if by == "feature_pos" else [None]
    out = torch.zeros(n, len(dicts), len(feats), len(positions))
    for i in range(len(dicts)):
        for fi, f in enumerate(feats):
            for pi, p in enumerate(positions):
                for b in range(n):
                    value = src[i][b:b + 1, p, f] if p is not None else src[i][b:b + 1, :, f]
                    logits = by_hand(model, base[b:b + 1], dicts, edits={i: set_latent(p, f, value)}, error=error)
                    out[b, i, fi, pi] = diff(logits)[0]
    return out if by == "feature_pos" else out[..., 0]


@pytest.mark.parametrize("by,direction,fast,features", [
    ("feature_pos", "denoise", True, [0, 5, 11, 17]),
    ("feature_pos", "noise", True, [2, 3, 23]),
    ("feature_pos", "denoise", False, [1, 8]),
    ("feature", "denoise", True, None),
    ("feature", "noise", False, [4, 9, 20]),
])
def test_feature_patching_equals_brute_force(model, sae, transcoder, prompts, by, direction, fast, features):
    clean, corrupted = prompts
    base, source = (corrupted, clean) if direction == "denoise" else (clean, corrupted)
    result = activation_patch(model, clean, corrupted, kind="sae_acts_post", by=by, saes=[sae, transcoder],
                              features=features, metric=METRIC, direction=direction, fast=fast, progress=False)
    feats = list(range(24)) if features is None else features
    expected = brute_force_features(model, [sae, transcoder], base, source, by, feats)
    torch.testing.assert_close(result.per_prompt, expected, **TOL)
    assert result.axes == (("sae", "feature", "pos") if by == "feature_pos" else ("sae", "feature"))
    assert result.labels["sae"] == [SAE_HOOK, TC_IN] and result.labels["feature"] == [f"F{f}" for f in feats]
    # Latents equal in both runs (all of them before the corrupted token) are not run.
    assert result.extra["rows_run"] < result.extra["rows"]
    assert "_spliced_dictionaries" not in model.__dict__


def test_feature_patching_of_two_dictionaries_in_one_block(model, transcoder, prompts):
    # Both read in block 1: their rows resume together, packed, each patched at its own hook point.
    pre = dictionary("jumprelu", "blocks.1.hook_resid_pre", seed=6)
    clean, corrupted = prompts
    result = activation_patch(model, clean, corrupted, kind="sae_acts_post", by="feature_pos", saes=[pre, transcoder],
                              features=[1, 2, 10, 19], metric=METRIC, progress=False)
    expected = brute_force_features(model, [pre, transcoder], corrupted, clean, "feature_pos", [1, 2, 10, 19])
    torch.testing.assert_close(result.per_prompt, expected, **TOL)
    assert result.extra["resumed"]


def test_feature_patching_inside_a_splice_without_the_error_term(model, sae, prompts):
    clean, corrupted = prompts
    with splice(model, [sae], use_error_term=False):
        result = activation_patch(model, clean, corrupted, kind="sae_acts_post", by="feature_pos", features=[3, 6],
                                  metric=METRIC, progress=False)
        assert f"{SAE_HOOK}.hook_sae_acts_post" in model.hook_dict  # the outer splice is left as it was
    expected = brute_force_features(model, [sae], corrupted, clean, "feature_pos", [3, 6], error=False)
    torch.testing.assert_close(result.per_prompt, expected, **TOL)


def test_error_nodes_are_sites_too(model, sae, transcoder, prompts):
    clean, corrupted = prompts
    result = activation_patch(model, clean, corrupted, kind="sae_error", by="sae_pos", saes=[sae, transcoder],
                              metric=METRIC, progress=False)
    with splice(model, [sae, transcoder], use_error_term=True):
        _, cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_sae_error"))
    errors = {i: cache[f"{d.cfg.hook_name}.hook_sae_error"] for i, d in enumerate([sae, transcoder])}
    expected = torch.zeros(2, 2, 6)
    for i, d in enumerate([sae, transcoder]):
        for p in range(6):
            for b in range(2):
                def put(t, hook, b=b, p=p, i=i):
                    t = t.clone()
                    t[:, p] = errors[i][b, p]
                    return t

                with splice(model, [sae, transcoder], use_error_term=True):
                    logits = model.run_with_hooks(corrupted[b:b + 1], fwd_hooks=[(f"{d.cfg.hook_name}.hook_sae_error", put)])
                expected[b, i, p] = diff(logits)[0]
    torch.testing.assert_close(result.per_prompt, expected, **TOL)


# ---------------------------------------------------------------------- attribution over features
@pytest.mark.parametrize("by,direction", [("feature_pos", "denoise"), ("feature_pos", "noise"), ("feature", "denoise")])
def test_feature_attribution_equals_the_gradient_by_hand(model, sae, transcoder, prompts, by, direction):
    clean, corrupted = prompts
    base, source = (corrupted, clean) if direction == "denoise" else (clean, corrupted)
    dicts = [sae, transcoder]
    result = attribution_patch(model, clean, corrupted, kind="sae_acts_post", by=by, saes=dicts, metric=METRIC,
                               direction=direction)
    src, rec = {}, {}
    by_hand(model, source, dicts, record=src)
    # Gradient of the metric with respect to each dictionary's latents on the base run: a zero leaf added to the
    # latents, so the latents themselves stay functions of the model (a later dictionary's error term cancels them).
    leaves = {i: torch.zeros(base.shape[0], base.shape[1], d.cfg.d_sae, requires_grad=True) for i, d in enumerate(dicts)}
    with torch.enable_grad():
        logits = by_hand(model, base, dicts, edits={i: (lambda a, i=i: a + leaves[i]) for i in leaves}, record=rec)
        metric = diff(logits)
        grads = torch.autograd.grad(metric.sum(), [leaves[0], leaves[1]])
    cells = torch.stack([((src[i] - rec[i]) * grads[i]).transpose(1, 2) for i in range(2)], dim=1)  # [n, sae, F, pos]
    expected = metric.detach()[:, None, None, None] + cells
    if by == "feature":
        expected = metric.detach()[:, None, None] + cells.sum(-1)
    torch.testing.assert_close(result.per_prompt, expected.detach(), **TOL)
    assert result.shape == ((2, 24, 6) if by == "feature_pos" else (2, 24))


# ---------------------------------------------------------------------- path patching from features
def brute_force_path(model, dicts, clean, corrupted, senders, receiver, positions):
    """Noising: the clean run, every head's z frozen at the clean run below the receiver, the sender latents
    (dictionary index, feature) from the corrupted run at `positions`; receiver None: the logits, else
    (layer, head): that head's query recorded there and patched into a fresh clean run."""
    top = 2 if receiver is None else receiver[0]
    src, base_z = {}, {}
    by_hand(model, corrupted, dicts, record=src)
    z_names = [f"blocks.{layer}.attn.hook_z" for layer in range(top)]
    store = lambda t, hook: base_z.__setitem__(hook.name, t.detach())  # noqa: E731
    by_hand(model, clean, dicts, hooks=[(n, store) for n in z_names])
    freeze = [(n, lambda t, hook: base_z[hook.name]) for n in z_names]
    edits = {}
    for i, f in senders:
        def edit(acts, i=i, f=f, prev=edits.get(i)):
            acts = prev(acts) if prev else acts.clone()
            acts[:, positions, f] = src[i][:, positions, f]
            return acts

        edits[i] = edit
    recorded = {}
    q_name = None if receiver is None else f"blocks.{receiver[0]}.attn.hook_q"
    rec = [] if q_name is None else [(q_name, lambda t, hook: recorded.__setitem__("q", t.detach()))]
    logits = by_hand(model, clean, dicts, edits=edits, hooks=freeze + rec)
    if receiver is None:
        return diff(logits)

    def put(t, hook):
        t = t.clone()
        t[:, :, receiver[1]] = recorded["q"][:, :, receiver[1]]
        return t

    return diff(by_hand(model, clean, dicts, hooks=[(q_name, put)]))


@pytest.mark.parametrize("receiver,positions", [(None, None), ((1, 1), None), ((1, 0), [2, 3])])
def test_path_patching_from_each_feature_equals_brute_force(model, sae, transcoder, prompts, receiver, positions):
    clean, corrupted = prompts
    feats = [0, 4, 7, 13, 21]
    result = path_patch(model, clean, corrupted, senders="features", saes=[sae], features=feats,
                        receivers="resid" if receiver is None else [receiver], receiver_inputs="q",
                        sender_positions=positions, metric=METRIC, progress=False)
    pos = list(range(6)) if positions is None else positions
    expected = torch.stack([brute_force_path(model, [sae], clean, corrupted, [(0, f)], receiver, pos) for f in feats],
                           dim=1)[:, None]
    torch.testing.assert_close(result.per_prompt, expected, **TOL)
    assert result.axes == ("sae", "feature") and result.by == "feature"


def test_path_patching_from_a_set_of_features_equals_brute_force(model, sae, transcoder, prompts):
    clean, corrupted = prompts
    acts = f"{SAE_HOOK}.hook_sae_acts_post"
    with splice(model, [sae, transcoder], use_error_term=True):
        result = path_patch(model, clean, corrupted, senders=[(acts, 4), (acts, 13)], receivers="resid",
                            metric=METRIC, progress=False)
    expected = brute_force_path(model, [sae, transcoder], clean, corrupted, [(0, 4), (0, 13)], None, list(range(6)))
    torch.testing.assert_close(result.per_prompt, expected, **TOL)
    with pytest.raises(ValueError, match="not the hook_sae_acts_post of a spliced"):
        path_patch(model, clean, corrupted, senders=[("blocks.1.hook_resid_post.hook_sae_acts_post", 1)],
                   saes=[sae], metric=METRIC, progress=False)
