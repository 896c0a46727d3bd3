"""Activation patching (`interp.patching`) against brute force on the `transformers` models.

Every sweep here is checked against a loop written in this file: the same patch made
with plain torch hooks on the Hugging Face twin of the model (never through the
toolkit's hook points), one batch row per patched site, and the metric computed by hand
from the twin's logits. The engine's fast path (resumed rows, packed, cached prefix
keys/values) and its plain path (one full forward per row) must both agree with it.
"""

from __future__ import annotations

import itertools
import json

import pytest
import torch
import torch.nn.functional as F

from interp.patching import (
    GaussianNoise, PatchingRuns, PromptLengthError, activation_patch, custom, kl_to_clean, log_prob, logit_diff, prob,
)

TOL = dict(atol=1e-4, rtol=1e-5)
WHOLE = ["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"]
PER_HEAD = ["z", "q", "k", "v", "result", "pattern"]
GRID_AXES = {
    "layer_pos": ("layer", "pos"), "layer": ("layer",), "head_pos": ("layer", "head", "pos"),
    "head": ("layer", "head"), "dest_src": ("layer", "head", "dest", "src"),
}
# Equal-length pairs that differ in one or two tokens, as a real corruption would.
CLEAN = ["The cat sat on the red mat", "A dog ran in the big park"]
CORRUPTED = ["The dog sat on the blue mat", "A cat ran in the old park"]


# ---------------------------------------------------------------------- the Hugging Face side
ATTN_NAME = "interp_test_patchable_eager"


def _patchable_eager(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention written out here, with a place to read or replace the pattern (HF has no hook there).

    The mask is built here too (causal, no padding: the tests never pad), so nothing
    depends on which mask `transformers` prepares for a custom implementation.
    """
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    n_rep = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(n_rep, dim=1), value.repeat_interleave(n_rep, dim=1)
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    n_q, n_k = scores.shape[-2:]
    causal = torch.ones(n_q, n_k, dtype=torch.bool, device=scores.device).tril(n_k - n_q)
    weights = F.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1, dtype=torch.float32).to(query.dtype)
    edit = getattr(module, "_test_pattern_edit", None)
    if edit is not None:
        weights = edit(weights)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def _register_attention():
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(ATTN_NAME, _patchable_eager)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


class _Handle:
    def __init__(self, fn):
        self.remove = fn


class HF:
    """Reads and rewrites the toolkit's site kinds on a `transformers` LLaMA or GPT-2, in the toolkit's layouts.

    attach(kind, layer, fn): the activation passes through fn, shaped [b, pos, d_model]
    (whole-stream kinds), [b, pos, heads, d_head] (z, q; k and v per KV head),
    [b, pos, heads, d_model] (result) or [b, heads, dest, src] (pattern).
    """

    def __init__(self, hf):
        self.hf = hf
        cfg = hf.config
        self.gpt2 = hasattr(hf, "transformer")
        self.blocks = hf.transformer.h if self.gpt2 else hf.model.layers
        self.H = cfg.num_attention_heads
        self.KV = getattr(cfg, "num_key_value_heads", None) or self.H
        self.d = cfg.hidden_size
        self.dh = self.d // self.H
        self.wte = hf.transformer.wte if self.gpt2 else hf.model.embed_tokens

    def _w_o(self, layer):  # [heads, d_head, d_model], row-vector convention
        blk = self.blocks[layer]
        if self.gpt2:  # Conv1D stores [in, out]
            return blk.attn.c_proj.weight.view(self.H, self.dh, self.d)
        return blk.self_attn.o_proj.weight.T.reshape(self.H, self.dh, self.d)

    def attach(self, kind, layer, fn):
        blk = self.blocks[layer]
        attn = blk.attn if self.gpt2 else blk.self_attn
        o_proj = attn.c_proj if self.gpt2 else attn.o_proj

        def on_output(module):
            def hook(mod, args, out):
                return (fn(out[0]),) + tuple(out[1:]) if isinstance(out, tuple) else fn(out)

            return module.register_forward_hook(hook)

        if kind == "resid_pre":
            def pre(mod, args, kwargs):
                if args:
                    return (fn(args[0]),) + tuple(args[1:]), kwargs
                return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}

            return blk.register_forward_pre_hook(pre, with_kwargs=True)
        if kind == "resid_mid":
            # HF keeps no resid_mid tensor that both the MLP and the residual add read: the
            # block adds its input to the attention output. So the attention output is
            # rewritten to make that sum the new resid_mid.
            seen = {}

            def block_input(mod, args, kwargs):
                seen["x"] = args[0] if args else kwargs["hidden_states"]

            def attn_output(mod, args, out):
                x = seen["x"]
                return (fn(x + out[0]) - x,) + tuple(out[1:])

            handles = [blk.register_forward_pre_hook(block_input, with_kwargs=True),
                       attn.register_forward_hook(attn_output)]
            return _Handle(lambda: [h.remove() for h in handles])
        if kind == "resid_post":
            return on_output(blk)
        if kind == "attn_out":
            return on_output(o_proj)  # GPT-2's resid_dropout is the identity in eval mode
        if kind == "mlp_out":
            return on_output(blk.mlp)
        if kind == "z":
            def pre_z(mod, args):
                z = args[0]
                b, p = z.shape[:2]
                return (fn(z.view(b, p, self.H, self.dh)).reshape(b, p, -1),) + tuple(args[1:])

            return o_proj.register_forward_pre_hook(pre_z)
        if kind in ("q", "k", "v"):
            n = self.H if kind == "q" else self.KV
            if self.gpt2:  # c_attn computes q, k and v in one matmul
                i = "qkv".index(kind)

                def split(mod, args, out):
                    b, p = out.shape[:2]
                    parts = list(out.split(self.d, dim=-1))
                    parts[i] = fn(parts[i].view(b, p, n, self.dh)).reshape(b, p, -1)
                    return torch.cat(parts, dim=-1)

                return attn.c_attn.register_forward_hook(split)
            proj = getattr(attn, f"{kind}_proj")

            def per_head(mod, args, out):
                b, p = out.shape[:2]
                return fn(out.view(b, p, n, self.dh)).reshape(b, p, -1)

            return proj.register_forward_hook(per_head)
        if kind == "result":
            # Head h writes z_h @ W_O[h]; a new result changes the output by the difference.
            def result(mod, args, out):
                z = args[0]
                b, p = z.shape[:2]
                res = torch.einsum("bphk,hkd->bphd", z.view(b, p, self.H, self.dh), self._w_o(layer))
                return out + (fn(res) - res).sum(2)

            return o_proj.register_forward_hook(result)
        if kind == "pattern":
            attn._test_pattern_edit = fn
            return _Handle(lambda: delattr(attn, "_test_pattern_edit"))
        raise AssertionError(kind)

    @torch.no_grad()
    def run(self, tokens, edits=(), noise=None, keep=1):
        """Logits [b, keep (0: all), vocab] with edits [(kind, layer, fn)]; noise is added to the token embeddings."""
        handles = [self.attach(*e) for e in edits]
        try:
            kwargs = {"logits_to_keep": keep}
            if noise is None:
                return self.hf(input_ids=tokens, **kwargs).logits
            return self.hf(inputs_embeds=self.wte(tokens) + noise, **kwargs).logits
        finally:
            for h in handles:
                h.remove()

    def record(self, tokens, kind, layers, noise=None):
        """{layer: activation} of one kind, from an unpatched run."""
        store = {}

        def grab(layer):
            def fn(act):
                store[layer] = act.detach().clone()
                return act

            return fn

        self.run(tokens, [(kind, layer, grab(layer)) for layer in layers], noise)
        return store


def grid_sites(kind, by, layers, n_heads, n_pos):
    """Every cell of a grid in row-major order, as dicts (pos None: every position)."""
    ranges = {"layer": layers, "head": range(n_heads), "pos": range(n_pos), "dest": range(n_pos),
              "src": range(n_pos)}
    axes = GRID_AXES[by]
    shape = tuple(len(ranges[a]) for a in axes)
    return [dict(zip(axes, c)) for c in itertools.product(*(ranges[a] for a in axes))], shape


def _overwrite(act, r, src, kind, site):
    """Row r of `act` takes `src` (one prompt's activation, no batch axis) at the site."""
    head = site.get("head")
    if kind == "pattern":  # [b, heads, dest, src]
        dest = site.get("pos", site.get("dest"))
        rows = slice(None) if dest is None else dest
        if "src" in site:
            act[r, head, dest, site["src"]] = src[head, dest, site["src"]]
        else:
            act[r, head, rows] = src[head, rows]
    else:
        pos = site.get("pos")
        idx = (slice(None) if pos is None else pos,) + (() if head is None else (head,))
        act[(r,) + idx] = src[idx]
    return act


def brute_force(hf, base, source_acts, kind, by, metric, layers, base_noise=None, keep=1, chunk=48):
    """metric(logits [R, keep, vocab], prompt [R]) for every (prompt, site): [n_prompts, *grid].

    One batch row per (site, prompt): the base run of that prompt with the single site
    overwritten by `source_acts[layer][prompt]` (an activation per prompt).
    """
    n, n_pos = base.shape
    n_heads = hf.KV if kind in ("k", "v") else hf.H
    sites, shape = grid_sites(kind, by, layers, n_heads, n_pos)
    rows = [(si, p) for si in range(len(sites)) for p in range(n)]
    out = torch.zeros(n, len(sites))
    for start in range(0, len(rows), chunk):
        part = rows[start: start + chunk]
        prompt = torch.tensor([p for _, p in part])

        def editor(layer):
            def fn(act):
                act = act.clone()
                for r, (si, p) in enumerate(part):
                    if sites[si]["layer"] == layer:
                        _overwrite(act, r, source_acts[layer][p], kind, sites[si])
                return act

            return fn

        noise = None if base_noise is None else base_noise[prompt]
        logits = hf.run(base[prompt], [(kind, layer, editor(layer)) for layer in layers], noise, keep)
        vals = metric(logits, prompt)
        for (si, p), v in zip(part, vals):
            out[p, si] = v
    return out.view(n, *shape)


def hand_logit_diff(a, b):
    """logit[a] - logit[b] at the last position, with each row's prompt's tokens."""
    a, b = torch.as_tensor(a), torch.as_tensor(b)

    def diff(logits, prompt):
        rows = torch.arange(len(prompt))
        return logits[rows, -1, a[prompt]] - logits[rows, -1, b[prompt]]

    return diff


# ---------------------------------------------------------------------- fixtures
def _load_hf(directory, attn=ATTN_NAME):
    from transformers import AutoModelForCausalLM

    _register_attention()
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation=attn).eval()


@pytest.fixture(scope="module")
def llama_hf(llama_dir):
    return HF(_load_hf(llama_dir))


@pytest.fixture(scope="module")
def gpt2_hf(gpt2_dir):
    return HF(_load_hf(gpt2_dir))


class Setup:
    """A model, its HF twin, a clean/corrupted token pair and a metric chosen so that the two runs differ a lot."""

    def __init__(self, model, hf, clean=CLEAN, corrupted=CORRUPTED):
        self.model, self.hf = model, hf
        self.clean, self.corrupted = model.to_tokens(clean), model.to_tokens(corrupted)
        assert self.clean.shape == self.corrupted.shape
        assert all(len(model.to_tokens(t)[0]) == self.clean.shape[1] for t in clean + corrupted), "no padding"
        self.clean_logits, self.corrupted_logits = hf.run(self.clean), hf.run(self.corrupted)
        # Per prompt, the two tokens whose logit difference moves most between the runs:
        # a large denominator for the normalised metric.
        gap = self.clean_logits[:, -1] - self.corrupted_logits[:, -1]
        self.a, self.b = gap.argmax(-1), gap.argmin(-1)
        self.diff = hand_logit_diff(self.a, self.b)
        idx = torch.arange(len(clean))
        self.clean_diff = self.diff(self.clean_logits, idx)
        self.corrupted_diff = self.diff(self.corrupted_logits, idx)

    def metric(self, normalized=False):
        return logit_diff(self.a, self.b, normalized=normalized)

    def expected(self, kind, by, direction="denoise", layers=None, normalized=False, metric=None, keep=1):
        layers = list(range(self.model.cfg.n_layers)) if layers is None else layers
        base, source = (self.corrupted, self.clean) if direction == "denoise" else (self.clean, self.corrupted)
        acts = self.hf.record(source, kind, layers)
        raw = brute_force(self.hf, base, acts, kind, by, metric or self.diff, layers, keep=keep)
        if not normalized:
            return raw
        shape = (-1,) + (1,) * (raw.dim() - 1)
        lo, hi = self.corrupted_diff.view(shape), self.clean_diff.view(shape)
        return (raw - lo) / (hi - lo)


@pytest.fixture(scope="module")
def llama_setup(llama, llama_hf):
    return Setup(llama, llama_hf)


@pytest.fixture(scope="module")
def gpt2_setup(gpt2, gpt2_hf):
    return Setup(gpt2, gpt2_hf)


def _setup(request, name):
    return request.getfixturevalue(f"{name}_setup")


def patch(s, kind, by, **kw):
    kw.setdefault("metric", s.metric())
    return activation_patch(s.model, s.clean, s.corrupted, kind=kind, by=by, progress=False, **kw)


# ---------------------------------------------------------------------- the harness itself
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_hf_harness_reads_what_the_model_hooks(request, name):
    """The brute force is only as good as its reading of HF modules: each kind must equal our hook's activation."""
    s = _setup(request, name)
    # The attention written here is the stock eager one, until a test edits the pattern.
    stock = _load_hf(request.getfixturevalue(f"{name}_dir"), "eager")
    with torch.no_grad():
        torch.testing.assert_close(s.hf.run(s.clean, keep=0), stock(s.clean).logits, **TOL)
    logits, cache = s.model.run_with_cache(s.clean, names_filter=lambda n: True)
    torch.testing.assert_close(s.clean_logits[:, -1], logits[:, -1], **TOL)
    hook = {"resid_pre": "hook_resid_pre", "resid_mid": "hook_resid_mid", "resid_post": "hook_resid_post",
            "attn_out": "hook_attn_out", "mlp_out": "hook_mlp_out", "z": "attn.hook_z", "q": "attn.hook_q",
            "k": "attn.hook_k", "v": "attn.hook_v", "result": "attn.hook_result", "pattern": "attn.hook_pattern"}
    for kind, suffix in hook.items():
        acts = s.hf.record(s.clean, kind, [0, 1])
        for layer in (0, 1):
            torch.testing.assert_close(acts[layer], cache[f"blocks.{layer}.{suffix}"], **TOL,
                                       msg=lambda m: f"{kind} L{layer}: {m}")


# ---------------------------------------------------------------------- every kind vs brute force
CASES = ([(k, "layer_pos") for k in WHOLE] + [(k, "layer") for k in WHOLE] + [(k, "head_pos") for k in PER_HEAD]
         + [(k, "head") for k in PER_HEAD] + [("pattern", "dest_src")])


@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("kind,by", CASES)
def test_sweep_matches_brute_force(request, name, direction, kind, by):
    s = _setup(request, name)
    normalized = direction == "denoise"
    want = s.expected(kind, by, direction, normalized=normalized)
    for fast in (True, False):
        got = patch(s, kind, by, direction=direction, fast=fast, metric=s.metric(normalized))
        assert got.per_prompt.shape == want.shape
        torch.testing.assert_close(got.per_prompt, want, **TOL, msg=lambda m: f"fast={fast}: {m}")
        torch.testing.assert_close(got.clean_metric, s.clean_diff, **TOL)
        torch.testing.assert_close(got.corrupted_metric, s.corrupted_diff, **TOL)
        assert got.extra["resumed"] == fast


def test_layers_option_sweeps_only_those_layers(llama_setup):
    s = llama_setup
    full = patch(s, "z", "head_pos")
    part = patch(s, "z", "head_pos", layers=[1])
    assert part.labels["layer"] == ["L1"]
    torch.testing.assert_close(part.per_prompt, full.per_prompt[:, 1:2], **TOL)


# ---------------------------------------------------------------------- identities
@pytest.mark.parametrize("kind,by", [("resid_pre", "layer_pos"), ("resid_mid", "layer"), ("mlp_out", "layer_pos"),
                                     ("z", "head_pos"), ("k", "head"), ("result", "head_pos"),
                                     ("pattern", "dest_src")])
def test_clean_into_clean_gives_the_clean_metric_everywhere(llama_setup, kind, by):
    s = llama_setup
    got = activation_patch(s.model, s.clean, s.clean, kind=kind, by=by, metric=s.metric(), progress=False)
    want = s.clean_diff.view(-1, *[1] * (got.per_prompt.dim() - 1)).expand_as(got.per_prompt)
    torch.testing.assert_close(got.per_prompt, want, **TOL)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_patching_a_whole_layer_restores_or_breaks_exactly(request, name):
    """resid_pre at layer 0, every position, is the whole input: denoise gives the clean run, noise the corrupted."""
    s = _setup(request, name)
    metric = s.metric(normalized=True)
    exact = dict(atol=1e-5, rtol=0)
    for fast in (True, False):
        den = patch(s, "resid_pre", "layer", metric=metric, fast=fast)
        torch.testing.assert_close(den.per_prompt[:, 0], torch.ones(2), **exact)
        noi = patch(s, "resid_pre", "layer", metric=metric, direction="noise", fast=fast)
        torch.testing.assert_close(noi.per_prompt[:, 0], torch.zeros(2), **exact)
        # The last block's output is all the unembedding reads.
        last = patch(s, "resid_post", "layer", metric=metric, fast=fast)
        torch.testing.assert_close(last.per_prompt[:, -1], torch.ones(2), **exact)


def test_noising_and_denoising_give_different_maps(llama_setup):
    s = llama_setup
    den = patch(s, "z", "head_pos", metric=s.metric(True))
    noi = patch(s, "z", "head_pos", metric=s.metric(True), direction="noise")
    assert den.direction == "denoise" and noi.direction == "noise"
    assert (den.per_prompt - noi.per_prompt).abs().max() > 0.1


# ---------------------------------------------------------------------- no state between calls
def test_no_state_survives_between_sweeps(llama_setup):
    s = llama_setup
    first = patch(s, "z", "head_pos", metric=s.metric(True))
    # Sweeps that touch other hooks, other paths (explicit attention, full forwards), ablations and noise.
    patch(s, "pattern", "dest_src", direction="noise")
    patch(s, "k", "head", fast=False)
    patch(s, "resid_mid", "layer_pos", ablation="zero")
    patch(s, "v", "head_pos", ablation="resample")
    activation_patch(s.model, CLEAN, noise=GaussianNoise("the", seed=3), kind="result", by="head_pos",
                     metric=s.metric(), progress=False)
    again = patch(s, "z", "head_pos", metric=s.metric(True))
    assert torch.equal(first.per_prompt, again.per_prompt)
    assert torch.equal(first.clean_metric, again.clean_metric)
    assert torch.equal(first.corrupted_metric, again.corrupted_metric)


@pytest.mark.parametrize("kind,by,layers", [("resid_pre", "layer_pos", None), ("z", "head_pos", [1]),
                                            ("pattern", "head_pos", [0]), ("v", "head", None)])
def test_batched_equals_one_prompt_at_a_time(llama_setup, kind, by, layers):
    s = llama_setup
    reference = patch(s, kind, by, metric=s.metric(True), batch_size=512, layers=layers)
    for batch_size in (1, 7):
        got = patch(s, kind, by, metric=s.metric(True), batch_size=batch_size, layers=layers)
        torch.testing.assert_close(got.per_prompt, reference.per_prompt, **TOL)
    for i in range(len(CLEAN)):
        one = activation_patch(s.model, CLEAN[i], CORRUPTED[i], kind=kind, by=by, progress=False, layers=layers,
                               metric=logit_diff(s.a[i], s.b[i], normalized=True))
        torch.testing.assert_close(one.per_prompt[0], reference.per_prompt[i], **TOL)


# ---------------------------------------------------------------------- metrics
def _last_log_probs(logits):
    return logits[:, -1].float().log_softmax(-1)


def test_metrics_match_hand_computations(llama_setup):
    s = llama_setup

    def rows(p):
        return torch.arange(len(p))

    target = s.a
    clean_lp = _last_log_probs(s.clean_logits)
    mid = 3  # a metric position before some patched positions: those rows must read it from the base run
    cases = {
        "log_prob": (log_prob(target), lambda lg, p: _last_log_probs(lg)[rows(p), target[p]], 1),
        "prob": (prob(target), lambda lg, p: _last_log_probs(lg)[rows(p), target[p]].exp(), 1),
        "kl_to_clean": (kl_to_clean(),
                        lambda lg, p: (clean_lp[p].exp() * (clean_lp[p] - _last_log_probs(lg))).sum(-1), 1),
        "logit_diff@3": (logit_diff(s.a, s.b, position=mid),
                         lambda lg, p: lg[rows(p), mid, s.a[p]] - lg[rows(p), mid, s.b[p]], 0),
        "custom, every position": (custom(lambda lg: lg[..., 7].mean(1) - lg[..., 11].max(1).values, positions=None),
                                   lambda lg, p: lg[..., 7].mean(1) - lg[..., 11].max(1).values, 0),
        "custom, two positions": (custom(lambda lg: lg[:, 0, 5] * lg[:, 1, 9], positions=(1, -1)),
                                  lambda lg, p: lg[:, 1, 5] * lg[:, -1, 9], 0),
        "plain function": (lambda lg: lg[:, 2:].logsumexp(-1).sum(1), lambda lg, p: lg[:, 2:].logsumexp(-1).sum(1), 0),
    }
    for name, (metric, hand, keep) in cases.items():
        want = s.expected("resid_pre", "layer_pos", metric=lambda lg, p, hand=hand: hand(lg.float(), p), keep=keep)
        for fast in (True, False):
            got = patch(s, "resid_pre", "layer_pos", metric=metric, fast=fast)
            torch.testing.assert_close(got.per_prompt, want, **TOL, msg=lambda m: f"{name} fast={fast}: {m}")
    # Nothing patched away from the clean run: KL 0.
    same = activation_patch(s.model, s.clean, s.clean, kind="z", by="head_pos", metric=kl_to_clean(), progress=False)
    torch.testing.assert_close(same.per_prompt, torch.zeros_like(same.per_prompt), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------- corruptions and ablations
def _positions_of(model, texts, token):
    return [[i for i, t in enumerate(model.to_str_tokens(text)) if t == token] for text in texts]


def test_gaussian_noise_follows_its_recipe_on_the_chosen_positions(llama_setup):
    s = llama_setup
    d = s.model.cfg.d_model
    chosen = _positions_of(s.model, CLEAN, " the")
    assert all(chosen)
    mask = torch.zeros(s.clean.shape, dtype=torch.bool)
    for i, ps in enumerate(chosen):
        mask[i, ps] = True
    # Zhang & Nanda's recipe: N(0, (3 x std(W_E))^2) on the subject's embeddings, from a seeded generator.
    w_e_std = float(s.hf.wte.weight.detach().std())
    g = torch.Generator().manual_seed(11)
    mine = torch.randn(*s.clean.shape, d, generator=g) * 3 * w_e_std * mask[..., None]

    noise = GaussianNoise(positions="the", scale=3, seed=11)
    added = noise.sample(s.model, CLEAN, s.clean)
    torch.testing.assert_close(added, mine, atol=1e-6, rtol=1e-5)
    assert torch.equal(added[~mask], torch.zeros_like(added[~mask]))
    assert abs(float(added[mask].std()) / (3 * w_e_std) - 1) < 0.15

    noised_logits = s.hf.run(s.clean, noise=mine)
    layers = [0, 1]
    for direction, fast in itertools.product(("denoise", "noise"), (True, False)):
        got = activation_patch(s.model, CLEAN, noise=noise, kind="resid_pre", by="layer_pos", metric=s.metric(),
                               direction=direction, fast=fast, progress=False)
        # The corrupted baseline is the HF run on embeddings noised here.
        torch.testing.assert_close(got.corrupted_metric, s.diff(noised_logits, torch.arange(2)), **TOL)
        torch.testing.assert_close(got.clean_metric, s.clean_diff, **TOL)
        if direction == "denoise":
            acts = s.hf.record(s.clean, "resid_pre", layers)
            want = brute_force(s.hf, s.clean, acts, "resid_pre", "layer_pos", s.diff, layers, base_noise=mine)
        else:
            acts = s.hf.record(s.clean, "resid_pre", layers, noise=mine)
            want = brute_force(s.hf, s.clean, acts, "resid_pre", "layer_pos", s.diff, layers)
        torch.testing.assert_close(got.per_prompt, want, **TOL, msg=lambda m: f"{direction} fast={fast}: {m}")
        # Positions before the first noised one see the same input in both runs: patching them does nothing.
        first = min(min(ps) for ps in chosen)
        unchanged = got.corrupted_metric if direction == "denoise" else got.clean_metric
        torch.testing.assert_close(got.per_prompt[:, 0, :first], unchanged[:, None].expand(-1, first), **TOL)

    def corrupted(seed, positions="the"):
        return PatchingRuns(s.model, CLEAN, noise=GaussianNoise(positions, seed=seed))

    def baseline(runs):
        return activation_patch(s.model, None, kind="resid_pre", by="layer", metric=s.metric(), runs=runs,
                                progress=False).corrupted_metric

    assert torch.equal(baseline(corrupted(11)), baseline(corrupted(11)))
    assert not torch.allclose(baseline(corrupted(11)), baseline(corrupted(12)))




def test_gaussian_noise_finds_its_positions_in_the_tokens_patched(llama_setup):
    """With prepend_bos=True every position shifts by one; the noise must follow the word, not the old index."""
    s = llama_setup
    tokens = s.model.to_tokens(CLEAN, prepend_bos=True)
    assert tokens.shape[1] == s.clean.shape[1] + 1
    mask = torch.zeros(tokens.shape, dtype=torch.bool)
    for i, text in enumerate(CLEAN):
        mask[i] = torch.tensor([t == " the" for t in s.model.to_str_tokens(text, prepend_bos=True)])
    g = torch.Generator().manual_seed(2)
    mine = torch.randn(*tokens.shape, s.model.cfg.d_model, generator=g) * 3 * float(s.hf.wte.weight.detach().std())
    got = activation_patch(s.model, CLEAN, noise=GaussianNoise("the", seed=2), kind="resid_pre", by="layer",
                           metric=s.metric(), prepend_bos=True, progress=False)
    want = s.diff(s.hf.run(tokens, noise=mine * mask[..., None]), torch.arange(2))
    torch.testing.assert_close(got.corrupted_metric, want, **TOL)


@pytest.mark.parametrize("ablation,kind,by,with_data", [
    ("zero", "z", "head_pos", False), ("zero", "resid_mid", "layer_pos", False),
    ("mean", "attn_out", "layer_pos", True), ("mean", "k", "head", True), ("mean", "pattern", "head_pos", False),
    ("resample", "v", "head_pos", False), ("resample", "result", "head", True),
])
def test_ablations_match_brute_force(llama_setup, ablation, kind, by, with_data):
    s = llama_setup
    layers = [0, 1]
    n_pos = s.clean.shape[1]
    data = torch.randint(100, 5000, (5, n_pos), generator=torch.Generator().manual_seed(1))
    seed = 4
    own = s.hf.record(s.clean, kind, layers)
    ref = s.hf.record(data, kind, layers) if with_data else own
    if ablation == "zero":
        src = {l: torch.zeros_like(own[l]) for l in layers}
    elif ablation == "mean":
        src = {l: ref[l].mean(0, keepdim=True).expand_as(own[l]) for l in layers}
    elif with_data:  # resample: each prompt draws one data prompt with the seeded generator
        pick = torch.randint(len(data), (len(CLEAN),), generator=torch.Generator().manual_seed(seed))
        src = {l: ref[l][pick] for l in layers}
    else:  # resample among the prompts themselves: with two, each takes the other's
        src = {l: own[l].flip(0) for l in layers}
    want = brute_force(s.hf, s.clean, src, kind, by, s.diff, layers)
    for fast in (True, False):
        got = activation_patch(s.model, s.clean, kind=kind, by=by, metric=s.metric(), ablation=ablation,
                               ablation_data=data if with_data else None, seed=seed, fast=fast, progress=False)
        assert got.direction == f"ablate:{ablation}"
        torch.testing.assert_close(got.per_prompt, want, **TOL)
        torch.testing.assert_close(got.clean_metric, s.clean_diff, **TOL)


def test_bidirectional_models_patch_every_position_a_site_reaches(bert):
    """In an encoder a patch at position p changes the positions before p too: no row may skip them."""
    clean, corrupted = "the cat sat on the mat", "the dog sat on the mat"
    differ = (bert.to_tokens(clean) != bert.to_tokens(corrupted))[0].nonzero()[:, 0].tolist()
    assert len(differ) == 1
    metric = logit_diff(100, 200)
    results = {fast: {kind: activation_patch(bert, clean, corrupted, kind=kind, by=by, metric=metric, fast=fast,
                                             progress=False)
                      for kind, by in (("resid_pre", "layer_pos"), ("v", "head_pos"), ("z", "head"))}
               for fast in (True, False)}
    for kind in results[True]:
        torch.testing.assert_close(results[True][kind].per_prompt, results[False][kind].per_prompt, **TOL)
    # The one differing token's input, patched in, is the whole difference between the runs.
    res = results[True]["resid_pre"]
    torch.testing.assert_close(res.per_prompt[0, 0, differ[0]], res.clean_metric[0], **TOL)


# ---------------------------------------------------------------------- errors
def test_prompts_of_different_lengths_raise(llama):
    a, b = "The cat sat on the mat", "The elephant sat quietly on the old mat"
    assert llama.to_tokens(a).shape != llama.to_tokens(b).shape
    with pytest.raises(PromptLengthError, match="differ in length"):
        activation_patch(llama, a, b, metric=logit_diff(1, 2), progress=False)
    with pytest.raises(PromptLengthError, match="same number of tokens"):
        activation_patch(llama, [a, b], [a, a], metric=logit_diff(1, 2), progress=False)
    assert issubclass(PromptLengthError, ValueError)


def test_unknown_kinds_and_grids_list_the_choices(llama_setup):
    s = llama_setup
    with pytest.raises(ValueError) as err:
        patch(s, "resid_middle", "layer_pos")
    assert all(k in str(err.value) for k in WHOLE + PER_HEAD)
    with pytest.raises(ValueError) as err:
        patch(s, "z", "head_position")
    assert all(g in str(err.value) for g in GRID_AXES)
    with pytest.raises(ValueError, match="head_pos or head"):
        patch(s, "z", "layer_pos")
    with pytest.raises(ValueError, match="pattern"):
        patch(s, "z", "dest_src")
    with pytest.raises(ValueError, match="denoise"):
        patch(s, "z", "head", direction="restore")
    with pytest.raises(ValueError, match="ablation"):
        activation_patch(s.model, s.clean, metric=s.metric(), progress=False)


@pytest.mark.parametrize("ablation", ["mean", "resample"])
@pytest.mark.parametrize("extra", [-2, 2])
def test_ablation_data_of_another_length_raises(llama_setup, ablation, extra):
    s = llama_setup
    data = torch.randint(100, 5000, (3, s.clean.shape[1] + extra), generator=torch.Generator().manual_seed(0))
    with pytest.raises(PromptLengthError, match="ablation data"):
        activation_patch(s.model, s.clean, kind="resid_pre", by="layer_pos", metric=s.metric(), ablation=ablation,
                         ablation_data=data, progress=False)


@pytest.mark.parametrize("position", [-8, 7])
def test_metric_positions_outside_the_prompt_raise(llama_setup, position):
    s = llama_setup
    assert s.clean.shape[1] == 7
    with pytest.raises(ValueError, match="outside"):
        patch(s, "resid_pre", "layer", metric=logit_diff(s.a, s.b, position=position))


@pytest.mark.parametrize("kind", ["resid_mid", "mlp_out"])
def test_attention_only_models_have_no_mlp_sites(attn_only, kind):
    tokens = torch.randint(50, (1, 5), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="attention-only"):
        activation_patch(attn_only, tokens, tokens.flip(-1), kind=kind, metric=logit_diff(1, 2), progress=False)


def test_normalized_metric_with_an_ablation_raises(llama_setup):
    s = llama_setup
    with pytest.raises(ValueError, match="normalized"):
        activation_patch(s.model, s.clean, kind="z", by="head", metric=s.metric(True), ablation="zero",
                         progress=False)


# ---------------------------------------------------------------------- hooks after an exception
def _attached(model):
    return [name for name, hp in model.hook_dict.items()
            if hp._hooks["fwd"] or hp._hooks["bwd"] or hp._forward_hooks or hp._forward_pre_hooks]


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("fail_at", ["metric", "base run", "source run", "patched run"])
def test_no_hook_survives_an_exception(llama_setup, fast, fail_at):
    s = llama_setup
    model = s.model
    before = model(s.clean)
    expected = patch(s, "pattern", "head", fast=fast)
    calls = {"n": 0}
    fail_on = {"metric": None, "base run": 1, "source run": 2, "patched run": 3}[fail_at]

    def counting(mod, args, out):
        calls["n"] += 1
        if calls["n"] == fail_on:
            raise Boom(fail_at)

    def bad_metric(logits):
        calls["n"] += 1
        if calls["n"] == 3:  # after both baselines: a row's metric
            raise Boom("metric")
        return logits[:, -1, 0]

    handle = None if fail_at == "metric" else model.blocks[1].register_forward_hook(counting)
    try:
        with pytest.raises(Boom):
            patch(s, "pattern", "head", fast=fast,
                  metric=custom(bad_metric) if fail_at == "metric" else s.metric())
    finally:
        if handle is not None:
            handle.remove()
    assert _attached(model) == []
    assert torch.equal(model(s.clean), before)
    assert torch.equal(patch(s, "pattern", "head", fast=fast).per_prompt, expected.per_prompt)


# ---------------------------------------------------------------------- the result object
@pytest.mark.parametrize("kind,by", [("resid_pre", "layer"), ("attn_out", "layer_pos"), ("z", "head_pos"),
                                     ("pattern", "dest_src")])
def test_patch_result_frame_save_and_plot(llama_setup, tmp_path, kind, by):
    s = llama_setup
    res = patch(s, kind, by, metric=s.metric(True))
    cells = res.per_prompt[0].numel()
    frame = res.to_frame()
    assert len(frame) == cells
    assert list(frame.columns) == list(GRID_AXES[by]) + ["mean", "std"]
    column = lambda c: torch.tensor(frame[c].values, dtype=torch.float32)  # noqa: E731
    torch.testing.assert_close(column("mean"), res.per_prompt.mean(0).flatten())
    torch.testing.assert_close(column("std"), res.per_prompt.std(0).flatten())
    assert frame.iloc[0]["layer"] == "L0"

    from matplotlib.figure import Figure

    fig = res.plot()
    assert isinstance(fig, Figure) and fig.axes[0].images  # a heatmap of the effect
    svg = res._repr_html_()
    assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>")

    html = res.save(tmp_path)
    saved = json.loads((tmp_path / f"patch_{kind}_{by}.json").read_text())
    assert html.exists() and html.suffix == ".html" and "<svg" in html.read_text()
    assert saved["kind"] == kind and saved["by"] == by and saved["axes"] == list(GRID_AXES[by])
    torch.testing.assert_close(torch.tensor(saved["mean"]), res.mean)
    torch.testing.assert_close(torch.tensor(saved["clean_metric"]), res.clean_metric)


# ---------------------------------------------------------------------- a real model
@pytest.mark.slow
def test_smollm2_ioi_matches_brute_force(smollm2, smollm2_hf):
    clean = "When Mary and John went to the store, John gave a drink to"
    corrupted = "When Mary and John went to the store, Mary gave a drink to"
    tokens = smollm2.to_tokens([clean, corrupted])
    assert smollm2.to_tokens(clean).shape == smollm2.to_tokens(corrupted).shape == tokens[:1].shape
    mary, john = smollm2.to_single_token(" Mary"), smollm2.to_single_token(" John")
    hf = HF(smollm2_hf)
    diff = hand_logit_diff([mary], [john])
    clean_t, corrupted_t = tokens[:1], tokens[1:]
    idx = torch.zeros(1, dtype=torch.long)
    lo, hi = diff(hf.run(corrupted_t), idx), diff(hf.run(clean_t), idx)
    assert hi - lo > 1  # the model does the task: the corruption moves the answer
    metric = logit_diff(mary, john, normalized=True)
    for kind, by, layers in (("resid_pre", "layer_pos", [0, 12, 29]), ("z", "head_pos", [9, 20])):
        acts = hf.record(clean_t, kind, layers)
        want = (brute_force(hf, corrupted_t, acts, kind, by, lambda lg, p: diff(lg, torch.zeros_like(p)), layers,
                            chunk=32) - lo) / (hi - lo)
        got = activation_patch(smollm2, clean, corrupted, kind=kind, by=by, layers=layers, metric=metric,
                               progress=False)
        torch.testing.assert_close(got.per_prompt, want, **TOL)
        torch.testing.assert_close(got.clean_metric, hi, **TOL)
