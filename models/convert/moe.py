"""Mixture-of-experts MLPs of the LLaMA layout: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE.

`transformers` 5 fuses the experts at load time (`conversion_mapping.py`), so a
constructed model's `state_dict()` holds `mlp.experts.gate_up_proj [E, 2 d_mlp, d_model]`
and `mlp.experts.down_proj [E, d_model, d_mlp]`, while the files on disk hold one
nn.Linear per expert (`block_sparse_moe.experts.{e}.w1/w2/w3` for Mixtral,
`mlp.experts.{e}.gate_proj/up_proj/down_proj` for the others). Both read into the same
`W_gate`, `W_in`, `W_out`.
"""

from __future__ import annotations

import torch

from models.convert.common import StateDictReader, refuse

# Routing fields of other MoE families (DeepSeek, GLM, ...): any set means a scheme we do not implement.
_OTHER_ROUTING = ("scoring_func", "topk_method", "n_group", "topk_group", "routed_scaling_factor",
                  "moe_router_activation", "router_aux_loss_free")


def moe_config(hf, model_type: str, model_name: str) -> dict:
    """TransformerConfig fields of the mixture of experts."""
    for field in _OTHER_ROUTING:
        value = getattr(hf, field, None)
        if value not in (None, False, "softmax"):
            raise refuse(model_name, field, value, "is a routing scheme that is not implemented (implemented: softmax "
                         "then top-k, renormalised or not, with an optional sigmoid-gated shared expert)")
    if model_type == "mixtral":
        return dict(num_experts=hf.num_local_experts, experts_per_token=hf.num_experts_per_tok,
                    d_mlp_expert=hf.intermediate_size, norm_topk_prob=True, router_weights_fp32=True)
    dense = sorted(set(getattr(hf, "mlp_only_layers", None) or []))
    step = getattr(hf, "decoder_sparse_step", 1) or 1
    dense += [l for l in range(hf.num_hidden_layers) if (l + 1) % step and l not in dense]
    shared = getattr(hf, "shared_expert_intermediate_size", None) if model_type == "qwen2_moe" else None
    return dict(num_experts=hf.num_experts, experts_per_token=hf.num_experts_per_tok,
                d_mlp_expert=getattr(hf, "moe_intermediate_size", None) or hf.intermediate_size,
                norm_topk_prob=bool(getattr(hf, "norm_topk_prob", False)), d_mlp_shared=shared or None,
                dense_layers=sorted(dense) or None)


def take_moe(r: StateDictReader, out: dict, p: str, o: str, n_experts: int, mixtral: bool) -> None:
    """Layer prefix p (the checkpoint's) -> our `{o}mlp.*`, from fused (in memory) or per-expert (on disk) names."""
    m = p + "mlp."
    disk = p + ("block_sparse_moe." if mixtral else "mlp.")
    router = r.take_optional(m + "gate.weight")
    out[o + "mlp.W_router"] = (router if router is not None else r.take(disk + "gate.weight")).T
    fused = r.take_optional(m + "experts.gate_up_proj")
    if fused is not None:  # [E, 2 d_mlp, d_model]: gate first, then up
        gate, up = fused.chunk(2, dim=1)
        down = r.take(m + "experts.down_proj")  # [E, d_model, d_mlp]
    else:
        names = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
        gate, up, down = (torch.stack([r.take(f"{disk}experts.{e}.{n}.weight") for e in range(n_experts)])
                          for n in names)
    out[o + "mlp.W_gate"] = gate.transpose(1, 2)  # [E, d_model, d_mlp]
    out[o + "mlp.W_in"] = up.transpose(1, 2)
    out[o + "mlp.W_out"] = down.transpose(1, 2)  # [E, d_mlp, d_model]
    if r.has(m + "shared_expert.gate_proj.weight"):
        s = m + "shared_expert."
        for ours, theirs in (("W_gate", "gate_proj"), ("W_in", "up_proj"), ("W_out", "down_proj")):
            out[o + f"mlp.shared.{ours}"] = r.take(s + f"{theirs}.weight").T
        out[o + "mlp.W_shared_gate"] = r.take(m + "shared_expert_gate.weight").T
