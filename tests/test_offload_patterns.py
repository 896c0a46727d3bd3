"""Issue 17: cached patterns beside the fused attention kernel, and caches copied to the host without stalls.

A pattern cached by run_with_cache must equal, bit for bit, the explicit path's for that
layer (that attention explicit, the others fused, so that it reads the same input), while the
logits stay the no-hook forward's bit for bit, through every way a frame masks: grouped KV heads, sliding windows shorter than the
prompt, left padding, a KV-cached step, packed rows with an explicit mask, T5's relative bias,
in float32 and bfloat16. Each case also counts the fused kernel's calls, so a test that fell
back to the explicit path could not pass. The offload tests run the CPU path (no pinning, no
stream) everywhere and the CUDA path where a GPU exists.
"""

from __future__ import annotations

import gc
import math
import weakref

import pytest
import torch
import torch.nn.functional as F

import interp.hooks
import models.attention
from interp.offload import Offload
from models.config import TransformerConfig
from models.encoder_decoder import HookedEncoderDecoder
from models.hooked_transformer import HookedTransformer

LAYERS, HEADS, KV_HEADS, WINDOW = 3, 4, 2, 4  # layers 0 and 2 slide over 4 keys, prompts are 9-16 tokens
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def patterns(name: str) -> bool:
    return name.endswith("hook_pattern")


def decoder(d_head: int = 16, dtype=torch.float32, **extra) -> HookedTransformer:
    """A LLaMA-like model: grouped KV heads, rotary, sliding and full layers; scale 1/sqrt(d_head)."""
    cfg = TransformerConfig(
        n_layers=LAYERS, d_model=64, n_heads=HEADS, n_kv_heads=KV_HEADS, d_head=d_head, d_vocab=200, n_ctx=64,
        d_mlp=96, act_fn="silu", gated_mlp=True, normalization_type="RMS", positional_embedding_type="rotary",
        sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        init_range=0.15, **extra)  # wide enough that patterns are far from uniform
    torch.manual_seed(0)
    return HookedTransformer(cfg).requires_grad_(False).to(dtype)


def t5(dtype=torch.float32) -> HookedEncoderDecoder:
    cfg = TransformerConfig(
        n_layers=2, n_decoder_layers=2, d_model=64, n_heads=HEADS, d_head=16, d_vocab=200, n_ctx=64, d_mlp=96,
        act_fn="relu", normalization_type="RMS", positional_embedding_type="relative", attn_scale=1.0,
        encoder_decoder=True, decoder_start_token_id=0, pad_token_id=0, init_range=0.15)
    torch.manual_seed(0)
    model = HookedEncoderDecoder(cfg).requires_grad_(False).to(dtype)
    with torch.no_grad():  # T5's bias matters only if it is large enough to move the softmax
        for stack in (model.encoder, model.decoder):
            stack.relative.W_rel.normal_(0, 2.0)
    return model


def ids(batch: int, pos: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 200, (batch, pos), generator=torch.Generator().manual_seed(seed))


def left_padded(batch: int = 3, pos: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = ids(batch, pos)
    mask = torch.ones_like(tokens)
    mask[1, :3] = 0
    mask[2, :8] = 0
    return tokens.masked_fill(mask == 0, 0), mask


@pytest.fixture
def sdpa_calls(monkeypatch):
    """The attentions that ran the fused kernel (Attention._fused), one entry per call."""
    fused = []
    real = models.attention.Attention._fused

    def spy(self, *args):
        fused.append(self)
        return real(self, *args)

    monkeypatch.setattr(models.attention.Attention, "_fused", spy)
    return fused


def n_attention(model) -> int:
    return sum(1 for m in model.modules() if isinstance(m, models.attention.Attention))


def explicit_run(model, *args, **kwargs):
    model.set_attention_implementation("explicit")
    try:
        return model.run_with_cache(*args, names_filter=patterns, **kwargs)
    finally:
        model.set_attention_implementation("auto")


def explicit_patterns(model, *args, **kwargs) -> dict:
    """Each attention's pattern from the explicit path, every other attention fused: that layer then reads the
    same stream as in a fused run (a whole explicit run rounds its outputs differently, and so moves every
    later layer's input)."""
    out = {}
    for name, attn in model.named_modules():
        if isinstance(attn, models.attention.Attention):
            attn.implementation = "explicit"
            try:
                _, cache = model.run_with_cache(*args, names_filter=f"{name}.hook_pattern", **kwargs)
            finally:
                attn.implementation = "auto"
            out.update(cache.cache_dict)
    return out


def explicit_patterns_at(model, layer: int, *args, **kwargs) -> dict:
    attn = model.blocks[layer].attn
    attn.implementation = "explicit"
    try:
        return model.run_with_cache(*args, names_filter=f"blocks.{layer}.attn.hook_pattern", **kwargs)[1].cache_dict
    finally:
        attn.implementation = "auto"


def assert_fast_path_exact(model, sdpa_calls, *args, **kwargs) -> dict:
    """Fused-path patterns == explicit-path patterns and fused-path logits == no-hook logits, bit for bit."""
    plain = model(*args, **kwargs)
    sdpa_calls.clear()
    logits, fast = model.run_with_cache(*args, names_filter=patterns, **kwargs)
    assert len(sdpa_calls) == n_attention(model), "the cached-pattern run left the fused kernel"
    slow = explicit_patterns(model, *args, **kwargs)
    assert torch.isfinite(plain).all()
    assert torch.equal(logits, plain)
    assert set(fast) == set(slow) and len(fast) == n_attention(model)
    for name in fast:
        assert fast[name].dtype == slow[name].dtype == plain.dtype, name
        assert torch.equal(fast[name], slow[name]), name
    return fast


# ====================================================================== 1. patterns beside the fused kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("d_head", [16, 24], ids=["scale_pow2", "scale_other"])
def test_gqa_and_sliding_windows(sdpa_calls, dtype, d_head):
    model = decoder(d_head, dtype)
    cache = assert_fast_path_exact(model, sdpa_calls, ids(2, 16))
    pattern = cache["pattern", 0]  # a sliding layer: nothing beyond the window
    q, k = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    assert (pattern[..., (q - k >= WINDOW) | (k > q)] == 0).all()
    assert (pattern[..., (q - k < WINDOW) & (k <= q)] > 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_left_padding(sdpa_calls, dtype):
    model = decoder(dtype=dtype)
    tokens, mask = left_padded()
    cache = assert_fast_path_exact(model, sdpa_calls, tokens, attention_mask=mask)
    assert (cache["pattern", 1][2, :, 8:, :8] == 0).all()  # real queries never read padding


@pytest.mark.parametrize("new", [1, 3], ids=["one_token", "three_tokens"])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_kv_cached_step(sdpa_calls, new, padded):
    model = decoder()
    prefix, mask = left_padded(3, 9) if padded else (ids(3, 9), None)
    kv = model.new_kv_cache()
    model(prefix, attention_mask=mask, past_kv=kv)
    step = ids(3, new, seed=1)
    step_mask = None if mask is None else torch.cat([mask, torch.ones_like(step)], dim=1)
    # Frozen copies: each run reads the same prefix and none extends it.
    plain = model(step, attention_mask=step_mask, past_kv=kv.frozen_copy())
    sdpa_calls.clear()
    logits, fast = model.run_with_cache(step, attention_mask=step_mask, past_kv=kv.frozen_copy(), names_filter=patterns)
    assert len(sdpa_calls) == LAYERS
    slow = {}
    for layer in range(LAYERS):  # a fresh frozen copy per run
        slow.update(explicit_patterns_at(model, layer, step, attention_mask=step_mask, past_kv=kv.frozen_copy()))
    assert torch.equal(logits, plain)
    for name in fast:
        assert fast[name].shape == (3, HEADS, new, 9 + new)
        assert torch.equal(fast[name], slow[name]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_packed_rows_with_an_explicit_mask(sdpa_calls, dtype):
    model = decoder(dtype=dtype)
    lengths = [7, 9]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]  # [1, 16]
    segment = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    idx = torch.arange(positions.shape[1])
    allowed = (segment[:, None] == segment[None]) & (idx[None] <= idx[:, None])
    kwargs = dict(positions=positions, attention_allowed=allowed[None, None], key_positions=positions)
    cache = assert_fast_path_exact(model, sdpa_calls, ids(1, 16), **kwargs)
    assert (cache["pattern", 1][0, :, 7:, :7] == 0).all()  # the second row never reads the first


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_t5_relative_bias_and_cross_attention(sdpa_calls, dtype):
    model = t5(dtype)
    src, mask = left_padded(3, 12)
    tgt = ids(3, 10, seed=2)
    tgt[:, 0] = 0
    cache = assert_fast_path_exact(model, sdpa_calls, src, tgt, attention_mask=mask)
    assert "decoder.blocks.0.cross_attn.hook_pattern" in cache
    assert (cache["encoder.blocks.0.attn.hook_pattern"][2, :, 8:, :8] == 0).all()


@pytest.mark.parametrize("d_head", [16, 24], ids=["scale_pow2", "scale_other"])
def test_float32_patterns_are_transformers_eager_formula(d_head):
    """The shared pattern code computes, in float32, exactly what it did before: softmax(mask(q k^T / scale))."""
    model = decoder(d_head)
    tokens = ids(2, 16)
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith(("hook_pattern", "hook_rot_q",
                                                                                "hook_rot_k")))
    for layer in range(LAYERS):
        attn = model.blocks[layer].attn
        q = cache["rot_q", layer].transpose(1, 2)
        k = cache["rot_k", layer].transpose(1, 2).repeat_interleave(HEADS // KV_HEADS, dim=1)
        scores = torch.matmul(q, k.transpose(-1, -2)) * (1 / math.sqrt(d_head))
        scores = scores.masked_fill(~attn.allowed_from_start(16), float("-inf"))
        expected = F.softmax(scores, dim=-1, dtype=torch.float32)
        assert torch.equal(cache["pattern", layer], expected), layer


def test_bfloat16_patterns_are_within_a_unit_of_the_float32_softmax():
    model = decoder(dtype=torch.bfloat16)
    tokens = ids(2, 13)  # a row length that is no multiple of the vector width
    _, cache = explicit_run(model, tokens)
    model.set_attention_implementation("explicit")
    try:
        _, scores = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_attn_scores"))
    finally:
        model.set_attention_implementation("auto")
    for layer in range(LAYERS):
        expected = F.softmax(scores["attn_scores", layer], dim=-1, dtype=torch.float32).to(torch.bfloat16)
        torch.testing.assert_close(cache["pattern", layer], expected, atol=0, rtol=2 ** -8)


def test_a_hook_that_changes_the_pattern_takes_effect(sdpa_calls):
    model = decoder()
    tokens = ids(2, 16)
    plain = model(tokens)

    def first_key_only(pattern, hook):
        out = torch.zeros_like(pattern)
        out[..., 0] = 1.0
        return out

    names = ["blocks.1.attn.hook_z", "blocks.1.attn.hook_v"]
    with model.hooks(fwd_hooks=[(("pattern", 1), first_key_only)]):
        sdpa_calls.clear()
        edited, cache = model.run_with_cache(tokens, names_filter=names)
    assert len(sdpa_calls) == LAYERS - 1  # the edited layer went explicit, the others stayed fused
    assert not torch.allclose(edited, plain)
    v = cache["blocks.1.attn.hook_v"].repeat_interleave(HEADS // KV_HEADS, dim=2)  # [b, p, h, d]
    z = cache["blocks.1.attn.hook_z"]
    assert torch.equal(z, v[:, :1].expand_as(z))  # every query read the first value, as the edit says


def test_a_read_only_hook_and_a_modifying_hook_together_take_the_explicit_path(sdpa_calls):
    model = decoder()
    seen = []
    model.add_hook(("pattern", 0), lambda t, hook: seen.append(t), read_only=True)
    model.add_hook(("pattern", 0), lambda t, hook: t * 0.5)
    try:
        sdpa_calls.clear()
        model(ids(1, 8))
        assert len(sdpa_calls) == LAYERS - 1
        assert len(seen) == 1
    finally:
        model.reset_hooks()


def test_read_only_marks(sdpa_calls):
    model = decoder()
    point = model.blocks[0].attn.hook_pattern
    assert point.read_only  # nothing attached
    handle = point.add_hook(lambda t, hook: None, read_only=True)
    assert point.read_only and handle.read_only

    def marked(t, hook):
        return None

    marked.read_only = True
    model.add_hook("blocks.0.attn.hook_pattern", marked)
    assert all(h.read_only for h in point._hooks["fwd"])
    bwd = point.add_hook(lambda g, hook: None, dir="bwd")
    assert not point.read_only  # a gradient must come from the pattern the output used
    bwd.remove()
    torch_hook = point.register_forward_hook(lambda module, args, out: None)
    assert not point.read_only
    torch_hook.remove()
    point.add_hook(lambda t, hook: None)
    assert not point.read_only
    model.reset_hooks()
    _, fwd, _ = model.get_caching_hooks(patterns)
    assert all(getattr(fn, "read_only", False) for _, fn in fwd)


def test_a_read_only_hook_that_returns_a_new_tensor_raises_and_is_removed():
    model = decoder()

    def not_read_only(t, hook):
        return t.clone()

    not_read_only.read_only = True
    with pytest.raises(ValueError, match="without read_only=True"):
        model.run_with_hooks(ids(1, 8), fwd_hooks=[(("pattern", 1), not_read_only)])
    assert not any(hp.active for hp in model.hook_points())


def test_pattern_gradients_take_the_explicit_path(sdpa_calls):
    model = decoder()
    tokens = ids(2, 16)
    sdpa_calls.clear()
    _, cache = model.run_with_cache(tokens, names_filter=patterns, incl_bwd=True,
                                    backward_metric=lambda logits: logits[:, -1, 3].sum())
    assert sdpa_calls == []
    for layer in range(LAYERS):
        assert cache[f"blocks.{layer}.attn.hook_pattern_grad"].abs().max() > 0


def test_soft_capped_scores_stay_explicit(sdpa_calls):
    model = decoder(attn_scores_soft_cap=2.0)
    sdpa_calls.clear()
    _, fast = model.run_with_cache(ids(2, 16), names_filter=patterns)
    assert sdpa_calls == []
    _, slow = explicit_run(model, ids(2, 16))
    for name in fast:
        assert torch.equal(fast[name], slow[name])


def test_hooking_the_scores_is_explicit_and_agrees(sdpa_calls):
    model = decoder()
    tokens = ids(2, 16)
    sdpa_calls.clear()
    names = lambda n: n.endswith("hook_pattern") or n == "blocks.1.attn.hook_attn_scores"  # noqa: E731
    _, both = model.run_with_cache(tokens, names_filter=names)
    assert len(sdpa_calls) == LAYERS - 1
    _, fast = model.run_with_cache(tokens, names_filter=patterns)
    for layer in range(2):  # layer 2 reads the explicit layer 1's output, rounded differently
        assert torch.equal(both["pattern", layer], fast["pattern", layer])


# ====================================================================== 2. offload
class Recording(Offload):
    made: list["Recording"] = []

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.finished = 0
        Recording.made.append(self)

    def finish(self) -> None:
        self.finished += 1
        super().finish()


@pytest.fixture
def recording(monkeypatch):
    Recording.made = []
    monkeypatch.setattr(interp.hooks, "Offload", Recording)
    return Recording.made


@pytest.mark.parametrize("dtype", [None, torch.float64])
def test_cpu_run_with_cache_to_cpu_goes_through_the_helper_without_pinning(recording, dtype):
    model = decoder()
    tokens = ids(2, 9)
    logits_ref, ref = model.run_with_cache(tokens)
    assert recording == []  # nothing to convert, no helper
    logits, cache = model.run_with_cache(tokens, device="cpu", dtype=dtype)
    (offload,) = recording
    assert offload.asynchronous and offload.finished == 1
    assert offload.pinned_bytes == 0 and offload._streams == {}
    assert torch.equal(logits, logits_ref)
    assert set(cache) == set(ref)
    for name, t in cache.items():
        assert t.device.type == "cpu" and t.dtype == (dtype or torch.float32), name
        assert torch.equal(t, ref[name].to(t.dtype)), name
    # resid_post of layer 0 is resid_pre of layer 1: converted once.
    a, b = cache["blocks.0.hook_resid_post"], cache["blocks.1.hook_resid_pre"]
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def test_offloaded_gradients_are_each_hooks_own_not_a_later_sum():
    """Autograd adds the next gradient into the tensor it handed to a hook (when nothing else holds it): a copy
    keyed on the tensor alone would give resid_mid the gradient resid_post had."""
    model = decoder()
    tokens = ids(2, 9)
    metric = lambda logits: logits[:, -1, 0].sum()  # noqa: E731
    _, ref = model.run_with_cache(tokens, incl_bwd=True, backward_metric=metric)
    _, cache = model.run_with_cache(tokens, device="cpu", dtype=torch.float64, incl_bwd=True, backward_metric=metric)
    for name, t in ref.items():
        assert torch.equal(cache[name], t.double()), name


def test_cpu_offload_with_remove_batch_dim_and_gradients():
    model = decoder()
    tokens = ids(1, 9)
    _, ref = model.run_with_cache(tokens, incl_bwd=True, backward_metric=lambda x: x[0, -1, 0])
    _, cache = model.run_with_cache(tokens, device="cpu", dtype=torch.float64, remove_batch_dim=True, incl_bwd=True,
                                    backward_metric=lambda x: x[0, -1, 0])
    assert not cache.has_batch_dim and set(cache) == set(ref)
    for name, t in cache.items():
        assert torch.equal(t, ref[name][0].double()), name


def test_get_caching_hooks_alone_converts_synchronously():
    model = decoder()
    cache, fwd, _ = model.get_caching_hooks(patterns, device="cpu", dtype=torch.float64)
    model.run_with_hooks(ids(1, 8), fwd_hooks=fwd)
    assert len(cache) == LAYERS and all(t.dtype == torch.float64 for t in cache.values())


def test_activation_cache_to_converts_each_tensor_once():
    model = decoder()
    _, cache = model.run_with_cache(ids(2, 9))
    moved = cache.to("cpu", torch.float64)
    a, b = moved["blocks.0.hook_resid_post"], moved["blocks.1.hook_resid_pre"]
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    for name, t in moved.items():
        assert torch.equal(t, cache[name].double()), name


def test_offload_on_cpu_does_not_pin_and_does_not_hold_its_sources():
    offload = Offload("cpu", torch.float64)
    source = torch.randn(3, 4)
    out = offload(source)
    assert offload(source) is out  # the same tensor again: the same copy
    assert out.dtype == torch.float64 and torch.equal(out, source.double())
    assert offload.pinned_bytes == 0 and offload._streams == {}
    assert torch.equal(offload(torch.arange(3)), torch.arange(3))  # integers keep their dtype
    gone = weakref.ref(source)
    del source
    gc.collect()
    assert gone() is None  # freed as soon as the forward drops it (on a GPU: as soon as it is copied)
    offload.finish()


def test_offload_under_inference_mode():
    model = decoder()
    tokens = ids(2, 9)
    _, ref = model.run_with_cache(tokens)
    with torch.inference_mode():
        _, cache = model.run_with_cache(tokens, device="cpu", dtype=torch.float64)
        moved = cache.to("cpu", torch.float32)
    for name, t in ref.items():
        assert torch.equal(cache[name], t.double()) and torch.equal(moved[name], t), name


# ---------------------------------------------------------------------- where a GPU exists
@cuda
@pytest.mark.parametrize("dtype", [None, torch.float32])
def test_cuda_run_with_cache_to_cpu_is_pinned_and_equal(recording, dtype):
    model = decoder(dtype=torch.bfloat16).cuda()
    tokens = ids(2, 16).cuda()
    _, on_gpu = model.run_with_cache(tokens)
    logits, cache = model.run_with_cache(tokens, device="cpu", dtype=dtype)
    (offload,) = recording
    assert offload.pinned_bytes > 0 and offload.finished == 1
    for name, t in cache.items():
        assert t.device.type == "cpu" and t.is_pinned() and t.is_contiguous(), name
        # dtype=None keeps each activation's own dtype (a norm's float32 scale in a bfloat16 model too)
        want = on_gpu[name] if dtype is None else on_gpu[name].to(dtype)
        assert t.dtype == want.dtype and torch.equal(t, want.cpu()), name
    a, b = cache["blocks.0.hook_resid_post"], cache["blocks.1.hook_resid_pre"]
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


@cuda
def test_cuda_activation_cache_to_cpu_is_pinned_and_equal():
    model = decoder(dtype=torch.bfloat16).cuda()
    _, cache = model.run_with_cache(ids(2, 16).cuda())
    moved = cache.to("cpu")
    for name, t in moved.items():
        assert t.is_pinned() and torch.equal(t, cache[name].cpu()), name  # hook_z arrives non-contiguous


@cuda
def test_cuda_offload_copies_the_value_at_hand_over_while_the_gpu_goes_on():
    offload = Offload("cpu")
    x = torch.randn(1024, 1024, device="cuda")
    expected = x.cpu()
    torch.cuda._sleep(10_000_000)  # the compute stream is busy: the copy must wait for what came before
    y = x * 1  # a kernel queued before the hand-over
    out = offload(y)
    del y  # the allocator must not hand y's memory to z before the copy has read it
    z = torch.full((1024, 1024), 7.0, device="cuda")
    offload.finish()
    assert torch.equal(out, expected)
    assert (z == 7).all()



@cuda
def test_cuda_offloaded_gradients_equal_the_gpu_cache():
    model = decoder().cuda()
    tokens = ids(2, 16).cuda()
    metric = lambda logits: logits[:, -1, 0].sum()  # noqa: E731
    _, on_gpu = model.run_with_cache(tokens, incl_bwd=True, backward_metric=metric)
    _, cache = model.run_with_cache(tokens, device="cpu", incl_bwd=True, backward_metric=metric)
    assert set(cache) == set(on_gpu)
    for name, t in on_gpu.items():
        assert cache[name].is_pinned() and torch.equal(cache[name], t.cpu()), name


# ---------------------------------------------------------------------- the one-pass causal pattern (GPU)
def _masked_softmax_by_hand(scores: torch.Tensor, offset: int = 0) -> torch.Tensor:
    n_query, n_key = scores.shape[-2:]
    hidden = torch.arange(n_key)[None] > torch.arange(offset, offset + n_query)[:, None]
    return scores.float().masked_fill(hidden.to(scores.device), float("-inf")).softmax(-1)


def test_the_one_pass_causal_pattern_is_shared_by_both_paths(monkeypatch):
    """Forced on here with a stand-in for the GPU kernel: cached == explicit bit for bit (one source for
    both), the logits those of the no-hook forward, and the stand-in really ran."""
    calls = []

    def stand_in(scores, offset=0):
        calls.append(tuple(scores.shape))
        return scores.copy_(_masked_softmax_by_hand(scores, offset).to(scores.dtype))

    monkeypatch.setattr(models.kernels, "causal_softmax_", stand_in)
    monkeypatch.setattr(models.attention.Attention, "_one_pass_causal",
                        lambda self, q, frame: frame.causal and not frame.offset and frame.key_mask is None)
    model = decoder(dtype=torch.bfloat16)
    tokens = ids(2, 16)
    plain = model(tokens)
    logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_pattern"))
    assert torch.equal(logits, plain) and len(calls) == model.cfg.n_layers
    for layer in range(model.cfg.n_layers):  # one layer explicit at a time: the others' outputs stay fused
        model.blocks[layer].attn.implementation = "explicit"
        _, explicit = model.run_with_cache(tokens, names_filter=f"blocks.{layer}.attn.hook_pattern")
        model.blocks[layer].attn.implementation = "auto"
        assert torch.equal(explicit["pattern", layer], cache["pattern", layer])


@cuda
@pytest.mark.parametrize("dtype, n_query, n_key, offset", [
    (torch.float32, 13, 13, 0), (torch.bfloat16, 512, 512, 0), (torch.float16, 100, 100, 0),
    (torch.float32, 3, 40, 37), (torch.bfloat16, 1000, 1000, 0)])
def test_the_triton_causal_softmax_equals_masked_softmax(dtype, n_query, n_key, offset):
    if not models.kernels.available():
        pytest.skip("Triton is not available")
    g = torch.Generator(device="cuda").manual_seed(0)
    scores = torch.randn(2, 3, n_query, n_key, device="cuda", generator=g).to(dtype) * 4
    want = _masked_softmax_by_hand(scores, offset)
    got = models.kernels.causal_softmax_(scores.clone(), offset)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    else:  # one rounding from float32: within one unit in the last place of the half-precision result
        assert (got.float() - want.to(dtype).float()).abs().max() <= want.abs().max() * 2 ** -7
