"""Activation patching across the two stacks of an encoder-decoder model.

    result = seq2seq_patch(model, clean_src, corrupted_src, decoder_input_ids, stack="encoder",
                           kind="resid_pre", by="layer_pos", metric=logit_diff(a, b))

The source sentence is corrupted; the decoder reads the same target prefix in both runs,
and the metric reads the decoder's logits (by default at its last position). A site is a
hook of either stack (`{stack}.blocks.{layer}.hook_...`), at an encoder position (its
patch reaches every decoder step through cross-attention) or a decoder position. Rows are
full forwards, batched (an encoder patch changes every decoder position, so there is no
prefix to resume from); the patch is a hook that overwrites each row's own site.
"""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from interp.patching.engine import _positions, as_logits
from interp.patching.metrics import Baselines, MetricContext, as_metric
from interp.patching.result import PatchResult
from interp.patching.runs import as_tokens, check_pairs
from interp.patching.sites import RowBatch, Site, apply_patches

# kind -> (hook below the block, per head, decoder only)
SEQ2SEQ_KINDS = {
    "resid_pre": ("hook_resid_pre", False, False),
    "resid_mid": ("hook_resid_mid", False, False),
    "resid_post": ("hook_resid_post", False, False),
    "attn_out": ("hook_attn_out", False, False),
    "mlp_out": ("hook_mlp_out", False, False),
    "cross_attn_out": ("hook_cross_attn_out", False, True),
    "resid_mid_cross": ("hook_resid_mid_cross", False, True),
    "z": ("attn.hook_z", True, False),
    "cross_z": ("cross_attn.hook_z", True, True),
}


def _check(model, stack: str, kind: str, by: str) -> None:
    if not getattr(model.cfg, "encoder_decoder", False):
        raise ValueError(f"seq2seq_patch needs an encoder-decoder model; {model.cfg.model_name} is not one "
                         "(use activation_patch)")
    if stack not in ("encoder", "decoder"):
        raise ValueError(f"stack must be 'encoder' or 'decoder', got {stack!r}")
    if kind not in SEQ2SEQ_KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose from {', '.join(SEQ2SEQ_KINDS)}")
    _, per_head, decoder_only = SEQ2SEQ_KINDS[kind]
    if decoder_only and stack == "encoder":
        raise ValueError(f"{kind!r} is a decoder site (the encoder has no cross-attention)")
    if per_head != (by in ("head_pos", "head")) or by not in ("layer_pos", "layer", "head_pos", "head"):
        raise ValueError(f"{kind!r} is {'a per-head' if per_head else 'a whole-stream'} activation; sweep it by "
                         f"{'head_pos or head' if per_head else 'layer_pos or layer'}, not {by!r}")


def seq2seq_patch(model, clean, corrupted, decoder_input_ids, *, stack: str = "encoder", kind: str = "resid_pre",
                  by: str = "layer_pos", metric, direction: str = "denoise", layers=None, batch_size: int = 256,
                  progress: bool = True) -> PatchResult:
    """Patch every site of one kind in one stack; the metric per prompt, `[n_prompts, layer, (head,) pos]`."""
    start = time.perf_counter()
    _check(model, stack, kind, by)
    metric = as_metric(metric)
    clean_t, corrupt_t = as_tokens(model, clean, "clean prompts"), as_tokens(model, corrupted, "corrupted prompts")
    check_pairs(clean_t, corrupt_t, model)
    n = clean_t.shape[0]
    dec = torch.as_tensor(decoder_input_ids, device=clean_t.device)
    dec = (dec[None] if dec.dim() == 1 else dec).expand(n, -1)
    positions = _positions(metric, dec.shape[1])
    blocks = getattr(model, stack).blocks
    layers = list(range(len(blocks))) if layers is None else [int(layer) for layer in layers]
    hook, per_head, _ = SEQ2SEQ_KINDS[kind]
    names = {layer: f"{stack}.blocks.{layer}.{hook}" for layer in layers}
    if direction not in ("denoise", "noise"):
        raise ValueError(f"direction must be 'denoise' or 'noise', got {direction!r}")
    base, source = (corrupt_t, clean_t) if direction == "denoise" else (clean_t, corrupt_t)

    def run(src, rows, hooks):
        with model.hooks(fwd_hooks=hooks):
            return as_logits(model(src, dec[rows]))[:, positions]

    with torch.no_grad():
        stores = {}, {}
        logits = []
        for tokens, store in zip((base, source), stores):
            grab = [(name, lambda t, hook, s=store: s.__setitem__(hook.name, t.detach())) for name in names.values()]
            logits.append(run(tokens, torch.arange(n), grab))
    base_logits, source_logits = logits
    base_store, source_store = stores
    clean_logits, corrupt_logits = (source_logits, base_logits) if direction == "denoise" else (base_logits, source_logits)
    ctx = MetricContext(clean_logits, corrupt_logits)
    idx = torch.arange(n, device=base_logits.device)
    baselines = Baselines(metric(clean_logits, idx, ctx).float().cpu(), metric(corrupt_logits, idx, ctx).float().cpu(), ctx)

    n_pos = base.shape[1] if stack == "encoder" else dec.shape[1]
    n_heads = model.cfg.n_heads
    grid = [(layer, h, p) for layer in layers for h in (range(n_heads) if per_head else [None])
            for p in (range(n_pos) if by in ("layer_pos", "head_pos") else [None])]
    rows = [(g, b) for g in range(len(grid)) for b in range(n)]
    values = torch.zeros(n, len(grid))
    chunks = [rows[i: i + batch_size] for i in range(0, len(rows), batch_size)]
    with torch.no_grad():
        for chunk in tqdm(chunks, disable=not progress, desc=f"patching {stack} {kind} by {by}", mininterval=1.0):
            prompt = torch.tensor([b for _, b in chunk], device=base.device)
            sites = [Site(kind, grid[g][0], grid[g][2], grid[g][1]) for g, _ in chunk]
            batch = RowBatch(prompt, torch.zeros_like(prompt), torch.full_like(prompt, n_pos), sites, n_pos)
            hooks = [(names[layer], _patcher(batch, layer, source_store[names[layer]], kind)) for layer in
                     sorted({s.layer for s in sites})]
            out = run(base[prompt], prompt, hooks)
            values[prompt.cpu(), torch.tensor([g for g, _ in chunk])] = metric(out, prompt, ctx).float().cpu()
    shape = (len(layers),) + ((n_heads,) if per_head else ()) + ((n_pos,) if by.endswith("pos") else ())
    per_prompt = values.view(n, *shape)
    if metric.normalized:
        per_prompt = baselines.normalize(per_prompt)
    axes = ("layer",) + (("head",) if per_head else ()) + (("pos",) if by.endswith("pos") else ())
    labels = {"layer": [f"{stack[0].upper()}L{layer}" for layer in layers], "head": [f"H{h}" for h in range(n_heads)]}
    tokens_shown = base[0] if stack == "encoder" else dec[0]
    tokenizer = getattr(model, "tokenizer", None)
    pos_text = model.to_str_tokens(tokens_shown) if tokenizer is not None else [str(t) for t in tokens_shown.tolist()]
    labels["pos"] = [f"{i} {t}" for i, t in enumerate(pos_text)]
    return PatchResult(f"{stack}.{kind}", by, axes, {a: labels[a] for a in axes}, per_prompt, metric.name, direction,
                       baselines.clean, baselines.corrupted, metric.normalized, forwards=len(chunks) + 2,
                       seconds=time.perf_counter() - start, extra={"rows": len(rows), "resumed": False, "stack": stack})


def _patcher(batch: RowBatch, layer: int, source: torch.Tensor, kind: str):
    """Overwrite the rows of this batch whose site is in `layer` (rows of other layers pass through)."""
    own = [i for i, s in enumerate(batch.sites) if s.layer == layer]

    def patch(tensor, hook):
        if len(own) == len(batch.sites):
            return apply_patches(tensor, batch, source, kind)
        idx = torch.tensor(own, device=tensor.device)
        sub = batch.subset(own)
        out = tensor.clone()
        out[idx] = apply_patches(tensor[idx], RowBatch(sub.prompt, sub.offset, sub.length, sub.sites, sub.n_pos),
                                 source, kind)
        return out

    return patch
