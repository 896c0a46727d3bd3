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
    positional_embedding_type: str = "standard"  # "standard" (learned), "rotary", "sinusoidal", "relative" or "none"
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
    attn_scale: float | None = None  # None: sqrt(d_head); scores are q.k / attn_scale
    # ---- family switches (docs/design.md, "Families are switches"); the defaults are GPT-2/LLaMA's
    parallel_attn_mlp: bool = False  # attention and MLP both read resid_pre; resid_post = pre + attn + mlp
    shared_norm: bool = False  # parallel blocks: ln1's output feeds the MLP too (GPT-J, Phi-2); else ln2
    pre_norm: bool = True  # a norm before each sublayer (False: OLMo 2, whose norms sit after them only)
    post_sublayer_norm: bool = False  # a norm on each sublayer's output before the add (Gemma 2/3, OLMo 2)
    embed_ln: bool | None = None  # a norm on the embeddings (None: post_ln, as BERT)
    norm_weight_offset: float = 0.0  # norms multiply by (offset + w): Gemma's 1 + w
    norm_weight_in_fp32: bool = False  # apply the weight before casting back (Gemma, OLMo 2)
    qk_norm: str | None = None  # "head" (one weight for every head), "head_separate" or "full" (whole width)
    qk_norm_type: str = "RMS"  # "RMS" or "LN" for the q/k norms
    qk_norm_bias: bool = False
    clip_qkv: float | None = None  # q, k and v clamped to [-clip, clip] (OLMo)
    attn_scores_soft_cap: float | None = None  # scores -> cap * tanh(scores / cap) before the mask (Gemma 2)
    output_logits_soft_cap: float | None = None  # logits -> cap * tanh(logits / cap) (Gemma 2)
    sliding_window: int | None = None  # a key is seen when query - key < window (transformers' rule)
    layer_types: list[str] | None = None  # per layer "full_attention" / "sliding_attention"; None: all sliding
    rotary_adjacent_pairs: bool = False  # GPT-J's interleaved rotary (rotate every two) on the first rotary_dim
    rotary_base_local: float | None = None  # a second rotary table for sliding layers (Gemma 3)
    rotary_scaling_local: dict | None = None
    embed_scale: float | None = None  # embeddings x scale, the scale cast to the weights' dtype first (Gemma)
    # ---- mixture of experts (TransformerLens' num_experts / experts_per_token)
    num_experts: int = 0  # 0: dense MLPs
    experts_per_token: int = 0
    d_mlp_expert: int | None = None  # each expert's hidden width (None: d_mlp)
    norm_topk_prob: bool = False  # renormalise the top-k routing weights to sum to 1 (Mixtral, Qwen3-MoE)
    router_weights_fp32: bool = False  # weight the experts' outputs in float32 before the cast (Mixtral)
    d_mlp_shared: int | None = None  # a shared expert of this width, gated by sigmoid(x W_shared_gate) (Qwen2-MoE)
    dense_layers: list[int] | None = None  # layers whose MLP stays dense (width d_mlp) in an MoE model
    # ---- TransformerLens' opt-in hook points (models/tl_compat.py: model.set_use_...)
    use_attn_result: bool = False
    use_split_qkv_input: bool = False
    use_attn_in: bool = False
    use_hook_mlp_in: bool = False
    # ---- encoder-decoder (HookedEncoderDecoder): n_layers counts the encoder's blocks
    encoder_decoder: bool = False
    n_decoder_layers: int | None = None  # None: n_layers
    relative_attention_num_buckets: int = 32  # T5's relative position buckets ("relative" positions)
    relative_attention_max_distance: int = 128
    output_scale: float | None = None  # the decoder output x scale before the unembedding (T5's tied head)
    embed_scale_in_dtype: bool = True  # the embedding scale rounded to the weights' dtype first (Gemma; not BART)
    decoder_start_token_id: int | None = None
    separate_decoder_embed: bool = False  # the decoder has its own token embedding (Marian, unshared)
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
        if self.positional_embedding_type not in ("standard", "rotary", "sinusoidal", "relative", "none"):
            raise ValueError(f"positional_embedding_type {self.positional_embedding_type!r} is not supported")
        if self.post_ln and self.normalization_type is None:
            raise ValueError("post_ln needs a normalization_type")
        if self.rotary_dim is None and self.positional_embedding_type == "rotary":
            self.rotary_dim = self.d_head
        if self.qk_norm not in (None, "head", "head_separate", "full"):
            raise ValueError(f"qk_norm must be None, 'head', 'head_separate' or 'full', got {self.qk_norm!r}")
        if self.qk_norm_type not in ("RMS", "LN"):
            raise ValueError(f"qk_norm_type must be 'RMS' or 'LN', got {self.qk_norm_type!r}")
        if (not self.pre_norm or self.post_sublayer_norm or self.qk_norm) and self.normalization_type is None:
            raise ValueError("pre_norm=False, post_sublayer_norm and qk_norm need a normalization_type")
        if self.parallel_attn_mlp and (self.post_ln or self.d_mlp is None):
            raise ValueError("parallel_attn_mlp needs a pre-LN block with an MLP")
        if self.layer_types is not None:
            if len(self.layer_types) != self.n_layers:
                raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.n_layers} layers")
            unknown = set(self.layer_types) - {"full_attention", "sliding_attention"}
            if unknown:
                raise ValueError(f"layer_types may hold 'full_attention' and 'sliding_attention', got {sorted(unknown)}")
            if "sliding_attention" in self.layer_types and not self.sliding_window:
                raise ValueError("layer_types has sliding layers but sliding_window is not set")
        if self.num_experts:
            if not 0 < self.experts_per_token <= self.num_experts:
                raise ValueError(f"experts_per_token={self.experts_per_token} must be in 1..num_experts={self.num_experts}")
            if self.d_mlp is None:
                raise ValueError("a mixture of experts needs d_mlp (the experts' width, or the dense layers')")
        if self.embed_ln is None:
            self.embed_ln = self.post_ln

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

    def window(self, layer: int) -> int | None:
        """The sliding window of `layer` (None: it attends to every earlier position)."""
        if not self.sliding_window:
            return None
        if self.layer_types is None or self.layer_types[layer] == "sliding_attention":
            return self.sliding_window
        return None

    def is_moe(self, layer: int) -> bool:
        """Does `layer`'s MLP route tokens to experts?"""
        return bool(self.num_experts) and layer not in (self.dense_layers or ())

    def is_local(self, layer: int) -> bool:
        return self.window(layer) is not None

    @property
    def base_norm_type(self) -> str | None:
        """"LN" or "RMS" (what the Pre variants normalise with), or None."""
        return None if self.normalization_type is None else self.normalization_type.removesuffix("Pre")

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
