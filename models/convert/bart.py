"""BART and Marian (`BartForConditionalGeneration`, `MarianMTModel`): post-LN encoder-decoders.

Each sublayer is followed by its LayerNorm after the residual add (ln1 after self-attention,
ln2 after cross-attention in the decoder, the MLP's last); biases everywhere; the lm head
tied to the token table with `final_logits_bias`. BART: learned positions (offset 2,
dropped here), a LayerNorm on the embeddings, optionally scaled embeddings. Marian:
sinusoidal positions as [sin | cos] halves, embeddings x sqrt(d_model), no embedding norm,
and (unshared checkpoints) a decoder token table of its own.
"""

from __future__ import annotations

from models.config import TransformerConfig
from models.encoder_decoder import sinusoidal_table
from models.convert.common import (
    StateDictReader, act_fn, architecture, refuse, take_heads, take_mlp, take_norm, token_ids,
)

OFFSET = 2  # BartLearnedPositionalEmbedding.offset


def convert(hf, state_dict, model_name):
    marian = hf.model_type == "marian"
    d = hf.d_model
    for enc, dec in (("encoder_attention_heads", "decoder_attention_heads"), ("encoder_ffn_dim", "decoder_ffn_dim")):
        if getattr(hf, enc) != getattr(hf, dec):
            raise refuse(model_name, f"{enc}/{dec}", (getattr(hf, enc), getattr(hf, dec)),
                         "differ between the stacks, which is not implemented")
    for field in ("add_final_layer_norm", "normalize_before"):
        if getattr(hf, field, False):
            raise refuse(model_name, field, True, "(an mBART-style pre-norm layout) is not implemented")
    h = hf.encoder_attention_heads
    dh = d // h
    r = StateDictReader(state_dict, "model.", model_name)
    shared = r.take_optional("shared.weight")
    enc_embed = r.take_optional("encoder.embed_tokens.weight")
    dec_embed = r.take_optional("decoder.embed_tokens.weight")
    separate = marian and not getattr(hf, "share_encoder_decoder_embeddings", True)
    if shared is None:
        shared = enc_embed
    lm_head = r.take_optional("lm_head.weight")
    bias = r.take_optional("final_logits_bias")
    tied_to = dec_embed if separate else shared
    tied = lm_head is None or bool(getattr(hf, "tie_word_embeddings", True))
    cfg = TransformerConfig(
        n_layers=hf.encoder_layers, n_decoder_layers=hf.decoder_layers, d_model=d, n_heads=h, d_head=dh,
        d_vocab=hf.vocab_size, n_ctx=hf.max_position_embeddings, d_mlp=hf.encoder_ffn_dim,
        act_fn=act_fn(hf.activation_function, model_name), normalization_type="LN", norm_eps=1e-5,
        positional_embedding_type="sinusoidal" if marian else "standard", post_ln=True, embed_ln=not marian,
        final_norm=False, encoder_decoder=True, tied_embeddings=tied, separate_decoder_embed=separate,
        embed_scale=d ** 0.5 if hf.scale_embedding else None, embed_scale_in_dtype=False,
        decoder_start_token_id=hf.decoder_start_token_id, model_name=model_name,
        original_architecture=architecture(hf), **token_ids(hf),
    )
    out = {"embed.W_E": shared}
    if separate:
        out["decoder_embed.W_E"] = dec_embed
    for stack, n_layers in (("encoder", cfg.n_layers), ("decoder", cfg.n_decoder_layers)):
        positions = r.take_optional(f"{stack}.embed_positions.weight")
        if marian:  # the sinusoidal table: the checkpoint's when it stores one, else computed as transformers does
            out[f"{stack}.pos_embed.W_pos"] = positions if positions is not None else sinusoidal_table(cfg.n_ctx, d)
        else:
            if positions is None:
                raise refuse(model_name, f"{stack}.embed_positions", None, "is missing from the checkpoint")
            out[f"{stack}.pos_embed.W_pos"] = positions[OFFSET:]
            take_norm(r, out, f"{stack}.ln_embed", f"{stack}.layernorm_embedding")
        for l in range(n_layers):
            p, o = f"{stack}.layers.{l}.", f"{stack}.blocks.{l}."
            take_heads(r, out, o, {k: f"{p}self_attn.{k}_proj" for k in "qkv"} | {"o": p + "self_attn.out_proj"},
                       h, h, dh)
            take_norm(r, out, o + "ln1", p + "self_attn_layer_norm")
            if stack == "decoder":
                take_heads(r, out, o, {k: f"{p}encoder_attn.{k}_proj" for k in "qkv"} | {"o": p + "encoder_attn.out_proj"},
                           h, h, dh, module="cross_attn")
                take_norm(r, out, o + "ln2", p + "encoder_attn_layer_norm")
            take_mlp(r, out, o, p + "fc1", p + "fc2")
            take_norm(r, out, o + ("ln3" if stack == "decoder" else "ln2"), p + "final_layer_norm")
    if bias is not None:
        out["unembed.b_U"] = bias.reshape(-1)
    if not tied:
        out["unembed.W_U"] = lm_head.T
    elif lm_head is not None and not lm_head.equal(tied_to):
        raise refuse(model_name, "tie_word_embeddings", True, "but lm_head differs from the token table")
    r.finish()
    return cfg, out
