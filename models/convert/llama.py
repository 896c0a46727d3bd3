"""LLaMA family (LLaMA, SmolLM, Mistral, Qwen2): RMSNorm, rotary, SwiGLU, grouped KV heads."""

from __future__ import annotations

from models.config import TransformerConfig
from models.convert.common import (
    StateDictReader, UnsupportedArchitectureError, act_fn, architecture, nn_linear_heads_in,
    nn_linear_heads_out, token_ids,
)


def rope_settings(hf) -> tuple[float, float, dict | None]:
    """(theta, partial rotary factor, scaling dict or None), from transformers v5 or v4 configs."""
    params = dict(getattr(hf, "rope_parameters", None) or {})
    legacy = getattr(hf, "rope_scaling", None) or {}
    params = {**legacy, **params}
    theta = params.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
    partial = params.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", 1.0))
    kind = params.get("rope_type", params.get("type", "default"))
    return float(theta), float(partial), (params if kind != "default" else None)


def convert(hf, state_dict, model_name):
    d, h = hf.hidden_size, hf.num_attention_heads
    kv = getattr(hf, "num_key_value_heads", None) or h
    dh = getattr(hf, "head_dim", None) or d // h
    theta, partial, scaling = rope_settings(hf)
    r = StateDictReader(state_dict, "model.", model_name)
    lm_head = r.take_optional("lm_head.weight")
    tied = lm_head is None or bool(getattr(hf, "tie_word_embeddings", False))
    n_ctx = hf.max_position_embeddings
    window = getattr(hf, "sliding_window", None)
    if window and getattr(hf, "use_sliding_window", True):
        n_ctx = min(n_ctx, window)  # beyond the window the checkpoint attends differently
    cfg = TransformerConfig(
        n_layers=hf.num_hidden_layers, d_model=d, n_heads=h, n_kv_heads=kv, d_head=dh, d_vocab=hf.vocab_size,
        n_ctx=n_ctx, d_mlp=hf.intermediate_size, act_fn=act_fn(hf.hidden_act, model_name), gated_mlp=True,
        normalization_type="RMS", norm_eps=hf.rms_norm_eps, positional_embedding_type="rotary",
        rotary_dim=int(dh * partial), rotary_base=theta, rotary_scaling=scaling, tied_embeddings=tied,
        model_name=model_name, original_architecture=architecture(hf), **token_ids(hf),
    )
    W_E = r.take("embed_tokens.weight")
    out = {"embed.W_E": W_E}
    for l in range(cfg.n_layers):
        p, o = f"layers.{l}.", f"blocks.{l}."
        for ours, theirs, n in (("W_Q", "q_proj", h), ("_W_K", "k_proj", kv), ("_W_V", "v_proj", kv)):
            out[o + "attn." + ours] = nn_linear_heads_in(r.take(p + f"self_attn.{theirs}.weight"), n, dh)
            bias = r.take_optional(p + f"self_attn.{theirs}.bias")
            if bias is not None:
                out[o + "attn." + ours.replace("W", "b")] = bias.reshape(n, dh)
        out[o + "attn.W_O"] = nn_linear_heads_out(r.take(p + "self_attn.o_proj.weight"), h, dh)
        b_o = r.take_optional(p + "self_attn.o_proj.bias")
        if b_o is not None:
            out[o + "attn.b_O"] = b_o
        out[o + "ln1.w"] = r.take(p + "input_layernorm.weight")
        out[o + "ln2.w"] = r.take(p + "post_attention_layernorm.weight")
        for ours, theirs in (("W_gate", "gate_proj"), ("W_in", "up_proj"), ("W_out", "down_proj")):
            out[o + "mlp." + ours] = r.take(p + f"mlp.{theirs}.weight").T
            bias = r.take_optional(p + f"mlp.{theirs}.bias")
            if bias is not None:
                out[o + "mlp." + ours.replace("W", "b")] = bias
    out["ln_final.w"] = r.take("norm.weight")
    if not tied:
        out["unembed.W_U"] = lm_head.T
    r.finish(ignorable=(r"rotary_emb\.inv_freq$",))
    return cfg, out
