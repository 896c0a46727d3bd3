"""Shared pieces of the converters."""

from __future__ import annotations

import re

import torch


class ConversionError(ValueError):
    """The checkpoint does not fit the converter (missing or unexpected weights)."""


class UnsupportedArchitectureError(ConversionError):
    """No converter for this architecture or variant."""


class StateDictReader:
    """Takes weights out of a checkpoint by name and reports any it never took."""

    def __init__(self, state_dict: dict[str, torch.Tensor], prefix: str, model_name: str) -> None:
        self.model_name = model_name
        self.weights: dict[str, torch.Tensor] = {}
        for key, value in state_dict.items():
            key = key[len(prefix):] if key.startswith(prefix) else key
            # Old TF-era BERT checkpoints call LayerNorm parameters gamma/beta.
            key = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", key)
            key = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key)
            self.weights[key] = value

    def has(self, key: str) -> bool:
        return key in self.weights

    def take(self, key: str) -> torch.Tensor:
        try:
            return self.weights.pop(key)
        except KeyError:
            raise ConversionError(f"{self.model_name}: the checkpoint has no weight {key!r}") from None

    def take_optional(self, key: str) -> torch.Tensor | None:
        return self.weights.pop(key, None)

    def finish(self, ignorable: tuple[str, ...] = ()) -> None:
        left = [k for k in self.weights if not any(re.search(p, k) for p in ignorable)]
        if left:
            raise UnsupportedArchitectureError(
                f"{self.model_name}: the checkpoint has weights this converter does not use: "
                f"{left[:8]}{' ...' if len(left) > 8 else ''}; this variant is not supported"
            )


def act_fn(name: str, model_name: str) -> str:
    table = {"gelu": "gelu", "gelu_new": "gelu_new", "gelu_fast": "gelu_fast",
             "gelu_pytorch_tanh": "gelu_pytorch_tanh", "silu": "silu", "swish": "silu", "relu": "relu"}
    if name not in table:
        raise UnsupportedArchitectureError(f"{model_name}: activation {name!r} is not supported")
    return table[name]


def token_ids(hf_config) -> dict:
    def first(v):
        return v[0] if isinstance(v, (list, tuple)) else v

    return {
        "bos_token_id": first(getattr(hf_config, "bos_token_id", None)),
        "eos_token_id": first(getattr(hf_config, "eos_token_id", None)),
        "pad_token_id": first(getattr(hf_config, "pad_token_id", None)),
    }


def architecture(hf_config) -> str | None:
    archs = getattr(hf_config, "architectures", None) or []
    return archs[0] if archs else None


def nn_linear_heads_in(weight: torch.Tensor, n: int, d_head: int) -> torch.Tensor:
    """nn.Linear weight [n * d_head, d_model] -> [n, d_model, d_head]."""
    return weight.reshape(n, d_head, weight.shape[-1]).permute(0, 2, 1)


def nn_linear_heads_out(weight: torch.Tensor, n: int, d_head: int) -> torch.Tensor:
    """nn.Linear weight [d_model, n * d_head] -> [n, d_head, d_model]."""
    return weight.T.reshape(n, d_head, weight.shape[0])
