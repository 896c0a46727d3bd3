"""Hook points, run_with_hooks / run_with_cache, the hooks() context and the hooked forward.

Every expectation is computed independently in the test: shapes come from the fixtures'
known configs (not from model.cfg), activations are rebuilt by hand with einsum from other
cached tensors, edited models are deep copies with weights changed, and gradients come
from torch.autograd.grad on leaves the test makes itself.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import models.attention
from interp.cache import ActivationCache
from interp.names import HookNameError

close = partial(torch.testing.assert_close, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------- what each fixture is
@dataclass(frozen=True)
class Spec:
    """The architecture of a fixture, written down from conftest.py (not read from model.cfg)."""

    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int | None  # None: attention-only
    learned_pos: bool
    rotary: bool
    gated: bool
    norm: bool
    final_norm: bool
    causal: bool
    post_ln: bool = False


SPECS = {
    # GPT2Config(n_layer=2, n_embd=64, n_head=4): d_mlp = 4 * 64
    "gpt2": Spec(2, 64, 4, 4, 16, 256, learned_pos=True, rotary=False, gated=False, norm=True, final_norm=True, causal=True),
    "llama": Spec(2, 64, 4, 2, 16, 96, learned_pos=False, rotary=True, gated=True, norm=True, final_norm=True, causal=True),
    "bert": Spec(2, 64, 4, 4, 16, 96, learned_pos=True, rotary=False, gated=False, norm=True, final_norm=False,
                 causal=False, post_ln=True),
    "attn_only": Spec(2, 32, 4, 4, 8, None, learned_pos=True, rotary=False, gated=False, norm=False, final_norm=False,
                      causal=True),
    "attn_only_ln": Spec(1, 32, 4, 4, 8, None, learned_pos=False, rotary=True, gated=False, norm=True, final_norm=True,
                         causal=True),
}
SMOLLM2 = Spec(30, 576, 9, 3, 64, 1536, learned_pos=False, rotary=True, gated=True, norm=True, final_norm=True, causal=True)
MINILM = Spec(6, 384, 12, 12, 32, 1536, learned_pos=True, rotary=False, gated=False, norm=True, final_norm=False,
              causal=False, post_ln=True)
FAMILIES = list(SPECS)


def expected_hooks(s: Spec, b: int, p: int) -> tuple[dict[str, tuple], set[str]]:
    """(name -> shape of every DESIGN.md hook this family has, names it must not have)."""
    present: dict[str, tuple] = {}
    absent: set[str] = set()
    d, h, kv, dh = s.d_model, s.n_heads, s.n_kv_heads, s.d_head

    def put(cond: bool, name: str, shape: tuple) -> None:
        if cond:
            present[name] = shape
        else:
            absent.add(name)

    put(True, "hook_embed", (b, p, d))
    put(s.learned_pos, "hook_pos_embed", (b, p, d))
    mlp = s.d_mlp is not None
    for l in range(s.n_layers):
        blk = f"blocks.{l}"
        put(True, f"{blk}.hook_resid_pre", (b, p, d))
        for ln, has in (("ln1", s.norm), ("ln2", s.norm and mlp)):
            put(has, f"{blk}.{ln}.hook_scale", (b, p, 1))
            put(has, f"{blk}.{ln}.hook_normalized", (b, p, d))
        put(True, f"{blk}.attn.hook_q", (b, p, h, dh))
        put(True, f"{blk}.attn.hook_k", (b, p, kv, dh))
        put(True, f"{blk}.attn.hook_v", (b, p, kv, dh))
        put(s.rotary, f"{blk}.attn.hook_rot_q", (b, p, h, dh))
        put(s.rotary, f"{blk}.attn.hook_rot_k", (b, p, kv, dh))
        put(True, f"{blk}.attn.hook_attn_scores", (b, h, p, p))
        put(True, f"{blk}.attn.hook_pattern", (b, h, p, p))
        put(True, f"{blk}.attn.hook_z", (b, p, h, dh))
        put(True, f"{blk}.attn.hook_result", (b, p, h, d))
        put(True, f"{blk}.hook_attn_out", (b, p, d))
        put(mlp, f"{blk}.hook_resid_mid", (b, p, d))
        put(mlp, f"{blk}.mlp.hook_pre", (b, p, s.d_mlp))
        put(mlp and s.gated, f"{blk}.mlp.hook_pre_linear", (b, p, s.d_mlp))
        put(mlp, f"{blk}.mlp.hook_post", (b, p, s.d_mlp))
        put(mlp, f"{blk}.hook_mlp_out", (b, p, d))
        put(True, f"{blk}.hook_resid_post", (b, p, d))
    put(s.final_norm, "ln_final.hook_scale", (b, p, 1))
    put(s.final_norm, "ln_final.hook_normalized", (b, p, d))
    absent.add(f"blocks.{s.n_layers}.hook_resid_pre")
    return present, absent


# ---------------------------------------------------------------------- helpers and fixtures
def tokens_for(model, batch: int = 2, pos: int = 7, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, min(model.cfg.d_vocab, 1000), (batch, pos), generator=g)


TEXTS = ["The Eiffel Tower is located in the city of", "American shrew mole"]


def padded_input(model) -> tuple[object, dict]:
    """A batch whose rows differ in length: strings (padded by the model) or ids with a mask."""
    if model.tokenizer is not None:
        assert model.tokenize(TEXTS).is_padded
        return TEXTS, {}
    tokens = tokens_for(model, 2, 9)
    mask = torch.ones_like(tokens)
    mask[1, 5:] = 0
    return tokens, {"attention_mask": mask}


def assert_no_hooks(model) -> None:
    for name, hp in model.hook_dict.items():
        assert hp._hooks["fwd"] == [] and hp._hooks["bwd"] == [], name
        assert not hp.active, name


def all_patterns(name: str) -> bool:
    return name.endswith("hook_pattern")


def noop(tensor, hook):
    return None


@pytest.fixture
def family(request):
    return request.param


@pytest.fixture
def model(family, request):
    """The family's session fixture, left as it was found: no hooks, auto attention."""
    m = request.getfixturevalue(family)
    yield m
    m.reset_hooks(including_permanent=True)
    m.set_attention_implementation("auto")


def pytest_generate_tests(metafunc):
    if "family" in metafunc.fixturenames and not any(
        m.name == "parametrize" and "family" in m.args[0] for m in metafunc.definition.iter_markers()
    ):
        metafunc.parametrize("family", FAMILIES, indirect=True)


@pytest.fixture
def sdpa_calls(monkeypatch):
    """Counts calls of the fused kernel where models/attention.py looks it up (F.scaled_dot_product_attention)."""
    calls = []
    real = models.attention.F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(models.attention.F, "scaled_dot_product_attention", counting)
    return calls


class OpShapes(TorchDispatchMode):
    """Records the shape of every tensor any aten op produces: what was really computed."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.shapes.extend(tuple(t.shape) for t in tree_leaves(out) if isinstance(t, torch.Tensor))
        return out


def grad_by_hand(model, tokens, name, metric) -> torch.Tensor:
    """d metric / d activation `name`, by making that activation a leaf and calling autograd.grad."""
    leaves = []

    def make_leaf(t, hook):
        leaf = t.detach().requires_grad_(True)
        leaves.append(leaf)
        return leaf

    with torch.enable_grad():
        out = model.run_with_hooks(tokens, fwd_hooks=[(name, make_leaf)])
        assert len(leaves) == 1
        (grad,) = torch.autograd.grad(metric(out), leaves[0])
    return grad


# ====================================================================== 1. names and shapes
def test_every_documented_hook_has_its_shape(model, family):
    spec = SPECS[family]
    tokens = tokens_for(model, 2, 7)
    _, cache = model.run_with_cache(tokens, names_filter=lambda name: True)  # everything, opt-in ones too
    present, absent = expected_hooks(spec, 2, 7)
    for name, shape in present.items():
        assert name in model.hook_dict, name
        assert tuple(cache[name].shape) == shape, name
    for name in absent:
        assert name not in model.hook_dict, name
        assert name not in cache, name


def test_gqa_keys_and_values_are_per_kv_head(llama):
    _, cache = llama.run_with_cache(tokens_for(llama))
    for l in range(2):
        assert cache["q", l].shape[2] == 4
        for key in ("k", "v", "rot_k"):
            assert cache[key, l].shape[2] == 2, key
        assert cache["pattern", l].shape[1] == 4 and cache["z", l].shape[2] == 4


def test_absent_hooks_are_absent_by_family(gpt2, llama, bert, attn_only, attn_only_ln):
    assert "hook_pos_embed" not in llama.hook_dict and "hook_pos_embed" in gpt2.hook_dict
    assert "blocks.0.hook_resid_mid" not in attn_only.hook_dict
    assert "blocks.0.hook_resid_mid" not in attn_only_ln.hook_dict
    assert "blocks.0.mlp.hook_pre_linear" in llama.hook_dict and "blocks.0.mlp.hook_pre_linear" not in gpt2.hook_dict
    assert "blocks.0.attn.hook_rot_q" in llama.hook_dict and "blocks.0.attn.hook_rot_q" not in gpt2.hook_dict
    assert "ln_final.hook_scale" not in bert.hook_dict and "ln_final.hook_scale" not in attn_only.hook_dict
    assert "blocks.0.ln1.hook_scale" not in attn_only.hook_dict


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["smollm2", "minilm"])
def test_real_model_hook_shapes(request, fixture):
    model = request.getfixturevalue(fixture)
    spec = {"smollm2": SMOLLM2, "minilm": MINILM}[fixture]
    _, cache = model.run_with_cache(tokens_for(model, 2, 6), names_filter=lambda name: True)
    present, absent = expected_hooks(spec, 2, 6)
    for name, shape in present.items():
        assert tuple(cache[name].shape) == shape, name
    for name in absent:
        assert name not in model.hook_dict, name


# ====================================================================== 2. semantics by hand
def test_attn_out_is_sum_of_head_results_plus_b_O(model, family):
    _, cache = model.run_with_cache(tokens_for(model), names_filter=lambda name: True)
    for l in range(SPECS[family].n_layers):
        close(cache["result", l].sum(dim=2) + model.blocks[l].attn.b_O, cache["attn_out", l])


def test_result_is_z_times_W_O_per_head(model, family):
    _, cache = model.run_with_cache(tokens_for(model), names_filter=lambda name: True)
    spec = SPECS[family]
    for l in range(spec.n_layers):
        W_O = model.W_O[l]  # [n_heads, d_head, d_model]
        for h in range(spec.n_heads):
            close(cache["result", l][:, :, h], cache["z", l][:, :, h] @ W_O[h])


def test_z_is_pattern_times_values(model, family):
    spec = SPECS[family]
    _, cache = model.run_with_cache(tokens_for(model))
    for l in range(spec.n_layers):
        v = cache["v", l].repeat_interleave(spec.n_heads // spec.n_kv_heads, dim=2)  # head h reads KV head h // n_rep
        expected = torch.einsum("bhqk,bkhd->bqhd", cache["pattern", l], v)
        close(cache["z", l], expected)


def test_scores_are_scaled_query_key_products(model, family):
    spec = SPECS[family]
    _, cache = model.run_with_cache(tokens_for(model))
    for l in range(spec.n_layers):
        q = cache["rot_q", l] if spec.rotary else cache["q", l]
        k = cache["rot_k", l] if spec.rotary else cache["k", l]
        k = k.repeat_interleave(spec.n_heads // spec.n_kv_heads, dim=2)
        expected = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(spec.d_head)
        scores = cache["attn_scores", l]
        allowed = torch.isfinite(scores)
        if spec.causal:
            assert torch.equal(allowed[0, 0], torch.ones(7, 7, dtype=torch.bool).tril())
        else:
            assert allowed.all()
        close(scores[allowed], expected[allowed])


def test_residual_stream_adds_up(model, family):
    spec = SPECS[family]
    _, cache = model.run_with_cache(tokens_for(model))
    for l in range(spec.n_layers):
        pre, attn_out, post = cache["resid_pre", l], cache["attn_out", l], cache["resid_post", l]
        if spec.d_mlp is None:
            close(post, pre + attn_out)
            continue
        mid, mlp_out = cache["resid_mid", l], cache["mlp_out", l]
        close(mid, pre + attn_out)
        if spec.post_ln:  # BERT: the MLP's residual is LN1(resid_mid)
            ln1 = model.blocks[l].ln1
            close(post, cache[f"blocks.{l}.ln1.hook_normalized"] * ln1.w + ln1.b + mlp_out)
        else:
            close(post, mid + mlp_out)
    if spec.post_ln:
        ln2 = model.blocks[0].ln2
        close(cache["blocks.1.hook_resid_pre"], cache["blocks.0.ln2.hook_normalized"] * ln2.w + ln2.b)
    elif spec.n_layers > 1:
        close(cache["blocks.1.hook_resid_pre"], cache["blocks.0.hook_resid_post"])


@pytest.mark.parametrize("family", [f for f in FAMILIES if SPECS[f].norm], indirect=True)
def test_norm_hooks_hold_scale_and_normalized_input(model, family):
    spec = SPECS[family]
    _, cache = model.run_with_cache(tokens_for(model))
    x = cache["resid_mid", 0] if spec.post_ln else cache["resid_pre", 0]  # what ln1 reads
    eps = model.cfg.norm_eps
    if family == "llama":
        scale = (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()
        normalized = x / scale
    else:
        scale = (x.var(-1, unbiased=False, keepdim=True) + eps).sqrt()
        normalized = F.layer_norm(x, (x.shape[-1],), eps=eps)
    close(cache["blocks.0.ln1.hook_scale"], scale)
    close(cache["blocks.0.ln1.hook_normalized"], normalized)


def test_pattern_rows_sum_to_one_and_respect_causality(model, family):
    spec = SPECS[family]
    _, cache = model.run_with_cache(tokens_for(model))
    for l in range(spec.n_layers):
        pattern = cache["pattern", l]
        close(pattern.sum(-1), torch.ones(pattern.shape[:-1]))
        above = torch.ones(7, 7, dtype=torch.bool).triu(1)
        if spec.causal:
            assert (pattern[..., above] == 0).all()
        else:
            assert (pattern[..., above] > 0).all()


# ====================================================================== 3. fused vs explicit attention
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_fused_and_explicit_paths_give_the_same_logits(model, padded, sdpa_calls):
    inp, kwargs = padded_input(model) if padded else (tokens_for(model), {})
    fused = model(inp, **kwargs)
    assert len(sdpa_calls) == model.cfg.n_layers
    sdpa_calls.clear()
    by_hook = model.run_with_hooks(inp, fwd_hooks=[(all_patterns, noop)], **kwargs)
    model.set_attention_implementation("explicit")
    try:
        explicit = model(inp, **kwargs)
    finally:
        model.set_attention_implementation("auto")
    assert sdpa_calls == []  # both really took the explicit path
    assert torch.isfinite(fused).all()
    close(by_hook, fused)
    close(explicit, fused)


def test_no_hooks_runs_the_fused_kernel_once_per_layer(model, family, sdpa_calls):
    model(tokens_for(model))
    assert len(sdpa_calls) == SPECS[family].n_layers


def test_hooking_the_pattern_bypasses_the_fused_kernel(model, family, sdpa_calls):
    n = SPECS[family].n_layers
    tokens = tokens_for(model)
    model.run_with_hooks(tokens, fwd_hooks=[(all_patterns, noop)])
    assert len(sdpa_calls) == 0
    model.run_with_hooks(tokens, fwd_hooks=[(("pattern", 0), noop)])
    assert len(sdpa_calls) == n - 1  # only the hooked layer is explicit
    sdpa_calls.clear()
    model.run_with_cache(tokens, names_filter="blocks.0.attn.hook_attn_scores")
    assert len(sdpa_calls) == n - 1
    sdpa_calls.clear()
    model.run_with_cache(tokens, names_filter=lambda name: "resid" in name or name.endswith("hook_z"))
    assert len(sdpa_calls) == n  # caching other activations keeps the fused kernel
    sdpa_calls.clear()
    model.run_with_cache(tokens)
    assert len(sdpa_calls) == 0


def test_default_cache_leaves_out_per_head_results_but_can_compute_them(model, family):
    tokens = tokens_for(model)
    _, default = model.run_with_cache(tokens)
    assert not any(name.endswith("hook_result") for name in default)
    assert "blocks.0.attn.hook_z" in default and "blocks.0.attn.hook_pattern" in default
    _, explicit = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_result"))
    for layer in range(model.cfg.n_layers):
        torch.testing.assert_close(default.head_results(layer), explicit["result", layer], atol=1e-5, rtol=1e-5)
        assert explicit.head_results(layer) is explicit["result", layer]


def test_per_head_result_is_computed_only_when_hooked(model, family):
    spec = SPECS[family]
    b, p = 2, 7
    per_head = (b, p, spec.n_heads, spec.d_model)
    tokens = tokens_for(model, b, p)
    with OpShapes() as plain:
        model(tokens)
    with OpShapes() as z_only:
        model.run_with_hooks(tokens, fwd_hooks=[(lambda n: n.endswith("hook_z"), noop)])
    with OpShapes() as hooked:
        model.run_with_hooks(tokens, fwd_hooks=[(("result", 0), noop)])
    assert per_head not in plain.shapes
    assert per_head not in z_only.shapes
    assert per_head in hooked.shapes  # the probe does see it when it exists


# ====================================================================== 4. hooks that modify
def test_zeroing_a_heads_z_equals_zeroing_its_W_O_rows(model, family):
    layer, head = SPECS[family].n_layers - 1, 1
    tokens = tokens_for(model)

    def zero_head(z, hook):
        z = z.clone()
        z[:, :, head] = 0
        return z

    hooked = model.run_with_hooks(tokens, fwd_hooks=[(("z", layer), zero_head)])
    edited = copy.deepcopy(model)
    with torch.no_grad():
        edited.blocks[layer].attn.W_O[head].zero_()
    assert (model.W_O[layer, head] != 0).any()  # the original is untouched
    clean = model(tokens)
    scale = clean.abs().max()  # the random attention-only model's logits are ~1e-3
    assert (hooked - clean).abs().max() > 1e-3 * scale
    torch.testing.assert_close(hooked, edited(tokens), atol=1e-5 * scale, rtol=1e-5)


# ====================================================================== 5. hooks removed after errors
class Boom(Exception):
    pass


def test_run_with_hooks_removes_hooks_when_a_hook_raises(model):
    tokens = tokens_for(model)
    clean = model(tokens)

    def explode(t, hook):
        raise Boom(hook.name)

    with pytest.raises(Boom):
        model.run_with_hooks(tokens, fwd_hooks=[(all_patterns, noop), ("blocks.0.hook_attn_out", explode)])
    assert_no_hooks(model)
    assert torch.equal(model(tokens), clean)


def test_hooks_context_removes_hooks_when_the_body_raises(model):
    tokens = tokens_for(model)
    clean = model(tokens)
    with pytest.raises(Boom):
        with model.hooks(fwd_hooks=[(all_patterns, noop), (("resid_pre", 0), lambda t, hook: t * 0)]):
            assert model.hook_dict["blocks.0.hook_resid_pre"].active
            raise Boom()
    assert_no_hooks(model)
    assert torch.equal(model(tokens), clean)


def test_hooks_context_with_a_bad_name_removes_the_hooks_it_already_added(model):
    with pytest.raises(HookNameError):
        with model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", noop), ("blocks.0.hook_bogus", noop)]):
            pass
    assert_no_hooks(model)


def test_context_exit_keeps_hooks_added_outside_it(model):
    seen = []
    record = lambda t, hook: seen.append(hook.name)
    model.add_hook("blocks.0.hook_resid_pre", record, is_permanent=True)
    model.add_hook("blocks.0.hook_attn_out", record)
    with pytest.raises(Boom):
        with model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", record)]):
            assert len(model.hook_dict["blocks.0.hook_resid_pre"]._hooks["fwd"]) == 2
            raise Boom()
    model(tokens_for(model))
    assert seen == ["blocks.0.hook_resid_pre", "blocks.0.hook_attn_out"]
    model.run_with_hooks(tokens_for(model), fwd_hooks=[("blocks.0.hook_attn_out", noop)])
    assert len(model.hook_dict["blocks.0.hook_attn_out"]._hooks["fwd"]) == 1  # the outside one


def test_reset_hooks_keeps_permanent_hooks_unless_asked(model):
    model.add_hook("blocks.0.hook_resid_pre", noop, is_permanent=True)
    model.add_perma_hook("blocks.0.hook_attn_out", noop, dir="bwd")
    model.add_hook("blocks.0.hook_resid_post", noop)
    model.add_hook("blocks.0.hook_resid_post", noop, dir="bwd")
    model.reset_hooks()
    assert len(model.hook_dict["blocks.0.hook_resid_pre"]._hooks["fwd"]) == 1
    assert len(model.hook_dict["blocks.0.hook_attn_out"]._hooks["bwd"]) == 1
    assert not model.hook_dict["blocks.0.hook_resid_post"].active
    model.reset_hooks(including_permanent=True)
    assert_no_hooks(model)


def test_hook_handle_removes_only_its_own_hook(model):
    (first,) = model.add_hook("blocks.0.hook_resid_pre", noop)
    (second,) = model.add_hook("blocks.0.hook_resid_pre", noop)
    first.remove()
    assert model.hook_dict["blocks.0.hook_resid_pre"]._hooks["fwd"] == [second]
    second.remove()
    assert_no_hooks(model)


# ====================================================================== 6. unknown names
def test_misspelt_hook_name_suggests_the_right_one(model):
    with pytest.raises(HookNameError) as err:
        model.run_with_hooks(tokens_for(model), fwd_hooks=[("blocks.0.attn.hook_patern", noop)])
    assert isinstance(err.value, KeyError)
    assert "blocks.0.attn.hook_pattern" in str(err.value)
    assert_no_hooks(model)


def test_names_filter_with_an_unknown_name_raises(model):
    with pytest.raises(HookNameError) as err:
        model.run_with_cache(tokens_for(model), names_filter=["blocks.0.hook_resid_pre", "nonsense"])
    assert "nonsense" in str(err.value)
    with pytest.raises(HookNameError, match="blocks.0.attn.hook_pattern"):
        model.run_with_cache(tokens_for(model), names_filter=["blocks.0.attn.hook_patern"])
    assert_no_hooks(model)


def test_cache_lookup_of_a_misspelt_name_suggests(model):
    _, cache = model.run_with_cache(tokens_for(model))
    with pytest.raises(HookNameError) as err:
        cache["blocks.0.attn.hook_patern"]
    assert "blocks.0.attn.hook_pattern" in str(err.value)
    with pytest.raises(HookNameError, match="unknown short hook key"):
        cache["patern", 0]


def test_cache_lookup_of_a_filtered_out_hook_says_so(model):
    _, cache = model.run_with_cache(tokens_for(model), names_filter="blocks.0.hook_resid_pre")
    with pytest.raises(KeyError) as err:
        cache["blocks.0.attn.hook_pattern"]
    assert "not cached" in str(err.value) and "names_filter" in str(err.value)


# ====================================================================== 7. run_with_cache options
def _filters(n_layers):
    return [
        pytest.param("blocks.0.hook_resid_pre", {"blocks.0.hook_resid_pre"}, id="str"),
        pytest.param(["hook_embed", "blocks.0.attn.hook_q"], {"hook_embed", "blocks.0.attn.hook_q"}, id="list"),
        pytest.param(("pattern", 0), {"blocks.0.attn.hook_pattern"}, id="short-key"),
        pytest.param([("z", 0), ("resid_post", 0)], {"blocks.0.attn.hook_z", "blocks.0.hook_resid_post"},
                     id="list-of-short-keys"),
        pytest.param(lambda name: name.endswith("hook_z"), {f"blocks.{l}.attn.hook_z" for l in range(n_layers)},
                     id="callable"),
    ]


@pytest.mark.parametrize("family", ["gpt2"], indirect=True)
@pytest.mark.parametrize("names_filter, expected", _filters(2))
def test_names_filter_forms(model, names_filter, expected):
    logits, cache = model.run_with_cache(tokens_for(model), names_filter=names_filter)
    assert set(cache) == expected
    assert isinstance(cache, ActivationCache)
    close(logits, model(tokens_for(model)))


def test_short_key_on_a_layer_is_that_layer(attn_only):
    _, cache = attn_only.run_with_cache(tokens_for(attn_only), names_filter=("pattern", 1))
    assert set(cache) == {"blocks.1.attn.hook_pattern"}
    assert cache["pattern", 1] is cache["blocks.1.attn.hook_pattern"]


def test_tuple_of_full_names_is_not_silently_truncated(gpt2):
    names = ("blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre")
    _, cache = gpt2.run_with_cache(tokens_for(gpt2), names_filter=names)
    assert set(cache) == set(names)
    with pytest.raises(HookNameError, match="full hook name"):
        cache["blocks.0.hook_resid_pre", 1]


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_cache_dtype_and_device_store_converted_copies(model, dtype):
    tokens = tokens_for(model)
    logits32, cache32 = model.run_with_cache(tokens)
    logits, cache = model.run_with_cache(tokens, device="cpu", dtype=dtype)
    assert torch.equal(logits, logits32)
    assert logits.dtype == torch.float32
    assert set(cache) == set(cache32)
    for name, t in cache.items():
        assert t.dtype == dtype and t.device.type == "cpu", name
        assert torch.equal(t, cache32[name].to(dtype)), name
    assert next(model.parameters()).dtype == torch.float32


def test_remove_batch_dim(model, family):
    tokens = tokens_for(model, 1, 5)
    _, full = model.run_with_cache(tokens)
    _, cache = model.run_with_cache(tokens, remove_batch_dim=True)
    assert not cache.has_batch_dim
    for name, t in full.items():
        assert torch.equal(cache[name], t[0]), name
    assert cache["pattern", 0].shape == (SPECS[family].n_heads, 5, 5)
    with pytest.raises(ValueError, match="batch"):
        model.run_with_cache(tokens_for(model, 2, 5), remove_batch_dim=True)
    assert_no_hooks(model)


@pytest.mark.parametrize("family", [f for f in FAMILIES if SPECS[f].n_layers > 1], indirect=True)
def test_tensor_reachable_under_two_names_is_stored_once(model, family):
    _, cache = model.run_with_cache(tokens_for(model))
    out_name = model.block_output_hook_name(0)  # resid_post, or normalized_resid_post for BERT
    a, b = cache[out_name], cache["blocks.1.hook_resid_pre"]
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    unique = {t.data_ptr(): t.numel() * t.element_size() for t in cache.values()}
    everything = sum(t.numel() * t.element_size() for t in cache.values())
    assert cache.nbytes == sum(unique.values())
    assert everything - cache.nbytes >= a.numel() * a.element_size()


def test_converted_tensor_reachable_under_two_names_is_stored_once(gpt2):
    _, cache = gpt2.run_with_cache(tokens_for(gpt2), dtype=torch.float64)
    a, b = cache["blocks.0.hook_resid_post"], cache["blocks.1.hook_resid_pre"]
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _grad_names(family):
    n = SPECS[family].n_layers
    return ["hook_embed", f"blocks.{n - 1}.hook_resid_pre", "blocks.0.attn.hook_z", "blocks.0.attn.hook_pattern"]


def test_incl_bwd_caches_gradients_equal_to_autograd(model, family):
    tokens = tokens_for(model)
    metric = lambda logits: logits[0, -1, 5]
    logits, cache = model.run_with_cache(tokens, incl_bwd=True, backward_metric=metric)
    assert logits.grad_fn is None
    for name in _grad_names(family):
        assert f"{name}_grad" in cache
        expected = grad_by_hand(model, tokens, name, metric)
        assert expected.abs().max() > 0, name
        close(cache[f"{name}_grad"], expected)
        assert cache[f"{name}_grad"].shape == cache[name].shape
    assert not any(p.grad is not None for p in model.parameters())
    assert_no_hooks(model)


def test_incl_bwd_needs_a_scalar(model):
    with pytest.raises(ValueError, match="backward_metric"):
        model.run_with_cache(tokens_for(model), incl_bwd=True)
    assert_no_hooks(model)


# ====================================================================== 8. no autograd graph unless asked
def test_loaded_models_are_frozen(gpt2, llama, bert):
    for m in (gpt2, llama, bert):
        assert not any(p.requires_grad for p in m.parameters())


def test_logits_carry_no_graph_by_default(model):
    tokens = tokens_for(model)
    for logits in (model(tokens), model.run_with_cache(tokens)[0],
                   model.run_with_hooks(tokens, fwd_hooks=[(all_patterns, noop)])):
        assert logits.grad_fn is None and not logits.requires_grad


def test_trainable_copy_does_build_a_graph(model):
    trainable = copy.deepcopy(model).requires_grad_(True)
    logits = trainable(tokens_for(model))
    assert logits.grad_fn is not None and logits.requires_grad
    assert not any(p.requires_grad for p in model.parameters())


# ====================================================================== 9. start_at_layer / stop_at_layer
def test_stop_at_layer_returns_the_stream_the_next_block_reads(model, family):
    spec = SPECS[family]
    tokens = tokens_for(model)
    _, cache = model.run_with_cache(tokens)
    for stop in range(spec.n_layers):
        close(model(tokens, stop_at_layer=stop), cache[f"blocks.{stop}.hook_resid_pre"])
    last = cache[model.block_output_hook_name(spec.n_layers - 1)]
    close(model(tokens, stop_at_layer=spec.n_layers), last)
    if spec.post_ln:  # BERT's stream is the normalised block output
        close(model(tokens, stop_at_layer=1), cache["blocks.0.hook_normalized_resid_post"])


def test_start_and_stop_compose_to_the_full_forward(model, family):
    tokens = tokens_for(model)
    full = model(tokens)
    for split in range(SPECS[family].n_layers + 1):
        resid = model(tokens, stop_at_layer=split)
        close(model(resid, start_at_layer=split), full)


def _count_runs(model):
    ran = []
    handles = [b.register_forward_hook(lambda mod, args, out, l=l: ran.append(l)) for l, b in enumerate(model.blocks)]
    return ran, handles


def test_start_and_stop_really_skip_work(model, family):
    spec = SPECS[family]
    n = spec.n_layers
    tokens = tokens_for(model)
    fired = []
    record = lambda t, hook: fired.append(hook.name)
    head_calls = []
    ran, handles = _count_runs(model)
    handles.append(model.unembed.register_forward_hook(lambda *a: head_calls.append("unembed")))
    head_hooks = [("hook_embed", record)] + ([("ln_final.hook_scale", record)] if spec.final_norm else [])
    try:
        with model.hooks(fwd_hooks=head_hooks):
            model(tokens)
            assert ran == list(range(n)) and head_calls == ["unembed"]
            assert fired == ["hook_embed"] + (["ln_final.hook_scale"] if spec.final_norm else [])
            ran.clear(), fired.clear(), head_calls.clear()

            resid = model(tokens, stop_at_layer=n - 1)
            assert ran == list(range(n - 1)) and fired == ["hook_embed"] and head_calls == []
            ran.clear(), fired.clear()

            model(resid, start_at_layer=n - 1)
            assert ran == [n - 1] and head_calls == ["unembed"]
            assert "hook_embed" not in fired
            ran.clear(), fired.clear(), head_calls.clear()

            model(tokens, stop_at_layer=0)
            assert ran == [] and fired == ["hook_embed"] and head_calls == []
    finally:
        for h in handles:
            h.remove()


def test_negative_stop_at_layer_counts_from_the_end(model, family):
    n = SPECS[family].n_layers
    tokens = tokens_for(model)
    assert torch.equal(model(tokens, stop_at_layer=-1), model(tokens, stop_at_layer=n - 1))
    ran, handles = _count_runs(model)
    try:
        model(tokens, stop_at_layer=-1)
    finally:
        for h in handles:
            h.remove()
    assert ran == list(range(n - 1))


def test_layer_index_out_of_range_raises(model, family):
    n = SPECS[family].n_layers
    tokens = tokens_for(model)
    for bad in (n + 1, -(n + 1), 100):
        with pytest.raises(ValueError, match="stop_at_layer"):
            model(tokens, stop_at_layer=bad)
    resid = torch.zeros(2, 7, SPECS[family].d_model)
    with pytest.raises(ValueError, match="start_at_layer"):
        model(resid, start_at_layer=n + 1)


# ====================================================================== 10. the hooks() context
def test_hooks_context_yields_the_model_with_hooks_active(model):
    seen = []
    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", lambda t, hook: seen.append(t.shape))]) as m:
        assert m is model
        assert model.hook_dict["blocks.0.hook_resid_pre"].active
        m(tokens_for(model))
    assert seen == [torch.Size([2, 7, model.cfg.d_model])]
    assert_no_hooks(model)


def test_nested_hooks_contexts(model):
    seen = []
    outer = lambda t, hook: seen.append("outer")
    inner = lambda t, hook: seen.append("inner")
    tokens = tokens_for(model)
    with model.hooks(fwd_hooks=[("hook_embed", outer)]):
        with model.hooks(fwd_hooks=[("hook_embed", inner)]):
            model(tokens)
            assert seen == ["outer", "inner"]
        seen.clear()
        model(tokens)
        assert seen == ["outer"]
    seen.clear()
    model(tokens)
    assert seen == []
    assert_no_hooks(model)


def test_hook_replacing_an_activation_changes_what_follows(model):
    tokens = tokens_for(model)
    with model.hooks(fwd_hooks=[("blocks.0.hook_attn_out", lambda t, hook: torch.zeros_like(t))]):
        _, cache = model.run_with_cache(tokens, names_filter=["blocks.0.hook_resid_pre", "blocks.0.hook_resid_post",
                                                              "blocks.0.hook_attn_out"])
    assert (cache["blocks.0.hook_attn_out"] == 0).all()
    if model.cfg.attn_only:
        assert torch.equal(cache["blocks.0.hook_resid_post"], cache["blocks.0.hook_resid_pre"])


def test_hooks_by_filter_and_by_short_key(model, family):
    n = SPECS[family].n_layers
    fired = []
    record = lambda t, hook: fired.append(hook.name)
    with model.hooks(fwd_hooks=[(lambda name: name.endswith("hook_z"), record), (("z", 0), record)]):
        model(tokens_for(model))
    assert sorted(fired) == sorted([f"blocks.{l}.attn.hook_z" for l in range(n)] + ["blocks.0.attn.hook_z"])
    with pytest.raises(HookNameError, match="matched no hook point"):
        with model.hooks(fwd_hooks=[(lambda name: name.endswith("hook_nothing"), record)]):
            pass
    assert_no_hooks(model)


# ====================================================================== 11. backward hooks
def test_backward_hook_in_context_gets_the_gradient(model, family):
    name = f"blocks.{SPECS[family].n_layers - 1}.hook_resid_pre"
    tokens = tokens_for(model)
    metric = lambda logits: logits[:, -1, 5].sum() + logits[0, 2, 9]
    grads = []
    with model.hooks(bwd_hooks=[(name, lambda g, hook: grads.append((hook.name, g.clone())))]):
        metric(model(tokens)).backward()
    assert [n for n, _ in grads] == [name]
    close(grads[0][1], grad_by_hand(model, tokens, name, metric))
    assert_no_hooks(model)


@pytest.mark.parametrize("family", [f for f in FAMILIES if SPECS[f].n_layers > 1], indirect=True)
def test_backward_hook_can_replace_the_gradient(model, family):
    n = SPECS[family].n_layers
    tokens = tokens_for(model)
    metric = lambda logits: logits[0, -1, 5]
    grads = {}
    bwd = [("blocks.1.hook_resid_pre", lambda g, hook: torch.zeros_like(g)),
           ("hook_embed", lambda g, hook: grads.setdefault("embed", g.clone()))]
    with model.hooks(bwd_hooks=bwd):
        metric(model(tokens)).backward()
    assert (grads["embed"] == 0).all()


def test_run_with_hooks_refuses_backward_hooks_it_would_remove(model):
    with pytest.raises(ValueError, match="reset_hooks_end"):
        model.run_with_hooks(tokens_for(model), bwd_hooks=[("blocks.0.hook_resid_pre", noop)])
    assert_no_hooks(model)


def test_run_with_hooks_keeps_backward_hooks_when_told(model):
    tokens = tokens_for(model)
    grads = []
    out = model.run_with_hooks(tokens, bwd_hooks=[("hook_embed", lambda g, hook: grads.append(g))],
                               reset_hooks_end=False)
    out[0, -1, 5].backward()
    model.reset_hooks()
    assert len(grads) == 1
    close(grads[0], grad_by_hand(model, tokens, "hook_embed", lambda logits: logits[0, -1, 5]))
    assert_no_hooks(model)
