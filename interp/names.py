"""Hook names: short keys (`("pattern", 3)`) and helpful errors for names that do not exist."""

from __future__ import annotations

import difflib
from typing import Iterable

# Short name -> (template, needs a layer). Mirrors TransformerLens' get_act_name so that
# `cache["pattern", 3]` means what a TL user expects.
_ATTN = {"q", "k", "v", "z", "rot_q", "rot_k", "pattern", "attn_scores", "result"}
_BLOCK = {"resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "normalized_resid_post",
          "mlp_in", "attn_in", "q_input", "k_input", "v_input"}
_MLP = {"pre", "post", "pre_linear"}
_ALIASES = {
    "attn": "pattern",
    "scores": "attn_scores",
    "mlp_pre": "pre",
    "mlp_post": "post",
    "mlp_pre_linear": "pre_linear",
    "rotated_q": "rot_q",
    "rotated_k": "rot_k",
}
_TOP = {"embed": "hook_embed", "pos_embed": "hook_pos_embed", "token_type_embed": "hook_token_type_embed"}


class HookNameError(KeyError):
    """A hook name that the model (or cache) does not have."""

    def __str__(self) -> str:  # KeyError would repr() the message and add quotes
        return str(self.args[0])


def act_name(name: str, layer: int | None = None, layer_type: str | None = None) -> str:
    """Full hook name for a short key, e.g. `act_name("pattern", 3)` -> `blocks.3.attn.hook_pattern`.

    `layer_type` picks the norm for `scale`/`normalized`: "ln1", "ln2" (needs a layer) or
    "ln_final" (the default without a layer). Full names pass through unchanged.
    """
    if "." in name or name.startswith("hook_"):
        if layer is not None or layer_type is not None:
            raise HookNameError(
                f"{name!r} is a full hook name and takes no layer (got {layer!r}); to name several hooks pass a list"
            )
        return name
    key = _ALIASES.get(name, name)
    if key in _TOP and layer is None:
        return _TOP[key]
    if key in ("scale", "normalized"):
        if layer is None:
            return f"{layer_type or 'ln_final'}.hook_{key}"
        if layer_type is None:
            raise HookNameError(f"short key ({name!r}, {layer}) needs a norm: pass 'ln1' or 'ln2'")
        return f"blocks.{layer}.{layer_type}.hook_{key}"
    if layer is None:
        raise HookNameError(f"short key {name!r} needs a layer index, e.g. ({name!r}, 0)")
    if key in _ATTN:
        return f"blocks.{layer}.attn.hook_{key}"
    if key in _BLOCK:
        return f"blocks.{layer}.hook_{key}"
    if key in _MLP:
        return f"blocks.{layer}.mlp.hook_{key}"
    raise HookNameError(
        f"unknown short hook key {name!r}; known: {sorted(_ATTN | _BLOCK | _MLP | set(_TOP) | set(_ALIASES))}"
    )


def resolve_key(key) -> str:
    """A cache/hook key given as a name or as a tuple `(name, layer[, layer_type])`."""
    if isinstance(key, tuple):
        return act_name(*key)
    if isinstance(key, str):
        return act_name(key) if key in _TOP else key
    raise TypeError(f"hook keys are strings or (name, layer) tuples, got {type(key).__name__}")


def closest_names(name: str, known: Iterable[str], n: int = 5) -> list[str]:
    known = list(known)
    matches = difflib.get_close_matches(name, known, n=n, cutoff=0.5)
    if len(matches) < n:
        # The tail of a name (`hook_patern`) usually says more than its layer prefix.
        tail = name.rsplit(".", 1)[-1]
        extra = [k for k in difflib.get_close_matches(tail, [k.rsplit(".", 1)[-1] for k in known], n=3)]
        for k in known:
            if len(matches) >= n:
                break
            if k.rsplit(".", 1)[-1] in extra and k not in matches and k.split(".")[:2] == name.split(".")[:2]:
                matches.append(k)
    return matches


def unknown_name_error(name: str, known: Iterable[str], what: str = "hook point") -> HookNameError:
    known = list(known)
    close = closest_names(name, known)
    hint = f" Closest: {', '.join(close)}." if close else f" The model has {len(known)} hook points."
    return HookNameError(f"no {what} named {name!r}.{hint}")
