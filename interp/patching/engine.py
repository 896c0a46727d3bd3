"""The activation-patching engine.

    result = activation_patch(model, clean, corrupted, kind="z", by="head_pos",
                              metric=logit_diff(paris, rome, normalized=True))

A patch at layer L, position p leaves every layer below L and every position before p
exactly as in the unpatched ("base") run, because the model is causal. So each patched
site becomes a *row* that resumes the base run at layer L from position p on: its
residual stream there is read from the base run, the keys and values of positions < p
come from the base run's cache, and only layers >= L at positions >= p are computed.
Many rows (sites x prompts) run as one batch; the patch itself is an ordinary hook on
the site's hook point that overwrites each row's own site, so every site kind takes the
same code path as a normal forward. Logits are computed only at the positions the
metric reads.

Models without the resume entry point (anything with TransformerLens-style hooks)
run each row as a full forward instead; the values are the same.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch
from tqdm.auto import tqdm

from interp.devices import take
from interp.patching.metrics import Baselines, Metric, MetricContext, as_metric
from interp.patching.result import PatchResult
from interp.patching.runs import GaussianNoise, PromptLengthError, Run, ablation_source, as_tokens, check_pairs
from interp.patching.sites import (
    FEATURE_KINDS, KINDS, RowBatch, default_layers, enumerate_sites, feature_list, is_sae_kind, is_template,
)


class _RecordKV:
    """Collects every layer's keys and values during one forward (the model's KV-cache protocol)."""

    frozen = False
    attention_mask = None

    def __init__(self, n_layers: int) -> None:
        self.keys: list = [None] * n_layers
        self.values: list = [None] * n_layers
        self.length = 0

    def update(self, layer, k, v):
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def commit(self, n_new, mask):
        pass


class _PackedPrefixKV:
    """Keys and values for packed rows: the base run's cached positions of each distinct prompt
    in the chunk (the attention mask decides which a row sees), then the packed tokens' own."""

    frozen = True
    attention_mask = None

    def __init__(self, base: _RecordKV, prompts: torch.Tensor, n_pos: int) -> None:
        self.base, self.prompts = base, prompts
        self.length = len(prompts) * n_pos

    def update(self, layer, k, v):
        def prefix(cached):  # [n_prompts, kv, n_pos, dh] -> [1, kv, n_slots * n_pos, dh]
            picked = cached.index_select(0, self.prompts.to(cached.device))  # a split model: the layer's device
            return picked.transpose(0, 1).reshape(picked.shape[1], -1, picked.shape[-1])[None]

        return (torch.cat([prefix(self.base.keys[layer]), k], dim=2),
                torch.cat([prefix(self.base.values[layer]), v], dim=2))

    def commit(self, n_new, mask):
        pass


def _positions(metric: Metric, n_pos: int) -> list[int]:
    positions = range(n_pos) if metric.positions is None else metric.positions
    outside = [p for p in positions if not -n_pos <= p < n_pos]
    if outside:  # p % n_pos would silently read another position
        raise ValueError(f"the metric reads position(s) {outside}, outside prompts of {n_pos} tokens")
    return [p % n_pos for p in positions]


def _logits_at(model, tokens: torch.Tensor, hooks: list, positions: list[int], names=None, kv=None):
    """Run `tokens` with `hooks`; logits at `positions` [n, k, vocab] and a cache of `names`."""
    store: dict = {}
    cache_hooks = [(n, lambda t, hook, s=store: s.__setitem__(hook.name, t.detach())) for n in (names or [])]
    kwargs = {"past_kv": kv} if kv is not None else {}
    with model.hooks(fwd_hooks=list(hooks) + cache_hooks):
        return logits_at(model, tokens, positions, **kwargs), store


def logits_at(model, inputs, positions: list[int], **kwargs) -> torch.Tensor:
    """model(inputs, **kwargs) read at `positions`: [batch, k, vocab]. Models that support it compute the
    final norm and unembedding only there (on SmolLM2, 14 positions of it cost as much as ~7 layers)."""
    if getattr(model, "supports_resume", False):
        return model(inputs, logit_positions=torch.tensor(positions, device=inputs.device), **kwargs)
    return as_logits(model(inputs, **kwargs))[:, positions]


def as_logits(out) -> torch.Tensor:
    """The logits in a model's output: the tensor itself, a `.logits` field (transformers), or the first element."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot find logits in a {type(out).__name__}: the model should return a tensor, a tuple "
                    "starting with one, or an object with .logits")


class PatchingRuns:
    """Clean and corrupted runs (or a clean run and an ablation), prepared once per experiment."""

    def __init__(self, model, clean, corrupted=None, noise: GaussianNoise | None = None, prepend_bos=None) -> None:
        self.clean = Run(as_tokens(model, clean, "clean prompts", prepend_bos))
        self.prompts = [clean] if isinstance(clean, str) else clean
        if corrupted is not None and noise is not None:
            raise ValueError("give a corrupted prompt set or noise, not both")
        if corrupted is not None:
            self.corrupted = Run(as_tokens(model, corrupted, "corrupted prompts", prepend_bos))
            check_pairs(self.clean.tokens, self.corrupted.tokens, model)
        elif noise is not None:
            if isinstance(self.prompts, torch.Tensor):
                raise ValueError("noise corruption finds its positions in text: give the clean prompts as strings")
            self.corrupted = Run(self.clean.tokens, noise.sample(model, self.prompts, self.clean.tokens, prepend_bos))
        else:
            self.corrupted = None

    @property
    def n_pos(self) -> int:
        return self.clean.tokens.shape[1]

    def base_and_source(self, direction: str, ablation: str | None = None) -> tuple[Run, Run | None, str]:
        """The run that is patched, the run the patches come from (None: an ablation), and the label."""
        if ablation is None and self.corrupted is None:
            raise ValueError("give corrupted prompts, noise=GaussianNoise(...), or an ablation ('zero', 'mean', "
                             "'resample')")
        if ablation is not None:
            return self.clean, None, f"ablate:{ablation}"
        if direction == "denoise":
            return self.corrupted, self.clean, "denoise"
        if direction == "noise":
            return self.clean, self.corrupted, "noise"
        raise ValueError(f"direction must be 'denoise' or 'noise', got {direction!r}")


def activation_patch(model, clean, corrupted=None, *, kind: str = "resid_pre", by: str = "layer_pos", metric,
                     direction: str = "denoise", noise: GaussianNoise | None = None, ablation: str | None = None,
                     ablation_data=None, layers=None, batch_size: int = 512, progress: bool = True,
                     fast: bool | None = None, seed: int = 0, prepend_bos=None, runs: PatchingRuns | None = None,
                     saes=None, features=None) -> PatchResult:
    """Patch every site of one kind on a grid and measure `metric` per prompt.

    direction "denoise": clean activations into the corrupted run (how much does this
    site restore the clean behaviour?); "noise": corrupted activations into the clean run
    (how much does it break it?). With `ablation` ("zero", "mean", "resample") the clean
    run's site is replaced instead, and no corrupted run is needed.

    Dictionary sites (kind="sae_acts_post", by="feature_pos" | "feature"; interp.patching.sites): `saes`
    are spliced for the sweep with the error term (None: those spliced now); `features` a subset of latents.
    A row whose latent is equal in both runs changes nothing and is not run (its value is the base run's).
    """
    if is_sae_kind(kind):
        from interp.sae.splice import spliced_for

        with spliced_for(model, saes) as entries:
            return _activation_patch(model, clean, corrupted, kind, by, metric, direction, noise, ablation,
                                     ablation_data, layers, batch_size, progress, fast, seed, prepend_bos, runs,
                                     entries, features)
    if saes is not None:
        raise ValueError(f"saes= belongs to dictionary sites (kind='sae_acts_post', ...), not {kind!r}")
    return _activation_patch(model, clean, corrupted, kind, by, metric, direction, noise, ablation, ablation_data,
                             layers, batch_size, progress, fast, seed, prepend_bos, runs, None, features)


def _activation_patch(model, clean, corrupted, kind, by, metric, direction, noise, ablation, ablation_data, layers,
                      batch_size, progress, fast, seed, prepend_bos, runs, saes, features) -> PatchResult:
    start = time.perf_counter()
    metric = as_metric(metric)
    runs = runs or PatchingRuns(model, clean, corrupted, noise, prepend_bos)
    n_pos = runs.n_pos
    positions = _positions(metric, n_pos)
    sites, shape, axes = enumerate_sites(model, kind, by, n_pos, layers, saes, features)
    site_layers = sorted({s.layer for s in sites})
    hook_names = list(dict.fromkeys(s.hook_name for s in sites))
    fast = getattr(model, "supports_resume", False) if fast is None else fast
    fast = fast and min(site_layers) >= 0  # a dictionary outside the blocks: nothing to resume from

    # The two unpatched runs: baselines for the metric, the base run's residual stream and
    # keys/values (where rows resume), and the source activations patched in.
    base, source_run, label = runs.base_and_source(direction, ablation)
    resid_names = [f"blocks.{layer}.hook_resid_pre" for layer in site_layers] if fast else []
    kv = _RecordKV(model.cfg.n_layers) if fast else None
    with torch.no_grad():
        base_logits, base_cache = _logits_at(model, base.tokens, base.hooks, positions, resid_names + hook_names, kv)
        if source_run is not None:
            source_logits, source_cache = _logits_at(model, source_run.tokens, source_run.hooks, positions, hook_names)
        else:
            data = None if ablation_data is None else as_tokens(model, ablation_data, "ablation data", prepend_bos)
            if data is not None and data.shape[1] != n_pos:
                # A shorter prompt has no activation to give at the last positions; a longer
                # one would be silently cut off.
                raise PromptLengthError(f"ablation data has {data.shape[1]} tokens per prompt, the prompts {n_pos}: "
                                        "mean and resample ablations replace activations position by position")
            data_cache = _logits_at(model, data, [], positions, hook_names)[1] if data is not None else {}
            source_cache = {n: ablation_source(kind, base_cache[n], ablation, data_cache.get(n), seed) for n in hook_names}
            source_logits = base_logits
    clean_logits = base_logits if base is runs.clean else source_logits
    corrupt_logits = source_logits if base is runs.clean else base_logits
    ctx = MetricContext(clean_logits, corrupt_logits)
    prompts_idx = torch.arange(base.tokens.shape[0], device=base.tokens.device)
    baselines = Baselines(metric(clean_logits, prompts_idx, ctx).float().cpu(),
                          metric(corrupt_logits, prompts_idx, ctx).float().cpu(), ctx)
    if metric.normalized and ablation is not None:
        raise ValueError("a normalized metric needs a corrupted run to define 0; use the raw metric with ablations")

    # Rows: every site for every prompt, grouped by the layer they resume at.
    n_prompts = base.tokens.shape[0]
    values = torch.zeros(n_prompts, len(sites))
    # A latent equal in both runs (most are zero in both) patches nothing: the row would be the base run.
    needed = _changed(sites, base_cache, source_cache) if kind in FEATURE_KINDS else None
    if needed is not None:
        values[:] = metric(base_logits, prompts_idx, ctx).float().cpu()[:, None]
    groups: dict[int, list] = defaultdict(list)
    for si, site in enumerate(sites):
        for b in range(n_prompts):
            if needed is not None and not needed[si, b]:
                continue
            # Under bidirectional attention a patch reaches earlier positions too: rows start at 0.
            offset = site.first_affected if fast and model.cfg.causal else 0
            groups[site.layer if fast else 0].append((si, b, offset))
    chunks = []
    for layer, rows in groups.items():
        rows.sort(key=lambda r: -r[2])  # similar offsets -> similar lengths in a chunk
        chunks += [(layer, rows[i: i + batch_size]) for i in range(0, len(rows), batch_size)]
    bar = tqdm(chunks, disable=not progress, desc=f"patching {kind} by {by}", mininterval=1.0)
    with torch.no_grad():
        for layer, rows in bar:
            out = _run_rows(model, rows, sites, layer, base, base_cache, kv, source_cache, kind, positions, fast,
                            base_logits)
            idx = torch.tensor([r[0] for r in rows])
            prm = torch.tensor([r[1] for r in rows])
            values[prm, idx] = metric(out, prm.to(out.device), ctx).float().cpu()
    per_prompt = values.view(n_prompts, *shape)
    if metric.normalized:
        per_prompt = baselines.normalize(per_prompt)
    labels = _labels(model, axes, shape, layers, base.tokens, kind, saes, features)
    extra = {"rows": len(sites) * n_prompts, "resumed": fast}
    if saes is not None:
        extra.update(saes=[e.prefix for e in saes], rows_run=sum(len(r) for r in groups.values()))
    return PatchResult(kind, by, axes, labels, per_prompt, metric.name, label, baselines.clean, baselines.corrupted,
                       metric.normalized, forwards=len(chunks) + 2, seconds=time.perf_counter() - start, extra=extra)


def _changed(sites, base_cache, source_cache) -> torch.Tensor:
    """[n_sites, n_prompts] bool: does the source differ from the base run at the site's latent (at any position,
    for a site over all positions)?"""
    by_hook: dict[str, list[int]] = defaultdict(list)
    for i, site in enumerate(sites):
        by_hook[site.hook_name].append(i)
    out = torch.zeros(len(sites), next(iter(base_cache.values())).shape[0], dtype=torch.bool)
    for name, idx in by_hook.items():
        differs = (source_cache[name].to(base_cache[name]) != base_cache[name]).cpu()  # [n_prompts, pos, d_sae]
        feats = torch.tensor([sites[i].head for i in idx])
        if sites[idx[0]].pos is None:
            out[idx] = differs[:, :, feats].any(1).T
        else:
            out[idx] = differs[:, torch.tensor([sites[i].pos for i in idx]), feats].T
    return out


def _run_rows(model, rows, sites, layer, base, base_cache, kv, source_cache, kind, positions, fast, base_logits):
    """Run one chunk of rows with their patches; logits at the metric positions [R, k, vocab]."""
    device = base.tokens.device
    n_pos = base.tokens.shape[1]
    prompt = torch.tensor([r[1] for r in rows], device=device)
    offset = torch.tensor([r[2] for r in rows], device=device)
    chunk_sites = [sites[r[0]] for r in rows]
    pos = torch.tensor(positions, device=device)
    rel = pos[None] - offset[:, None]  # [R, k] metric positions relative to each row
    if fast:
        batch, inputs = _packed(model, prompt, offset, chunk_sites, n_pos, layer, base_cache, kv)
        flat = (batch.start[:, None] + rel.clamp(min=0)).reshape(1, -1)
        patcher = _patcher(batch, source_cache, kind)
        with model.hooks(fwd_hooks=[(n, patcher) for n in dict.fromkeys(s.hook_name for s in chunk_sites)]):
            logits = model(inputs.pop("x"), start_at_layer=layer, logit_positions=flat, **inputs)
        logits = logits.view(len(rows), len(positions), -1)
        # A metric position before the row's offset is untouched: read it from the base run.
        before = rel < 0
        if before.any():
            logits = torch.where(before[..., None].to(logits.device), take(base_logits, prompt), logits)
        return logits
    batch = RowBatch(prompt, offset, n_pos - offset, chunk_sites, n_pos)
    hooks = base.hooks_for(prompt) + [(n, _patcher(batch, source_cache, kind)) for n in {s.hook_name for s in chunk_sites}]
    with model.hooks(fwd_hooks=hooks):
        logits = as_logits(model(base.tokens[prompt]))
    return logits[:, positions]


def _packed(model, prompt, offset, chunk_sites, n_pos, layer, base_cache, kv):
    """Lay the rows end to end: inputs for `model(x, start_at_layer=layer, ...)` and their RowBatch."""
    device = prompt.device
    slots_prompts, slot = torch.unique(prompt, sorted=True, return_inverse=True)
    length = n_pos - offset
    start = torch.cumsum(length, 0) - length
    tok_row = torch.repeat_interleave(torch.arange(len(prompt), device=device), length)  # [N]
    tok_pos = offset[tok_row] + torch.arange(int(length.sum()), device=device) - start[tok_row]
    resid = base_cache[f"blocks.{layer}.hook_resid_pre"]  # [n_prompts, n_pos, d_model]
    x = take(resid, prompt[tok_row], tok_pos)[None]  # [1, N, d_model]
    # Prefix keys: slot u, position j -- a token sees its own prompt's cached positions before its row's offset.
    key_slot = torch.arange(len(slots_prompts), device=device).repeat_interleave(n_pos)
    key_pos = torch.arange(n_pos, device=device).repeat(len(slots_prompts))
    prefix = (slot[tok_row][:, None] == key_slot[None]) & (key_pos[None] < offset[tok_row][:, None])
    # Packed keys: the same row, at or before the query (any position, for bidirectional models).
    own = tok_row[:, None] == tok_row[None]
    if model.cfg.causal:
        own = own & (tok_pos[None] <= tok_pos[:, None])
    allowed = torch.cat([prefix, own], dim=1)[None, None]  # [1, 1, N, n_slots * n_pos + N]
    batch = RowBatch(prompt, offset, length, chunk_sites, n_pos, packed=True, start=start, slot=slot,
                     n_slots=len(slots_prompts))
    inputs = {"x": x, "positions": tok_pos[None], "attention_allowed": allowed,
              "past_kv": _PackedPrefixKV(kv, slots_prompts, n_pos)}
    if _has_windows(model):  # sliding windows count positions: give every key's position
        inputs["key_positions"] = torch.cat([key_pos, tok_pos])[None]
    return batch, inputs


def _has_windows(model) -> bool:
    cfg = model.cfg
    return bool(getattr(cfg, "sliding_window", None)) and any(cfg.window(l) for l in range(cfg.n_layers))


def _patcher(batch: RowBatch, source_cache, kind):
    """A hook patching each row's own site (rows of one chunk may sit at different hooks)."""
    from interp.patching.sites import apply_patches

    def patch(tensor, hook):
        own = [i for i, s in enumerate(batch.sites) if s.hook_name == hook.name]
        if not own:
            return tensor
        rows = batch if len(own) == len(batch.sites) else batch.subset(own)
        if not batch.packed and len(own) != len(batch.sites):
            idx = torch.tensor(own, device=tensor.device)
            out = tensor.clone()
            sub = RowBatch(rows.prompt, rows.offset, rows.length, rows.sites, rows.n_pos)
            out[idx] = apply_patches(tensor[idx], sub, source_cache[hook.name], kind)
            return out
        return apply_patches(tensor, rows, source_cache[hook.name], kind)

    return patch


def _labels(model, axes, shape, layers, tokens, kind, saes=None, features=None) -> dict[str, list[str]]:
    pos_labels = [f"{i}" for i in range(tokens.shape[1])]
    if getattr(model, "tokenizer", None) is not None:
        pos_labels = [f"{i} {t}" for i, t in enumerate(model.to_str_tokens(tokens[0]))]
    if saes is not None:  # dictionary sites: [sae, feature, pos] and the like
        feats = feature_list(saes, features) if kind in FEATURE_KINDS else []
        named = {"sae": [e.prefix for e in saes], "feature": [f"F{f}" for f in feats], "pos": pos_labels}
        return {axis: named[axis][:n] for axis, n in zip(axes, shape)}
    layers = default_layers(model, kind) if layers is None else list(layers)
    head = "E" if not is_template(kind) and KINDS.get(kind, (None, None))[1] == "experts" else "H"
    out = {}
    for axis, n in zip(axes, shape):
        if axis == "layer":
            out[axis] = [f"L{l}" for l in layers]
        elif axis == "head":
            out[axis] = [f"{head}{h}" for h in range(n)]
        else:
            out[axis] = pos_labels[:n]
    return out
