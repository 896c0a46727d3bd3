"""T5, flan-T5 and mT5 (`T5ForConditionalGeneration`): the encoder-decoder with relative position buckets.

RMSNorm without mean before each sublayer and at the end of each stack; no 1/sqrt(d_head)
scaling; a learned bias per (relative-position bucket, head) in the first layer of each
stack, shared by its layers (bidirectional buckets in the encoder, causal in the decoder);
ReLU or gated-GELU MLPs; a head tied to the token table that scales the decoder output by
d_model^-1/2 (`scale_decoder_outputs`), or an untied head (flan-T5) where the checkpoint has one.
"""

from __future__ import annotations

import torch

from models.config import TransformerConfig
from models.convert.common import StateDictReader, act_fn, architecture, refuse, take_heads, token_ids


def convert(hf, state_dict, model_name):
    d, h, dh = hf.d_model, hf.num_heads, hf.d_kv
    r = StateDictReader(state_dict, "", model_name)
    shared = r.take("shared.weight")
    for stack in ("encoder", "decoder"):  # the token table again, tied
        r.take_optional(f"{stack}.embed_tokens.weight")
    lm_head = r.take_optional("lm_head.weight")
    tied = lm_head is None or torch.equal(lm_head, shared)
    if getattr(hf, "is_encoder_decoder", True) is False:
        raise refuse(model_name, "is_encoder_decoder", False, "(T5's encoder alone) is not converted here")
    gated = bool(getattr(hf, "is_gated_act", False))
    scale = getattr(hf, "scale_decoder_outputs", getattr(hf, "tie_word_embeddings", True))
    cfg = TransformerConfig(
        n_layers=hf.num_layers, n_decoder_layers=hf.num_decoder_layers, d_model=d, n_heads=h, d_head=dh,
        d_vocab=hf.vocab_size, n_ctx=getattr(hf, "n_positions", None) or 512, d_mlp=hf.d_ff,
        act_fn=act_fn(hf.dense_act_fn, model_name), gated_mlp=gated, normalization_type="RMS",
        norm_eps=hf.layer_norm_epsilon, positional_embedding_type="relative", attn_scale=1.0,
        relative_attention_num_buckets=hf.relative_attention_num_buckets,
        relative_attention_max_distance=hf.relative_attention_max_distance, encoder_decoder=True,
        tied_embeddings=tied, output_scale=d ** -0.5 if scale else None,
        decoder_start_token_id=hf.decoder_start_token_id, model_name=model_name,
        original_architecture=architecture(hf), **token_ids(hf),
    )
    out = {"embed.W_E": shared}
    for stack, n_layers in (("encoder", cfg.n_layers), ("decoder", cfg.n_decoder_layers)):
        out[f"{stack}.relative.W_rel"] = r.take(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
        for l in range(n_layers):
            p, o = f"{stack}.block.{l}.layer.", f"{stack}.blocks.{l}."
            take_heads(r, out, o, {k: f"{p}0.SelfAttention.{k}" for k in "qkvo"}, h, h, dh)
            out[o + "ln1.w"] = r.take(p + "0.layer_norm.weight")
            ff = 1
            if stack == "decoder":
                cross = {k: f"{p}1.EncDecAttention.{k}" for k in "qkvo"}
                take_heads(r, out, o, cross, h, h, dh, module="cross_attn")
                out[o + "ln2.w"] = r.take(p + "1.layer_norm.weight")
                ff = 2
            f = f"{p}{ff}.DenseReluDense."
            if gated:  # wi_0 goes through the activation (our W_gate), wi_1 is the linear branch (W_in)
                out[o + "mlp.W_gate"] = r.take(f + "wi_0.weight").T
                out[o + "mlp.W_in"] = r.take(f + "wi_1.weight").T
            else:
                out[o + "mlp.W_in"] = r.take(f + "wi.weight").T
            out[o + "mlp.W_out"] = r.take(f + "wo.weight").T
            out[o + ("ln3" if stack == "decoder" else "ln2") + ".w"] = r.take(f"{p}{ff}.layer_norm.weight")
        out[f"{stack}.ln_final.w"] = r.take(f"{stack}.final_layer_norm.weight")
    if not tied:
        out["unembed.W_U"] = lm_head.T
    r.finish()
    return cfg, out
