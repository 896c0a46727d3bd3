"""One stack of an encoder-decoder's cache, so that TransformerLens' cache methods apply to it.

    _, cache = t5.run_with_cache(source, decoder_input_ids=target)
    lens = cache.decoder.accumulated_resid(apply_ln=True, pos_slice=-1)      # logit lens on the decoder
    parts, labels = cache.decoder.decompose_resid(return_labels=True)        # ..., "1_cross_attn_out", ...
    heads, labels = cache.encoder.stack_head_results(return_labels=True)

`cache.encoder` / `cache.decoder` are ActivationCaches over the same tensors (nothing is
copied) with the stack's prefix dropped from every name (`cache.decoder["resid_pre", 0]` is
`cache["decoder.blocks.0.hook_resid_pre"]`), whose model is a StackModel: the stack's blocks,
norms and configuration, and for the decoder the unembedding. A decoder block adds
cross-attention between attention and MLP: its output (`{l}_cross_attn_out`), its stream
(`{l}_mid_cross`) and its heads (`L{l}H{h}_cross`) are components like the others, and the
MLP reads the stream through ln3.
"""

from __future__ import annotations

import torch


class StackConfig:
    """The encoder-decoder's configuration seen from one stack: its own layer count, not an encoder-decoder."""

    def __init__(self, cfg, n_layers: int, name: str) -> None:
        self._cfg, self.n_layers = cfg, n_layers
        self.encoder_decoder = False
        self.model_name = f"{cfg.model_name} ({name})"

    def __getattr__(self, field: str):
        return getattr(self._cfg, field)


class StackModel:
    """What the cache methods read from a model (cfg, blocks, norms, biases, unembedding), for one stack."""

    def __init__(self, root, name: str) -> None:
        stack = getattr(root, name)
        self.root, self.name, self.stack = root, name, stack
        self.cfg = StackConfig(root.cfg, len(stack.blocks), name)
        self.blocks, self.ln_final, self.ln_embed = stack.blocks, stack.ln_final, stack.ln_embed
        prefix = name + "."
        self.hook_dict = {k[len(prefix):]: v for k, v in root.hook_dict.items() if k.startswith(prefix)}

    @property
    def W_E(self) -> torch.Tensor:
        return self.root.W_E

    def block_output_hook_name(self, layer: int) -> str:
        """The hook holding what block `layer` passes on (post-LN stacks normalise it first)."""
        return f"blocks.{layer}.{'hook_normalized_resid_post' if self.cfg.post_ln else 'hook_resid_post'}"

    def accumulated_bias(self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True) -> torch.Tensor:
        from models.tl_compat import TransformerLensModelMethods

        return TransformerLensModelMethods.accumulated_bias(self, layer, mlp_input, include_mlp_biases)

    def tokens_to_residual_directions(self, tokens) -> torch.Tensor:
        """W_U's column of each token, times T5's output scale (the decoder's output is scaled before the
        unembedding, so this is the direction in the decoder's stream): `[*tokens.shape, d_model]`."""
        if self.name != "decoder":
            raise ValueError("the encoder has no unembedding: its output is read by the decoder's cross-attention; "
                             "use cache.decoder for logit attributions")
        if isinstance(tokens, str):
            ids = self.root.to_tokens(tokens, prepend_bos=False)[0]
            if ids.numel() != 1:
                raise ValueError(f"{tokens!r} is {ids.numel()} tokens, not one")
            tokens = int(ids[0])
        tokens = torch.as_tensor(tokens, device=self.root.W_U.device)
        directions = self.root.W_U[:, tokens].movedim(0, -1)
        scale = self.cfg.output_scale
        return directions * scale if scale is not None else directions


def stack_cache(cache, name: str):
    """`cache`'s activations of one stack (`name` "encoder" or "decoder"), as an ActivationCache of its own."""
    if not getattr(cache.model.cfg, "encoder_decoder", False):
        raise AttributeError(f"cache.{name}: {cache.model.cfg.model_name} is not an encoder-decoder; its cache "
                             "methods (accumulated_resid, ...) apply to the cache itself")
    prefix = name + "."
    own = {k[len(prefix):]: v for k, v in cache.cache_dict.items() if k.startswith(prefix)}
    view = type(cache)(own, StackModel(cache.model, name), cache.has_batch_dim)
    view._parent = (cache, prefix)  # what compute_head_results adds to the view reaches the whole cache too
    return view
