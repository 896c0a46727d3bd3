"""What a dictionary's latents write straight into the logits: `W_dec[f] @ W_U` through the final norm.

    feature_logits(model, sae, torch.arange(16), k=10)   # {"top_ids", "top", "bottom_ids", "bottom", "note"}

`W_dec[f]` is what one unit of latent f adds where the dictionary writes: the residual stream for a
residual SAE, `hook_mlp_out` for a transcoder (MLP-output space, added to the residual stream as it
is), `hook_attn_out` likewise. A dictionary on an MLP's hidden layer (`mlp.hook_post`) is mapped into
the stream through W_out, one on heads' z (`attn.hook_z`, flattened head-major) through W_O. A
dictionary trained on normalised inputs (`expected_average_only_in`) decodes in scaled units, so
W_dec is divided by the scaling factor to be in the model's units.

The final norm: LayerNorm's centring and the norm's weight (Gemma's 1 + w) are linear and are applied
to the direction; its scale (1 / rms of the whole stream at that token, a positive number) and its
bias, b_U and a logit soft-cap are left out. They are the same for every feature (the scale
multiplies all of a token's logits alike), so the ranking and the signs are those of the direct
path at any token; the magnitudes are per unit of normalised stream. A model whose weights were
processed with fold_ln has the weight in W_U already (ln_final.w is None) and nothing is applied twice.
"""

from __future__ import annotations

import math
import re

import torch

RESIDUAL_WRITERS = re.compile(r"^(blocks\.\d+\.(hook_resid_(pre|mid|post)|hook_attn_out|hook_mlp_out)|hook_embed)$")


def residual_directions(model, sae, ids: torch.Tensor) -> tuple[torch.Tensor | None, str]:
    """(what one unit of each latent adds to the residual stream [F, d_model], or None; how, in words)."""
    cfg = sae.cfg
    where = cfg.writes_to
    D = sae.W_dec.detach()[ids.to(sae.W_dec.device)].float()  # [F, d_out]
    if cfg.normalize_activations == "expected_average_only_in" and cfg.norm_scaling_factor:
        D = D / cfg.norm_scaling_factor  # decode() divides the output by the factor: back in the model's units
    writer = "a transcoder's W_dec[f] is in MLP-output space" if cfg.is_transcoder else "W_dec[f]"
    if RESIDUAL_WRITERS.match(where):
        if "resid" in where:
            return D, f"{writer} is a direction in the residual stream ({where})"
        return D, f"{writer}: {where} is added to the residual stream as it is"
    layer = re.match(r"^blocks\.(\d+)\.", where)
    blocks = getattr(model, "blocks", None)
    if layer and blocks is not None:
        block = blocks[int(layer.group(1))]
        if where.endswith("mlp.hook_post") and hasattr(block.mlp, "W_out"):
            return D @ block.mlp.W_out.detach().float().to(D.device), f"{writer} @ W_out: {where} is what W_out reads"
        if where.endswith("attn.hook_z") and hasattr(block.attn, "W_O"):
            W_O = block.attn.W_O.detach().float().to(D.device)  # [n_heads, d_head, d_model]
            return D @ W_O.reshape(-1, W_O.shape[-1]), f"{writer} @ W_O (heads' z, flattened head-major)"
    return None, f"no logits: {where} has no known linear map into the residual stream"


def feature_logits(model, sae, ids: torch.Tensor, k: int, chunk: int = 256) -> dict:
    """The k most promoted (top, descending) and suppressed (bottom, ascending) tokens of each latent's
    direct path to the logits, `W_dec[f] @ W_U` with the final norm's weight folded in (module docstring)."""
    F = ids.numel()
    empty = dict(top_ids=torch.full((F, k), -1, dtype=torch.long), top=torch.full((F, k), math.nan),
                 bottom_ids=torch.full((F, k), -1, dtype=torch.long), bottom=torch.full((F, k), math.nan))
    unembed = getattr(model, "unembed", None)
    if unembed is None or getattr(model, "mlm_head", None) is not None or getattr(model.cfg, "encoder_decoder", False):
        return {**empty, "note": "no logits: the model has no decoder unembedding (W_U) read from its residual stream"}
    D, how = residual_directions(model, sae, ids)
    if D is None or k == 0:
        return {**empty, "note": how}
    if D.shape[-1] != model.cfg.d_model:
        return {**empty, "note": f"no logits: {how}, but it has {D.shape[-1]} features, not d_model="
                                 f"{model.cfg.d_model}"}
    W_U = unembed.W_U.detach().float()  # [d_model, d_vocab]
    D = D.to(W_U.device)
    ln = getattr(model, "ln_final", None)
    parts = [how]
    if ln is not None:
        if not ln.rms:
            D = D - D.mean(-1, keepdim=True)  # LayerNorm centres its input
        weight = ln.effective_weight
        if weight is not None:
            D = D * weight.detach().float().to(D.device)
        parts.append(("LayerNorm centring and " if not ln.rms else "") +
                     ("ln_final's weight folded in" if weight is not None else "ln_final has no weight (folded into W_U)")
                     + "; its scale (one positive number per token) and bias left out")
    parts.append("then @ W_U (b_U" + (" and the logit soft-cap" if getattr(model.cfg, "output_logits_soft_cap", None)
                                     else "") + " left out: the same for every feature)")
    k = min(k, W_U.shape[1])
    out = {name: [] for name in ("top_ids", "top", "bottom_ids", "bottom")}
    for a in range(0, F, chunk):  # [chunk, d_vocab] at a time: the full [F, d_vocab] can be gigabytes
        logits = D[a:a + chunk] @ W_U
        hi, lo = logits.topk(k, dim=-1), logits.topk(k, dim=-1, largest=False)
        out["top"].append(hi.values.cpu())
        out["top_ids"].append(hi.indices.cpu())
        out["bottom"].append(lo.values.cpu())
        out["bottom_ids"].append(lo.indices.cpu())
    return {**{n: torch.cat(v) for n, v in out.items()}, "note": "; ".join(parts)}
