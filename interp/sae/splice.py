"""Splicing sparse dictionaries into a hooked model: the model runs through them for a `with` block.

    with splice(model, [sae], use_error_term=True):          # or: with model.saes([sae], use_error_term=True)
        logits, cache = model.run_with_cache(tokens)
    cache["blocks.8.hook_resid_post.hook_sae_acts_post"]      # [batch, pos, d_sae]
    run_with_saes(model, tokens, [sae])                       # SAELens's calls
    run_with_cache_with_saes(model, tokens, [sae], names_filter=lambda n: "hook_sae" in n)

How: a hook on the model's own hook point replaces the activation by `sae(x)`. A transcoder reads one
hook (`cfg.hook_name`, e.g. `blocks.8.ln2.hook_normalized`) and writes another (`cfg.out_hook_name`,
`blocks.8.hook_mlp_out`): its input is captured at the first and the second's activation is replaced by
`sae(x_in, target=true output)`. These hooks run last at their points (`fn.runs_last`, interp.hooks), so
every other hook there, added before or during the splice, sees and may edit what the dictionary reads:
`blocks.8.hook_resid_post` keeps meaning the model's activation (the dictionary's input), and
`....hook_sae_output` is what the model goes on with. They are permanent, so `model.reset_hooks()` in the
block leaves them; everything is undone when the block ends, exception or not.

While spliced the dictionary's hook points are the model's: `model.hook_dict["<hook>.hook_sae_acts_post"]`
(the prefix is `cfg.hook_name`, the hook a dictionary reads, for transcoders too), named so in caches,
`model.hooks(...)`, `run_with_hooks`, and the patching sites (interp.patching: kind="sae_acts_post").

With the error term (`use_error_term=True`) the output is recons + (true output - recons): the model's own
output, so logits are unchanged, while an edit of a latent still reaches the output through recons.
`use_error_term=None` leaves each dictionary's own `use_error_term`. A dictionary that does not fit the
model (unknown hook, other width) is refused before anything is attached (interp.sae.formats.check_fits),
and the widths are checked again when the first activation arrives (for hooks the config cannot size).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch

from interp.sae.dictionary import SparseDictionary
from interp.sae.fitting import DimensionMismatchError, check_fits

SAE_HOOKS = ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons", "hook_sae_error",
             "hook_sae_output")
_REGISTRY = "_spliced_dictionaries"  # attribute on the model: {prefix: Spliced}, only while something is spliced


class SpliceError(ValueError):
    """Dictionaries that cannot be spliced together (a clash of names or outputs), or patching that needs one spliced.
    A dictionary that does not fit the model raises interp.sae.formats' DictionaryMismatchError (HookNotInModelError,
    DimensionMismatchError)."""


@dataclass
class Spliced:
    """A dictionary spliced into a model: where it reads and writes, and where its hook points live."""

    dictionary: SparseDictionary
    prefix: str  # its hook points are f"{prefix}.hook_sae_acts_post", ...
    reads: str
    writes: str
    layer: int | None  # the block holding `reads` (a resumed patching row starts there); None outside the blocks
    _captured: dict = field(default_factory=dict, repr=False)  # a transcoder's input between its two hooks

    def hook(self, name: str) -> str:
        """The model's name of one of the dictionary's hook points: "acts_post" or "hook_sae_acts_post"."""
        short = name if name.startswith("hook_sae_") else f"hook_sae_{name}"
        if short not in SAE_HOOKS:
            raise ValueError(f"a dictionary's hook points are {', '.join(SAE_HOOKS)}; got {name!r}")
        return f"{self.prefix}.{short}"

    @property
    def d_sae(self) -> int:
        return self.dictionary.cfg.d_sae


def spliced(model) -> list[Spliced]:
    """The dictionaries spliced into `model` now, in splice order."""
    return list(model.__dict__.get(_REGISTRY, {}).values())


def _as_list(saes) -> list:
    if isinstance(saes, SparseDictionary):
        return [saes]
    if isinstance(saes, dict):  # {name: dictionary}, as some loaders return them
        return list(saes.values())
    return list(saes)


def _fit(x: torch.Tensor, width: int, where: str, what: str, sae: SparseDictionary) -> None:
    """A named error unless x [..., width] (or [..., n_heads, d_head] for a hook_z dictionary) fits the dictionary.
    check_fits saw the width at splice time where the config or a probe could tell it; this is the first use."""
    if x.shape[-1] == width:
        return
    if sae.cfg.reshape_activations == "hook_z" and x.dim() >= 2 and x.shape[-2] * x.shape[-1] == width:
        return
    raise DimensionMismatchError(f"{where} holds activations of shape {tuple(x.shape)} in this model, but the "
                                 f"dictionary's {what} is {width} ({sae.cfg!r}): it was made for another model or "
                                 f"another hook; load the dictionary for this model, or give the hook whose width is "
                                 f"{width}")


def _run(sae: SparseDictionary, x: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    device = sae.W_enc.device
    out = sae(x.to(device), None if target is None else target.to(device))
    return out.to(x.device)


def _hooks_for(entry: Spliced):
    """(reads hook fn or None, writes hook fn) that run the dictionary in the model's forward."""
    sae, cfg = entry.dictionary, entry.dictionary.cfg

    if not cfg.is_transcoder:
        def replace(x, hook):
            _fit(x, cfg.d_in, entry.reads, "d_in", sae)
            return _run(sae, x, None)

        replace.runs_last = True
        return None, replace

    captured = entry._captured

    def capture(x, hook):
        captured["x"] = x  # read by `write` in this forward (popped there, so never reused by a later one)

    def write(y, hook):
        x = captured.pop("x", None)
        if x is None or x.shape[:2] != y.shape[:2]:
            raise SpliceError(f"the transcoder writing {entry.writes} found no input from {entry.reads} in this "
                              f"forward: {entry.reads} must run before {entry.writes} (a run resumed between them, "
                              "or a hook order that skips the read, cannot use it)")
        _fit(x, cfg.d_in, entry.reads, "d_in", sae)
        _fit(y, cfg.d_out, entry.writes, "d_out", sae)
        return _run(sae, x, y)

    capture.runs_last = write.runs_last = True
    return capture, write


@contextlib.contextmanager
def splice(model, saes, use_error_term: bool | None = None) -> Iterator:
    """Splice one or more dictionaries into `model` for a `with` block (see the module docstring); yields the model.

    A dictionary already spliced into this model stays as it is (the outer splice's settings hold).
    """
    registry = model.__dict__.setdefault(_REGISTRY, {})
    undo: list = []
    try:
        for sae in _as_list(saes):
            if not isinstance(sae, SparseDictionary):
                raise TypeError(f"splice takes SparseDictionary objects (interp.sae), got {type(sae).__name__}")
            if any(e.dictionary is sae for e in registry.values()):
                continue
            entry = _attach(model, sae, registry)
            undo.append(_make_splice(model, entry, registry, use_error_term))
        yield model
    finally:
        for fn in reversed(undo):
            fn()
        if not registry:
            model.__dict__.pop(_REGISTRY, None)


def _attach(model, sae: SparseDictionary, registry: dict) -> Spliced:
    cfg = sae.cfg
    reads, writes = cfg.hook_name, cfg.writes_to
    check_fits(sae, model)  # hooks of the model, widths, norm weights: named errors before anything is attached
    prefix = reads
    if prefix in registry:
        raise SpliceError(f"another dictionary is already spliced at {prefix} ({registry[prefix].dictionary.cfg!r}): "
                          "their hook points would share names; splice one of them at a time")
    for other in registry.values():
        if other.writes == writes:
            raise SpliceError(f"{other.dictionary.cfg!r} already writes {writes}; two dictionaries replacing the same "
                              "activation would silently chain, so splice one of them at a time")
    try:
        layer = model.hook_dict[reads].layer()
    except (ValueError, AttributeError):
        layer = None
    return Spliced(sae, prefix, reads, writes, layer)


def _make_splice(model, entry: Spliced, registry: dict, use_error_term: bool | None):
    """Make the splice (registry, names, hook_dict entries, error term, hooks) and return what undoes it."""
    sae = entry.dictionary
    old_names = {name: sae.hook_dict[name].name for name in SAE_HOOKS}
    old_error = sae.use_error_term
    handles, added = [], []

    def undo():
        for handle in handles:
            handle.remove()
        entry._captured.clear()
        for full in added:  # only what the splice put there
            model.hook_dict.pop(full, None)
        for name in SAE_HOOKS:
            sae.hook_dict[name].name = old_names[name]
        sae.use_error_term = old_error
        registry.pop(entry.prefix, None)

    registry[entry.prefix] = entry
    try:
        for name in SAE_HOOKS:
            full = entry.hook(name)
            if full in model.hook_dict:
                raise SpliceError(f"{type(model).__name__} already has a hook point named {full}")
            point = sae.hook_dict[name]
            point.name = full  # caches and patching key activations by the point's own name
            model.hook_dict[full] = point
            added.append(full)
        if use_error_term is not None:
            sae.use_error_term = bool(use_error_term)
        read_fn, write_fn = _hooks_for(entry)
        if read_fn is not None:
            handles.append(model.hook_dict[entry.reads].add_hook(read_fn, is_permanent=True))
        handles.append(model.hook_dict[entry.writes].add_hook(write_fn, is_permanent=True))
    except BaseException:
        undo()
        raise
    return undo


# ---------------------------------------------------------------------- SAELens's calls
def run_with_saes(model, input, saes=(), *, use_error_term: bool | None = None, **model_kwargs):
    """model(input, **model_kwargs) with `saes` spliced in."""
    with splice(model, saes, use_error_term):
        return model(input, **model_kwargs)


def run_with_cache_with_saes(model, input, saes=(), *, use_error_term: bool | None = None, **kwargs):
    """model.run_with_cache(input, **kwargs) with `saes` spliced in: (output, cache), the latents included."""
    with splice(model, saes, use_error_term):
        return model.run_with_cache(input, **kwargs)


def run_with_hooks_with_saes(model, input, saes=(), *, use_error_term: bool | None = None, fwd_hooks=(),
                             bwd_hooks=(), **kwargs):
    """model.run_with_hooks(input, fwd_hooks=..., ...) with `saes` spliced in; hooks may name their points."""
    with splice(model, saes, use_error_term):
        return model.run_with_hooks(input, fwd_hooks=fwd_hooks, bwd_hooks=bwd_hooks, **kwargs)


# ---------------------------------------------------------------------- for interp.patching
def resolve(model, saes=None) -> list[Spliced]:
    """The spliced entries meant by `saes` (dictionaries or their prefixes; None: every spliced one)."""
    entries = spliced(model)
    if saes is None:
        if not entries:
            raise SpliceError("no dictionary is spliced into the model: pass saes=[...] or run inside "
                              "`with splice(model, saes):`")
        return entries
    out = []
    for item in _as_list(saes):
        match = [e for e in entries if e.dictionary is item or e.prefix == item]
        if not match:
            raise SpliceError(f"{item!r} is not spliced into the model; spliced: "
                              f"{', '.join(e.prefix for e in entries) or 'nothing'}")
        out.append(match[0])
    return out


@contextlib.contextmanager
def spliced_for(model, saes=None, use_error_term: bool = True) -> Iterator[list[Spliced]]:
    """The entries for `saes`, splicing (with the error term, so the unpatched runs are the model's) those
    not spliced yet; None: every dictionary spliced now."""
    if saes is None:
        yield resolve(model)
        return
    with splice(model, saes, use_error_term):
        yield resolve(model, saes)
