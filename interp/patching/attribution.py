"""Attribution patching: every site's patching effect from 2 forwards and 1 backward.

Patching site a from the base run's value a_base to the source's a_src changes the metric
by about (a_src - a_base) . dm/da, the gradient taken once on the base run (Nanda 2023;
Syed et al. 2023). The approximation is poor where the metric is far from linear in the
site, above all through the attention softmax: a query or key patch can move a pattern
from one token to another. AtP* (Kramar et al. 2024) fixes that part: for q and k sites
the new attention pattern is recomputed exactly from the patched queries/keys and only
the step from the pattern to the metric is linearised, (A_new - A_base) . dm/dA.

The result has the same grid and meaning as `activation_patch` (the estimated patched
metric, normalised the same way), so `compare(exact, approx)` can line them up cell by cell.
"""

from __future__ import annotations

import math
import time

import torch

from interp.patching.engine import PatchingRuns, _labels, _logits_at, _positions, logits_at
from interp.patching.metrics import Baselines, MetricContext, as_metric
from interp.patching.result import PatchResult
from interp.patching.runs import GaussianNoise, ablation_source, as_tokens
from interp.patching.scores import qk_hook_names, score_and_mask
from interp.patching.sites import FEATURE_KINDS, default_layers, enumerate_sites, feature_list, hook_name, is_sae_kind

MERGE_TOKENS = 256  # base prompts x positions up to which the source run shares the graph's forward


def attribution_patch(model, clean, corrupted=None, *, kind: str = "resid_pre", by: str = "layer_pos", metric,
                      direction: str = "denoise", noise: GaussianNoise | None = None, ablation: str | None = None,
                      ablation_data=None, layers=None, qk_fix: bool = True, seed: int = 0, prepend_bos=None,
                      runs: PatchingRuns | None = None, saes=None, features=None) -> PatchResult:
    """Estimate `activation_patch(...)` with the same arguments for every site at once.

    qk_fix: AtP*'s exact softmax for q and k sites (False: the plain linear estimate).
    Dictionary sites (kind="sae_acts_post", by="feature_pos"): every latent of `saes` at once, the gradient
    taken through the model spliced with the error term (so it is the model's own).
    """
    return attribution_sweeps(model, clean, corrupted, sweeps=[(kind, by)], metric=metric, direction=direction,
                              noise=noise, ablation=ablation, ablation_data=ablation_data, layers=layers,
                              qk_fix=qk_fix, seed=seed, prepend_bos=prepend_bos, runs=runs, saes=saes,
                              features=features)[(kind, by)]


def attribution_sweeps(model, clean, corrupted=None, *, sweeps, metric, direction: str = "denoise",
                       noise: GaussianNoise | None = None, ablation: str | None = None, ablation_data=None,
                       layers=None, qk_fix: bool = True, seed: int = 0, prepend_bos=None,
                       runs: PatchingRuns | None = None, saes=None, features=None) -> dict[tuple[str, str], PatchResult]:
    """Several sweeps [(kind, by), ...] from the same 2 forwards and 1 backward: {(kind, by): PatchResult}."""
    args = (model, clean, corrupted, sweeps, metric, direction, noise, ablation, ablation_data, layers, qk_fix,
            seed, prepend_bos, runs)
    if any(is_sae_kind(k) for k, _ in sweeps):
        from interp.sae.splice import spliced_for

        with spliced_for(model, saes) as entries:
            return _attribution_sweeps(*args, entries, features)
    if saes is not None:
        raise ValueError("saes= belongs to dictionary sites (kind='sae_acts_post', ...), and no sweep has one")
    return _attribution_sweeps(*args, None, features)


def _attribution_sweeps(model, clean, corrupted, sweeps, metric, direction, noise, ablation, ablation_data, layers,
                        qk_fix, seed, prepend_bos, runs, saes, features) -> dict[tuple[str, str], PatchResult]:
    start = time.perf_counter()
    metric = as_metric(metric)
    runs = runs or PatchingRuns(model, clean, corrupted, noise, prepend_bos)
    n_pos = runs.n_pos
    positions = _positions(metric, n_pos)
    grids, kind_hooks = {}, {}  # kind_hooks: kind -> [(layer, hook name)] along the grid's first axis
    for kind, by in sweeps:
        sae_kind = is_sae_kind(kind)
        sites, shape, axes = enumerate_sites(model, kind, by, n_pos, None if sae_kind else layers,
                                             saes if sae_kind else None, features if sae_kind else None)
        grids[(kind, by)] = (shape, axes)
        if sae_kind:
            kind_hooks[kind] = list(dict.fromkeys((s.layer, s.hook_name) for s in sites))
        else:
            kind_hooks[kind] = [(layer, hook_name(kind, layer))
                                for layer in (default_layers(model, kind) if layers is None else list(layers))]
    layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    kinds = sorted({k for k, _ in sweeps})
    names = list(dict.fromkeys(name for kind in kinds for _, name in kind_hooks[kind]))
    fix = qk_fix and any(k in ("q", "k") for k in kinds)
    rq, rk = qk_hook_names(model.cfg)
    qk_names = [f"blocks.{layer}.{n}" for layer in layers for n in (rq, rk)] if fix else []
    pattern_names = [f"blocks.{layer}.attn.hook_pattern" for layer in layers] if fix else []
    qk_names = [n for n in qk_names if n not in names]
    pattern_names = [n for n in pattern_names if n not in names]

    if "hook_embed" not in model.hook_dict:
        raise ValueError(f"attribution patching starts its graph at the token embedding, and "
                         f"{type(model).__name__} has none named hook_embed (an attached model gets it from "
                         "get_input_embeddings() or its first nn.Embedding); use activation_patch instead")
    base, source_run, label = runs.base_and_source(direction, ablation)
    if ablation is not None and metric.normalized:
        raise ValueError("a normalized metric needs a corrupted run to define 0; use the raw metric with ablations")

    acts, grads, live = {}, {}, {}
    n = base.tokens.shape[0]
    # Small batches are weight-bandwidth bound on CPU (SmolLM2: batch 2 at 14 tokens costs 1.09x
    # batch 1), so the source rows ride along in the graph's forward (benchmarks/attribution_merge.py).
    # Larger ones are compute bound, where the source rows' share of the backward costs more.
    merged = source_run is not None and base.tokens.numel() <= MERGE_TOKENS
    if not merged:  # Forward 1 (no graph): the source activations.
        with torch.no_grad():
            if source_run is not None:
                source_logits, source = _logits_at(model, source_run.tokens, source_run.hooks, positions,
                                                   names + qk_names)
            else:
                data = None if ablation_data is None else as_tokens(model, ablation_data, "ablation data", prepend_bos)
                source_logits, source = None, _logits_at(model, data, [], positions, names)[1] if data is not None else {}

    # Forward 2 with a graph (base rows, then source rows if merged), and the one backward.
    tokens = torch.cat([base.tokens, source_run.tokens]) if merged else base.tokens
    noise = _stacked_noise([base, source_run] if merged else [base])

    def leaf(tensor, hook):  # the graph starts at the embeddings, whatever the parameters' requires_grad
        if noise is not None:
            tensor = tensor + noise.to(tensor.device, tensor.dtype)
        return tensor.detach().requires_grad_(True)

    def keep(tensor, hook):
        acts[hook.name] = tensor.detach()
        if tensor.requires_grad:
            live[hook.name] = tensor
        return tensor

    hooks = [("hook_embed", leaf)] + [(name, keep) for name in names + qk_names + pattern_names]
    with model.hooks(fwd_hooks=hooks), torch.enable_grad():
        logits = logits_at(model, tokens, positions)
        if merged:
            source_logits, logits = logits[n:].detach(), logits[:n]
            source = {name: a[n:] for name, a in acts.items() if name in names or name in qk_names}
            acts = {name: a[:n] for name, a in acts.items()}
        prompt_idx = torch.arange(n, device=logits.device)
        if source_run is None:
            source = {name: ablation_source(name, acts[name], ablation, source.get(name), seed) for name in names}
            source_logits = logits.detach()
        clean_logits = logits.detach() if base is runs.clean else source_logits
        corrupt_logits = source_logits if base is runs.clean else logits.detach()
        ctx = MetricContext(clean_logits, corrupt_logits)
        base_metric = metric(logits, prompt_idx, ctx)
        # Prompts are independent: one backward gives every prompt's gradient. autograd.grad to the sites
        # alone: no weight gradient is computed, and no parameter's .grad of the user's model is touched.
        wanted = list(live) if base_metric.requires_grad else []
        for name, g in zip(wanted, torch.autograd.grad(base_metric.sum(), [live[k] for k in wanted],
                                                        allow_unused=True) if wanted else []):
            if g is not None:
                grads[name] = g.detach()[:n]
        live.clear()
    base_metric = base_metric.detach().float().cpu()
    baselines = Baselines(metric(clean_logits, prompt_idx, ctx).float().cpu(),
                          metric(corrupt_logits, prompt_idx, ctx).float().cpu(), ctx)
    seconds = time.perf_counter() - start

    results = {}
    for kind, by in sweeps:
        t0 = time.perf_counter()
        deltas = []
        use_fix = qk_fix and kind in ("q", "k")
        feats = feature_list(saes, features) if kind in FEATURE_KINDS else None
        for layer, name in kind_hooks[kind]:
            if name not in grads:  # the metric does not depend on this site (e.g. after the read position)
                grads[name] = torch.zeros_like(acts[name])
            if use_fix:
                deltas.append(_qk_delta(model, kind, by, layer, acts, source, grads, rq, rk))
            else:
                deltas.append(_linear_delta(kind, by, acts[name], source[name].to(acts[name]), grads[name], feats))
        delta = torch.stack([d.float().cpu() for d in deltas], dim=1)  # [n_prompts, layer, ...grid]
        per_prompt = base_metric.view(-1, *([1] * (delta.dim() - 1))) + delta
        if metric.normalized:
            per_prompt = baselines.normalize(per_prompt)
        shape, axes = grids[(kind, by)]
        sae_kind = is_sae_kind(kind)
        labels = _labels(model, axes, shape, [layer for layer, _ in kind_hooks[kind]], base.tokens, kind,
                         saes if sae_kind else None, features if sae_kind else None)
        results[(kind, by)] = PatchResult(
            kind, by, axes, labels, per_prompt, metric.name, label, baselines.clean, baselines.corrupted,
            metric.normalized, forwards=2, seconds=seconds + time.perf_counter() - t0,
            extra={"method": "attribution (AtP*)" if use_fix else "attribution", "backwards": 1,
                   "shared_pass_s": round(seconds, 4)})
    return results


def _stacked_noise(run_list) -> torch.Tensor | None:
    """The runs' embedding noise stacked in batch order (zeros for a run without), or None if none has any."""
    noises = [run.embed_noise for run in run_list]
    if all(x is None for x in noises):
        return None
    ref = next(x for x in noises if x is not None)
    return torch.cat([x if x is not None else torch.zeros_like(ref) for x in noises])


def _linear_delta(kind, by, base, src, grad, features=None) -> torch.Tensor:
    """(src - base) . grad summed to the grid's cell, per prompt (one layer, or one dictionary)."""
    prod = (src - base) * grad
    if features is not None:  # latents [n, pos, d_sae] -> [n, feature, pos]
        per_feature = prod[..., features].transpose(1, 2)
        return per_feature if by == "feature_pos" else per_feature.sum(-1)
    if by in ("sae_pos", "sae"):  # a dictionary's whole vector [n, pos, d]
        per_pos = prod.sum(-1)
        return per_pos if by == "sae_pos" else per_pos.sum(-1)
    if kind == "pattern":  # [n, head, dest, src]
        return {"dest_src": prod, "head_pos": prod.sum(-1), "head": prod.sum((-1, -2))}[by]
    if by in ("layer_pos", "layer"):  # [n, pos, d_model]
        per_pos = prod.sum(-1)
        return per_pos if by == "layer_pos" else per_pos.sum(-1)
    per_pos_head = prod.sum(-1).transpose(1, 2)  # [n, pos, head, d] -> [n, head, pos]
    return per_pos_head if by == "head_pos" else per_pos_head.sum(-1)


def _qk_delta(model, kind, by, layer, acts, source, grads, rq, rk) -> torch.Tensor:
    """AtP*: the exact new pattern from patched queries (or keys), linearised from the pattern on."""
    cfg = model.cfg
    q_name, k_name = f"blocks.{layer}.{rq}", f"blocks.{layer}.{rk}"
    pattern, g = acts[f"blocks.{layer}.attn.hook_pattern"].double(), grads.get(f"blocks.{layer}.attn.hook_pattern")
    if g is None:
        g = torch.zeros_like(pattern)
    g = g.double()
    n_rep = cfg.n_heads // cfg.n_kv_heads
    # [n, pos, heads, d] -> [n, heads, pos, d], keys repeated to every query head of their group
    q_base, q_src = (t.double().transpose(1, 2) for t in (acts[q_name], source[q_name]))
    k_base, k_src = (t.double().transpose(1, 2).repeat_interleave(n_rep, 1) for t in (acts[k_name], source[k_name]))
    n_pos = pattern.shape[-1]
    score, causal = score_and_mask(model, layer, n_pos, pattern.device)  # causal: with any sliding window
    base_pg = (pattern * g).sum(-1)  # [n, h, q]
    if kind == "q" or by == "head":
        # Each query row (q sites) -- or every key at once (k patched at all positions) -- gives a new softmax.
        q_new, k_new = (q_src, k_base) if kind == "q" else (q_base, k_src)
        scores = score(q_new @ k_new.transpose(-1, -2)).masked_fill(~causal, -math.inf)
        per_row = (scores.softmax(-1) * g).sum(-1) - base_pg  # [n, h, q]
        if kind == "q":
            return (per_row if by == "head_pos" else per_row.sum(-1)).float()
        return _group(per_row.sum(-1), n_rep).float()  # k by head: [n, kv_heads]
    # k by head_pos: only column j of row q changes, by ds = score(q . k_src_j) - score(q . k_base_j). In log space
    # (attention is often peaked, and exp(ds) overflows): the new weight on j is w = sigmoid(x) with
    # x = log a_j + ds - log(1 - a_j), and every other weight is scaled by r = (1 - w) / (1 - a_j).
    unmasked = score(q_base @ k_base.transpose(-1, -2))
    scores = unmasked.masked_fill(~causal, -math.inf)
    log_a = scores.log_softmax(-1)  # [n, h, q, j]
    a = log_a.exp()
    # The difference of the scores themselves (exact also through a soft-cap, which is not linear).
    ds = (score(q_base @ k_src.transpose(-1, -2)) - unmasked).masked_fill(~causal, 0.0)  # [n, h, q, j]
    # log(1 - a_j) and sum_{k != j} a_k g_k, accurately also for a peaked row's top key (a_j ~ 1, where
    # 1 - a_j and base_pg - a_j g_j cancel): for that key they are summed over the other keys directly.
    top = torch.nn.functional.one_hot(log_a.argmax(-1), log_a.shape[-1]).bool()  # [n, h, q, j]
    rest_of_top = torch.logsumexp(log_a.masked_fill(top, -math.inf), -1, keepdim=True)  # [n, h, q, 1]
    log_rest = torch.where(top, rest_of_top, torch.log1p(-a.clamp(max=0.5)))
    log_rest = log_rest.clamp(min=-700.0)  # a row with a single key: nothing else to rescale
    others = torch.where(top, (a * g).masked_fill(top, 0.0).sum(-1, keepdim=True), base_pg[..., None] - a * g)
    x = log_a + ds - log_rest
    w = torch.sigmoid(x)
    r = torch.exp((torch.nn.functional.logsigmoid(-x) - log_rest).clamp(max=700.0))
    new_pg = others * r + w * g
    change = (new_pg - base_pg[..., None]).masked_fill(~causal, 0.0).sum(-2)  # over query rows: [n, h, j]
    return _group(change, n_rep).float()  # [n, kv_heads, pos]


def _group(per_head: torch.Tensor, n_rep: int) -> torch.Tensor:
    """Sum query heads into their KV head: [n, heads, ...] -> [n, kv_heads, ...]."""
    return per_head.unflatten(1, (-1, n_rep)).sum(2)


def effects(result: PatchResult) -> torch.Tensor:
    """Each cell's change from the unpatched base run, per prompt [n_prompts, *grid]."""
    if result.normalized:
        base = torch.full_like(result.clean_metric, 0.0 if result.direction == "denoise" else 1.0)
    else:
        base = result.corrupted_metric if result.direction == "denoise" else result.clean_metric
    return result.per_prompt - base.view(-1, *([1] * (result.per_prompt.dim() - 1)))


def compare(exact: PatchResult, approx: PatchResult, k: int = 10) -> dict:
    """Agreement of two sweeps of the same grid (e.g. attribution vs exact) on the mean effect per cell.

    pearson / spearman correlation over cells, and top-k agreement: the share of the k
    cells with the largest |effect| in `exact` that are also among the k largest in `approx`.
    """
    if exact.shape != approx.shape:
        raise ValueError(f"the sweeps have different grids: {exact.shape} vs {approx.shape}")
    a, b = effects(exact).mean(0).flatten().double(), effects(approx).mean(0).flatten().double()
    k = min(k, a.numel())

    def pearson(x, y):
        x, y = x - x.mean(), y - y.mean()
        return float((x @ y) / (x.norm() * y.norm()).clamp(min=1e-30))

    def ranks(x):
        return torch.empty_like(x).scatter_(0, x.argsort(), torch.arange(len(x), dtype=x.dtype))

    top_a, top_b = set(a.abs().topk(k).indices.tolist()), set(b.abs().topk(k).indices.tolist())
    return {"pearson": pearson(a, b), "spearman": pearson(ranks(a), ranks(b)), "top_k": len(top_a & top_b) / k,
            "k": k, "max_abs_diff": float((a - b).abs().max()), "cells": a.numel()}
