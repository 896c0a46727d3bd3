"""Hook points and the run_with_hooks / run_with_cache machinery.

A `HookPoint` is an identity module placed where an activation is worth reading or
replacing. Its cost when nothing is attached is one attribute check, so a model full
of hook points runs as fast as one without (DESIGN.md, "pay only for what you hook").
Components ask `hook.active` before computing anything that exists only to be hooked
(attention patterns, per-head results).

Hook functions follow TransformerLens: `fn(tensor, hook) -> tensor | None`; returning a
tensor replaces the activation. Backward hooks get the gradient of the activation.
A forward hook added with `read_only=True` (or whose function has `read_only = True`, as
the caching hooks do) promises to neither replace nor change the activation, which lets a
component compute it the cheap way (attention keeps its fused kernel for a cached pattern).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from interp.names import HookNameError, resolve_key, unknown_name_error
from interp.offload import Offload

HookFn = Callable[..., "torch.Tensor | None"]
NameSpec = "str | tuple | Callable[[str], bool]"


@dataclass(eq=False)
class HookHandle:
    """Removes exactly the hook it was returned for, and nothing else."""

    hook_point: "HookPoint"
    fn: HookFn
    direction: str
    permanent: bool = False
    read_only: bool = False  # the hook neither replaces nor changes the activation
    last: bool = False  # runs after every other hook here (a spliced dictionary, interp.sae.splice)

    def remove(self) -> None:
        hooks = self.hook_point._hooks[self.direction]
        for i, h in enumerate(hooks):
            if h is self:
                del hooks[i]
                return


class HookPoint(nn.Module):
    """Identity on a tensor; hooks attached here see and may replace it."""

    def __init__(self) -> None:
        super().__init__()
        self.name: str | None = None
        self._hooks: dict[str, list[HookHandle]] = {"fwd": [], "bwd": []}
        # Scratch space for hook functions that need state across calls (TL has the same).
        self.ctx: dict = {}

    @property
    def active(self) -> bool:
        return bool(self._hooks["fwd"] or self._hooks["bwd"] or self._forward_hooks)

    @property
    def read_only(self) -> bool:
        """Does every hook here only read? Forward hooks added read-only, and no backward or plain torch
        hook (a gradient must flow through the activation the forward really used)."""
        return (all(h.read_only for h in self._hooks["fwd"]) and not self._hooks["bwd"]
                and not self._forward_hooks and not self._forward_pre_hooks)

    def layer(self) -> int:
        """The layer of a hook point inside a block (`blocks.3.attn.hook_z` -> 3), as TransformerLens has it."""
        parts = (self.name or "").split(".")
        for i, part in enumerate(parts[:-1]):
            if part == "blocks" and parts[i + 1].isdigit():
                return int(parts[i + 1])
        raise ValueError(f"hook point {self.name!r} is not inside a block (blocks.<layer>....), so it has no layer")

    def add_hook(self, fn: HookFn, dir: str = "fwd", is_permanent: bool = False, prepend: bool = False,
                 read_only: bool = False) -> HookHandle:
        """read_only: `fn` returns None (or its input) and never writes into the tensor; also taken from
        `fn.read_only`. The activation may then be computed off the forward's own path."""
        if dir not in ("fwd", "bwd"):
            raise ValueError(f"dir must be 'fwd' or 'bwd', got {dir!r}")
        if not callable(fn):
            raise TypeError(f"hook for {self.name} must be callable, got {type(fn).__name__}")
        handle = HookHandle(self, fn, dir, is_permanent, read_only or bool(getattr(fn, "read_only", False)))
        if prepend:
            self._hooks[dir].insert(0, handle)
        else:
            self._hooks[dir].append(handle)
        return handle

    def remove_hooks(self, dir: str = "both", including_permanent: bool = False) -> None:
        for d in ("fwd", "bwd") if dir == "both" else (dir,):
            self._hooks[d] = [h for h in self._hooks[d] if h.permanent and not including_permanent]

    def clear_context(self) -> None:
        self.ctx.clear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fwd = list(self._hooks["fwd"])
        n = len(fwd)
        while n and fwd[n - 1].last:  # hooks that run last run after the backward hooks are set, below
            n -= 1
        for handle in fwd[:n]:
            out = handle.fn(x, hook=self)
            if out is not None:
                x = out
        x = self._with_bwd(x)
        for handle in fwd[n:]:
            out = handle.fn(x, hook=self)
            if out is not None:
                x = out
        return x

    def _with_bwd(self, x: torch.Tensor) -> torch.Tensor:
        if self._hooks["bwd"] and torch.is_grad_enabled():
            if not x.requires_grad:
                # Nothing upstream needs a gradient, so a fresh leaf loses nothing and
                # the graph is built only from here on.
                x = x.detach().requires_grad_(True)
            bwd = list(self._hooks["bwd"])

            def run_bwd(grad: torch.Tensor) -> torch.Tensor:
                for handle in bwd:
                    out = handle.fn(grad, hook=self)
                    if out is not None:
                        grad = out
                return grad

            x.register_hook(run_bwd)
        return x

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # Skip nn.Module.__call__ (a few microseconds, hundreds of times a forward)
        # unless someone registered plain torch hooks on this module.
        if self._forward_hooks or self._forward_pre_hooks:
            return super().__call__(x)
        if not (self._hooks["fwd"] or self._hooks["bwd"]):
            return x
        return self.forward(x)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, fwd={len(self._hooks['fwd'])}, bwd={len(self._hooks['bwd'])}"


class HookedRootModule(nn.Module):
    """Mixin for a model whose submodules include HookPoints.

    Call `setup_hooks()` at the end of `__init__` to name every hook point after its
    module path. Everything else here works on those names.
    """

    hook_dict: dict[str, HookPoint]
    # Hook points that `names_filter=None` leaves out because caching them costs far
    # more than the forward computes anyway (per-head attention results: n_heads times
    # attn_out). Name them, or pass a filter function, to cache them.
    opt_in_hooks: tuple[str, ...] = ()

    def setup_hooks(self) -> None:
        self.hook_dict = {}
        for name, module in self.named_modules():
            if isinstance(module, HookPoint):
                module.name = name
                self.hook_dict[name] = module

    # ------------------------------------------------------------------ lookup
    def hook_points(self) -> list[HookPoint]:
        return list(self.hook_dict.values())

    def resolve_hook_names(self, spec) -> list[str]:
        """Hook names meant by `spec`: a name, a short key tuple, a list of those, or a filter function."""
        if spec is None:
            return list(self.hook_dict)
        if callable(spec) and not isinstance(spec, (str, tuple)):
            return [n for n in self.hook_dict if spec(n)]
        if isinstance(spec, tuple) and spec and all(isinstance(s, str) and "." in s for s in spec):
            spec = list(spec)  # a tuple of full names, not a short key
        if isinstance(spec, (str, tuple)):
            spec = [spec]
        names = []
        for item in spec:
            # A real hook name wins over a short key it spells (an attached model's `embed` module
            # is not `hook_embed`).
            name = item if isinstance(item, str) and item in self.hook_dict else resolve_key(item)
            if name not in self.hook_dict:
                raise unknown_name_error(name, self.hook_dict)
            names.append(name)
        return names

    # ------------------------------------------------------------------ adding and removing
    def add_hook(self, name, fn: HookFn, dir: str = "fwd", is_permanent: bool = False, prepend: bool = False,
                 read_only: bool = False) -> list[HookHandle]:
        names = self.resolve_hook_names(name)
        if not names:
            raise HookNameError(f"hook filter {name!r} matched no hook point")
        # Passed only when set: subclasses' points (interp.attach) may not take it; fn.read_only reaches them.
        marks = {"read_only": True} if read_only else {}
        return [self.hook_dict[n].add_hook(fn, dir=dir, is_permanent=is_permanent, prepend=prepend, **marks)
                for n in names]

    def add_perma_hook(self, name, fn: HookFn, dir: str = "fwd") -> list[HookHandle]:
        return self.add_hook(name, fn, dir=dir, is_permanent=True)

    def reset_hooks(self, including_permanent: bool = False, clear_contexts: bool = True) -> None:
        for hp in self.hook_dict.values():
            hp.remove_hooks("both", including_permanent=including_permanent)
            if clear_contexts:
                hp.clear_context()

    @contextlib.contextmanager
    def hooks(
        self,
        fwd_hooks: Sequence[tuple] = (),
        bwd_hooks: Sequence[tuple] = (),
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
    ) -> Iterator["HookedRootModule"]:
        """Attach hooks for the body of a `with` block; they are removed on exit, exception or not.

        Only the hooks added here are removed: hooks added elsewhere stay.
        """
        handles: list[HookHandle] = []
        try:
            for direction, pairs in (("fwd", fwd_hooks), ("bwd", bwd_hooks)):
                for name, fn in pairs:
                    handles.extend(self.add_hook(name, fn, dir=direction))
            yield self
        finally:
            if reset_hooks_end:
                for handle in handles:
                    handle.remove()
                if clear_contexts:
                    for hp in self.hook_dict.values():
                        hp.clear_context()

    def saes(self, saes, use_error_term: bool | None = None):
        """`with model.saes([sae]):` splices sparse dictionaries in for the block (interp.sae.splice)."""
        from interp.sae.splice import splice

        return splice(self, saes, use_error_term=use_error_term)

    def run_with_hooks(
        self,
        *model_args,
        fwd_hooks: Sequence[tuple] = (),
        bwd_hooks: Sequence[tuple] = (),
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
        **model_kwargs,
    ):
        """Run the model with temporary hooks; `fwd_hooks` is a list of `(name_or_filter, fn)`."""
        if bwd_hooks and reset_hooks_end:
            raise ValueError(
                "backward hooks would be removed before you call .backward(); pass "
                "reset_hooks_end=False, use `with model.hooks(bwd_hooks=...)`, or "
                "run_with_cache(..., incl_bwd=True)"
            )
        with self.hooks(fwd_hooks, bwd_hooks, reset_hooks_end=reset_hooks_end, clear_contexts=clear_contexts):
            return self(*model_args, **model_kwargs)

    # ------------------------------------------------------------------ caching
    def get_caching_hooks(
        self,
        names_filter=None,
        incl_bwd: bool = False,
        device=None,
        dtype: torch.dtype | None = None,
        remove_batch_dim: bool = False,
        cache: dict | None = None,
        offload: Offload | None = None,
    ) -> tuple[dict, list[tuple], list[tuple]]:
        """Hooks that store activations (and gradients, as `name + "_grad"`) into a dict.

        The forward hooks are read-only (a cached pattern keeps the fused attention kernel).
        `device`/`dtype` copies are made by `offload` when given (its device and dtype then apply;
        run_with_cache passes one that copies a GPU run to the host without stalling, and waits for it at
        the end), else synchronously, so the dict is complete when the forward returns.
        """
        cache = {} if cache is None else cache
        names = self.resolve_hook_names(names_filter)
        if names_filter is None and self.opt_in_hooks:
            names = [n for n in names if not n.endswith(self.opt_in_hooks)]
        if offload is None and (device is not None or dtype is not None):
            offload = Offload(device, dtype, asynchronous=False)

        def store(key: str, original: torch.Tensor, hold: bool = False) -> None:
            # One tensor reachable under two names (resid_post of layer l is resid_pre of l+1) is
            # converted and stored once: the Offload remembers what it converted.
            tensor = original.detach() if offload is None else offload(original, hold=hold)
            if remove_batch_dim:
                if tensor.shape[0] != 1:
                    raise ValueError(f"remove_batch_dim needs batch size 1, {key} has batch {tensor.shape[0]}")
                tensor = tensor[0]
            cache[key] = tensor

        def fwd_fn(tensor, hook):
            store(hook.name, tensor)

        fwd_fn.read_only = True

        def bwd_fn(grad, hook):
            # Held until the copy is made: with no other reference autograd may add the next gradient
            # into this very tensor, before a queued copy has read it.
            store(hook.name + "_grad", grad, hold=True)

        fwd = [(n, fwd_fn) for n in names]
        bwd = [(n, bwd_fn) for n in names] if incl_bwd else []
        return cache, fwd, bwd

    def run_with_cache(
        self,
        *model_args,
        names_filter=None,
        device=None,
        dtype: torch.dtype | None = None,
        incl_bwd: bool = False,
        backward_metric: Callable[[torch.Tensor], torch.Tensor] | None = None,
        remove_batch_dim: bool = False,
        return_cache_object: bool = True,
        **model_kwargs,
    ):
        """Run the model and return `(output, cache)` of the activations named by `names_filter`.

        `names_filter=None` caches every hook point except the opt-in ones
        (`opt_in_hooks`, e.g. per-head `hook_result`); a name, list, short key or filter
        function caches exactly what it names.

        `device`/`dtype` say where and how the stored copies live (the model's own
        activations are untouched). A GPU run cached to `device="cpu"` is copied into pinned
        memory by a side stream while the forward goes on, with one wait at the end
        (interp.offload). With `incl_bwd=True` gradients are cached too:
        `backward_metric(output)` (or the output itself, if scalar) is differentiated.
        Without it no autograd graph is built.
        """
        from interp.cache import ActivationCache

        offload = Offload(device, dtype) if device is not None or dtype is not None else None
        store, fwd, bwd = self.get_caching_hooks(
            names_filter, incl_bwd=incl_bwd, device=device, dtype=dtype, remove_batch_dim=remove_batch_dim,
            offload=offload,
        )
        with self.hooks(fwd, bwd):
            if incl_bwd:
                with torch.enable_grad():
                    out = self(*model_args, **model_kwargs)
                    target = backward_metric(out) if backward_metric is not None else out
                    if not isinstance(target, torch.Tensor) or target.numel() != 1:
                        raise ValueError(
                            "incl_bwd=True needs a scalar to differentiate: pass backward_metric="
                            "lambda logits: ... returning a scalar, or return_type='loss'"
                        )
                    if not target.requires_grad:
                        raise ValueError("the backward metric does not depend on any cached activation")
                    target.backward()
                out = out.detach() if isinstance(out, torch.Tensor) else out
            else:
                out = self(*model_args, **model_kwargs)
        if offload is not None:
            # The one wait of the run. After an exception nothing waits: the copies still in flight write
            # into buffers nobody holds, and record_stream keeps their sources alive until they are done.
            offload.finish()
        if not return_cache_object:
            return out, store
        return out, ActivationCache(store, self, has_batch_dim=not remove_batch_dim)


def hook_names_matching(names: Iterable[str], pattern: str) -> list[str]:
    """Names ending with `pattern` (e.g. "hook_pattern"), in model order."""
    return [n for n in names if n.endswith(pattern)]
