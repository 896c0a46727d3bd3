"""TransformerLens' ActivationCache methods, with its signatures and semantics (ActivationCache inherits them).

    accum, labels = cache.accumulated_resid(apply_ln=True, return_labels=True)   # logit lens
    heads, labels = cache.stack_head_results(layer=-1, return_labels=True)
    dla = cache.logit_attrs(heads, " Mary", " John", pos_slice=-1)                 # direct logit attribution

As in TransformerLens: `apply_ln_to_stack` divides by the *cached* scale of the norm the
stack would meet (ln1 of `layer`, ln2 with `mlp_input`, or ln_final), centring first for
LayerNorm, and does not apply the norm's weight (fold it first, `fold_ln=True`, for logit
attribution, as TransformerLens' own warning says); `tokens_to_residual_directions` are
columns of W_U. With the final norm's scale frozen this way, the logit attributions of a
decomposition of the final stream sum to its logit difference, less the unembedding
biases' difference.

Families (docs/coming_from_transformerlens.md): post-LN encoders have no decomposition of
their stream into sublayer outputs (each sublayer's output is renormalised), so
`decompose_resid` and the head / full decompositions refuse them; parallel blocks have no
`resid_mid` (`incl_mid` / `mlp_input` refuse); families with a norm after each sublayer
(Gemma 2/3, OLMo 2) decompose into `attn_out` / `mlp_out`, but a head's result is not its
share of `attn_out`, so the full decomposition refuses them; MoE layers have no neurons.
An encoder-decoder has two streams: the methods apply to `cache.encoder` and `cache.decoder`
(interp.cache_stacks), where a decoder block's cross-attention is one more attention
component (its output, its heads, the stream after it, ln3 before the MLP).
"""

from __future__ import annotations

import torch

from interp.devices import one_device


class Slice:
    """TransformerLens' slice argument: None (everything), an int (one index, the dimension dropped), a tuple
    (start, stop[, step]), a Python slice, or a list / tensor of indices."""

    def __init__(self, spec=None) -> None:
        self.spec = spec.spec if isinstance(spec, Slice) else spec

    def apply(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        s = self.spec
        if s is None:
            return t
        if isinstance(s, int):
            return t.select(dim, s)
        if isinstance(s, tuple):
            s = slice(*s)
        if isinstance(s, slice):
            index = [slice(None)] * t.dim()
            index[dim] = s
            return t[tuple(index)]
        return t.index_select(dim if dim >= 0 else t.dim() + dim, torch.as_tensor(s, device=t.device))

    def indices(self, n: int) -> list[int]:
        return self.apply(torch.arange(n)).reshape(-1).tolist()


class TransformerLensCacheMethods:
    """Mixed into interp.cache.ActivationCache (which provides `self[...]`, `cache_dict`, `model`)."""

    # ------------------------------------------------------------------ helpers
    def _cfg(self):
        cfg = self.model.cfg
        if getattr(cfg, "encoder_decoder", False):
            raise ValueError("an encoder-decoder has two residual streams: call these methods on one stack, "
                             "cache.encoder or cache.decoder (e.g. cache.decoder.accumulated_resid())")
        return cfg

    def _cross(self, layer: int) -> bool:
        """Whether block `layer` has cross-attention (a decoder block of an encoder-decoder)."""
        return getattr(self.model.blocks[layer], "cross", False)

    def _mlp_input_name(self, layer: int) -> str:
        """The stream the MLP of `layer` reads: resid_mid, or after cross-attention resid_mid_cross."""
        return f"blocks.{layer}.hook_resid_mid_cross" if self._cross(layer) else f"blocks.{layer}.hook_resid_mid"

    def _layer(self, layer) -> int:
        n = self._cfg().n_layers
        return n if layer is None or layer == -1 else int(layer)

    def _no_mid(self, what: str) -> None:
        if getattr(self._cfg(), "parallel_attn_mlp", False):
            raise ValueError(f"{what}: {self.model.cfg.model_name} runs attention and MLP in parallel from "
                             "resid_pre, so it has no resid_mid")

    def _additive(self, what: str) -> None:
        if getattr(self._cfg(), "post_ln", False):
            raise ValueError(f"{what}: in a post-LN model (BERT, BART, Marian) every sublayer's output is "
                             "renormalised, so the stream is not a sum of component outputs; use "
                             "interp.shift.decompose, which linearises each norm at its real scale")
        if getattr(self.model, "ln_embed", None) is not None:
            raise ValueError(f"{what}: {self.model.cfg.model_name} normalises its embeddings before the first "
                             "block, so the stream is not the sum of the embeddings and the sublayer outputs")

    def _final_output(self) -> torch.Tensor:
        n = self._cfg().n_layers
        return self[self.model.block_output_hook_name(n - 1)]

    # ------------------------------------------------------------------ stacks of the residual stream
    def accumulated_resid(self, layer: int | None = None, incl_mid: bool = False, apply_ln: bool = False,
                          pos_slice=None, mlp_input: bool = False, return_labels: bool = False):
        """The stream as each layer reads it (and resid_mid with `incl_mid`), up to the input of `layer`
        (default: every layer and the final stream, "final_post"): `[components, *batch, pos, d_model]`."""
        pos_slice = Slice(pos_slice)
        n = self._cfg().n_layers
        layer = self._layer(layer)
        if incl_mid or mlp_input:
            self._no_mid("accumulated_resid(incl_mid / mlp_input)")
        parts, labels = [], []
        for l in range(layer + 1):
            if l == n:
                parts.append(self._final_output())
                labels.append("final_post")
                continue
            parts.append(self["resid_pre", l])
            labels.append(f"{l}_pre")
            if (incl_mid and l < layer) or (mlp_input and l == layer):
                parts.append(self["resid_mid", l])
                labels.append(f"{l}_mid")
                if self._cross(l):
                    parts.append(self[f"blocks.{l}.hook_resid_mid_cross"])
                    labels.append(f"{l}_mid_cross")
        stack = torch.stack(one_device([pos_slice.apply(p, dim=-2) for p in parts]))
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice, mlp_input=mlp_input,
                                           has_batch_dim=self.has_batch_dim, recompute_ln=layer == n)
        return (stack, labels) if return_labels else stack

    def decompose_resid(self, layer: int | None = None, mlp_input: bool = False, mode: str = "all",
                        apply_ln: bool = False, pos_slice=None, incl_embeds: bool = True,
                        return_labels: bool = False):
        """The stream entering `layer` as the sum of the embeddings and each earlier attention and MLP output
        (`mode` "all", "attn" or "mlp"; a decoder block's cross-attention counts as attention); with
        `mlp_input`, layer's own attention output too."""
        self._additive("decompose_resid")
        if mode not in ("all", "attn", "mlp"):
            raise ValueError(f"mode must be 'all', 'attn' or 'mlp', got {mode!r}")
        pos_slice = Slice(pos_slice)
        cfg = self._cfg()
        layer = self._layer(layer)
        incl_attn, incl_mlp = mode != "mlp", mode != "attn" and not cfg.attn_only
        parts, labels = [], []
        if incl_embeds:
            for key, label in (("hook_embed", "embed"), ("hook_pos_embed", "pos_embed"),
                               ("hook_token_type_embed", "token_type_embed")):
                if key in self.cache_dict:
                    parts.append(self[key])
                    labels.append(label)
        for l in range(layer + (1 if mlp_input else 0)):
            if incl_attn:
                parts.append(self["attn_out", l])
                labels.append(f"{l}_attn_out")
                if self._cross(l):
                    parts.append(self[f"blocks.{l}.hook_cross_attn_out"])
                    labels.append(f"{l}_cross_attn_out")
            if incl_mlp and l < layer:
                parts.append(self["mlp_out", l])
                labels.append(f"{l}_mlp_out")
        stack = torch.stack(one_device([pos_slice.apply(p, dim=-2) for p in parts]))
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice, mlp_input=mlp_input)
        return (stack, labels) if return_labels else stack

    def compute_head_results(self) -> None:
        """Put every layer's per-head results (z @ W_O, `[*batch, pos, n_heads, d_model]`) in the cache."""
        for l in range(self._cfg().n_layers):
            name = f"blocks.{l}.attn.hook_result"
            if name not in self.cache_dict:
                self._store(name, self.head_results(l))
            cross = f"blocks.{l}.cross_attn.hook_result"
            if self._cross(l) and cross not in self.cache_dict:
                self._store(cross, self.cross_head_results(l))

    def stack_head_results(self, layer: int = -1, return_labels: bool = False, incl_remainder: bool = False,
                           pos_slice=None, apply_ln: bool = False):
        """Every head's result in the layers before `layer`, `[n_heads x layers, *batch, pos, d_model]`
        (labels "L{l}H{h}"; a decoder block's cross-attention heads follow its own, "L{l}H{h}_cross"), and
        with `incl_remainder` what the stream holds besides them."""
        pos_slice = Slice(pos_slice)
        layer = self._layer(layer)
        labels, parts = [], []
        for l in range(layer):
            parts.append(pos_slice.apply(self.head_results(l), dim=-3))
            labels += [f"L{l}H{h}" for h in range(self.model.cfg.n_heads)]
            if self._cross(l):
                parts.append(pos_slice.apply(self.cross_head_results(l), dim=-3))
                labels += [f"L{l}H{h}_cross" for h in range(self.model.cfg.n_heads)]
        if parts:
            stack = torch.cat(one_device(parts), dim=-2).movedim(-2, 0)
        else:
            stack = pos_slice.apply(self["hook_embed"], dim=-2)[None][:0]
        if incl_remainder:
            total = pos_slice.apply(self["resid_post", layer - 1] if layer > 0 else self["resid_pre", 0], dim=-2)
            stack = torch.cat([stack, (total.to(stack.device) - stack.sum(0))[None]])
            labels.append("remainder")
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def get_neuron_results(self, layer: int, neuron_slice=None, pos_slice=None) -> torch.Tensor:
        """Each neuron's write into the stream, `[*batch, pos, neurons, d_model]`: its activation times its W_out row."""
        mlp = self.model.blocks[layer].mlp
        if hasattr(mlp, "W_router"):
            raise ValueError(f"layer {layer} is a mixture of experts: its neurons are per expert; read "
                             "blocks.{l}.mlp.hook_expert_out or hook_experts instead")
        neuron_slice, pos_slice = Slice(neuron_slice), Slice(pos_slice)
        acts = pos_slice.apply(self["post", layer], dim=-2)
        W_out = mlp.W_out
        if neuron_slice.spec is not None:
            acts = neuron_slice.apply(acts, dim=-1)
            W_out = neuron_slice.apply(W_out, dim=0)
        return acts[..., None] * W_out.to(acts.dtype)

    def stack_neuron_results(self, layer: int, pos_slice=None, neuron_slice=None, return_labels: bool = False,
                             incl_remainder: bool = False, apply_ln: bool = False, mlp_input: bool = False):
        """Every neuron's write in the layers before `layer`, `[neurons x layers, *batch, pos, d_model]`
        (labels "L{l}N{n}")."""
        cfg = self._cfg()
        layer = self._layer(layer)
        pos_slice = Slice(pos_slice)
        neuron_slice = Slice([neuron_slice] if isinstance(neuron_slice, int) else neuron_slice)
        ids = neuron_slice.indices(cfg.d_mlp)
        labels = [f"L{l}N{n}" for l in range(layer) for n in ids]
        parts = [self.get_neuron_results(l, neuron_slice, pos_slice) for l in range(layer)]
        if parts:
            stack = torch.cat(one_device(parts), dim=-2).movedim(-2, 0)
        else:
            stack = pos_slice.apply(self["hook_embed"], dim=-2)[None][:0]
        if incl_remainder:
            target = self[self._mlp_input_name(layer)] if mlp_input else (
                self["resid_post", layer - 1] if layer > 0 else self["resid_pre", 0])
            stack = torch.cat([stack, (pos_slice.apply(target, dim=-2).to(stack.device) - stack.sum(0))[None]])
            labels.append("remainder")
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice, mlp_input=mlp_input)
        return (stack, labels) if return_labels else stack

    def get_full_resid_decomposition(self, layer: int | None = None, mlp_input: bool = False,
                                     expand_neurons: bool = True, apply_ln: bool = False, pos_slice=None,
                                     return_labels: bool = False):
        """The stream entering `layer` as every head, every neuron (or each MLP), the embeddings and the summed
        biases; the components sum to the stream exactly."""
        self._additive("get_full_resid_decomposition")
        cfg = self._cfg()
        if getattr(cfg, "post_sublayer_norm", False):
            raise ValueError("get_full_resid_decomposition: the attention output passes a norm (ln1_post) before the "
                             "residual add, so heads' results do not add up to it; use decompose_resid (attn_out and "
                             "mlp_out are what the stream adds) or stack_head_results with incl_remainder")
        layer = self._layer(layer)
        pos_slice = Slice(pos_slice)
        heads, labels = self.stack_head_results(layer + (1 if mlp_input else 0), pos_slice=pos_slice,
                                                return_labels=True)
        parts = [heads]
        if not cfg.attn_only and layer > 0:
            if expand_neurons:
                neurons, more = self.stack_neuron_results(layer, pos_slice=pos_slice, return_labels=True)
                parts.append(neurons)
            else:
                mlps, more = self.decompose_resid(layer, pos_slice=pos_slice, incl_embeds=False, mode="mlp",
                                                  return_labels=True)
                parts.append(mlps)
            labels = labels + more
        for key, label in (("hook_embed", "embed"), ("hook_pos_embed", "pos_embed"),
                           ("hook_token_type_embed", "token_type_embed")):
            if key in self.cache_dict:
                parts.append(pos_slice.apply(self[key], dim=-2)[None])
                labels.append(label)
        bias = self.model.accumulated_bias(layer, mlp_input, include_mlp_biases=expand_neurons)
        parts.append(bias.to(heads.device, heads.dtype).expand((1,) + heads.shape[1:]))
        labels.append("bias")
        stack = torch.cat(one_device(parts))
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice, mlp_input=mlp_input)
        return (stack, labels) if return_labels else stack

    # ------------------------------------------------------------------ norms and logits
    def apply_ln_to_stack(self, residual_stack: torch.Tensor, layer: int | None = None, mlp_input: bool = False,
                          pos_slice=None, batch_slice=None, has_batch_dim: bool = True,
                          recompute_ln: bool = False) -> torch.Tensor:
        """Each component as the norm before `layer` (ln1, ln2 with `mlp_input`, ln_final for the last) sees
        it, with that norm's scale frozen at its cached value: centred (LayerNorm) and divided by the scale.
        The norm's weight is not applied (fold_ln first). `recompute_ln` at the final layer applies ln_final
        itself to each component (its own statistics and its weight), as TransformerLens does."""
        cfg = self._cfg()
        pos_slice, batch_slice = Slice(pos_slice), Slice(batch_slice)
        layer = self._layer(layer)
        if has_batch_dim:
            residual_stack = batch_slice.apply(residual_stack, dim=1)
        if getattr(cfg, "normalization_type", None) not in ("LN", "LNPre", "RMS", "RMSPre"):
            return residual_stack
        if getattr(cfg, "post_ln", False):
            raise ValueError("apply_ln_to_stack: in a post-LN model (BERT, BART, Marian) the stream each block reads "
                             "is already a norm's output, so there is no norm ahead of it whose scale could be "
                             "frozen; use apply_ln=False")
        final = layer == cfg.n_layers
        if recompute_ln and final and getattr(self.model, "ln_final", None) is not None:
            norm = self.model.ln_final
            device = next((p.device for p in norm.parameters()), residual_stack.device)
            return torch.stack([norm(x.to(device)) for x in residual_stack])
        if final:
            name = "ln_final.hook_scale"
        else:
            norm = ("ln3" if self._cross(layer) else "ln2") if mlp_input else "ln1"
            if getattr(self.model.blocks[layer], norm, None) is None:
                raise ValueError(f"apply_ln_to_stack: layer {layer} has no {norm} (a norm before the "
                                 f"{'MLP' if mlp_input else 'attention'}): this family normalises sublayer outputs "
                                 "instead, so no cached scale applies mid-stream; use apply_ln=False or the final layer")
            name = f"blocks.{layer}.{norm}.hook_scale"
        if cfg.normalization_type in ("LN", "LNPre"):
            residual_stack = residual_stack - residual_stack.mean(-1, keepdim=True)
        scale = pos_slice.apply(self[name], dim=-2).to(residual_stack.device)
        if has_batch_dim:
            scale = batch_slice.apply(scale, dim=0)
        return residual_stack / scale

    def logit_attrs(self, residual_stack: torch.Tensor, tokens, incorrect_tokens=None, pos_slice=None,
                    batch_slice=None, has_batch_dim: bool = True) -> torch.Tensor:
        """Each component's contribution to the logit of `tokens` (minus `incorrect_tokens`'): the component,
        scaled as the final norm scales the stream (apply_ln_to_stack), dotted with the tokens' unembedding
        directions. `[components, *batch, (pos)]`."""
        directions = self.model.tokens_to_residual_directions(tokens)
        if incorrect_tokens is not None:
            wrong = self.model.tokens_to_residual_directions(incorrect_tokens)
            if wrong.shape != directions.shape:
                raise ValueError(f"tokens and incorrect_tokens must have the same shape ({tuple(directions.shape)} "
                                 f"vs {tuple(wrong.shape)})")
            directions = directions - wrong
        scaled = self.apply_ln_to_stack(residual_stack, layer=-1, pos_slice=pos_slice, batch_slice=batch_slice,
                                        has_batch_dim=has_batch_dim)
        batch_sliced = Slice(batch_slice).spec is not None and isinstance(Slice(batch_slice).spec, int)
        if has_batch_dim and not batch_sliced and scaled.dim() == 4 and directions.dim() == 2 \
                and directions.shape[0] == scaled.shape[1]:
            directions = directions[:, None]  # one token per prompt, for every position
        return (scaled * directions.to(scaled.device, scaled.dtype)).sum(-1)
