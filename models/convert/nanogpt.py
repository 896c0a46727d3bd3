"""nanoGPT checkpoints (`ckpt.pt` from Karpathy's nanoGPT `train.py`): `model_args` plus a state dict.

nanoGPT is GPT-2 with `nn.Linear` weights ([out, in], where GPT-2's Conv1D holds [in, out]),
exact GELU, optional biases (`bias=False` drops every bias, LayerNorms' too) and
`_orig_mod.` prefixes when the model was `torch.compile`d. The checkpoint is mapped onto
GPT-2's names and orientation and converted by the GPT-2 converter, so both share one
tested path; absent biases become zeros, which is what a missing bias computes.
"""

from __future__ import annotations

import torch

from models.convert import gpt2
from models.convert.common import ConversionError

_LINEAR = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def is_nanogpt(checkpoint) -> bool:
    return isinstance(checkpoint, dict) and "model_args" in checkpoint and "model" in checkpoint


def convert(checkpoint: dict, model_name: str):
    """(TransformerConfig, our state dict) from a loaded nanoGPT checkpoint dict."""
    from transformers import GPT2Config

    args = checkpoint["model_args"]
    missing = [k for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size") if k not in args]
    if missing:
        raise ConversionError(f"{model_name}: model_args lacks {missing}; is this a nanoGPT checkpoint?")
    sd = {k.removeprefix("_orig_mod."): v for k, v in checkpoint["model"].items()}
    d, n_layer = args["n_embd"], args["n_layer"]
    wte = sd["transformer.wte.weight"]
    tied = "lm_head.weight" not in sd or torch.equal(sd["lm_head.weight"], wte)
    hf_sd = {}
    for key, value in sd.items():
        if key.endswith(".attn.bias") and not key.endswith("c_attn.bias"):
            continue  # nanoGPT's causal-mask buffer (non-flash attention)
        if key == "lm_head.weight" and tied:
            continue
        hf_sd[key] = value.T.contiguous() if key.endswith(_LINEAR) else value
    zeros = {"attn.c_attn.bias": 3 * d, "attn.c_proj.bias": d, "mlp.c_fc.bias": 4 * d, "mlp.c_proj.bias": d,
             "ln_1.bias": d, "ln_2.bias": d}
    for layer in range(n_layer):
        for name, size in zeros.items():
            hf_sd.setdefault(f"transformer.h.{layer}.{name}", wte.new_zeros(size))
    hf_sd.setdefault("transformer.ln_f.bias", wte.new_zeros(d))
    config = GPT2Config(n_layer=n_layer, n_head=args["n_head"], n_embd=d, n_positions=args["block_size"],
                        vocab_size=args["vocab_size"], activation_function="gelu", layer_norm_epsilon=1e-5,
                        tie_word_embeddings=tied, architectures=["nanoGPT"])
    return gpt2.convert(config, hf_sd, model_name)
