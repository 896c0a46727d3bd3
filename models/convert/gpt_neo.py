"""GPT-Neo: GPT-2-like with nn.Linear projections, no 1/sqrt(d_head) scaling, and local attention
(a window of `window_size`) on the layers `attention_layers` marks "local"."""

from __future__ import annotations

from models.config import TransformerConfig
from models.convert.common import (
    StateDictReader, act_fn, architecture, refuse, take_gpt2_style_rest, take_heads, take_norm, token_ids,
)


def convert(hf, state_dict, model_name):
    d, h = hf.hidden_size, hf.num_heads
    dh = d // h
    kinds = list(hf.attention_layers)
    unknown = sorted(set(kinds) - {"global", "local"})
    if unknown:
        raise refuse(model_name, "attention_layers", unknown[0], "names an attention variant that is not implemented")
    r = StateDictReader(state_dict, "transformer.", model_name)
    lm_head = r.take_optional("lm_head.weight")
    tied = lm_head is None or bool(getattr(hf, "tie_word_embeddings", True))
    windows = {}
    if "local" in kinds:
        windows = dict(sliding_window=int(hf.window_size),
                       layer_types=["sliding_attention" if k == "local" else "full_attention" for k in kinds])
    cfg = TransformerConfig(
        n_layers=hf.num_layers, d_model=d, n_heads=h, d_head=dh, d_vocab=hf.vocab_size,
        n_ctx=hf.max_position_embeddings, d_mlp=hf.intermediate_size or 4 * d,
        act_fn=act_fn(hf.activation_function, model_name), normalization_type="LN", norm_eps=hf.layer_norm_epsilon,
        positional_embedding_type="standard", attn_scale=1.0, tied_embeddings=tied, model_name=model_name,
        original_architecture=architecture(hf), **windows, **token_ids(hf),
    )
    out = {"embed.W_E": r.take("wte.weight"), "pos_embed.W_pos": r.take("wpe.weight")}
    for l in range(cfg.n_layers):
        p, o = f"h.{l}.", f"blocks.{l}."
        a = p + "attn.attention."
        take_heads(r, out, o, {k: a + f"{k}_proj" for k in "qkv"} | {"o": a + "out_proj"}, h, h, dh)
        take_gpt2_style_rest(r, out, p, o)
    take_norm(r, out, "ln_final", "ln_f")
    if not tied:
        out["unembed.W_U"] = lm_head.T
    r.finish(ignorable=(r"attn\.attention\.bias$", r"attn\.attention\.masked_bias$"))
    return cfg, out
