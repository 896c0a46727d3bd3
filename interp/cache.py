"""ActivationCache: the activations of one run, by hook name."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Iterator

import torch

from interp.cache_stacks import stack_cache
from interp.cache_tl import TransformerLensCacheMethods
from interp.devices import one_device
from interp.names import resolve_key, unknown_name_error
from interp.offload import Offload


def unique_nbytes(tensors) -> int:
    """Bytes held by the tensors, counting a storage shared by several only once."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
    return sum(seen.values())


class ActivationCache(TransformerLensCacheMethods, Mapping):
    """Activations keyed by hook name; also accepts short keys: `cache["pattern", 3]` (a negative layer
    counts from the end, as in TransformerLens) and TransformerLens' `get_act_name(...)` names.

    Gradients from `run_with_cache(incl_bwd=True)` live under `name + "_grad"`. TransformerLens'
    analysis methods (accumulated_resid, decompose_resid, stack_head_results, logit_attrs, ...)
    come from interp.cache_tl.
    """

    def __init__(self, cache_dict: dict[str, torch.Tensor], model, has_batch_dim: bool = True) -> None:
        self.cache_dict = cache_dict
        self.model = model
        self.has_batch_dim = has_batch_dim

    # ------------------------------------------------------------------ mapping
    def _key(self, key) -> str:
        if isinstance(key, str) and key in self.cache_dict:
            return key
        if isinstance(key, tuple) and len(key) >= 1 and isinstance(key[-1], str) and key[-1] == "grad":
            return resolve_key(self._layer_from_end(key[:-1])) + "_grad"
        return resolve_key(self._layer_from_end(key))

    def _layer_from_end(self, key):
        """(name, -1, ...) -> (name, n_layers - 1, ...), as TransformerLens' cache allows."""
        if isinstance(key, tuple) and len(key) > 1 and isinstance(key[1], int) and key[1] < 0:
            return (key[0], self.model.cfg.n_layers + key[1], *key[2:])
        return key

    def __getitem__(self, key) -> torch.Tensor:
        name = self._key(key)
        try:
            return self.cache_dict[name]
        except KeyError:
            hooks = getattr(self.model, "hook_dict", {})
            if name.endswith("hook_result") and name in hooks:
                raise KeyError(
                    f"{name!r} is opt-in (n_heads times the size of attn_out) and was not cached; use "
                    "cache.head_results(layer), which computes it from hook_z, or name it in names_filter"
                ) from None
            if name in hooks:
                raise KeyError(
                    f"{name!r} is a hook point of the model but was not cached; widen names_filter "
                    f"in run_with_cache (it cached {len(self.cache_dict)} activations)"
                ) from None
            raise unknown_name_error(name, self.cache_dict, what="cached activation") from None

    def __contains__(self, key) -> bool:
        try:
            return self._key(key) in self.cache_dict
        except (KeyError, TypeError):
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(self.cache_dict)

    def __len__(self) -> int:
        return len(self.cache_dict)

    def __repr__(self) -> str:
        return f"ActivationCache({len(self)} activations, {self.nbytes / 2**20:.1f} MiB)"

    def _store(self, name: str, tensor: torch.Tensor) -> None:
        """Add an activation computed after the run (compute_head_results); a stack's view
        (cache.decoder) writes it through to the whole cache as well."""
        self.cache_dict[name] = tensor
        parent = getattr(self, "_parent", None)
        if parent is not None:
            whole, prefix = parent
            whole._store(prefix + name, tensor)

    # ------------------------------------------------------------------ housekeeping
    @property
    def nbytes(self) -> int:
        """Memory held by the cache; tensors stored under several names count once."""
        return unique_nbytes(self.cache_dict.values())

    def to(self, device=None, dtype: torch.dtype | None = None) -> "ActivationCache":
        """The cache on `device` in `dtype` (floating point only); a tensor stored under two names is moved once.
        A CUDA cache bound for the host is copied through pinned memory by a side stream, with one wait at the
        end instead of one per tensor (interp.offload)."""
        offload = Offload(device, dtype)
        out = {k: offload(v) for k, v in self.cache_dict.items()}
        offload.finish()
        return ActivationCache(out, self.model, self.has_batch_dim)

    def remove_batch_dim(self) -> "ActivationCache":
        if not self.has_batch_dim:
            return self
        for k, v in self.cache_dict.items():
            if v.shape[0] != 1:
                raise ValueError(f"remove_batch_dim needs batch size 1; {k} has batch {v.shape[0]}")
        return ActivationCache({k: v[0] for k, v in self.cache_dict.items()}, self.model, has_batch_dim=False)

    # ------------------------------------------------------------------ the residual stream
    def residual_stream(self) -> torch.Tensor:
        """The stream read by each layer and the one leaving the last: `[n_layers + 1, batch, pos, d_model]`.

        Entry 0 is the embedding (as the first block reads it), entry l the output of
        block l-1; for post-LN encoders that is the normalised output. This is the
        stack `transformers` returns as `hidden_states`, except that its last entry has
        the final norm applied for pre-LN models.
        """
        n_layers = self.model.cfg.n_layers
        names = [f"blocks.{l}.hook_resid_pre" for l in range(n_layers)]
        names.append(self.model.block_output_hook_name(n_layers - 1))
        return torch.stack(one_device([self[n] for n in names]))

    def head_results(self, layer: int) -> torch.Tensor:
        """Each head's output `[batch, pos, n_heads, d_model]` (attn_out = their sum + b_O, except in
        families with a norm after attention, Gemma 2/3 and OLMo 2, where attn_out is ln1_post of it).

        The cached `hook_result` if there is one, else computed from the cached `hook_z`
        and the layer's W_O, so a default cache (which leaves hook_result out) has it too.
        """
        return self._head_results(layer, "attn")

    def cross_head_results(self, layer: int) -> torch.Tensor:
        """Each cross-attention head's output in a decoder block of an encoder-decoder (`cache.decoder`),
        `[batch, pos, n_heads, d_model]`: they sum to hook_cross_attn_out less the bias."""
        if not getattr(self.model.blocks[layer], "cross", False):
            raise ValueError(f"block {layer} has no cross-attention (only the decoder of an encoder-decoder has; "
                             "use cache.decoder)")
        return self._head_results(layer, "cross_attn")

    def _head_results(self, layer: int, owner: str) -> torch.Tensor:
        name = f"blocks.{layer}.{owner}.hook_result"
        if name in self.cache_dict:
            return self.cache_dict[name]
        z = self[f"blocks.{layer}.{owner}.hook_z"]  # [batch, pos, n_heads, d_head]
        W_O = getattr(self.model.blocks[layer], owner).W_O  # [n_heads, d_head, d_model]
        return torch.einsum("...hk,hkd->...hd", z, W_O.to(z.device, z.dtype))

    # ------------------------------------------------------------------ the stacks of an encoder-decoder
    @property
    def encoder(self) -> "ActivationCache":
        """The encoder's activations, names without "encoder." (interp.cache_stacks): TransformerLens'
        cache methods apply to it."""
        return stack_cache(self, "encoder")

    @property
    def decoder(self) -> "ActivationCache":
        """The decoder's activations, names without "decoder." (interp.cache_stacks), cross-attention included."""
        return stack_cache(self, "decoder")

    def stack_activation(self, activation_name: str, layer: int = -1, sublayer_type: str | None = None) -> torch.Tensor:
        """One activation for every layer before `layer` (default all), stacked on a new leading `layer`
        dimension (TransformerLens' signature; `sublayer_type` picks the norm for scale / normalized)."""
        layer = self.model.cfg.n_layers if layer is None or layer == -1 else layer
        keys = [(activation_name, l) if sublayer_type is None else (activation_name, l, sublayer_type)
                for l in range(layer)]
        return torch.stack(one_device([self[k] for k in keys]))
