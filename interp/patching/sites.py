"""Patching sites: which activation, which layer, position, head (and key position for patterns).

A sweep patches every site of one kind on a grid (`by`):

| by | grid | kinds |
| --- | --- | --- |
| "layer_pos" | [layer, pos] | resid_pre, resid_mid, resid_post, attn_out, mlp_out |
| "layer" | [layer] (all positions at once) | the same |
| "head_pos" | [layer, head, pos] | z, q, k, v, result, pattern (the destination row) |
| "head" | [layer, head] (all positions) | the same |
| "dest_src" | [layer, head, dest, src] | pattern (one attention weight) |
| "feature_pos" | [sae, feature, pos] | sae_acts_post, sae_acts_pre (one latent of a spliced dictionary) |
| "feature" | [sae, feature] (all positions) | the same |
| "sae_pos" | [sae, pos] | sae_input, sae_recons, sae_error, sae_output (the whole vector) |
| "sae" | [sae] (all positions) | the same |

k and v are patched per KV head (grouped-query models have fewer than query heads).
Dictionary kinds patch the hook points of dictionaries spliced into the model (interp.sae.splice);
`saes` says which (the sae axis) and `features` which latents (default: every one).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

# kind -> (hook template, what the head axis counts or None)
KINDS: dict[str, tuple[str, str | None]] = {
    "resid_pre": ("blocks.{layer}.hook_resid_pre", None),
    "resid_mid": ("blocks.{layer}.hook_resid_mid", None),
    "resid_post": ("blocks.{layer}.hook_resid_post", None),
    "attn_out": ("blocks.{layer}.hook_attn_out", None),
    "mlp_out": ("blocks.{layer}.hook_mlp_out", None),
    "z": ("blocks.{layer}.attn.hook_z", "heads"),
    "q": ("blocks.{layer}.attn.hook_q", "heads"),
    "k": ("blocks.{layer}.attn.hook_k", "kv_heads"),
    "v": ("blocks.{layer}.attn.hook_v", "kv_heads"),
    "result": ("blocks.{layer}.attn.hook_result", "heads"),
    "pattern": ("blocks.{layer}.attn.hook_pattern", "heads"),
    # Mixture-of-experts layers: the router's logits (whole vector per position) and each expert's weighted
    # contribution (the "head" axis counts experts; zeroing one removes it without re-routing).
    "router_logits": ("blocks.{layer}.mlp.hook_router_logits", None),
    "expert": ("blocks.{layer}.mlp.hook_experts", "experts"),
}
MOE_KINDS = ("router_logits", "expert")
# Hook points of spliced dictionaries (interp.sae.splice): kind -> the point's name on the dictionary. The
# feature of a per-feature kind sits in a Site's `head` slot: both index dim 2 of [batch, pos, ...].
SAE_KINDS = {
    "sae_acts_post": "hook_sae_acts_post", "sae_acts_pre": "hook_sae_acts_pre", "sae_input": "hook_sae_input",
    "sae_recons": "hook_sae_recons", "sae_error": "hook_sae_error", "sae_output": "hook_sae_output",
}
FEATURE_KINDS = ("sae_acts_post", "sae_acts_pre")
SAE_GRIDS = {
    "feature_pos": ("sae", "feature", "pos"),
    "feature": ("sae", "feature"),
    "sae_pos": ("sae", "pos"),
    "sae": ("sae",),
}
GRIDS = {
    "layer_pos": ("layer", "pos"),
    "layer": ("layer",),
    "head_pos": ("layer", "head", "pos"),
    "head": ("layer", "head"),
    "dest_src": ("layer", "head", "dest", "src"),
}


@dataclass(frozen=True)
class Site:
    kind: str
    layer: int
    pos: int | None = None  # None: every position (for patterns: every destination)
    head: int | None = None  # None: the whole activation (per-head kinds: every head)
    src: int | None = None  # patterns only: the key position
    hook: str | None = None  # dictionary sites: the hook point's full name (`layer` is then the block it reads in)

    @property
    def hook_name(self) -> str:
        return self.hook if self.hook is not None else hook_name(self.kind, self.layer)

    @property
    def first_affected(self) -> int:
        """Positions before this one are untouched by the patch (the model is causal)."""
        return 0 if self.pos is None else self.pos


def is_template(kind: str) -> bool:
    """A hook-name template such as "model.layers.{layer}": a module-output site of an attached model."""
    return "{layer}" in kind


def hook_name(kind: str, layer: int) -> str:
    if is_template(kind):
        return kind.format(layer=layer)
    if kind not in KINDS:
        raise ValueError(f"unknown site kind {kind!r}; choose from {', '.join(KINDS)}, or a hook-name template "
                         "with {layer} (e.g. 'model.layers.{layer}' on an attached model)")
    return KINDS[kind][0].format(layer=layer)


def n_heads_for(model, kind: str) -> int:
    if is_template(kind):
        return 0
    what = KINDS[kind][1]
    if what is None:
        return 0
    if what == "experts":
        return model.cfg.num_experts
    return model.cfg.n_kv_heads if what == "kv_heads" else model.cfg.n_heads


def _is_moe(model, layer: int) -> bool:
    is_moe = getattr(model.cfg, "is_moe", None)
    return bool(is_moe(layer)) if is_moe is not None else False


def default_layers(model, kind: str) -> list[int]:
    """Every layer, or for router / expert sites every mixture-of-experts layer."""
    layers = list(range(model.cfg.n_layers))
    return [layer for layer in layers if _is_moe(model, layer)] if kind in MOE_KINDS else layers


def enumerate_sites(model, kind: str, by: str, n_pos: int, layers=None, saes=None,
                    features=None) -> tuple[list[Site], tuple[int, ...], tuple[str, ...]]:
    """Every site of a sweep, in grid order, with the grid's shape and axis names.

    Dictionary kinds (SAE_KINDS) take `saes`, the spliced entries (interp.sae.splice.resolve), and `features`.
    """
    if kind in SAE_KINDS:
        if layers is not None:
            raise ValueError(f"layers= selects the model's own sites; {kind!r} sites are chosen with saes=[...] "
                             "(and features=[...])")
        return _sae_sites(kind, by, n_pos, saes, features)
    if features is not None:
        raise ValueError(f"features= selects latents of dictionary sites (kind='sae_acts_post'), not {kind!r} sites")
    hook_name(kind, 0)  # validates the kind
    if by not in GRIDS:
        raise ValueError(f"unknown sweep {by!r}; choose from {', '.join(GRIDS)}")
    per_head = not is_template(kind) and KINDS[kind][1] is not None
    if per_head != by.startswith(("head", "dest")):
        raise ValueError(f"{kind!r} is {'a per-head' if per_head else 'a whole-stream'} activation; "
                         f"sweep it by {'head_pos or head' if per_head else 'layer_pos or layer'}, not {by!r}")
    if by == "dest_src" and kind != "pattern":
        raise ValueError("dest_src sweeps patch single attention weights: use kind='pattern'")
    layers = default_layers(model, kind) if layers is None else [int(layer) for layer in layers]
    bad = [layer for layer in layers if not 0 <= layer < model.cfg.n_layers]
    if bad:
        raise ValueError(f"layers {bad} are outside {model.cfg.model_name}'s 0..{model.cfg.n_layers - 1}")
    if kind in MOE_KINDS:
        dense = [layer for layer in layers if not _is_moe(model, layer)]
        if dense:
            raise ValueError(f"{kind!r} sites need mixture-of-experts layers; layers {dense} of "
                             f"{model.cfg.model_name} have dense MLPs (MoE layers: {default_layers(model, kind)})")
    if model.cfg.attn_only and kind in ("resid_mid", "mlp_out"):
        raise ValueError(f"{model.cfg.model_name} is attention-only: it has no {kind}")
    if kind == "resid_mid" and getattr(model.cfg, "parallel_attn_mlp", False):
        raise ValueError(f"{model.cfg.model_name} runs attention and MLP in parallel from resid_pre: it has no "
                         "resid_mid; patch resid_pre, attn_out or mlp_out instead")
    H = n_heads_for(model, kind)
    axes = GRIDS[by]
    ranges = {"layer": layers, "head": range(H), "pos": range(n_pos), "dest": range(n_pos), "src": range(n_pos)}
    sites = []
    for combo in itertools.product(*(ranges[a] for a in axes)):
        v = dict(zip(axes, combo))
        pos = v.get("pos", v.get("dest"))
        sites.append(Site(kind, v["layer"], pos, v.get("head"), v.get("src")))
    shape = tuple(len(ranges[a]) for a in axes)
    return sites, shape, axes


def is_sae_kind(kind: str) -> bool:
    return kind in SAE_KINDS


def feature_list(saes, features) -> list[int]:
    """The latents a dictionary sweep covers: `features`, or every one (the dictionaries' widths must agree)."""
    widths = {e.d_sae for e in saes}
    if features is None:
        if len(widths) > 1:
            raise ValueError(f"the dictionaries have different widths ({sorted(widths)}), so no one feature axis fits "
                             "them all: sweep them one at a time, or pass features=[...] present in each")
        return list(range(widths.pop()))
    feats = [int(f) for f in (features.tolist() if isinstance(features, torch.Tensor) else features)]
    bad = [f for f in feats if not 0 <= f < min(widths)]
    if bad or not feats:
        raise ValueError(f"features {bad or '[]'} are outside the dictionaries' 0..{min(widths) - 1}")
    return feats


def _sae_sites(kind: str, by: str, n_pos: int, saes, features):
    if not saes:
        raise ValueError(f"{kind!r} sites are latents of spliced dictionaries: pass saes=[...] (spliced for the "
                         "sweep with the error term) or sweep inside `with splice(model, saes):`")
    per_feature = kind in FEATURE_KINDS
    if by not in SAE_GRIDS or per_feature != by.startswith("feature"):
        good = "feature_pos or feature" if per_feature else "sae_pos or sae"
        raise ValueError(f"{kind!r} is {'a per-feature' if per_feature else 'a whole-vector'} dictionary site; "
                         f"sweep it by {good}, not {by!r}")
    if kind == "sae_error":
        off = [e.prefix for e in saes if not e.dictionary.use_error_term]
        if off:
            raise ValueError(f"the dictionaries at {', '.join(off)} are spliced without the error term, so "
                             "hook_sae_error never fires: splice them with use_error_term=True")
    if not per_feature and features is not None:
        raise ValueError(f"features= selects latents; {kind!r} patches the whole vector")
    feats = feature_list(saes, features) if per_feature else [None]
    axes = SAE_GRIDS[by]
    positions = range(n_pos) if axes[-1] == "pos" else [None]
    sites = [Site(kind, -1 if e.layer is None else e.layer, p, f, hook=e.hook(SAE_KINDS[kind]))
             for e in saes for f in feats for p in positions]
    shape = {"sae": len(saes), "feature": len(feats), "pos": n_pos}
    return sites, tuple(shape[a] for a in axes), axes


@dataclass
class RowBatch:
    """Rows of a patched forward: row r is prompt `prompt[r]` from position `offset[r]` on, patched at `sites[r]`.

    Two layouts. Full rows (`packed=False`): row r is batch entry r, all positions, keys
    are the row's own positions. Packed rows (`packed=True`): every row's tokens are laid
    end to end in one sequence (row r starts at `start[r]`), and the keys are first the
    cached prefixes of the chunk's distinct prompts (`n_slots` x `n_pos`, row r's at slot
    `slot[r]`), then the packed tokens themselves.
    """

    prompt: torch.Tensor  # [R]
    offset: torch.Tensor  # [R]
    length: torch.Tensor  # [R] = n_pos - offset
    sites: list[Site]
    n_pos: int
    packed: bool = False
    start: torch.Tensor | None = None  # [R], packed layout
    slot: torch.Tensor | None = None  # [R], packed layout
    n_slots: int = 0

    def loc(self, r: int, i: int) -> tuple[int, int]:
        """(batch index, sequence index) of row r's entry i (absolute position offset[r] + i)."""
        return (0, int(self.start[r]) + i) if self.packed else (r, i)

    def key_index(self, r: int, abs_key: int) -> int:
        if not self.packed:
            return abs_key
        off = int(self.offset[r])
        if abs_key < off:
            return int(self.slot[r]) * self.n_pos + abs_key
        return self.n_slots * self.n_pos + int(self.start[r]) + abs_key - off

    def subset(self, rows: list[int]) -> "RowBatch":
        pick = torch.tensor(rows, device=self.prompt.device)
        return RowBatch(self.prompt[pick], self.offset[pick], self.length[pick], [self.sites[i] for i in rows],
                        self.n_pos, self.packed, None if self.start is None else self.start[pick],
                        None if self.slot is None else self.slot[pick], self.n_slots)


def apply_patches(tensor: torch.Tensor, rows: RowBatch, source: torch.Tensor, kind: str) -> torch.Tensor:
    """Overwrite each row's site in `tensor` (the hook's activation) with `source` ([n_prompts, ...] at full positions)."""
    out = tensor.clone()
    if kind == "pattern":
        return _apply_pattern(out, rows, source)
    idx_b, idx_s, idx_p, idx_abs, idx_h = [], [], [], [], []
    for r, site in enumerate(rows.sites):
        off, n = int(rows.offset[r]), int(rows.length[r])
        for i in (range(n) if site.pos is None else [site.pos - off]):
            b, s_ = rows.loc(r, i)
            idx_b.append(b)
            idx_s.append(s_)
            idx_p.append(int(rows.prompt[r]))
            idx_abs.append(off + i)
            idx_h.append(site.head)
    dev = out.device
    b_t, s_t = torch.tensor(idx_b, device=dev), torch.tensor(idx_s, device=dev)
    p_t, a_t = torch.tensor(idx_p, device=dev), torch.tensor(idx_abs, device=dev)
    src = source.to(dev, out.dtype)
    if idx_h and idx_h[0] is not None:
        h_t = torch.tensor(idx_h, device=dev)
        out[b_t, s_t, h_t] = src[p_t, a_t, h_t]
    else:
        out[b_t, s_t] = src[p_t, a_t]
    return out


def _apply_pattern(out: torch.Tensor, rows: RowBatch, source: torch.Tensor) -> torch.Tensor:
    """out: [batch, heads, query, key] in the rows' layout; source: [n_prompts, heads, n_pos, n_pos]."""
    source = source.to(out.device, out.dtype)
    for r, site in enumerate(rows.sites):
        p, off = int(rows.prompt[r]), int(rows.offset[r])
        heads = list(range(out.shape[1])) if site.head is None else [site.head]
        dests = range(off, rows.n_pos) if site.pos is None else [site.pos]
        keys = [site.src] if site.src is not None else list(range(rows.n_pos))
        key_idx = torch.tensor([rows.key_index(r, j) for j in keys], device=out.device)
        h_idx = torch.tensor(heads, device=out.device)
        for dest in dests:
            b, q = rows.loc(r, dest - off)
            out[b, h_idx[:, None], q, key_idx[None, :]] = source[p, h_idx][:, dest, keys]
    return out
