"""Weight converters: a `transformers` config and state dict -> our config and state dict.

Each family's module maps the checkpoint's names and orientations onto DESIGN.md's
layout. Every tensor in the checkpoint is either used or explicitly known to be
irrelevant (buffers, BERT's pooler); anything else stops the conversion, because a
weight we silently ignore is a model we silently get wrong.
"""

from __future__ import annotations

from models.convert.common import ConversionError, UnsupportedArchitectureError
from models.convert import bert, gpt2, llama

CONVERTERS = {
    "gpt2": gpt2.convert,
    "llama": llama.convert,
    "mistral": llama.convert,
    "qwen2": llama.convert,
    "bert": bert.convert,
}


def convert_hf(hf_config, state_dict: dict, model_name: str):
    """(TransformerConfig, state dict in our names) for a supported `transformers` checkpoint."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in CONVERTERS:
        raise UnsupportedArchitectureError(
            f"{model_name}: model_type {model_type!r} has no converter (supported: {', '.join(sorted(CONVERTERS))}). "
            "interp.attach(model) hooks any torch module without conversion."
        )
    return CONVERTERS[model_type](hf_config, state_dict, model_name)


__all__ = ["convert_hf", "ConversionError", "UnsupportedArchitectureError", "CONVERTERS"]
