"""Weight converters: a `transformers` config and state dict -> our config and state dict.

Each family's module maps the checkpoint's names and orientations onto DESIGN.md's
layout. Every tensor in the checkpoint is either used or explicitly known to be
irrelevant (buffers, BERT's pooler); anything else stops the conversion, because a
weight we silently ignore is a model we silently get wrong. `FAMILIES` is the support
table (`interp models --families`, the README's table is written from it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from models.convert import bart, bert, gpt2, gpt_bigcode, gpt_neo, gpt_neox, gptj, llama, opt, phi, stablelm, t5
from models.convert.common import ConversionError, UnsupportedArchitectureError


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # transformers' config.model_type values
    classes: tuple[str, ...]  # transformers model classes whose checkpoints convert
    convert: Callable
    switches: str  # the forward switches the family turns on
    circuits: str = "QK, OV"  # model.QK / model.OV exactness (interp.circuits refuses the others)
    fold_ln: str = "yes"  # weight processing
    notes: str = ""


FAMILIES: list[Family] = [
    Family("GPT-2", ("gpt2",), ("GPT2LMHeadModel", "GPT2Model"), gpt2.convert,
           "LayerNorm, learned positions, GELU", notes="nanoGPT ckpt.pt too"),
    Family("LLaMA, SmolLM, Qwen2", ("llama", "qwen2"), ("LlamaForCausalLM", "Qwen2ForCausalLM"), llama.convert,
           "RMSNorm, rotary (default/linear/llama3), SwiGLU, grouped KV; Qwen2's sliding layers from layer_types"),
    Family("Mistral", ("mistral",), ("MistralForCausalLM",), llama.convert,
           "as LLaMA + a sliding window on every layer (query - key < window)"),
    Family("Qwen3", ("qwen3",), ("Qwen3ForCausalLM",), llama.convert,
           "as LLaMA + per-head q/k RMSNorm before the rotary, explicit head_dim",
           circuits="OV (QK: q/k norms)"),
    Family("Gemma", ("gemma",), ("GemmaForCausalLM",), llama.convert,
           "RMSNorm x(1 + w) in float32, GeGLU, embeddings x sqrt(d_model) cast to the weights' dtype, "
           "head_dim != d_model / n_heads, multi-query"),
    Family("Gemma 2", ("gemma2",), ("Gemma2ForCausalLM",), llama.convert,
           "as Gemma + norms after attention and MLP, query_pre_attn_scalar, attention and final-logit "
           "soft-caps, sliding layers from layer_types",
           circuits="QK (before the cap); OV refused in interp.circuits (post-attention norm)",
           fold_ln="pre-norms only (ln1_post/ln2_post stay)", notes="always the explicit attention path (SDPA has no soft-cap)"),
    Family("Gemma 3 (text)", ("gemma3_text", "gemma3"), ("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"),
           llama.convert, "as Gemma 2 + per-head q/k norms, 5 local : 1 global layers with their own rope bases "
           "(rope parameters nested per layer type)",
           circuits="none exact (q/k norms, post-attention norm)", fold_ln="pre-norms only (ln1_post/ln2_post stay)",
           notes="the multimodal checkpoint converts its language model"),
    Family("OLMo", ("olmo",), ("OlmoForCausalLM",), llama.convert,
           "LayerNorm without weights (eps 1e-5), clip_qkv, SwiGLU, rotary",
           circuits="QK, OV (both refused when clip_qkv is set)", fold_ln="nothing to fold",
           notes="fold_value_biases refused under clip_qkv"),
    Family("OLMo 2", ("olmo2",), ("Olmo2ForCausalLM",), llama.convert,
           "RMSNorm only after each sublayer (before the add), q/k RMSNorm over the full width",
           circuits="none exact (q/k norms, post-attention norm)", fold_ln="ln_final only",
           notes="hook_attn_out is after the norm: resid_mid = resid_pre + attn_out"),
    Family("Phi-3", ("phi3",), ("Phi3ForCausalLM",), llama.convert,
           "as LLaMA with fused qkv_proj and gate_up_proj, sliding window on every layer, LongRoPE",
           notes="rope types other than default/longrope are refused"),
    Family("Mixtral", ("mixtral",), ("MixtralForCausalLM",), llama.convert,
           "as Mistral + a mixture of experts: softmax, top-k, renormalised; expert weights fused (in memory) or "
           "per expert (on disk)", notes="hook_router_logits / expert_weights / expert_indices / expert_out / experts"),
    Family("Qwen2-MoE", ("qwen2_moe",), ("Qwen2MoeForCausalLM",), llama.convert,
           "as Qwen2 + experts (top-k, renormalised or not) and a shared expert scaled by a sigmoid gate; dense "
           "layers from mlp_only_layers / decoder_sparse_step", notes="hook_shared_expert_out"),
    Family("Qwen3-MoE", ("qwen3_moe",), ("Qwen3MoeForCausalLM",), llama.convert,
           "as Qwen3 (per-head q/k norms) + experts with normalised top-k", circuits="OV (QK: q/k norms)"),
    Family("OLMoE", ("olmoe",), ("OlmoeForCausalLM",), llama.convert,
           "LLaMA-style pre-norms, q/k RMSNorm over the full width then clip_qkv, experts (top-k)",
           circuits="none exact (q/k norms, clip_qkv)", notes="routing schemes other than softmax top-k are refused"),
    Family("GPT-NeoX / Pythia", ("gpt_neox",), ("GPTNeoXForCausalLM",), gpt_neox.convert,
           "parallel attention and MLP through two LayerNorms, fused per-head QKV, partial rotary",
           notes="use_parallel_residual=False converts as a sequential block"),
    Family("GPT-J", ("gptj",), ("GPTJForCausalLM",), gptj.convert,
           "parallel block with one LayerNorm, interleaved partial rotary, lm_head bias"),
    Family("GPT-Neo", ("gpt_neo",), ("GPTNeoForCausalLM",), gpt_neo.convert,
           "no attention scaling, local attention (window_size) on the layers attention_layers marks local"),
    Family("OPT", ("opt",), ("OPTForCausalLM",), opt.convert,
           "learned positions (offset 2 dropped), ReLU, word_embed_proj_dim projections folded into W_E / W_U, "
           "post-LN when do_layer_norm_before=False (350m)", fold_ln="yes (pre-LN checkpoints)"),
    Family("Phi-1/2", ("phi",), ("PhiForCausalLM",), phi.convert,
           "parallel block with one LayerNorm, partial rotary, biases, lm_head bias, optional q/k LayerNorm",
           circuits="QK, OV (QK refused with qk_layernorm)"),
    Family("StableLM", ("stablelm",), ("StableLmForCausalLM",), stablelm.convert,
           "LayerNorm, partial rotary, SwiGLU, optional qkv bias; parallel block and per-head q/k LayerNorm "
           "(a weight per head) on the larger checkpoints", circuits="QK, OV (QK refused with qk_layernorm)"),
    Family("GPT-BigCode", ("gpt_bigcode",), ("GPTBigCodeForCausalLM",), gpt_bigcode.convert,
           "multi-query attention, fused c_attn (nn.Linear), learned positions"),
    Family("T5 / flan-T5 / mT5", ("t5", "mt5"), ("T5ForConditionalGeneration", "MT5ForConditionalGeneration"),
           t5.convert, "encoder-decoder; RMSNorm without mean, relative position buckets per stack (bidirectional / "
           "causal) in a hooked bias, no 1/sqrt(d_head), ReLU or gated-GELU, tied head x d_model^-1/2 or untied",
           circuits="QK, OV, cross QK / OV per stack (the position bias is added to the scores)",
           fold_ln="refused (encoder-decoder)", notes="HookedEncoderDecoder: encoder.blocks.* / decoder.blocks.*"),
    Family("BART", ("bart",), ("BartForConditionalGeneration",), bart.convert,
           "encoder-decoder; post-LN, learned positions (offset 2), embedding LayerNorm, final_logits_bias",
           circuits="QK, OV, cross QK / OV per stack", fold_ln="refused (post-LN)"),
    Family("Marian", ("marian",), ("MarianMTModel",), bart.convert,
           "encoder-decoder; post-LN, sinusoidal positions as [sin | cos] halves, scaled embeddings, "
           "final_logits_bias, shared or separate decoder embeddings",
           circuits="QK, OV, cross QK / OV per stack", fold_ln="refused (post-LN)"),
    Family("BERT", ("bert",), ("BertForMaskedLM", "BertModel"), bert.convert,
           "post-LN encoder, token types, optional MLM head", circuits="refused (post-LN)",
           fold_ln="refused (post-LN)"),
]

CONVERTERS = {model_type: family.convert for family in FAMILIES for model_type in family.model_types}


def family_of(model_type: str) -> Family | None:
    return next((f for f in FAMILIES if model_type in f.model_types), None)


def convert_hf(hf_config, state_dict: dict, model_name: str):
    """(TransformerConfig, state dict in our names) for a supported `transformers` checkpoint."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in CONVERTERS:
        raise UnsupportedArchitectureError(
            f"{model_name}: model_type {model_type!r} has no converter (supported: {', '.join(sorted(CONVERTERS))}). "
            "interp.attach(model) hooks any torch module without conversion."
        )
    return CONVERTERS[model_type](hf_config, state_dict, model_name)


def support_table() -> str:
    """The README's support table (markdown), from FAMILIES."""
    rows = ["| family | `transformers` classes (model_type) | forward switches | circuits | fold_ln | notes |",
            "| --- | --- | --- | --- | --- | --- |"]
    for f in FAMILIES:
        classes = ", ".join(f"`{c}`" for c in f.classes) + " (" + ", ".join(f"`{t}`" for t in f.model_types) + ")"
        rows.append(f"| {f.name} | {classes} | {f.switches} | {f.circuits} | {f.fold_ln} | {f.notes} |")
    return "\n".join(rows)


__all__ = ["convert_hf", "ConversionError", "UnsupportedArchitectureError", "CONVERTERS", "FAMILIES", "Family",
           "family_of", "support_table"]
