"""Does a dictionary fit a model: its hooks are the model's hook points, its widths the activations' there,
and a dictionary trained after a norm's weights is not put before them (check_fits)."""

from __future__ import annotations

import difflib
import re

import torch

from interp.sae.dictionary import SparseDictionary


class DictionaryMismatchError(ValueError):
    """A dictionary that does not fit a model (check_fits)."""


class HookNotInModelError(DictionaryMismatchError):
    """The dictionary's hook is not one of the model's hook points."""


class DimensionMismatchError(DictionaryMismatchError):
    """The dictionary's d_in (or a transcoder's d_out) differs from the width of the model's activation there."""


class NormNotFoldedError(DictionaryMismatchError):
    """A dictionary trained on a sublayer's input (after its norm's weights) put on a hook before those weights."""


# ---------------------------------------------------------------------------------------------- fitting a model
_OPT_IN = {"hook_mlp_in": "set_use_hook_mlp_in", "hook_attn_in": "set_use_attn_in",
           "hook_q_input": "set_use_split_qkv_input", "hook_k_input": "set_use_split_qkv_input",
           "hook_v_input": "set_use_split_qkv_input", "hook_result": "set_use_attn_result"}
_D_MODEL_HOOKS = re.compile(r"(hook_resid_(pre|mid|post|mid_cross)|hook_(attn|mlp|cross_attn)_out|hook_mlp_in|"
                            r"hook_embed|hook_pos_embed|hook_normalized_resid_post|ln\d?(_final)?\.hook_normalized|"
                            r"ln_final\.hook_normalized)$")


def _hook_width(model, name: str) -> int | None:
    """The last dimension of the activation at `name` (hook_z: n_heads * d_head), from the config where the name
    says it, else None."""
    cfg = model.cfg
    if _D_MODEL_HOOKS.search(name):
        return int(cfg.d_model)
    if name.endswith("attn.hook_z"):
        return int(cfg.n_heads) * int(cfg.d_head)
    if re.search(r"(^|\.)mlp\.hook_(pre|post|pre_linear)$", name) and getattr(cfg, "d_mlp", None) \
            and not getattr(cfg, "num_experts", None):
        return int(cfg.d_mlp)
    return None


def _probe_width(model, name: str) -> int | None:
    """The activation's last dimension from a two-token forward (for hooks the config does not describe)."""
    seen = {}

    def grab(act, hook):
        seen["shape"] = tuple(act.shape)

    try:
        device = next(model.parameters()).device
        with torch.no_grad():
            model.run_with_hooks(torch.zeros(1, 2, dtype=torch.long, device=device), fwd_hooks=[(name, grab)])
    except Exception:  # a model that needs other inputs (encoder-decoder): the width stays unchecked
        return None
    return seen.get("shape", (None,))[-1]


def check_fits(sae: SparseDictionary, model) -> None:
    """Raise a DictionaryMismatchError unless `sae` can be spliced into `model`: its hook(s) are hook points of
    the model (HookNotInModelError), d_in / d_out equal the widths there (DimensionMismatchError), and a
    dictionary trained on a sublayer's input (after the norm's weights: sparsify and Gemma Scope transcoders)
    is not put on a `hook_normalized` that comes before unfolded norm weights (NormNotFoldedError)."""
    cfg = sae.cfg
    hooks = model.hook_dict
    sides = [("hook_name", cfg.hook_name, cfg.d_in)]
    if cfg.is_transcoder:
        sides.append(("out_hook_name", cfg.out_hook_name, cfg.d_out))
    for field, name, width in sides:
        if name not in hooks:
            leaf = name.rsplit(".", 1)[-1]
            if leaf in _OPT_IN:
                fix = f"it is an opt-in hook point: call model.{_OPT_IN[leaf]}(True) first"
            else:
                close = difflib.get_close_matches(name, list(hooks), n=3)
                fix = f"did you mean {', '.join(close)}?" if close else "see model.hook_dict for its hook points"
            raise HookNotInModelError(f"the dictionary's {field} {name!r} is not a hook point of this model "
                                      f"({getattr(model.cfg, 'model_name', type(model).__name__)}): {fix}")
        if name.endswith("attn.hook_z") and cfg.reshape_activations != "hook_z":
            raise DimensionMismatchError(f"{name} is [..., n_heads, d_head]; a dictionary there must flatten it: "
                                         "reshape_activations='hook_z'")
        have = _hook_width(model, name)
        if have is None:
            have = _probe_width(model, name)
        if have is not None and have != width:
            what = "d_in" if field == "hook_name" else "d_out"
            raise DimensionMismatchError(f"the dictionary's {what} is {width}, but {name} in this model is {have} "
                                         f"wide: it was trained for another model or another hook (its model_name: "
                                         f"{cfg.model_name!r})")
    if cfg.metadata.get("reads_norm_output") and cfg.hook_name.endswith("hook_normalized"):
        norm = model.get_submodule(cfg.hook_name.rsplit(".", 1)[0])
        weight, bias = getattr(norm, "effective_weight", None), getattr(norm, "b", None)
        unfolded = (weight is not None and not torch.all(weight == 1)) or (bias is not None and torch.any(bias != 0))
        if unfolded:
            raise NormNotFoldedError(
                f"this dictionary reads the sublayer's input, after {norm.__class__.__name__}'s weights; in this "
                f"model {cfg.hook_name} is before them. Load the model with fold_ln=True (models.load(..., "
                "fold_ln=True)) so the two are the same")
