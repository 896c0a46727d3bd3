"""Phi-1/1.5/2 (`PhiForCausalLM`): one LayerNorm feeding attention and MLP in parallel, partial
half-rotation rotary, biases everywhere, optional per-head q/k LayerNorms, `lm_head` with a bias."""

from __future__ import annotations

from models.config import TransformerConfig
from models.convert.common import (
    StateDictReader, act_fn, architecture, rope_config, take_heads, take_mlp, take_norm, token_ids,
)


def convert(hf, state_dict, model_name):
    d, h = hf.hidden_size, hf.num_attention_heads
    kv = getattr(hf, "num_key_value_heads", None) or h
    dh = getattr(hf, "head_dim", None) or d // h
    r = StateDictReader(state_dict, "model.", model_name)
    lm_head, lm_bias = r.take_optional("lm_head.weight"), r.take_optional("lm_head.bias")
    tied = lm_head is None or bool(getattr(hf, "tie_word_embeddings", False))
    qk = bool(getattr(hf, "qk_layernorm", False))
    cfg = TransformerConfig(
        n_layers=hf.num_hidden_layers, d_model=d, n_heads=h, n_kv_heads=kv, d_head=dh, d_vocab=hf.vocab_size,
        n_ctx=hf.max_position_embeddings, d_mlp=hf.intermediate_size, act_fn=act_fn(hf.hidden_act, model_name),
        normalization_type="LN", norm_eps=hf.layer_norm_eps, parallel_attn_mlp=True, shared_norm=True,
        qk_norm="head" if qk else None, qk_norm_type="LN", qk_norm_bias=True, tied_embeddings=tied,
        model_name=model_name, original_architecture=architecture(hf), **token_ids(hf),
        **rope_config(hf, model_name, dh),
    )
    out = {"embed.W_E": r.take("embed_tokens.weight")}
    for l in range(cfg.n_layers):
        p, o = f"layers.{l}.", f"blocks.{l}."
        a = p + "self_attn."
        take_heads(r, out, o, {k: a + f"{k}_proj" for k in "qkv"} | {"o": a + "dense"}, h, kv, dh)
        if qk:
            take_norm(r, out, o + "attn.q_norm", a + "q_layernorm")
            take_norm(r, out, o + "attn.k_norm", a + "k_layernorm")
        take_norm(r, out, o + "ln1", p + "input_layernorm")
        take_mlp(r, out, o, p + "mlp.fc1", p + "mlp.fc2")
    take_norm(r, out, "ln_final", "final_layernorm")
    if not tied:
        out["unembed.W_U"] = lm_head.T
    if lm_bias is not None:
        out["unembed.b_U"] = lm_bias
    r.finish(ignorable=(r"rotary_emb\.",))
    return cfg, out
