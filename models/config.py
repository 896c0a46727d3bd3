"""TransformerConfig: every architectural choice of a HookedTransformer, in one dataclass."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

import torch

ACT_FNS = ("gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "silu", "relu")
NORM_TYPES = (None, "LN", "RMS", "LNPre", "RMSPre")


@dataclass
class TransformerConfig:
    """Configuration of a HookedTransformer (field names follow TransformerLens where they exist).

    Families are combinations of these switches: GPT-2 is LN + learned positions + GELU;
    LLaMA is RMS + rotary + gated SiLU MLP (+ grouped KV heads); BERT is post-LN +
    bidirectional + token-type embeddings; the framework's toy models are attention-only
    (`d_mlp=None`) with or without norms.
    """

    n_layers: int
    d_model: int
    n_heads: int
    d_head: int
    d_vocab: int
    n_ctx: int
    d_mlp: int | None = None  # None: attention-only
    n_kv_heads: int | None = None  # None: one KV head per query head
    act_fn: str = "gelu_new"
    gated_mlp: bool = False
    normalization_type: str | None = "LN"
    norm_eps: float = 1e-5
    positional_embedding_type: str = "standard"  # "standard" (learned), "rotary" or "none"
    rotary_dim: int | None = None  # None: the whole head
    rotary_base: float = 10000.0
    rotary_scaling: dict | None = None  # HF rope_parameters for non-default rope types
    causal: bool = True
    post_ln: bool = False  # BERT: norm after each residual add, and on the embedding
    n_token_types: int = 0
    final_norm: bool = True
    tied_embeddings: bool = False
    has_unembed: bool = True  # False for an encoder checkpoint without an MLM head
    mlm_head: bool = False
    attn_scale: float | None = None  # None: sqrt(d_head)
    d_vocab_out: int | None = None  # None: d_vocab
    model_name: str = "custom"
    original_architecture: str | None = None
    default_prepend_bos: bool | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    init_range: float = 0.02
    # torch.dtype and device string, as TransformerLens' config has them (its utilities read
    # both); the model keeps them current when it is moved or cast. JSON holds the dtype's name.
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.dtype, str):
            self.dtype = getattr(torch, self.dtype.removeprefix("torch."))
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.d_vocab_out is None:
            self.d_vocab_out = self.d_vocab
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.act_fn not in ACT_FNS:
            raise ValueError(f"act_fn {self.act_fn!r} is not supported; choose one of {ACT_FNS}")
        if self.normalization_type not in NORM_TYPES:
            raise ValueError(f"normalization_type must be one of {NORM_TYPES}, got {self.normalization_type!r}")
        if self.positional_embedding_type not in ("standard", "rotary", "none"):
            raise ValueError(f"positional_embedding_type {self.positional_embedding_type!r} is not supported")
        if self.post_ln and self.normalization_type is None:
            raise ValueError("post_ln needs a normalization_type")
        if self.rotary_dim is None and self.positional_embedding_type == "rotary":
            self.rotary_dim = self.d_head

    # TransformerLens spellings, so code written for TL reads our config.
    @property
    def n_key_value_heads(self) -> int:
        return self.n_kv_heads

    @property
    def attn_only(self) -> bool:
        return self.d_mlp is None

    @property
    def attention_dir(self) -> str:
        return "causal" if self.causal else "bidirectional"

    @property
    def is_gqa(self) -> bool:
        return self.n_kv_heads != self.n_heads

    @property
    def scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else math.sqrt(self.d_head)

    @property
    def torch_dtype(self) -> torch.dtype:
        return self.dtype

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["dtype"] = str(self.dtype).removeprefix("torch.")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TransformerConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config fields {sorted(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def replace(self, **changes) -> "TransformerConfig":
        return dataclasses.replace(self, **changes)
