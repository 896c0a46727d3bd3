"""StableLM: LayerNorm with bias, partial rotary, SwiGLU, optional qkv bias; the larger checkpoints run
attention and MLP in parallel from one norm and normalise q and k per head with a weight for each head."""

from __future__ import annotations

import torch

from models.config import TransformerConfig
from models.convert.common import (
    StateDictReader, act_fn, architecture, rope_config, take_heads, take_norm, token_ids,
)


def convert(hf, state_dict, model_name):
    d, h = hf.hidden_size, hf.num_attention_heads
    kv = getattr(hf, "num_key_value_heads", None) or h
    dh = d // h
    r = StateDictReader(state_dict, "model.", model_name)
    lm_head = r.take_optional("lm_head.weight")
    tied = lm_head is None or bool(getattr(hf, "tie_word_embeddings", False))
    parallel = bool(getattr(hf, "use_parallel_residual", False))
    qk = bool(getattr(hf, "qk_layernorm", False))
    cfg = TransformerConfig(
        n_layers=hf.num_hidden_layers, d_model=d, n_heads=h, n_kv_heads=kv, d_head=dh, d_vocab=hf.vocab_size,
        n_ctx=hf.max_position_embeddings, d_mlp=hf.intermediate_size, act_fn=act_fn(hf.hidden_act, model_name),
        gated_mlp=True, normalization_type="LN", norm_eps=hf.layer_norm_eps, parallel_attn_mlp=parallel,
        shared_norm=parallel, qk_norm="head_separate" if qk else None, qk_norm_type="LN", qk_norm_bias=False,
        tied_embeddings=tied, model_name=model_name, original_architecture=architecture(hf), **token_ids(hf),
        **rope_config(hf, model_name, dh),
    )
    out = {"embed.W_E": r.take("embed_tokens.weight")}
    for l in range(cfg.n_layers):
        p, o = f"layers.{l}.", f"blocks.{l}."
        a = p + "self_attn."
        take_heads(r, out, o, {k: a + f"{k}_proj" for k in "qkvo"}, h, kv, dh)
        if qk:  # StableLmLayerNormPerHead: one LayerNorm (no bias) per head
            for ours, theirs, n in (("q_norm", "q_layernorm", h), ("k_norm", "k_layernorm", kv)):
                out[o + f"attn.{ours}.w"] = torch.stack([r.take(a + f"{theirs}.norms.{i}.weight") for i in range(n)])
        take_norm(r, out, o + "ln1", p + "input_layernorm")
        if not parallel:
            take_norm(r, out, o + "ln2", p + "post_attention_layernorm")
        for ours, theirs in (("W_gate", "gate_proj"), ("W_in", "up_proj"), ("W_out", "down_proj")):
            out[o + "mlp." + ours] = r.take(p + f"mlp.{theirs}.weight").T
    take_norm(r, out, "ln_final", "norm")
    if not tied:
        out["unembed.W_U"] = lm_head.T
    r.finish(ignorable=(r"rotary_emb\.",))
    return cfg, out
