"""GPT-J: one LayerNorm feeding attention and MLP in parallel, interleaved ("rotate every two")
rotary on the first `rotary_dim` dimensions (base 10,000), no q/k/v/o biases, `lm_head` with a bias."""

from __future__ import annotations

from models.config import TransformerConfig
from models.convert.common import StateDictReader, act_fn, architecture, take_heads, take_mlp, take_norm, token_ids


def convert(hf, state_dict, model_name):
    d, h = hf.n_embd, hf.n_head
    dh = d // h
    r = StateDictReader(state_dict, "transformer.", model_name)
    lm_head, lm_bias = r.take_optional("lm_head.weight"), r.take_optional("lm_head.bias")
    tied = lm_head is None or bool(getattr(hf, "tie_word_embeddings", False))
    cfg = TransformerConfig(
        n_layers=hf.n_layer, d_model=d, n_heads=h, d_head=dh, d_vocab=hf.vocab_size, n_ctx=hf.n_positions,
        d_mlp=hf.n_inner or 4 * d, act_fn=act_fn(hf.activation_function, model_name), normalization_type="LN",
        norm_eps=hf.layer_norm_epsilon, parallel_attn_mlp=True, shared_norm=True,
        positional_embedding_type="rotary", rotary_dim=hf.rotary_dim or d, rotary_base=10000.0,
        rotary_adjacent_pairs=True, tied_embeddings=tied, model_name=model_name,
        original_architecture=architecture(hf), **token_ids(hf),
    )
    out = {"embed.W_E": r.take("wte.weight")}
    for l in range(cfg.n_layers):
        p, o = f"h.{l}.", f"blocks.{l}."
        take_heads(r, out, o, {k: p + f"attn.{k}_proj" for k in "qkv"} | {"o": p + "attn.out_proj"}, h, h, dh)
        take_norm(r, out, o + "ln1", p + "ln_1")
        take_mlp(r, out, o, p + "mlp.fc_in", p + "mlp.fc_out")
    take_norm(r, out, "ln_final", "ln_f")
    if not tied:
        out["unembed.W_U"] = lm_head.T
    if lm_bias is not None:
        out["unembed.b_U"] = lm_bias
    r.finish(ignorable=(r"rotary_emb\.", r"embed_positions$", r"attn\.bias$", r"attn\.masked_bias$"))
    return cfg, out
