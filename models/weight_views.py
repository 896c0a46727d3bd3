"""The model's weights as TransformerLens shows them: stacked over layers, and the QK / OV circuits.

`HookedTransformer` inherits these views; each stack is a copy (edit `model.blocks[l]` to
change a weight).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from interp.factored_matrix import FactoredMatrix


class NoUnembedError(RuntimeError):
    """Logits were asked of a checkpoint that has no output head."""


class SplitModelError(RuntimeError):
    """A view that stacks every block was asked of a model whose blocks live on several devices."""


class WeightViews:
    # Where stacked views gather on a model over several devices (None: refuse, naming the devices).
    _gather_on: torch.device | None = None

    @contextmanager
    def gathered_on(self, device):
        """Stacked views (`model.W_Q`, `model.QK`, ...) of a model over several devices, gathered on `device`:
        `with model.gathered_on("cpu"): qk = model.QK`."""
        previous, self._gather_on = self._gather_on, torch.device(device)
        try:
            yield self
        finally:
            self._gather_on = previous

    def _stack(self, owner: str, name: str) -> torch.Tensor:
        parts = []
        for block in self.blocks:
            module = getattr(block, owner, None)
            if module is None:
                raise AttributeError(f"{self.cfg.model_name} has no {owner} (attention-only model?)")
            parts.append(getattr(module, name))
        if len({tuple(t.shape) for t in parts}) > 1:
            raise ValueError(f"{owner}.{name} differs in shape between layers (dense and mixture-of-experts MLPs): "
                             f"read it per layer, model.blocks[l].{owner}.{name}")
        devices = {t.device for t in parts}
        if self._gather_on is not None:
            parts = [t.to(self._gather_on) for t in parts]
        elif len(devices) > 1:
            raise SplitModelError(
                f"model.{name} stacks every block, but the blocks live on {', '.join(sorted(map(str, devices)))}: "
                f"gather them on one device with `with model.gathered_on('cpu'): model.{name}`, or read one "
                f"block's, model.blocks[l].{owner}.{name}"
            )
        return torch.stack(parts)

    # Stacked over layers: [n_layers, ...]. These are copies; edit model.blocks[l] to change weights.
    W_Q = property(lambda self: self._stack("attn", "W_Q"))
    W_K = property(lambda self: self._stack("attn", "W_K"))
    W_V = property(lambda self: self._stack("attn", "W_V"))
    W_O = property(lambda self: self._stack("attn", "W_O"))
    b_Q = property(lambda self: self._stack("attn", "b_Q"))
    b_K = property(lambda self: self._stack("attn", "b_K"))
    b_V = property(lambda self: self._stack("attn", "b_V"))
    b_O = property(lambda self: self._stack("attn", "b_O"))
    _W_K = property(lambda self: self._stack("attn", "_W_K"))
    _W_V = property(lambda self: self._stack("attn", "_W_V"))
    _b_K = property(lambda self: self._stack("attn", "_b_K"))
    _b_V = property(lambda self: self._stack("attn", "_b_V"))
    W_in = property(lambda self: self._stack("mlp", "W_in"))
    W_gate = property(lambda self: self._stack("mlp", "W_gate"))
    W_out = property(lambda self: self._stack("mlp", "W_out"))
    b_in = property(lambda self: self._stack("mlp", "b_in"))
    b_out = property(lambda self: self._stack("mlp", "b_out"))

    @property
    def W_E(self) -> torch.Tensor:
        return self.embed.W_E

    @property
    def W_pos(self) -> torch.Tensor:
        if self.cfg.positional_embedding_type != "standard":
            raise AttributeError(f"{self.cfg.model_name} has no learned positions ({self.cfg.positional_embedding_type})")
        return self.pos_embed.W_pos

    @property
    def W_U(self) -> torch.Tensor:
        if self.unembed is None:
            raise NoUnembedError(f"{self.cfg.model_name} has no unembedding")
        return self.unembed.W_U

    @property
    def b_U(self) -> torch.Tensor:
        if self.unembed is None:
            raise NoUnembedError(f"{self.cfg.model_name} has no unembedding")
        return self.unembed.b_U

    @property
    def QK(self) -> FactoredMatrix:
        """`[n_layers, n_heads, d_model, d_model]`: W_Q W_K^T, so x_q QK x_k^T = q.k, the scores before
        the scale 1/attn_scale, the rotary, biases and any soft-cap (which then gives
        cap * tanh(q.k / (attn_scale cap))). x is what attention reads (ln1's output).

        Raises CircuitError for models with q/k norms (Gemma 3, Qwen3, OLMo 2, ...) or with
        clip_qkv (OLMo): there the scores are not a bilinear form of the residual stream.
        """
        from interp.circuits import CircuitError, circuit_limits

        why = circuit_limits(self.cfg).get("QK")
        if why:
            raise CircuitError(f"model.QK is not defined for {self.cfg.model_name}: {why}. The projections are "
                               "model.W_Q / model.W_K; hook_rot_q / hook_rot_k hold the queries and keys the scores "
                               "are made of.")
        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    @property
    def OV(self) -> FactoredMatrix:
        """`[n_layers, n_heads, d_model, d_model]`: W_V W_O, what a head writes per unit of attention.

        With post-sublayer norms (Gemma 2/3, OLMo 2) this is what the head writes into
        ln1_post, before that norm divides the summed attention output by its rms and
        multiplies by its weight; `interp.circuits` functions that need the write into the
        residual stream refuse such models.
        """
        return FactoredMatrix(self.W_V, self.W_O)
