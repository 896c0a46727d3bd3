"""GPT-BigCode (SantaCoder, StarCoder): GPT-2 with nn.Linear projections and multi-query attention,
the fused `c_attn` laid out `[q (d_model) | k (d_head) | v (d_head)]` (per head `[q | k | v]`
without multi-query)."""

from __future__ import annotations

from models.config import TransformerConfig
from models.convert.common import (
    StateDictReader, act_fn, architecture, nn_linear_heads_in, nn_linear_heads_out, take_gpt2_style_rest, take_norm,
    token_ids,
)


def convert(hf, state_dict, model_name):
    d, h = hf.n_embd, hf.n_head
    dh = d // h
    kv = 1 if hf.multi_query else h
    r = StateDictReader(state_dict, "transformer.", model_name)
    lm_head = r.take_optional("lm_head.weight")
    tied = lm_head is None or bool(getattr(hf, "tie_word_embeddings", True))
    cfg = TransformerConfig(
        n_layers=hf.n_layer, d_model=d, n_heads=h, n_kv_heads=kv, d_head=dh, d_vocab=hf.vocab_size,
        n_ctx=hf.n_positions, d_mlp=hf.n_inner or 4 * d, act_fn=act_fn(hf.activation_function, model_name),
        normalization_type="LN", norm_eps=hf.layer_norm_epsilon, positional_embedding_type="standard",
        attn_scale=dh ** 0.5 if hf.scale_attn_weights else 1.0, tied_embeddings=tied, model_name=model_name,
        original_architecture=architecture(hf), **token_ids(hf),
    )
    out = {"embed.W_E": r.take("wte.weight"), "pos_embed.W_pos": r.take("wpe.weight")}
    for l in range(cfg.n_layers):
        p, o = f"h.{l}.", f"blocks.{l}."
        w, b = r.take(p + "attn.c_attn.weight"), r.take(p + "attn.c_attn.bias")
        if hf.multi_query:
            parts = zip(w.split([d, dh, dh]), b.split([d, dh, dh]))
        else:  # [head, (q | k | v), d_head]
            w, b = w.view(h, 3, dh, d), b.view(h, 3, dh)
            parts = [(w[:, i].reshape(h * dh, d), b[:, i].reshape(-1)) for i in range(3)]
        for (weight, bias), ours, n in zip(parts, ("W_Q", "_W_K", "_W_V"), (h, kv, kv)):
            out[o + "attn." + ours] = nn_linear_heads_in(weight, n, dh)
            out[o + "attn." + ours.replace("W", "b")] = bias.reshape(n, dh)
        out[o + "attn.W_O"] = nn_linear_heads_out(r.take(p + "attn.c_proj.weight"), h, dh)
        out[o + "attn.b_O"] = r.take(p + "attn.c_proj.bias")
        take_gpt2_style_rest(r, out, p, o)
    take_norm(r, out, "ln_final", "ln_f")
    if not tied:
        out["unembed.W_U"] = lm_head.T
    r.finish(ignorable=(r"attn\.bias$", r"attn\.masked_bias$"))
    return cfg, out
