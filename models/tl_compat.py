"""TransformerLens' model-side idioms on HookedTransformer, with its signatures and semantics.

    model.set_use_attn_result(True)        # hook_result computed and cached by default
    model.set_use_split_qkv_input(True)    # blocks.{l}.hook_q_input / hook_k_input / hook_v_input [b, p, heads, d_model]
    model.set_use_attn_in(True)            # blocks.{l}.hook_attn_in [b, p, heads, d_model]
    model.set_use_hook_mlp_in(True)        # blocks.{l}.hook_mlp_in [b, p, d_model]
    model.tokens_to_residual_directions(" Mary")   # W_U's column, [d_model]
    model.get_token_position(" Mary", prompt, mode="last")

The hook points the switches create exist only while the switch is on (a hook on them
otherwise would never fire): each block's attention input is then copied once per head
(per KV head for keys and values) before the norm, so patching one head's copy changes
that head alone, as in TransformerLens. With grouped KV heads and `use_attn_in`, a KV
head reads the copy of the first query head of its group.
"""

from __future__ import annotations

import torch

from interp.hooks import HookPoint

_SWITCHES = {  # config field -> the hook points it creates on each block
    "use_split_qkv_input": ("hook_q_input", "hook_k_input", "hook_v_input"),
    "use_attn_in": ("hook_attn_in",),
    "use_hook_mlp_in": ("hook_mlp_in",),
}


class TransformerLensModelMethods:
    """Mixed into HookedTransformer (which provides cfg, blocks, W_U, tokenizer helpers, setup_hooks)."""

    # ------------------------------------------------------------------ switches
    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """Cache each head's result (z @ W_O, `blocks.{l}.attn.hook_result`) by default in run_with_cache."""
        self.cfg.use_attn_result = bool(use_attn_result)
        base = tuple(type(self).opt_in_hooks)
        self.opt_in_hooks = tuple(h for h in base if h != "hook_result") if use_attn_result else base

    def _switch(self, field: str, on: bool) -> None:
        if field == "use_hook_mlp_in" and self.cfg.attn_only:
            raise ValueError(f"{self.cfg.model_name} is attention-only: it has no MLP input")
        setattr(self.cfg, field, bool(on))
        for block in self.blocks:
            for name in _SWITCHES[field]:
                if on and not hasattr(block, name):
                    block.add_module(name, HookPoint())
                elif not on and hasattr(block, name):
                    delattr(block, name)
        self.setup_hooks()

    def set_use_split_qkv_input(self, use_split_qkv_input: bool) -> None:
        """Give each head its own copy of the attention input (hook_q_input [b, p, n_heads, d_model],
        hook_k_input / hook_v_input [b, p, n_kv_heads, d_model]), before the norm."""
        self._switch("use_split_qkv_input", use_split_qkv_input)

    def set_use_attn_in(self, use_attn_in: bool) -> None:
        """One copy of the attention input per head, shared by its q, k and v (hook_attn_in [b, p, n_heads, d_model])."""
        self._switch("use_attn_in", use_attn_in)

    def set_use_hook_mlp_in(self, use_hook_mlp_in: bool) -> None:
        """A hook on the MLP's input before its norm (hook_mlp_in [b, p, d_model]); editing it leaves the stream."""
        self._switch("use_hook_mlp_in", use_hook_mlp_in)

    # ------------------------------------------------------------------ tokens
    def tokens_to_residual_directions(self, tokens) -> torch.Tensor:
        """The unembedding direction of each token: W_U's column, `[*tokens.shape, d_model]` (a string is one token).
        The final norm's weight is not in it: fold it (`fold_ln=True`) for logit attribution, as in TransformerLens."""
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        tokens = torch.as_tensor(tokens, device=self.W_U.device)
        return self.W_U[:, tokens].movedim(0, -1)

    def to_single_str_token(self, int_token: int) -> str:
        """The text of one token id."""
        if not isinstance(int_token, int):
            int_token = int(torch.as_tensor(int_token).item())
        return self.to_str_tokens(torch.tensor([int_token]))[0]

    def get_token_position(self, single_token, input, mode: str = "first", prepend_bos: bool | None = None,
                           padding_side: str | None = None) -> int:
        """Where `single_token` (a string or id) first (or last) occurs in `input` (a string, or ids of one prompt)."""
        if mode not in ("first", "last"):
            raise ValueError(f"mode must be 'first' or 'last', got {mode!r}")
        token = self.to_single_token(single_token) if isinstance(single_token, str) else int(single_token)
        ids = self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side) if isinstance(input, str) \
            else torch.as_tensor(input)
        ids = ids[0] if ids.dim() == 2 else ids
        if ids.dim() != 1:
            raise ValueError("get_token_position reads one prompt: give ids of shape [pos] or [1, pos]")
        where = (ids == token).nonzero().flatten().tolist()
        if not where:
            raise ValueError(f"token {token} ({self.to_single_str_token(token)!r}) does not occur in the input")
        return where[0] if mode == "first" else where[-1]

    # ------------------------------------------------------------------ biases
    def accumulated_bias(self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True) -> torch.Tensor:
        """The sum of the output biases written to the stream before `layer` (b_O, a decoder block's
        cross-attention b_O, and b_out with `include_mlp_biases`; with `mlp_input`, layer's own attention
        biases too): `[d_model]`."""
        total = torch.zeros(self.cfg.d_model, device=self.W_E.device, dtype=self.W_E.dtype)
        for l in range(layer):
            total = total + _on(_attention_out_bias(self.blocks[l]), total)
            if include_mlp_biases and not self.cfg.attn_only:
                total = total + _on(_mlp_out_bias(self.blocks[l].mlp), total)
        if mlp_input:
            total = total + _on(_attention_out_bias(self.blocks[layer]), total)
        return total


def _on(bias, total: torch.Tensor):
    return bias.to(total.device) if isinstance(bias, torch.Tensor) else bias  # a model over several devices


def _attention_out_bias(block) -> torch.Tensor:
    cross = getattr(block, "cross_attn", None) if getattr(block, "cross", False) else None
    return block.attn.b_O + (cross.b_O if cross is not None else 0.0)


def _mlp_out_bias(mlp) -> torch.Tensor:
    if hasattr(mlp, "b_out"):
        return mlp.b_out
    return mlp.shared.b_out if getattr(mlp, "shared", None) is not None else 0.0  # experts have no output bias
