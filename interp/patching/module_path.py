"""Path patching between hook points named by the user: senders -> receivers, the rest frozen.

The head-level `path_patch` knows the toolkit's attention internals. This form needs only
hook names, so it runs on any hookable model, attached ones included (`interp.attach`):

    path_patch(hooked, clean_ids, corrupted_ids, metric=m,
               senders="model.layers.{layer}.mlp",                  # each layer's MLP on its own
               receivers=["model.layers.4.self_attn.q_proj"],       # what the senders reach...
               freeze=["model.layers.{layer}.self_attn[0]"])        # ...with these held at the base run

Step 1, the sender run: the base run with the senders' values taken from the source run
and every `freeze` point (other than a sender) set to its base-run value, so the change
reaches the receivers only through what recomputes. The receivers' values are recorded.
Step 2, the receiver run: the base run with only the receivers set to the recorded
values. Without receivers the metric is read from step 1 (the path to the logits).
Sender tensors are [batch, pos, ...]; `sender_positions` restricts the patch to positions.
"""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from interp.patching.engine import PatchingRuns, _logits_at, _positions, logits_at
from interp.patching.metrics import Baselines, MetricContext, as_metric
from interp.patching.result import PatchResult
from interp.patching.runs import GaussianNoise
from interp.patching.sites import hook_name, is_template


def is_module_spec(spec) -> bool:
    """Hook names (or a template) rather than (layer, head) pairs."""
    if isinstance(spec, str):
        return spec not in ("each", "resid")
    return isinstance(spec, (list, tuple)) and len(spec) > 0 and all(isinstance(s, str) for s in spec)


def _expand(model, spec, what: str) -> list[str]:
    """Names, with every template expanded over the model's layers; each checked against the model."""
    items = [] if spec is None else [spec] if isinstance(spec, str) else list(spec)
    names = []
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"{what} are hook names or templates such as 'model.layers.{{layer}}.mlp', "
                            f"got {item!r}")
        names += [hook_name(item, layer) for layer in range(model.cfg.n_layers)] if is_template(item) else [item]
    for name in names:
        model.resolve_hook_names(name)  # an unknown name raises, listing the closest real ones
    return list(dict.fromkeys(names))


def module_path_patch(model, clean, corrupted=None, *, senders, receivers=None, freeze=None, metric,
                      direction: str = "noise", noise: GaussianNoise | None = None, sender_positions=None,
                      progress: bool = True, prepend_bos=None, runs: PatchingRuns | None = None) -> PatchResult:
    """Path-patch senders -> receivers (hook names) with the `freeze` points held at the base run.

    senders: a template ("model.layers.{layer}.mlp": each layer on its own, a [layer] grid) or
    a list of names patched together (one value per prompt). receivers / freeze: names or
    templates (a template means every layer); receivers None or "resid": the logits.
    """
    start = time.perf_counter()
    metric = as_metric(metric)
    runs = runs or PatchingRuns(model, clean, corrupted, noise, prepend_bos)
    if runs.corrupted is None:
        raise ValueError("path patching needs corrupted prompts or noise=GaussianNoise(...)")
    if isinstance(senders, str) and is_template(senders):
        sender_sets = [[name] for name in _expand(model, senders, "senders")]
        shape, axes = (len(sender_sets),), ("layer",)
        labels = {"layer": [str(layer) for layer in range(len(sender_sets))]}
    else:
        sender_sets, shape, axes, labels = [_expand(model, senders, "senders")], (), (), {}
    recv = _expand(model, None if receivers == "resid" else receivers, "receivers")
    frozen = _expand(model, freeze, "freeze points")
    all_senders = list(dict.fromkeys(n for s in sender_sets for n in s))
    for name in recv:
        if name in frozen or name in all_senders:
            raise ValueError(f"receiver {name} is also a {'freeze point' if name in frozen else 'sender'}: its "
                             "value would be fixed, so no path could reach it")

    base, source_run, label = runs.base_and_source(direction)
    n_pos = runs.n_pos
    positions = _positions(metric, n_pos)
    pos_mask = torch.zeros(n_pos, dtype=torch.bool)
    pos_mask[list(range(n_pos)) if sender_positions is None else list(sender_positions)] = True
    with torch.no_grad():
        base_logits, base_cache = _logits_at(model, base.tokens, base.hooks, positions, frozen)
        source_logits, source_cache = _logits_at(model, source_run.tokens, source_run.hooks, positions, all_senders)
    clean_logits = base_logits if base is runs.clean else source_logits
    corrupt_logits = source_logits if base is runs.clean else base_logits
    ctx = MetricContext(clean_logits, corrupt_logits)
    prompts = torch.arange(base.tokens.shape[0], device=base_logits.device)
    baselines = Baselines(metric(clean_logits, prompts, ctx).float().cpu(),
                          metric(corrupt_logits, prompts, ctx).float().cpu(), ctx)

    def hold(tensor, hook):
        return base_cache[hook.name].to(tensor.dtype)

    def send(tensor, hook):
        src = source_cache[hook.name].to(tensor.dtype)
        mask = pos_mask.to(tensor.device).view(1, -1, *([1] * (tensor.dim() - 2)))
        return torch.where(mask, src, tensor)

    values = torch.zeros(len(prompts), len(sender_sets))
    forwards = 2
    with torch.no_grad():
        for si, names in enumerate(tqdm(sender_sets, disable=not progress, desc="path patching", mininterval=1.0)):
            recorded: dict = {}
            hooks = list(base.hooks) + [(n, hold) for n in frozen if n not in names] + [(n, send) for n in names]
            hooks += [(n, lambda t, hook: recorded.__setitem__(hook.name, t.detach())) for n in recv]
            with model.hooks(fwd_hooks=hooks):
                out = logits_at(model, base.tokens, positions)
            forwards += 1
            if recv:
                put = [(n, lambda t, hook: recorded[hook.name].to(t.dtype)) for n in recv]
                with model.hooks(fwd_hooks=list(base.hooks) + put):
                    out = logits_at(model, base.tokens, positions)
                forwards += 1
            values[:, si] = metric(out, prompts, ctx).float().cpu()
    per_prompt = values.view(len(prompts), *shape)
    if metric.normalized:
        per_prompt = baselines.normalize(per_prompt)
    return PatchResult("path", "layer" if axes else "set", axes, labels, per_prompt, metric.name, label,
                       baselines.clean, baselines.corrupted, metric.normalized, forwards=forwards,
                       seconds=time.perf_counter() - start,
                       extra={"senders": senders if isinstance(senders, str) else sender_sets[0],
                              "receivers": ", ".join(recv) or "logits", "freeze": frozen})
