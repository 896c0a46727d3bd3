"""Opt-in weight processing, each step exact in what it promises to preserve.

- fold_ln: LayerNorm/RMSNorm scale and bias move into the weights that read the
  normalised stream; the norms become LNPre/RMSPre. Preserves logits and the residual
  stream (pre-LN models only: in post-LN models the stream *is* the affine output).
  Only norms that stand before a linear reader fold: ln1, ln2 (in a parallel block with
  one norm, ln1 folds into attention and MLP alike) and ln_final. Norms after a sublayer
  (Gemma 2/3's and OLMo 2's ln1_post / ln2_post) write into the residual stream
  through a division by their input's rms, and q/k norms sit before the rotary, so no
  weight can absorb them: they keep their weights (their kind is the model's base norm).
- center_writing_weights: everything written to the residual stream loses its mean
  over d_model. LayerNorm removes that mean anyway, so logits are preserved; the
  residual stream becomes its own centred version. Not for RMSNorm, which keeps it.
- center_unembed: W_U and b_U lose their mean over the vocabulary: logits shift by a
  constant per position, so log-probs and logit differences are preserved.
- fold_value_biases: b_V moves into b_O (attention rows sum to one). Preserves logits
  (refused under clip_qkv, which clamps v after its bias is added).
"""

from __future__ import annotations

import warnings

import torch

from models.layout import set_param


class WeightProcessingError(ValueError):
    """A processing step that would change what the model computes."""


def process_weights(model, fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False):
    with torch.no_grad():
        if fold_ln:
            _fold_ln(model)
        if center_writing_weights:
            _center_writing_weights(model)
        if center_unembed:
            _center_unembed(model)
        if fold_value_biases:
            _fold_value_biases(model)
    if model.unembed is not None:
        model.cfg.tied_embeddings = model.unembed.tied  # processing may have untied W_U from W_E
    model.setup_hooks()
    return model


def _fold_into(norm, readers: list[tuple[torch.Tensor, torch.Tensor | None, int]], center: bool) -> None:
    """Fold `norm`'s affine part into the (W, b, axis) that read its output (axis: W's d_model axis)."""
    for W, bias, axis in readers:
        _fold_pair(norm, W, bias, center, axis)
    norm.w = None
    norm.b = None


def _mlp_readers(mlp) -> list[tuple[torch.Tensor, torch.Tensor | None, int]]:
    """Every weight that reads the MLP's input: a dense MLP's W_in (W_gate), or an MoE's router, experts and
    shared expert (with its gate)."""
    from models.moe import MoE

    if not isinstance(mlp, MoE):
        return [(mlp.W_in, mlp.b_in, 0)] + ([(mlp.W_gate, mlp.b_gate, 0)] if mlp.gated else [])
    readers = [(mlp.W_router, None, 0), (mlp.W_gate, None, 1), (mlp.W_in, None, 1)]
    if mlp.shared is not None:
        readers += _mlp_readers(mlp.shared) + [(mlp.W_shared_gate, None, 0)]
    return readers


def _fold_pair(norm, W: torch.Tensor, bias: torch.Tensor, center: bool, axis: int) -> None:
    w = norm.effective_weight
    b = norm.b
    shape = [1] * W.dim()
    shape[axis] = -1
    new_W = W * w.reshape(shape)
    if b is not None:
        if bias is None:
            raise WeightProcessingError("fold_ln: a LayerNorm bias would fold into a weight that has no bias")
        # b_ln @ W, summed over d_model
        set_param(bias, bias + torch.tensordot(b, W, dims=([0], [axis])))
    if center:
        # LN's output has zero mean, so W's component along the all-ones input direction never matters.
        new_W = new_W - new_W.mean(dim=axis, keepdim=True)
    set_param(W, new_W)


def _fold_ln(model) -> None:
    cfg = model.cfg
    if cfg.normalization_type not in ("LN", "RMS"):
        raise WeightProcessingError(f"fold_ln needs LN or RMS norms with weights; this model has {cfg.normalization_type}")
    if cfg.post_ln:
        raise WeightProcessingError(
            "fold_ln does not apply to post-LN models (BERT): their residual stream is the norm's affine output"
        )
    center = cfg.normalization_type == "LN"
    for block in model.blocks:
        attn = block.attn
        attn_readers = [(attn.W_Q, attn.b_Q, 1), (attn._W_K, attn._b_K, 1), (attn._W_V, attn._b_V, 1)]
        mlp_readers = [] if cfg.attn_only else _mlp_readers(block.mlp)
        if block.ln1 is not None:
            # A parallel block with one norm: its output feeds the MLP as well.
            shared = cfg.parallel_attn_mlp and cfg.shared_norm
            _fold_into(block.ln1, attn_readers + (mlp_readers if shared else []), center)
        if getattr(block, "ln2", None) is not None:
            _fold_into(block.ln2, mlp_readers, center)
    if model.ln_final is not None and model.unembed is not None:
        model.unembed.untie()
        _fold_into(model.ln_final, [(model.unembed.W_U, model.unembed.b_U, 0)], center)
    cfg.normalization_type = "LNPre" if cfg.normalization_type == "LN" else "RMSPre"
    kept = [name for name, on in (("ln1_post/ln2_post (after their sublayers)", cfg.post_sublayer_norm),
                                  ("attn.q_norm/k_norm (before the rotary)", cfg.qk_norm)) if on]
    if kept:
        # Not an error: what could be folded was, exactly; these norms have no linear reader to absorb them.
        warnings.warn(f"fold_ln folded the norms before each sublayer and the final norm; {' and '.join(kept)} "
                      "keep their weights, because no weight can absorb them exactly", stacklevel=4)


def _center(param: torch.Tensor) -> None:
    set_param(param, param - param.mean(dim=-1, keepdim=True))


def _center_writing_weights(model) -> None:
    cfg = model.cfg
    if cfg.normalization_type not in ("LN", "LNPre"):
        raise WeightProcessingError(
            f"center_writing_weights relies on LayerNorm removing the mean; this model uses {cfg.normalization_type}, "
            "which keeps it, so centring would change its outputs"
        )
    if not cfg.post_ln and not cfg.pre_norm:
        raise WeightProcessingError(
            "center_writing_weights: the sublayers read the residual stream without a norm before them "
            "(norms only after each sublayer), so centring would change what they read"
        )
    if cfg.post_ln and not cfg.embed_ln:
        raise WeightProcessingError(
            "center_writing_weights: the first block reads the embeddings without a LayerNorm, so centring them "
            "would change its input"
        )
    if not cfg.post_ln and model.ln_final is None and model.unembed is not None:
        raise WeightProcessingError(
            "center_writing_weights: no final LayerNorm stands before the unembedding, so centring would change the logits"
        )
    if model.unembed is not None:
        model.unembed.untie()  # W_U must keep its own values when W_E is centred
    _center(model.embed.W_E)
    if cfg.positional_embedding_type == "standard":
        _center(model.pos_embed.W_pos)
    if cfg.n_token_types:
        _center(model.token_type_embed.W_token_type)
    for block in model.blocks:
        _center(block.attn.W_O)
        _center(block.attn.b_O)
        if not cfg.attn_only:
            mlp = block.mlp
            for dense in [mlp] if not hasattr(mlp, "W_router") else ([mlp.shared] if mlp.shared is not None else []):
                _center(dense.W_out)
                _center(dense.b_out)
            if hasattr(mlp, "W_router"):
                _center(mlp.W_out)  # every expert's [d_mlp_expert, d_model]


def _center_unembed(model) -> None:
    if model.unembed is None:
        raise WeightProcessingError("center_unembed: this model has no unembedding")
    if model.cfg.output_logits_soft_cap is not None:
        raise WeightProcessingError(
            "center_unembed: the logits are soft-capped (cap * tanh(logits / cap)), which is not shift-invariant, "
            "so subtracting each position's mean logit would change the probabilities"
        )
    model.unembed.untie()
    _center(model.unembed.W_U)
    _center(model.unembed.b_U)


def _fold_value_biases(model) -> None:
    if model.cfg.clip_qkv is not None:
        raise WeightProcessingError(
            f"fold_value_biases: v is clamped to +-{model.cfg.clip_qkv} after its bias is added (clip_qkv), so "
            "moving b_V past the attention would change which values are clipped"
        )
    for block in model.blocks:
        attn = block.attn
        # Each head's output gets b_V @ W_O whatever it attends to, because its pattern rows sum to 1.
        folded = torch.einsum("hk,hkd->d", attn.b_V, attn.W_O)
        set_param(attn.b_O, attn.b_O + folded)
        set_param(attn._b_V, torch.zeros_like(attn._b_V))
