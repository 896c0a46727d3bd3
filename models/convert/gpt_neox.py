"""GPT-NeoX / Pythia: parallel attention and MLP (each through its own LayerNorm), fused QKV stored per
head as `[heads, 3, d_head]`, partial half-rotation rotary."""

from __future__ import annotations

from models.config import TransformerConfig
from models.convert.common import StateDictReader, act_fn, architecture, refuse, rope_config, take_mlp, take_norm, token_ids


def convert(hf, state_dict, model_name):
    d, h = hf.hidden_size, hf.num_attention_heads
    dh = d // h
    r = StateDictReader(state_dict, "gpt_neox.", model_name)
    head = r.take_optional("embed_out.weight")
    if head is None:
        head = r.take_optional("lm_head.weight")
    tied = head is None or bool(getattr(hf, "tie_word_embeddings", False))
    cfg = TransformerConfig(
        n_layers=hf.num_hidden_layers, d_model=d, n_heads=h, d_head=dh, d_vocab=hf.vocab_size,
        n_ctx=hf.max_position_embeddings, d_mlp=hf.intermediate_size, act_fn=act_fn(hf.hidden_act, model_name),
        normalization_type="LN", norm_eps=hf.layer_norm_eps, parallel_attn_mlp=bool(hf.use_parallel_residual),
        tied_embeddings=tied, model_name=model_name, original_architecture=architecture(hf), **token_ids(hf),
        **rope_config(hf, model_name, dh),
    )
    if cfg.rotary_dim % 2:
        raise refuse(model_name, "rope_parameters['partial_rotary_factor']", cfg.rotary_dim / dh,
                     f"gives an odd rotary dimension ({cfg.rotary_dim})")
    out = {"embed.W_E": r.take("embed_in.weight")}
    for l in range(cfg.n_layers):
        p, o = f"layers.{l}.", f"blocks.{l}."
        # query_key_value: output rows laid out [head, (q | k | v), d_head].
        w = r.take(p + "attention.query_key_value.weight").view(h, 3, dh, d)
        b = r.take_optional(p + "attention.query_key_value.bias")
        b = b.view(h, 3, dh) if b is not None else None
        for i, name in enumerate(("W_Q", "_W_K", "_W_V")):
            out[o + "attn." + name] = w[:, i].permute(0, 2, 1)
            if b is not None:
                out[o + "attn." + name.replace("W", "b")] = b[:, i]
        out[o + "attn.W_O"] = r.take(p + "attention.dense.weight").T.reshape(h, dh, d)
        bias = r.take_optional(p + "attention.dense.bias")
        if bias is not None:
            out[o + "attn.b_O"] = bias
        take_norm(r, out, o + "ln1", p + "input_layernorm")
        take_norm(r, out, o + "ln2", p + "post_attention_layernorm")
        take_mlp(r, out, o, p + "mlp.dense_h_to_4h", p + "mlp.dense_4h_to_h")
    take_norm(r, out, "ln_final", "final_layer_norm")
    if not tied:
        out["unembed.W_U"] = head.T
    r.finish(ignorable=(r"rotary_emb\.", r"attention\.bias$", r"attention\.masked_bias$"))
    return cfg, out
