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


# ---------------------------------------------------------------------- switches read off configs
_LAYER_TYPES = ("full_attention", "sliding_attention")


def refuse(model_name: str, field: str, value, why: str = "is not implemented") -> UnsupportedArchitectureError:
    """The error for a checkpoint switch we do not implement: it names the field and its value."""
    return UnsupportedArchitectureError(f"{model_name}: config field {field} = {value!r} {why}; converting it "
                                        "anyway would give a model that computes something else")


def rope_parameters(hf) -> dict:
    """transformers v5 `rope_parameters`, with v4's flat `rope_theta` / `rope_scaling` merged in."""
    params = dict(getattr(hf, "rope_parameters", None) or {})
    legacy = dict(getattr(hf, "rope_scaling", None) or {})
    return {**legacy, **params}


def _one_rope(params: dict, hf, model_name: str, field: str, default_theta: float) -> tuple[float, float, dict | None]:
    from models.rotary import ROPE_TYPES, longrope_attention_factor, rope_kind

    kind = rope_kind(params)
    if kind == "su":  # Phi-3's old name for LongRoPE
        kind = "longrope"
    if kind not in ROPE_TYPES:
        raise refuse(model_name, f"{field}['rope_type']", kind, f"is not implemented (implemented: {', '.join(ROPE_TYPES)})")
    theta = float(params.get("rope_theta", getattr(hf, "rope_theta", None) or default_theta))
    partial = float(params.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", None) or 1.0))
    if kind == "default":
        return theta, partial, None
    scaling = {**params, "rope_type": kind}
    if kind == "longrope":
        scaling["attention_factor"] = longrope_attention_factor(params, hf.max_position_embeddings)
    return theta, partial, scaling


def rope_config(hf, model_name: str, head_dim: int, default_theta: float = 10000.0) -> dict:
    """TransformerConfig fields for rotary positions, flat or nested per layer type (Gemma 3)."""
    params = rope_parameters(hf)
    nested = bool(params) and set(params) <= set(_LAYER_TYPES) and all(isinstance(v, dict) or v is None
                                                                        for v in params.values())
    if not nested:
        theta, partial, scaling = _one_rope(params, hf, model_name, "rope_parameters", default_theta)
        return dict(positional_embedding_type="rotary", rotary_dim=int(head_dim * partial), rotary_base=theta,
                    rotary_scaling=scaling)
    full = _one_rope(params.get("full_attention") or {}, hf, model_name, "rope_parameters['full_attention']",
                     default_theta)
    local = _one_rope(params.get("sliding_attention") or {}, hf, model_name, "rope_parameters['sliding_attention']",
                      default_theta)
    if full[1] != local[1]:
        raise refuse(model_name, "rope_parameters[...]['partial_rotary_factor']", (full[1], local[1]),
                     "differs between layer types, which is not implemented")
    return dict(positional_embedding_type="rotary", rotary_dim=int(head_dim * full[1]), rotary_base=full[0],
                rotary_scaling=full[2], rotary_base_local=local[0], rotary_scaling_local=local[2])


def attention_windows(hf, model_name: str, every_layer: bool = False) -> dict:
    """`sliding_window` / `layer_types` fields: from the config's layer_types when it has them, else the
    window applies to every layer (`every_layer`: Mistral, Phi-3) or to none."""
    window = getattr(hf, "sliding_window", None)
    types = getattr(hf, "layer_types", None)
    if types is not None:
        types = list(types)
        unknown = sorted(set(types) - set(_LAYER_TYPES))
        if unknown:
            raise refuse(model_name, "layer_types", unknown[0], "names an attention variant that is not implemented")
        if "sliding_attention" not in types or not window:
            return {}
        return dict(sliding_window=int(window), layer_types=types)
    if every_layer and window:
        return dict(sliding_window=int(window))
    return {}


def refuse_true(hf, model_name: str, *fields: str) -> None:
    """Refuse a checkpoint that switches on any of `fields` (variants we do not implement)."""
    for field in fields:
        value = getattr(hf, field, None)
        if value:
            raise refuse(model_name, field, value)


# ---------------------------------------------------------------------- taking weights in our layout
def take_norm(r: StateDictReader, out: dict, ours: str, theirs: str, bias: bool = True) -> None:
    """A norm's weight (and bias) `theirs.weight` -> `ours.w` (`ours.b`)."""
    out[ours + ".w"] = r.take(theirs + ".weight")
    if bias:
        out[ours + ".b"] = r.take(theirs + ".bias")


def take_linear(r: StateDictReader, out: dict, ours_w: str, ours_b: str, theirs: str) -> None:
    """An nn.Linear `[out, in]` -> our `[in, out]` weight, and its bias when the checkpoint has one."""
    out[ours_w] = r.take(theirs + ".weight").T
    bias = r.take_optional(theirs + ".bias")
    if bias is not None:
        out[ours_b] = bias


def take_mlp(r: StateDictReader, out: dict, o: str, fc_in: str, fc_out: str) -> None:
    """A dense MLP's two nn.Linear layers -> `{o}mlp.W_in/b_in`, `{o}mlp.W_out/b_out`."""
    take_linear(r, out, o + "mlp.W_in", o + "mlp.b_in", fc_in)
    take_linear(r, out, o + "mlp.W_out", o + "mlp.b_out", fc_out)


def take_heads(r: StateDictReader, out: dict, o: str, names: dict[str, str], n_heads: int, n_kv: int,
               d_head: int, module: str = "attn") -> None:
    """Separate q/k/v/o nn.Linear projections -> our per-head weights and biases (absent biases stay zero).

    names: {"q": ..., "k": ..., "v": ..., "o": ...}, the checkpoint's module paths; module: ours under the
    block prefix o ("attn", or "cross_attn" in an encoder-decoder's decoder)."""
    a = f"{o}{module}."
    for ours, key, n in (("W_Q", "q", n_heads), ("_W_K", "k", n_kv), ("_W_V", "v", n_kv)):
        out[a + ours] = nn_linear_heads_in(r.take(names[key] + ".weight"), n, d_head)
        bias = r.take_optional(names[key] + ".bias")
        if bias is not None:
            out[a + ours.replace("W", "b")] = bias.reshape(n, d_head)
    out[a + "W_O"] = nn_linear_heads_out(r.take(names["o"] + ".weight"), n_heads, d_head)
    bias = r.take_optional(names["o"] + ".bias")
    if bias is not None:
        out[a + "b_O"] = bias


def take_gpt2_style_rest(r: StateDictReader, out: dict, p: str, o: str) -> None:
    """GPT-2's block around the attention, with nn.Linear MLP weights (GPT-Neo, GPT-BigCode):
    `ln_1`, `ln_2`, `mlp.c_fc`, `mlp.c_proj`."""
    take_norm(r, out, o + "ln1", p + "ln_1")
    take_norm(r, out, o + "ln2", p + "ln_2")
    take_mlp(r, out, o, p + "mlp.c_fc", p + "mlp.c_proj")
