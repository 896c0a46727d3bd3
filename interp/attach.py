"""Hooks on any `torch.nn.Module`, without changing its code: `interp.attach(model)`.

    hooked = attach(hf_model)                       # nothing registered yet: costs nothing
    out, cache = hooked.run_with_cache(input_ids=ids, names_filter=lambda n: n.startswith("model.layers."))
    hooked.run_with_hooks(input_ids=ids, fwd_hooks=[("model.layers.3.mlp", zero_fn)])
    hooked.detach()                                 # the model is exactly as it was

Every submodule's output is a hook point named by its module path (`model.layers.3.mlp`);
with `inputs=True` its first positional input too (`model.layers.3.mlp.input`). Outputs
that are tuples, lists, dicts, `ModelOutput`s or dataclasses are hooked at their first
tensor; `path[k]` names element k (an index, key or field), e.g. `model.layers.3[0]`. A
module called several times in one forward fires its hook point on every call, and
`path#k` names the k-th call alone (counted from 0 in each call of the wrapper).
The token embedding's output is also named `hook_embed`, as on the toolkit's own models,
so noise corruption and attribution patching start there.

Hook points are `HookPoint`s held by the wrapper, never added to the user's model; a
point registers a plain torch forward hook on its module only while it has hooks, and
removes exactly that handle when its last hook goes, so other hooks on the model (the
user's, `transformers`' own) are never touched and an unhooked forward costs nothing.
Cached activations are copies: an in-place edit later in the forward cannot change them.
"""

from __future__ import annotations

import dataclasses
import re

import torch
from torch import nn

from interp.hooks import HookedRootModule, HookHandle, HookPoint
from interp.names import unknown_name_error

_ELEMENT = re.compile(r"^(?P<base>.+?)(?:#(?P<call>\d+))?(?:\[(?P<elem>[^\]]+)\])?$")


def _first_tensor_key(out):
    """The key of the first tensor in a structured output (None for a tensor)."""
    if isinstance(out, torch.Tensor):
        return None
    if isinstance(out, (tuple, list)):
        for i, x in enumerate(out):
            if isinstance(x, torch.Tensor):
                return i
    elif isinstance(out, dict):
        for k, x in out.items():
            if isinstance(x, torch.Tensor):
                return k
    elif dataclasses.is_dataclass(out):
        for f in dataclasses.fields(out):
            if isinstance(getattr(out, f.name), torch.Tensor):
                return f.name
    raise TypeError(f"output of type {type(out).__name__} holds no tensor to hook")


def _get(out, key):
    if key is None:
        return out
    if isinstance(out, (tuple, list)):
        return out[int(key)]
    if isinstance(out, dict):
        return out[key]
    return getattr(out, key)


def _set(out, key, value):
    """`out` with element `key` replaced (a new tuple/list; dicts and dataclasses updated in place)."""
    if key is None:
        return value
    if isinstance(out, tuple):
        items = list(out)
        items[int(key)] = value
        return type(out)(*items) if hasattr(out, "_fields") else tuple(items)
    if isinstance(out, list):
        items = list(out)
        items[int(key)] = value
        return items
    if isinstance(out, dict):
        out[key] = value
        return out
    setattr(out, key, value)
    return out


class AttachedHandle(HookHandle):
    def remove(self) -> None:
        super().remove()
        self.hook_point._sync()


class AttachedHookPoint(HookPoint):
    """A hook point on a module of a model we do not own; registered with torch only while hooked."""

    def __init__(self, module: nn.Module, name: str, kind: str = "output",
                 element: str | None = None, call: int | None = None) -> None:
        super().__init__()
        self.name = name
        object.__setattr__(self, "_target", module)
        self.kind, self.element, self.call = kind, element, call
        self._torch_handle = None
        self._count_handle = None
        self._n = -1  # calls of the module seen in this forward, minus one

    def add_hook(self, fn, dir: str = "fwd", is_permanent: bool = False, prepend: bool = False,
                 read_only: bool = False) -> HookHandle:
        handle = super().add_hook(fn, dir, is_permanent, prepend, read_only=read_only)
        handle.__class__ = AttachedHandle
        self._sync()
        return handle

    def remove_hooks(self, dir: str = "both", including_permanent: bool = False) -> None:
        super().remove_hooks(dir, including_permanent)
        self._sync()

    def _sync(self) -> None:
        wanted = bool(self._hooks["fwd"] or self._hooks["bwd"])
        if wanted and self._torch_handle is None:
            if self.call is not None:
                self._count_handle = self._target.register_forward_pre_hook(self._count)
            if self.kind == "input":
                self._torch_handle = self._target.register_forward_pre_hook(self._on_input, with_kwargs=True)
            else:
                self._torch_handle = self._target.register_forward_hook(self._on_output)
        elif not wanted and self._torch_handle is not None:
            self._torch_handle.remove()
            self._torch_handle = None
            if self._count_handle is not None:
                self._count_handle.remove()
                self._count_handle = None

    def _count(self, module, args) -> None:
        self._n += 1

    def _this_call(self) -> bool:
        return self.call is None or self.call == self._n

    def _fire(self, value):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{self.name} is a {type(value).__name__}, not a tensor: hook one of its elements, "
                            f"e.g. {self.name}[0]")
        return HookPoint.forward(self, value)

    def _on_output(self, module, args, output):
        if not self._this_call():
            return None
        key = self.element if self.element is not None else _first_tensor_key(output)
        value = _get(output, key)
        new = self._fire(value)
        return None if new is value else _set(output, key, new)

    def _on_input(self, module, args, kwargs):
        if not self._this_call():
            return None
        if not args or not isinstance(args[0], torch.Tensor):
            raise TypeError(f"{self.name}: the module's first positional input is not a tensor")
        new = self._fire(args[0])
        return None if new is args[0] else ((new,) + tuple(args[1:]), kwargs)


@dataclasses.dataclass
class AttachedConfig:
    """What the toolkit's analyses read from `model.cfg`, for a model it did not build.

    n_layers: the length of the model's longest `ModuleList` (its blocks), unless given.
    causal: from a `transformers` config (`is_decoder`, or a causal-LM class), else True.
    """

    model_name: str
    n_layers: int
    causal: bool = True
    d_model: int | None = None
    attn_only: bool = False
    d_vocab: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    n_ctx: int | None = None  # longest input, where the config says (max_position_embeddings / n_positions)


def _infer_config(module: nn.Module, n_layers: int | None, causal: bool | None) -> AttachedConfig:
    if n_layers is None:
        lists = [len(m) for m in module.modules() if isinstance(m, nn.ModuleList)]
        n_layers = max(lists) if lists else 0
    hf = getattr(module, "config", None)
    if causal is None:
        name = type(module).__name__
        causal = bool(getattr(hf, "is_decoder", False)) or "CausalLM" in name or not (
            hf is not None and getattr(hf, "model_type", "") in ("bert", "roberta", "distilbert", "electra", "t5"))
    ids = {k: getattr(hf, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    ids = {k: v if isinstance(v, int) else None for k, v in ids.items()}  # some configs hold lists
    n_ctx = getattr(hf, "max_position_embeddings", None) or getattr(hf, "n_positions", None)
    return AttachedConfig(type(module).__name__, n_layers, causal, getattr(hf, "hidden_size", None),
                          d_vocab=getattr(hf, "vocab_size", None), n_ctx=n_ctx, **ids)


def _token_embedding(module: nn.Module) -> str | None:
    """Module path of the token embedding: `get_input_embeddings()` where defined, else the first nn.Embedding."""
    paths = {m: p for p, m in module.named_modules() if p}
    getter = getattr(module, "get_input_embeddings", None)
    if callable(getter):
        try:
            found = getter()
        except (NotImplementedError, AttributeError):
            found = None
        if found in paths:
            return paths[found]
    return next((p for m, p in paths.items() if isinstance(m, nn.Embedding)), None)


class Attached(HookedRootModule):
    """`module` with a hook point on every submodule's output (see the module docstring)."""

    def __init__(self, module: nn.Module, inputs: bool = False, n_layers: int | None = None,
                 causal: bool | None = None, tokenizer=None) -> None:
        super().__init__()
        object.__setattr__(self, "module", module)  # held, not registered: our state_dict stays empty
        self.cfg = _infer_config(module, n_layers, causal)
        self.tokenizer = tokenizer
        self._call_points: list[AttachedHookPoint] = []
        self.hook_dict = {}
        for path, sub in module.named_modules():
            if not path:
                continue
            self.hook_dict[path] = AttachedHookPoint(sub, path)
            if inputs:
                name = f"{path}.input"
                if name in dict(module.named_modules()):
                    raise ValueError(f"{name} names a submodule; cannot also name the input hook point")
                self.hook_dict[name] = AttachedHookPoint(sub, name, kind="input")
        self.embed_path = _token_embedding(module)
        if self.embed_path is not None:  # the toolkit's name for it, where noise and attribution's graph start
            self.hook_dict["hook_embed"] = AttachedHookPoint(module.get_submodule(self.embed_path), "hook_embed")

    # ------------------------------------------------------------------ text, with a tokenizer given
    def _tokenizer(self):
        from interp.tokens import NoTokenizerError

        if self.tokenizer is None:
            raise NoTokenizerError(f"this attached {type(self.module).__name__} has no tokenizer, so it cannot take "
                                   "strings: pass token ids, or attach(model, tokenizer=AutoTokenizer"
                                   ".from_pretrained(...))")
        return self.tokenizer

    def tokenize(self, text, prepend_bos: bool | None = None, padding_side: str | None = None,
                 truncate: bool = False):
        from interp.tokens import tokenize

        return tokenize(self._tokenizer(), text, n_ctx=self.cfg.n_ctx or 10 ** 9,
                        model_name=self.cfg.model_name, prepend_bos=prepend_bos, padding_side=padding_side,
                        truncate=truncate)

    def to_tokens(self, text, prepend_bos: bool | None = None, padding_side: str | None = None,
                  truncate: bool = False) -> torch.Tensor:
        return self.tokenize(text, prepend_bos, padding_side, truncate).tokens.to(self.device)

    def to_str_tokens(self, input, prepend_bos: bool | None = None):
        from interp.tokens import decode_each

        tokenizer = self._tokenizer()
        if isinstance(input, str):
            input = self.tokenize(input, prepend_bos).tokens[0]
        ids = torch.as_tensor(input)
        if ids.dim() == 2:
            return [decode_each(tokenizer, row.tolist()) for row in ids]
        return decode_each(tokenizer, ids.reshape(-1).tolist())

    def to_single_token(self, text: str) -> int:
        ids = self.tokenize(text, prepend_bos=False).tokens[0]
        if ids.numel() != 1:
            pieces = self.to_str_tokens(text, prepend_bos=False)
            raise ValueError(f"{text!r} is {ids.numel()} tokens, not one: {pieces}")
        return int(ids[0])

    @property
    def is_language_model(self) -> bool:
        """Whether the output is next-token logits: a causal model with an output embedding (an LM head)."""
        getter = getattr(self.module, "get_output_embeddings", None)
        head = getter() if callable(getter) else None
        return self.cfg.causal and (head is not None or type(self.module).__name__.endswith(("CausalLM", "LMHeadModel")))

    @property
    def W_E(self) -> torch.Tensor:
        """The token embedding matrix [d_vocab, d_model] (for noise scaled to it, as on our models)."""
        if self.embed_path is None:
            raise ValueError(f"found no token embedding (nn.Embedding) in {type(self.module).__name__}")
        return self.module.get_submodule(self.embed_path).weight

    @property
    def device(self) -> torch.device:
        param = next(self.module.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    def forward(self, *args, **kwargs):
        for point in self._call_points:
            point._n = -1  # `path#k` counts the calls of one forward of the wrapper
        return self.module(*args, **kwargs)

    def resolve_hook_names(self, spec) -> list[str]:
        # Element (`path[k]`) and call (`path#k`) points are made the first time they are named.
        items = [spec] if isinstance(spec, str) else spec if isinstance(spec, (list, tuple)) else []
        for name in items:
            if isinstance(name, str) and name not in self.hook_dict:
                self._make_point(name)
        return super().resolve_hook_names(spec)

    def _make_point(self, name: str) -> None:
        m = _ELEMENT.match(name)
        if m is None or m.group("base") not in self.hook_dict or not (m.group("call") or m.group("elem")):
            raise unknown_name_error(name, self.hook_dict)
        base = self.hook_dict[m.group("base")]
        elem = m.group("elem")
        point = AttachedHookPoint(base._target, name, base.kind, elem,
                                  int(m.group("call")) if m.group("call") else None)
        self.hook_dict[name] = point
        if point.call is not None:
            self._call_points.append(point)

    def run_with_cache(self, *args, incl_bwd: bool = False, **kwargs):
        """As `HookedRootModule.run_with_cache`; without `incl_bwd` the forward runs under `no_grad`, so a
        model with trainable weights builds no autograd graph for a cache nobody differentiates."""
        if incl_bwd:
            return super().run_with_cache(*args, incl_bwd=True, **kwargs)
        with torch.no_grad():
            return super().run_with_cache(*args, **kwargs)

    def get_caching_hooks(self, *args, **kwargs):
        # Copies, not views: the user's forward may edit an activation in place after we read it.
        cache, fwd, bwd = super().get_caching_hooks(*args, **kwargs)
        return cache, [(n, lambda t, hook, f=f: f(t.clone(), hook)) for n, f in fwd], bwd

    def attention_patterns(self, *args, **kwargs) -> list[torch.Tensor]:
        """Every layer's attention pattern `[batch, head, query, key]`, where the model exposes them.

        Attention weights are not a module output in most implementations (they are computed
        inside the attention module's forward), so they come from the model's own switch:
        `output_attentions=True` on `transformers` models. Feed them to `interp.views`.
        """
        try:
            with torch.no_grad():
                out = self(*args, output_attentions=True, **kwargs)
        except TypeError as e:
            if "output_attentions" not in str(e):
                raise
            raise ValueError(f"{type(self.module).__name__} does not expose attention patterns (its forward takes no "
                             "output_attentions); hook the module that computes them, e.g. return the weights from "
                             "your attention module and hook `path[1]`") from None
        att = getattr(out, "attentions", None)
        if not att or any(a is None for a in att):
            raise ValueError(f"{type(self.module).__name__} returned no attention weights: load it with "
                             "attn_implementation='eager' (fused attention kernels never form the pattern)")
        return list(att)

    def attention_view(self, text: str, layer: int, **kwargs):
        """A circuitsvis grid of one layer's heads on `text` (needs a tokenizer and exposed patterns)."""
        from interp.views import attention_heads

        ids = self.to_tokens(text)
        pattern = self.attention_patterns(input_ids=ids, **kwargs)[layer][0]  # [head, query, key]
        return attention_heads(pattern, self.to_str_tokens(ids[0]), [f"L{layer}H{h}" for h in range(pattern.shape[0])],
                               causal=self.cfg.causal, title=f"{self.cfg.model_name}, layer {layer}")

    def detach(self) -> nn.Module:
        """Remove every hook this wrapper added; returns the untouched module."""
        for point in self.hook_dict.values():
            point.remove_hooks("both", including_permanent=True)
        return self.module


def attach(module: nn.Module, inputs: bool = False, n_layers: int | None = None,
           causal: bool | None = None, tokenizer=None) -> Attached:
    """Make any module hookable by module path (see the module docstring).

    `n_layers` and `causal` describe the model to the patching engine (`hooked.cfg`); both
    are inferred when not given. With a (`transformers`) `tokenizer` the wrapper takes text
    like the toolkit's own models (`to_tokens`, `to_str_tokens`, word selectors, probes).
    Patch module outputs with a hook-name template:
    `activation_patch(hooked, clean_ids, corrupted_ids, kind="model.layers.{layer}", ...)`.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"attach needs a torch.nn.Module, got {type(module).__name__}")
    return Attached(module, inputs=inputs, n_layers=n_layers, causal=causal, tokenizer=tokenizer)
