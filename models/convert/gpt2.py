"""GPT-2 family (GPT2LMHeadModel, GPT2Model): Conv1D weights are already [in, out]."""

from __future__ import annotations

from models.config import TransformerConfig
from models.convert.common import StateDictReader, UnsupportedArchitectureError, act_fn, architecture, token_ids


def convert(hf, state_dict, model_name):
    if getattr(hf, "scale_attn_by_inverse_layer_idx", False) or getattr(hf, "reorder_and_upcast_attn", False):
        raise UnsupportedArchitectureError(f"{model_name}: GPT-2 attention variants (scale by layer, upcast) are not supported")
    d, h = hf.n_embd, hf.n_head
    dh = d // h
    r = StateDictReader(state_dict, "transformer.", model_name)
    lm_head = r.take_optional("lm_head.weight")
    tied = lm_head is None or getattr(hf, "tie_word_embeddings", True)
    cfg = TransformerConfig(
        n_layers=hf.n_layer, d_model=d, n_heads=h, d_head=dh, d_vocab=hf.vocab_size, n_ctx=hf.n_positions,
        d_mlp=hf.n_inner or 4 * d, act_fn=act_fn(hf.activation_function, model_name), normalization_type="LN",
        norm_eps=hf.layer_norm_epsilon, positional_embedding_type="standard", tied_embeddings=tied,
        attn_scale=(dh ** 0.5) if getattr(hf, "scale_attn_weights", True) else 1.0,
        model_name=model_name, original_architecture=architecture(hf), **token_ids(hf),
    )
    out = {"embed.W_E": r.take("wte.weight"), "pos_embed.W_pos": r.take("wpe.weight")}
    for l in range(cfg.n_layers):
        p, o = f"h.{l}.", f"blocks.{l}."
        w_qkv, b_qkv = r.take(p + "attn.c_attn.weight"), r.take(p + "attn.c_attn.bias")  # [d, 3d], [3d]
        for name, w, b in zip(("W_Q", "_W_K", "_W_V"), w_qkv.split(d, dim=1), b_qkv.split(d)):
            out[o + "attn." + name] = w.reshape(d, h, dh).permute(1, 0, 2)
            out[o + "attn." + name.replace("W", "b")] = b.reshape(h, dh)
        out[o + "attn.W_O"] = r.take(p + "attn.c_proj.weight").reshape(h, dh, d)
        out[o + "attn.b_O"] = r.take(p + "attn.c_proj.bias")
        out[o + "ln1.w"], out[o + "ln1.b"] = r.take(p + "ln_1.weight"), r.take(p + "ln_1.bias")
        out[o + "ln2.w"], out[o + "ln2.b"] = r.take(p + "ln_2.weight"), r.take(p + "ln_2.bias")
        out[o + "mlp.W_in"], out[o + "mlp.b_in"] = r.take(p + "mlp.c_fc.weight"), r.take(p + "mlp.c_fc.bias")
        out[o + "mlp.W_out"], out[o + "mlp.b_out"] = r.take(p + "mlp.c_proj.weight"), r.take(p + "mlp.c_proj.bias")
    out["ln_final.w"], out["ln_final.b"] = r.take("ln_f.weight"), r.take("ln_f.bias")
    if not tied:
        out["unembed.W_U"] = lm_head.T
    out["unembed.b_U"] = lm_head.new_zeros(cfg.d_vocab) if lm_head is not None else out["embed.W_E"].new_zeros(cfg.d_vocab)
    r.finish(ignorable=(r"\.attn\.bias$", r"\.attn\.masked_bias$"))
    return cfg, out
