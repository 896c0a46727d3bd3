"""BERT-style encoders (BertModel, BertForMaskedLM): post-LN, token types, optional MLM head."""

from __future__ import annotations

from models.config import TransformerConfig
from models.convert.common import (
    StateDictReader, UnsupportedArchitectureError, act_fn, architecture, nn_linear_heads_in,
    nn_linear_heads_out, token_ids,
)


def convert(hf, state_dict, model_name):
    if getattr(hf, "position_embedding_type", "absolute") != "absolute":
        raise UnsupportedArchitectureError(f"{model_name}: relative position embeddings are not supported")
    if getattr(hf, "is_decoder", False):
        raise UnsupportedArchitectureError(f"{model_name}: BERT used as a decoder is not supported")
    d, h = hf.hidden_size, hf.num_attention_heads
    dh = d // h
    r = StateDictReader(state_dict, "bert.", model_name)
    has_head = r.has("cls.predictions.transform.dense.weight")
    decoder = r.take_optional("cls.predictions.decoder.weight")
    tied = has_head and (decoder is None or bool(getattr(hf, "tie_word_embeddings", True)))
    cfg = TransformerConfig(
        n_layers=hf.num_hidden_layers, d_model=d, n_heads=h, d_head=dh, d_vocab=hf.vocab_size,
        n_ctx=hf.max_position_embeddings, d_mlp=hf.intermediate_size, act_fn=act_fn(hf.hidden_act, model_name),
        normalization_type="LN", norm_eps=hf.layer_norm_eps, positional_embedding_type="standard",
        causal=False, post_ln=True, n_token_types=hf.type_vocab_size, final_norm=False,
        has_unembed=has_head, mlm_head=has_head, tied_embeddings=tied, default_prepend_bos=True,
        model_name=model_name, original_architecture=architecture(hf), **token_ids(hf),
    )
    e = "embeddings."
    out = {
        "embed.W_E": r.take(e + "word_embeddings.weight"),
        "pos_embed.W_pos": r.take(e + "position_embeddings.weight"),
        "token_type_embed.W_token_type": r.take(e + "token_type_embeddings.weight"),
        "ln_embed.w": r.take(e + "LayerNorm.weight"),
        "ln_embed.b": r.take(e + "LayerNorm.bias"),
    }
    for l in range(cfg.n_layers):
        p, o = f"encoder.layer.{l}.", f"blocks.{l}."
        for ours, theirs in (("W_Q", "query"), ("_W_K", "key"), ("_W_V", "value")):
            out[o + "attn." + ours] = nn_linear_heads_in(r.take(p + f"attention.self.{theirs}.weight"), h, dh)
            out[o + "attn." + ours.replace("W", "b")] = r.take(p + f"attention.self.{theirs}.bias").reshape(h, dh)
        out[o + "attn.W_O"] = nn_linear_heads_out(r.take(p + "attention.output.dense.weight"), h, dh)
        out[o + "attn.b_O"] = r.take(p + "attention.output.dense.bias")
        out[o + "ln1.w"] = r.take(p + "attention.output.LayerNorm.weight")
        out[o + "ln1.b"] = r.take(p + "attention.output.LayerNorm.bias")
        out[o + "mlp.W_in"] = r.take(p + "intermediate.dense.weight").T
        out[o + "mlp.b_in"] = r.take(p + "intermediate.dense.bias")
        out[o + "mlp.W_out"] = r.take(p + "output.dense.weight").T
        out[o + "mlp.b_out"] = r.take(p + "output.dense.bias")
        out[o + "ln2.w"] = r.take(p + "output.LayerNorm.weight")
        out[o + "ln2.b"] = r.take(p + "output.LayerNorm.bias")
    if has_head:
        c = "cls.predictions."
        out["mlm_head.W"] = r.take(c + "transform.dense.weight").T
        out["mlm_head.b"] = r.take(c + "transform.dense.bias")
        out["mlm_head.ln.w"] = r.take(c + "transform.LayerNorm.weight")
        out["mlm_head.ln.b"] = r.take(c + "transform.LayerNorm.bias")
        bias = r.take_optional(c + "bias")
        decoder_bias = r.take_optional(c + "decoder.bias")
        out["unembed.b_U"] = bias if bias is not None else decoder_bias
        if not tied:
            out["unembed.W_U"] = decoder.T
    # The pooler (tanh on [CLS]) and the next-sentence head sit outside the residual stream.
    r.finish(ignorable=(r"^pooler\.", r"position_ids$", r"^cls\.seq_relationship\."))
    return cfg, out
