"""OPT: learned positions with an offset of 2, ReLU MLP, pre-LN (post-LN for the 350m checkpoint,
`do_layer_norm_before=False`), and `word_embed_proj_dim` projections where a checkpoint has them.

The projections are folded at conversion: `W_E = embed_tokens @ project_in^T` and
`W_U = project_out^T @ embed_tokens^T` (or lm_head), so the residual stream, W_E and W_U
all live in d_model, as every circuit expects. The two row positions OPT's table keeps
before position 0 are dropped: our `W_pos[p]` is OPT's row `p + 2`.
"""

from __future__ import annotations

from models.config import TransformerConfig
from models.convert.common import StateDictReader, act_fn, architecture, take_heads, take_mlp, take_norm, token_ids

OFFSET = 2  # OPTLearnedPositionalEmbedding.offset


def convert(hf, state_dict, model_name):
    d, h = hf.hidden_size, hf.num_attention_heads
    dh = d // h
    r = StateDictReader(state_dict, "model.decoder.", model_name)
    lm_head = r.take_optional("lm_head.weight")
    embed = r.take("embed_tokens.weight")  # [vocab, word_embed_proj_dim]
    project_in, project_out = r.take_optional("project_in.weight"), r.take_optional("project_out.weight")
    tied_head = lm_head is None or bool(getattr(hf, "tie_word_embeddings", True))
    head = embed if tied_head else lm_head  # [vocab, word_embed_proj_dim]
    projected = project_in is not None or project_out is not None
    pre_ln = bool(hf.do_layer_norm_before)
    affine = bool(getattr(hf, "layer_norm_elementwise_affine", True))
    final_norm = pre_ln and not getattr(hf, "_remove_final_layer_norm", False)
    cfg = TransformerConfig(
        n_layers=hf.num_hidden_layers, d_model=d, n_heads=h, d_head=dh, d_vocab=hf.vocab_size,
        n_ctx=hf.max_position_embeddings, d_mlp=hf.ffn_dim, act_fn=act_fn(hf.activation_function, model_name),
        normalization_type="LN" if affine else "LNPre", norm_eps=1e-5, positional_embedding_type="standard",
        post_ln=not pre_ln, embed_ln=False, final_norm=final_norm, tied_embeddings=tied_head and not projected,
        model_name=model_name, original_architecture=architecture(hf), **token_ids(hf),
    )
    out = {
        "embed.W_E": embed @ project_in.T if project_in is not None else embed,
        "pos_embed.W_pos": r.take("embed_positions.weight")[OFFSET:],
    }
    for l in range(cfg.n_layers):
        p, o = f"layers.{l}.", f"blocks.{l}."
        a = p + "self_attn."
        take_heads(r, out, o, {k: a + f"{k}_proj" for k in "qkv"} | {"o": a + "out_proj"}, h, h, dh)
        take_mlp(r, out, o, p + "fc1", p + "fc2")
        if affine:
            # self_attn_layer_norm is ln1 (before attention, or after its add in post-LN); final_layer_norm ln2.
            take_norm(r, out, o + "ln1", p + "self_attn_layer_norm")
            take_norm(r, out, o + "ln2", p + "final_layer_norm")
    if final_norm and affine:
        take_norm(r, out, "ln_final", "final_layer_norm")
    if not cfg.tied_embeddings:
        out["unembed.W_U"] = project_out.T @ head.T if project_out is not None else head.T
    r.finish()
    return cfg, out
