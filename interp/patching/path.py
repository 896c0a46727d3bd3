"""Path patching (Wang et al. 2022; Goldowsky-Dill et al. 2023): the effect of a set of
sender heads on the model's output *through* a set of receivers only.

Step 1, the sender run: the base run with the senders' outputs (`hook_z`) taken from the
source run and every other head frozen at its base value, so the change reaches the
receivers only along direct paths (and through MLPs, which recompute, unless
`freeze_mlps`). The receivers' inputs are recorded there.
Step 2, the receiver run: the base run with only the receivers' inputs replaced by the
recorded ones; everything downstream recomputes. The metric is read from it.

Receivers are heads with the inputs they read ("q", "k", "v", any combination), or
"resid", the final residual stream (then step 1's logits are the answer). A receiver
head's k and v inputs are patched for that query head alone, also under grouped-query
attention where the key/value projection is shared by the group: its z is recomputed
from its own query, keys and values.

Direction as in `activation_patch`: "noise" (the paper's setting) patches the corrupted
run's sender outputs into the clean run; "denoise" the clean outputs into the corrupted run.
"""

from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm

from interp.devices import take
from interp.patching.engine import PatchingRuns, _labels, _logits_at, _positions, logits_at
from interp.patching.metrics import Baselines, MetricContext, as_metric
from interp.patching.module_path import is_module_spec, module_path_patch
from interp.patching.result import PatchResult
from interp.patching.runs import GaussianNoise
from interp.patching.scores import qk_hook_names, score_and_mask
from interp.patching.sites import feature_list

Head = tuple[int, int]


def _receivers(model, receivers, receiver_inputs: str) -> list[tuple[int, int, str]] | str:
    if isinstance(receivers, str):
        if receivers != "resid":
            raise ValueError(f"receivers are a list of (layer, head) or 'resid', got {receivers!r}")
        return "resid"
    inputs = set(receiver_inputs)
    if not inputs or not inputs <= set("qkv"):
        raise ValueError(f"receiver_inputs is a combination of 'q', 'k', 'v', got {receiver_inputs!r}")
    out = []
    for r in receivers:
        layer, head = r[0], r[1]
        which = r[2] if len(r) > 2 else receiver_inputs
        _check_head(model, (layer, head), "receiver")
        out.append((int(layer), int(head), "".join(sorted(set(which)))))
    if not out:
        raise ValueError("no receivers given")
    return out


def _check_head(model, head, what: str) -> None:
    layer, h = head
    if not (0 <= layer < model.cfg.n_layers and 0 <= h < model.cfg.n_heads):
        raise ValueError(f"{what} head {tuple(head)} is outside the model ({model.cfg.n_layers} layers x "
                         f"{model.cfg.n_heads} heads)")


def path_patch(model, clean, corrupted=None, *, senders="each", receivers="resid", receiver_inputs: str = "q",
               metric, direction: str = "noise", noise: GaussianNoise | None = None, sender_positions=None,
               freeze_mlps: bool = False, batch_size: int = 64, progress: bool = True, prepend_bos=None,
               runs: PatchingRuns | None = None, freeze=None, saes=None, features=None) -> PatchResult:
    """Path-patch senders -> receivers.

    senders: a list of (layer, head) patched together (the result's grid is empty: one
    value per prompt), or "each": every head below the lowest receiver layer on its own,
    giving a [layer, head] map. receivers: "resid" or [(layer, head), ...] (optionally
    (layer, head, "qk") to choose inputs per receiver); receiver_inputs: the default inputs.
    sender_positions: positions whose sender outputs are patched (default all).

    Features of spliced dictionaries as senders: "features", every latent of `saes` (or the
    `features` subset) on its own, a [sae, feature] map; or (hook, feature) pairs in the list,
    e.g. ("blocks.0.hook_resid_post.hook_sae_acts_post", 12), patched together (with heads, if
    any). `saes` are spliced with the error term for the call (None: those spliced now). Every
    head stays frozen, so a feature reaches the receivers along the residual stream (and MLPs).

    Senders given as hook names or a template ("model.layers.{layer}.mlp") select the
    module-level form, which runs on any hookable model (attached ones too): receivers and
    `freeze` are then hook names as well (`interp.patching.module_path`).
    """
    if senders == "features" or (isinstance(senders, (list, tuple)) and any(map(_is_feature, senders))):
        from interp.sae.splice import spliced_for

        with spliced_for(model, saes) as entries:
            return _path_patch(model, clean, corrupted, senders, receivers, receiver_inputs, metric, direction, noise,
                               sender_positions, freeze_mlps, batch_size, progress, prepend_bos, runs, freeze,
                               entries, features)
    if saes is not None or features is not None:
        raise ValueError("saes= and features= choose feature senders: senders='features' or (hook, feature) pairs")
    return _path_patch(model, clean, corrupted, senders, receivers, receiver_inputs, metric, direction, noise,
                       sender_positions, freeze_mlps, batch_size, progress, prepend_bos, runs, freeze, None, None)


def _is_feature(sender) -> bool:
    """A (hook name, feature) pair, as opposed to a (layer, head) pair."""
    return isinstance(sender, (list, tuple)) and len(sender) == 2 and isinstance(sender[0], str)


def _feature_senders(model, senders, entries, features):
    """Feature sender sets, grid and labels; the layer each dictionary reads in, by its latents' hook name."""
    layer_of = {e.hook("acts_post"): e for e in entries}
    if senders == "features":
        feats = feature_list(entries, features)
        sets = [[(e.hook("acts_post"), f)] for e in entries for f in feats]
        labels = {"sae": [e.prefix for e in entries], "feature": [f"F{f}" for f in feats]}
        return sets, (len(entries), len(feats)), ("sae", "feature"), labels, layer_of
    items = []
    for s in senders:
        if not _is_feature(s):
            _check_head(model, s, "sender")
            items.append(tuple(s))
            continue
        hook, f = s[0], int(s[1])
        if hook not in layer_of:
            raise ValueError(f"feature sender {tuple(s)}: {hook!r} is not the hook_sae_acts_post of a spliced "
                             f"dictionary (spliced: {', '.join(layer_of) or 'none'})")
        if not 0 <= f < layer_of[hook].d_sae:
            raise ValueError(f"feature sender {tuple(s)} is outside the dictionary's 0..{layer_of[hook].d_sae - 1}")
        items.append((hook, f))
    return [items], (), (), {}, layer_of


def _path_patch(model, clean, corrupted, senders, receivers, receiver_inputs, metric, direction, noise,
                sender_positions, freeze_mlps, batch_size, progress, prepend_bos, runs, freeze, entries,
                features) -> PatchResult:
    if entries is None and is_module_spec(senders):
        return module_path_patch(model, clean, corrupted, senders=senders, receivers=receivers, freeze=freeze,
                                 metric=metric, direction=direction, noise=noise, sender_positions=sender_positions,
                                 progress=progress, prepend_bos=prepend_bos, runs=runs)
    if freeze is not None:
        raise ValueError("freeze= names hook points for module-level path patching (senders given as hook names); "
                         "with (layer, head) senders every other head is frozen, and freeze_mlps=True adds the MLPs")
    if not getattr(model, "supports_resume", False) and not hasattr(model.cfg, "n_heads"):
        raise ValueError(f"head-level path patching needs the toolkit's attention hooks, which "
                         f"{type(model).__name__} lacks: convert the model (models.load) or give senders, receivers "
                         "and freeze as hook names, e.g. senders='model.layers.{layer}.mlp'")
    start = time.perf_counter()
    metric = as_metric(metric)
    runs = runs or PatchingRuns(model, clean, corrupted, noise, prepend_bos)
    if runs.corrupted is None:
        raise ValueError("path patching needs corrupted prompts or noise=GaussianNoise(...)")
    cfg = model.cfg
    recv = _receivers(model, receivers, receiver_inputs)
    top = cfg.n_layers if recv == "resid" else min(r[0] for r in recv)
    feature_hooks: dict = {}
    if entries is not None:
        sender_sets, shape, axes, labels, feature_hooks = _feature_senders(model, senders, entries, features)
        late = [e.prefix for e in entries if e.layer is not None and e.layer > top
                and any(s[0] == e.hook("acts_post") for ss in sender_sets for s in ss)]
        if late:
            raise ValueError(f"the dictionaries at {', '.join(late)} read after the receivers (lowest receiver layer "
                             f"{top}): no path runs from their features to them")
        for s in sender_sets[0] if not axes else []:
            if not _is_feature(s) and s[0] >= top:
                raise ValueError(f"sender {s} is not below the receivers (lowest receiver layer {top})")
    elif senders == "each":
        sender_sets = [[(layer, h)] for layer in range(top) for h in range(cfg.n_heads)]
        shape, axes = (top, cfg.n_heads), ("layer", "head")
    else:
        sender_sets = [[tuple(s) for s in senders]]
        for s in sender_sets[0]:
            _check_head(model, s, "sender")
            if s[0] >= top:
                raise ValueError(f"sender {s} is not below the receivers (lowest receiver layer {top}): "
                                 "no path runs from it to them")
        shape, axes = (), ()
    base, source_run, label = runs.base_and_source(direction)
    n_pos = runs.n_pos
    positions = _positions(metric, n_pos)
    pos_mask = torch.zeros(n_pos, dtype=torch.bool)
    pos_mask[list(range(n_pos)) if sender_positions is None else list(sender_positions)] = True
    pos_mask = pos_mask.to(base.tokens.device)

    rq, rk = qk_hook_names(model.cfg)
    z_names = [f"blocks.{layer}.attn.hook_z" for layer in range(top)]
    mlp_names = [f"blocks.{layer}.hook_mlp_out" for layer in range(top)] if freeze_mlps and not cfg.attn_only else []
    recv_layers = [] if recv == "resid" else sorted({r[0] for r in recv})
    recv_names = [f"blocks.{layer}.{n}" for layer in recv_layers for n in (rq, rk, "attn.hook_v")]
    resid_names = [f"blocks.{layer}.hook_resid_pre" for layer in range(cfg.n_layers)]
    with torch.no_grad():
        base_logits, base_cache = _logits_at(model, base.tokens, base.hooks, positions,
                                             z_names + mlp_names + recv_names + resid_names + list(feature_hooks))
        source_logits, source_cache = _logits_at(model, source_run.tokens, source_run.hooks, positions,
                                                 z_names + list(feature_hooks))
    clean_logits = base_logits if base is runs.clean else source_logits
    corrupt_logits = source_logits if base is runs.clean else base_logits
    ctx = MetricContext(clean_logits, corrupt_logits)
    n_prompts = base.tokens.shape[0]
    prompt_all = torch.arange(n_prompts, device=base_logits.device)
    baselines = Baselines(metric(clean_logits, prompt_all, ctx).float().cpu(),
                          metric(corrupt_logits, prompt_all, ctx).float().cpu(), ctx)

    # Below a row's lowest sender (step 1) or lowest receiver (step 2) the run is the base run:
    # models that can resume start there from the base residual stream.
    resume = getattr(model, "supports_resume", False)
    rows = [(si, b) for si in range(len(sender_sets)) for b in range(n_prompts)]
    values = torch.zeros(n_prompts, len(sender_sets))
    if feature_hooks and all(_is_feature(s) for ss in sender_sets for s in ss):
        # Senders equal in both runs at the sender positions change nothing (every head is frozen at the base
        # run): the row is the base run, whose value it takes.
        values[:] = metric(base_logits, prompt_all, ctx).float().cpu()[:, None]
        moved = {h: (source_cache[h].to(base_cache[h]) != base_cache[h]) & pos_mask[None, :, None].to(base_cache[h].device)
                 for h in feature_hooks}
        rows = [(si, b) for si, b in rows if any(bool(moved[h][b, :, f].any()) for h, f in sender_sets[si])]

    def first_layer(items) -> int:  # where a row's run may start: its lowest sender (a dictionary: where it reads)
        return min(s[0] if not _is_feature(s) else (feature_hooks[s[0]].layer or 0) for s in items)

    groups: dict[int, list] = {}
    for si, b in rows:
        groups.setdefault(first_layer(sender_sets[si]) if resume else 0, []).append((si, b))
    chunks = [(layer, g[i: i + batch_size]) for layer, g in sorted(groups.items()) for i in range(0, len(g), batch_size)]
    forwards = 2
    recv_start = (min(recv_layers) if resume else 0) if recv != "resid" else 0
    with torch.no_grad():
        for layer, chunk in tqdm(chunks, disable=not progress, desc="path patching", mininterval=1.0):
            sets = [sender_sets[si] for si, _ in chunk]
            prompt = torch.tensor([b for _, b in chunk], device=base.tokens.device)
            out = _sender_run(model, base, prompt, sets, base_cache, source_cache, z_names, mlp_names, pos_mask,
                              recv_names, positions, layer)
            forwards += 1
            if recv != "resid":
                out = _receiver_run(model, base, prompt, recv, out, base_cache, positions, rq, rk, recv_start)
                forwards += 1
            values[prompt.cpu(), torch.tensor([si for si, _ in chunk])] = metric(out, prompt, ctx).float().cpu()
    per_prompt = values.view(n_prompts, *shape)
    if metric.normalized:
        per_prompt = baselines.normalize(per_prompt)
    if entries is None:
        labels = _labels(model, axes, shape, list(range(top)), base.tokens, "z") if axes else {}
    what = "resid" if recv == "resid" else ", ".join(f"L{l}H{h}.{w}" for l, h, w in recv)
    grid = ("feature" if entries is not None else "head") if axes else "set"
    return PatchResult("path", grid, axes, labels, per_prompt, metric.name, label,
                       baselines.clean, baselines.corrupted, metric.normalized, forwards=forwards,
                       seconds=time.perf_counter() - start,
                       extra={"receivers": what, "senders": senders if senders in ("each", "features") else sender_sets[0],
                              "freeze_mlps": freeze_mlps, **({"rows_run": len(rows)} if entries else {})})


def _resume(model, base, prompt, base_cache, layer: int, **kwargs):
    """Run rows of `base` from `layer` on (the base residual stream there as input), or from the tokens:
    logits at `logit_at` ([R, k, vocab]), or the residual stream with stop_at_layer."""
    logit_at = kwargs.pop("logit_at", None)
    if layer == 0:
        inputs = base.tokens[prompt]
    else:
        inputs = take(base_cache[f"blocks.{layer}.hook_resid_pre"], prompt)
        kwargs["start_at_layer"] = layer
    return model(inputs, **kwargs) if logit_at is None else logits_at(model, inputs, logit_at, **kwargs)


def _sender_run(model, base, prompt, sets, base_cache, source_cache, z_names, mlp_names, pos_mask, recv_names,
                positions, start_layer: int):
    """Step 1 for a chunk of rows: logits [R, k, vocab] (receivers = resid) or the receivers' recorded inputs."""
    R, H = len(sets), model.cfg.n_heads
    masks, feature_masks = {}, {}
    for r, items in enumerate(sets):
        for a, b in items:
            if isinstance(a, str):  # a feature: (its hook, its index)
                feature_masks.setdefault(a, torch.zeros(R, source_cache[a].shape[-1], dtype=torch.bool))[r, b] = True
            else:
                masks.setdefault(a, torch.zeros(R, H, dtype=torch.bool))[r, b] = True

    def freeze(tensor, hook):  # z [R, pos, heads, d_head]: base values, the row's senders from the source
        layer = int(hook.name.split(".")[1])
        frozen = take(base_cache[hook.name], prompt).to(tensor.dtype)
        if layer not in masks:
            return frozen
        pick = masks[layer].to(tensor.device)[:, None, :, None] & pos_mask.to(tensor.device)[None, :, None, None]
        return torch.where(pick, take(source_cache[hook.name], prompt).to(tensor.dtype), frozen)

    def freeze_mlp(tensor, hook):
        return take(base_cache[hook.name], prompt).to(tensor.dtype)

    def send_features(tensor, hook):  # latents [R, pos, d_sae]: the row's features from the source
        pick = feature_masks[hook.name].to(tensor.device)[:, None, :] & pos_mask.to(tensor.device)[None, :, None]
        return torch.where(pick, take(source_cache[hook.name], prompt).to(tensor.dtype), tensor)

    recorded: dict = {}
    hooks = base.hooks_for(prompt) + [(n, freeze) for n in z_names] + [(n, freeze_mlp) for n in mlp_names]
    hooks += [(n, send_features) for n in feature_masks]
    hooks += [(n, lambda t, hook: recorded.__setitem__(hook.name, t.detach())) for n in recv_names]
    with model.hooks(fwd_hooks=hooks):
        if not recv_names:
            return _resume(model, base, prompt, base_cache, start_layer, logit_at=positions)
        _resume(model, base, prompt, base_cache, start_layer,
                stop_at_layer=max(int(n.split(".")[1]) for n in recv_names) + 1)
    return recorded


def _receiver_run(model, base, prompt, recv, recorded, base_cache, positions, rq, rk, start_layer: int):
    """Step 2: the base run with each receiver head's z recomputed from its recorded inputs."""
    cfg = model.cfg
    n_rep = cfg.n_heads // cfg.n_kv_heads
    by_layer: dict[int, list] = {}
    for layer, head, which in recv:
        by_layer.setdefault(layer, []).append((head, which))
    live: dict = {}

    def grab(tensor, hook):
        live[hook.name] = tensor
        return tensor

    def recompute(z, hook):  # z: [R, pos, heads, d_head]
        layer = int(hook.name.split(".")[1])
        pre = f"blocks.{layer}."
        out = z.clone()
        n_pos = z.shape[1]
        score, allowed = score_and_mask(model, layer, n_pos, z.device)
        for head, which in by_layer[layer]:
            g = head // n_rep

            def pick(short, letter, idx):
                src = recorded if letter in which else live
                return src[pre + short][:, :, idx].to(z.dtype)

            q, k, v = pick(rq, "q", head), pick(rk, "k", g), pick("attn.hook_v", "v", g)
            scores = score(q @ k.transpose(-1, -2)).masked_fill(~allowed, -math.inf)
            out[:, :, head] = scores.softmax(-1, dtype=torch.float32).to(z.dtype) @ v
        return out

    hooks = base.hooks_for(prompt)
    for layer in by_layer:
        hooks += [(f"blocks.{layer}.{n}", grab) for n in (rq, rk, "attn.hook_v")]
        hooks.append((f"blocks.{layer}.attn.hook_z", recompute))
    with model.hooks(fwd_hooks=hooks):
        return _resume(model, base, prompt, base_cache, start_layer, logit_at=positions)
