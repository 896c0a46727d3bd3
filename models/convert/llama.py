"""The LLaMA layout and its relatives: `model.layers.{l}.self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`.

LLaMA, SmolLM, Mistral, Qwen2 and Qwen3 (RMSNorm, rotary, SwiGLU, grouped KV heads,
sliding windows), OLMo (LayerNorm without weights, clip_qkv), OLMo 2 (norms after each
sublayer only, q/k norms over the full width), Gemma 1/2/3 (x(1 + w) norms, GeGLU,
scaled embeddings, post-sublayer norms, soft-caps, local/global layers) and Phi-3 (fused
qkv and gate/up projections). One reader; each family is a row of `LAYOUTS`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from models.config import TransformerConfig
from models.convert.common import (
    StateDictReader, act_fn, architecture, attention_windows, nn_linear_heads_in, nn_linear_heads_out, refuse,
    refuse_true, rope_config, token_ids,
)
from models.convert.moe import moe_config, take_moe


@dataclass(frozen=True)
class Layout:
    # checkpoint norm name -> our name, per layer
    norms: tuple[tuple[str, str], ...] = (("input_layernorm", "ln1"), ("post_attention_layernorm", "ln2"))
    final_norm: str | None = "norm"
    qk_norm: str | None = None  # "head" (Qwen3, Gemma 3) or "full" (OLMo 2)
    fused: bool = False  # Phi-3: qkv_proj and gate_up_proj
    every_layer_window: bool = False  # sliding_window without layer_types applies to every layer
    gemma: int = 0  # Gemma generation: 1, 2 or 3
    olmo: int = 0
    moe: bool = False  # mixture-of-experts MLPs (models/convert/moe.py)


LAYOUTS = {
    "llama": Layout(),
    "mistral": Layout(every_layer_window=True),
    "qwen2": Layout(),
    "qwen3": Layout(qk_norm="head"),
    "olmo": Layout(norms=(), final_norm=None, olmo=1),
    "olmo2": Layout(norms=(("post_attention_layernorm", "ln1_post"), ("post_feedforward_layernorm", "ln2_post")),
                    qk_norm="full", olmo=2),
    "gemma": Layout(gemma=1),
    "gemma2": Layout(norms=(("input_layernorm", "ln1"), ("post_attention_layernorm", "ln1_post"),
                            ("pre_feedforward_layernorm", "ln2"), ("post_feedforward_layernorm", "ln2_post")), gemma=2),
    "gemma3_text": Layout(norms=(("input_layernorm", "ln1"), ("post_attention_layernorm", "ln1_post"),
                                 ("pre_feedforward_layernorm", "ln2"), ("post_feedforward_layernorm", "ln2_post")),
                          qk_norm="head", gemma=3),
    "phi3": Layout(fused=True, every_layer_window=True),
    "mixtral": Layout(every_layer_window=True, moe=True),
    "qwen2_moe": Layout(moe=True),
    "qwen3_moe": Layout(qk_norm="head", every_layer_window=True, moe=True),
    "olmoe": Layout(qk_norm="full", olmo=3, moe=True),
}


def _switches(hf, layout: Layout, model_name: str, d: int, dh: int) -> dict:
    """TransformerConfig fields beyond LLaMA's for this family."""
    out: dict = {}
    if layout.gemma:
        refuse_true(hf, model_name, "use_bidirectional_attention")
        out.update(norm_weight_offset=1.0, norm_weight_in_fp32=True, embed_scale=d ** 0.5)
        if layout.gemma >= 2:
            # Gemma 3's config keeps attn_logit_softcapping, but its attention never passes it on
            # (transformers 5): the checkpoint's model does not cap, so neither do we.
            out.update(post_sublayer_norm=True, attn_scale=math.sqrt(hf.query_pre_attn_scalar),
                       attn_scores_soft_cap=getattr(hf, "attn_logit_softcapping", None) if layout.gemma == 2 else None,
                       output_logits_soft_cap=getattr(hf, "final_logit_softcapping", None))
    if layout.olmo == 1:
        # OlmoLayerNorm: no weight or bias, eps fixed at 1e-5 whatever the config says.
        out.update(normalization_type="LNPre", norm_eps=1e-5, clip_qkv=getattr(hf, "clip_qkv", None))
    if layout.olmo == 2:
        out.update(pre_norm=False, post_sublayer_norm=True, norm_weight_in_fp32=True)
    if layout.olmo == 3:  # OLMoE: pre-norms as LLaMA, q/k norms over the full width, then clip_qkv
        out.update(clip_qkv=getattr(hf, "clip_qkv", None))
    if layout.moe:
        out.update(moe_config(hf, hf.model_type, model_name))
    if layout.qk_norm:
        out.update(qk_norm=layout.qk_norm, qk_norm_type="RMS")
    return out


def _gemma3_language_model(state_dict: dict) -> dict:
    """Gemma3ForConditionalGeneration's text weights under Gemma3ForCausalLM's names. The files say
    `language_model.model.*`, a constructed model `model.language_model.*` (transformers 5 renames at load)."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith(("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                           "model.multi_modal_projector.")):
            continue  # the image path never touches text-only input
        for old, new in (("model.language_model.", "model."), ("language_model.model.", "model."),
                         ("language_model.lm_head.", "lm_head.")):
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    return out


def convert(hf, state_dict, model_name):
    model_type = hf.model_type
    prefix = "model."
    multimodal = model_type == "gemma3"
    if multimodal:  # the multimodal checkpoint: its language model, without the vision tower
        hf, model_type, state_dict = hf.text_config, "gemma3_text", _gemma3_language_model(state_dict)
    layout = LAYOUTS[model_type]
    d, h = hf.hidden_size, hf.num_attention_heads
    kv = getattr(hf, "num_key_value_heads", None) or h
    dh = getattr(hf, "head_dim", None) or d // h
    refuse_true(hf, model_name, "attention_chunk_size", "use_sliding_window_per_layer")
    r = StateDictReader(state_dict, prefix, model_name)
    lm_head = r.take_optional("lm_head.weight")
    tied = lm_head is None or bool(getattr(hf, "tie_word_embeddings", False))
    act = getattr(hf, "hidden_activation", None) or hf.hidden_act
    eps = getattr(hf, "rms_norm_eps", None) or getattr(hf, "layer_norm_eps", None) or 1e-6
    cfg = TransformerConfig(**{
        **dict(
            n_layers=hf.num_hidden_layers, d_model=d, n_heads=h, n_kv_heads=kv, d_head=dh, d_vocab=hf.vocab_size,
            n_ctx=hf.max_position_embeddings, d_mlp=hf.intermediate_size, act_fn=act_fn(act, model_name),
            gated_mlp=True, normalization_type="RMS", norm_eps=eps, tied_embeddings=tied, model_name=model_name,
            original_architecture=architecture(hf), **token_ids(hf),
        ),
        **rope_config(hf, model_name, dh),
        **attention_windows(hf, model_name, every_layer=layout.every_layer_window),
        **_switches(hf, layout, model_name, d, dh),
        # Gemma3ForConditionalGeneration never applies the text config's final_logit_softcapping.
        **(dict(output_logits_soft_cap=None) if multimodal else {}),
    })
    out = {"embed.W_E": r.take("embed_tokens.weight")}
    for l in range(cfg.n_layers):
        p, o = f"layers.{l}.", f"blocks.{l}."
        a = p + "self_attn."
        if layout.fused:
            q, k, v = r.take(a + "qkv_proj.weight").split([h * dh, kv * dh, kv * dh], dim=0)
            weights = {"q_proj": q, "k_proj": k, "v_proj": v}
        else:
            weights = {name: r.take(a + f"{name}.weight") for name in ("q_proj", "k_proj", "v_proj")}
        for ours, theirs, n in (("W_Q", "q_proj", h), ("_W_K", "k_proj", kv), ("_W_V", "v_proj", kv)):
            out[o + "attn." + ours] = nn_linear_heads_in(weights[theirs], n, dh)
            bias = r.take_optional(a + f"{theirs}.bias")
            if bias is not None:
                out[o + "attn." + ours.replace("W", "b")] = bias.reshape(n, dh)
        out[o + "attn.W_O"] = nn_linear_heads_out(r.take(a + "o_proj.weight"), h, dh)
        b_o = r.take_optional(a + "o_proj.bias")
        if b_o is not None:
            out[o + "attn.b_O"] = b_o
        if layout.qk_norm:
            out[o + "attn.q_norm.w"] = r.take(a + "q_norm.weight")
            out[o + "attn.k_norm.w"] = r.take(a + "k_norm.weight")
        for theirs, ours in layout.norms:
            out[o + ours + ".w"] = r.take(p + f"{theirs}.weight")
        m = p + "mlp."
        if layout.moe and cfg.is_moe(l):
            take_moe(r, out, p, o, cfg.num_experts, mixtral=hf.model_type == "mixtral")
        elif layout.fused:
            # Phi-3: gate_up_proj holds [gate; up] along its output.
            out[o + "mlp.W_gate"], out[o + "mlp.W_in"] = (w.T for w in r.take(m + "gate_up_proj.weight").chunk(2, dim=0))
            out[o + "mlp.W_out"] = r.take(m + "down_proj.weight").T
        else:
            for ours, theirs in (("W_gate", "gate_proj"), ("W_in", "up_proj"), ("W_out", "down_proj")):
                out[o + "mlp." + ours] = r.take(m + f"{theirs}.weight").T
                bias = r.take_optional(m + f"{theirs}.bias")
                if bias is not None:
                    out[o + "mlp." + ours.replace("W", "b")] = bias
    if layout.final_norm:
        out["ln_final.w"] = r.take(layout.final_norm + ".weight")
    if not tied:
        out["unembed.W_U"] = lm_head.T
    r.finish(ignorable=(r"rotary_emb\.", r"embed_tokens\.embed_scale$"))
    return cfg, out


__all__ = ["convert", "LAYOUTS", "refuse"]
