"""A sparse dictionary: an SAE (reads and rewrites one hook) or a transcoder (reads one hook, writes another).

    f = act(W_enc^T (x_in - b_dec?) + b_enc)      x_in: the input, normalised if the dictionary was trained so
    x_hat = f W_dec + b_dec (+ x_in W_skip^T)      transcoder with a skip connection (skip transcoders)

Weights in SAELens's names and shapes, so its files load without renaming:
W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_out], b_dec [d_out], threshold [d_sae] (JumpReLU),
W_skip [d_out, d_in] (skip transcoders). d_out = d_in for an SAE.

Activation functions (`architecture`): "relu" (trained with an L1 penalty), "topk" (the k largest
pre-activations per token, after a ReLU), "jumprelu" (pre-activation kept where it exceeds the latent's
threshold) and "batchtopk" (trained on the top k x batch pre-activations of a batch; at inference a
JumpReLU with the threshold learnt in training, and saved as one, as SAELens does).

Input normalisation (`normalize_activations`, SAELens's values and arithmetic): "expected_average_only_in"
multiplies the input by `norm_scaling_factor` and divides the output by it (SAELens folds the factor into
the weights when training ends, and saving here does the same); "constant_norm_rescale" scales each input
to norm sqrt(d_in) and "layer_norm" standardises it (mean, unbiased std + 1e-5), both undone on an SAE's
output from that same input. SAELens's transcoders normalise their input only, and so do ours.
A skip connection reads the raw input and adds to the (denormalised) output, as in SAELens.
`reshape_activations="hook_z"`: the dictionary reads [..., n_heads, d_head] flattened to d_in and writes
its output back in that shape (SAELens's attention-output SAEs).

Hook points, SAELens's names: hook_sae_input, hook_sae_acts_pre, hook_sae_acts_post, hook_sae_recons,
hook_sae_error, hook_sae_output. Spliced into a model (interp.sae.splice) they are reachable as
`blocks.8.hook_resid_post.hook_sae_acts_post`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

import torch
from torch import nn

from interp.hooks import HookedRootModule, HookPoint

ARCHITECTURES = ("relu", "topk", "batchtopk", "jumprelu")
NORMALIZATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")
RESHAPES = ("none", "hook_z")
RUNTIME_NORMALIZATIONS = ("constant_norm_rescale", "layer_norm")  # computed from each input, so decode needs x


class DictionaryConfigError(ValueError):
    """A dictionary configuration that is incomplete or contradicts itself; the message names the field."""


@dataclass
class DictionaryConfig:
    """What a dictionary is: its shape, activation, where it reads and writes in our hook names.

    hook_name: the hook it reads (an SAE also writes there). out_hook_name: where a transcoder writes
    (None for an SAE). k: latents kept per token (topk; batchtopk's average during training).
    apply_b_dec_to_input: subtract b_dec from the input before encoding (SAEs only).
    normalize_activations: SAELens's input normalisation; "expected_average_only_in" scales inputs by
    `norm_scaling_factor` (sqrt(d_in) / E||x||, estimated in training) and the output back by its inverse.
    reshape_activations: "hook_z" for SAEs on attention's hook_z (see the module docstring).
    rescale_acts_by_decoder_norm: SAELens's TopK option: latents are chosen and passed on as pre * ||W_dec
    row||, and divided by that norm again before decoding (so the decoder acts as if its rows had unit norm).
    """

    architecture: str
    d_in: int
    d_sae: int
    hook_name: str
    out_hook_name: str | None = None
    d_out: int | None = None
    k: int | None = None
    apply_b_dec_to_input: bool = False
    normalize_activations: str = "none"
    norm_scaling_factor: float | None = None
    skip: bool = False
    model_name: str | None = None
    dtype: str = "float32"
    metadata: dict = field(default_factory=dict)  # anything else a source format said (kept when saving)
    reshape_activations: str = "none"
    rescale_acts_by_decoder_norm: bool = False

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise DictionaryConfigError(f"architecture must be one of {', '.join(ARCHITECTURES)}; got "
                                        f"{self.architecture!r}")
        if self.architecture in ("topk", "batchtopk") and not (isinstance(self.k, int) and self.k > 0):
            raise DictionaryConfigError(f"a {self.architecture} dictionary needs k, the latents kept per token "
                                        f"(a positive integer); got k={self.k!r}")
        if self.normalize_activations not in NORMALIZATIONS:
            raise DictionaryConfigError(f"normalize_activations must be one of {', '.join(NORMALIZATIONS)}; got "
                                        f"{self.normalize_activations!r}")
        if self.reshape_activations not in RESHAPES:
            raise DictionaryConfigError(f"reshape_activations must be one of {', '.join(RESHAPES)}; got "
                                        f"{self.reshape_activations!r}")
        if self.d_out is None:
            self.d_out = self.d_in
        if self.is_transcoder and self.apply_b_dec_to_input:
            raise DictionaryConfigError("apply_b_dec_to_input subtracts the decoder bias from the input, which only "
                                        "makes sense when input and output are the same space (an SAE, not a transcoder)")
        if self.skip and not self.is_transcoder:
            raise DictionaryConfigError("skip=True (a skip connection W_skip) is for transcoders: give out_hook_name")
        if self.reshape_activations == "hook_z" and self.is_transcoder:
            raise DictionaryConfigError("reshape_activations='hook_z' is for SAEs on an attention hook_z; a transcoder "
                                        "reads and writes flat activations")

    @property
    def is_transcoder(self) -> bool:
        return self.out_hook_name is not None and self.out_hook_name != self.hook_name

    @property
    def writes_to(self) -> str:
        return self.out_hook_name if self.is_transcoder else self.hook_name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "DictionaryConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [n for n in required if n not in data]
        if missing:
            raise DictionaryConfigError(f"the dictionary config lacks {', '.join(missing)} (needs "
                                        f"{', '.join(required)})")
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names}
        known.setdefault("metadata", {}).update(extra)
        return cls(**known)

    def __repr__(self) -> str:
        where = f"{self.hook_name} -> {self.out_hook_name}" if self.is_transcoder else self.hook_name
        k = f", k={self.k}" if self.k else ""
        return f"DictionaryConfig({self.architecture}{k}, {self.d_in} -> {self.d_sae} -> {self.d_out}, {where})"


class SparseDictionary(HookedRootModule):
    """An SAE or transcoder (see the module docstring). `forward(x)` is the reconstruction (in the output
    space); with `error` given (spliced with the error term) the output is recons + error.

    Shapes: x [..., d_in] -> acts [..., d_sae] -> recons [..., d_out].
    """

    def __init__(self, cfg: DictionaryConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d_in, d_sae, d_out = cfg.d_in, cfg.d_sae, cfg.d_out
        dtype = getattr(torch, cfg.dtype)
        self.W_enc = nn.Parameter(torch.zeros(d_in, d_sae, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, dtype=dtype))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_out, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d_out, dtype=dtype))
        if cfg.architecture in ("jumprelu", "batchtopk"):
            self.threshold = nn.Parameter(torch.zeros(d_sae, dtype=dtype))
        if cfg.skip:
            self.W_skip = nn.Parameter(torch.zeros(d_out, d_in, dtype=dtype))
        for name in ("input", "acts_pre", "acts_post", "recons", "error", "output"):
            setattr(self, f"hook_sae_{name}", HookPoint())
        self.use_error_term = False  # spliced: output = recons + (true output - recons), so the model is unchanged
        self.setup_hooks()

    # ------------------------------------------------------------------ the maps
    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., n_heads, d_head] -> [..., d_in] for a hook_z dictionary; anything already flat passes."""
        if self.cfg.reshape_activations == "hook_z" and x.shape[-1] != self.cfg.d_in:
            return x.flatten(-2)
        return x

    def _normalise_in(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d_in] in the model's units -> the units the encoder was trained in (SAELens's formulas)."""
        norm = self.cfg.normalize_activations
        if norm == "expected_average_only_in" and self.cfg.norm_scaling_factor is not None:
            return x * self.cfg.norm_scaling_factor
        if norm == "constant_norm_rescale":
            return x * (self.cfg.d_in ** 0.5 / x.norm(dim=-1, keepdim=True))
        if norm == "layer_norm":
            centred = x - x.mean(dim=-1, keepdim=True)
            return centred / (centred.std(dim=-1, keepdim=True) + 1e-5)
        return x

    def _normalise_out(self, y: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
        """y [..., d_out] in training units -> the model's units; x: the input y was computed from."""
        norm = self.cfg.normalize_activations
        if norm == "expected_average_only_in" and self.cfg.norm_scaling_factor is not None:
            return y / self.cfg.norm_scaling_factor
        if norm not in RUNTIME_NORMALIZATIONS or self.cfg.is_transcoder:
            return y  # SAELens's transcoders undo no run-time normalisation on their output
        if x is None:
            raise ValueError(f"normalize_activations={norm!r} undoes a per-input normalisation on the output: pass "
                             "the input x to decode")
        x = self._flat(x.to(y.dtype))
        if norm == "constant_norm_rescale":
            return y / (self.cfg.d_in ** 0.5 / x.norm(dim=-1, keepdim=True))
        # SAELens's layer_norm keeps the std without its epsilon for the way back
        centred = x - x.mean(dim=-1, keepdim=True)
        return y * centred.std(dim=-1, keepdim=True) + x.mean(dim=-1, keepdim=True)

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d_in] (in the model's units; [..., n_heads, d_head] for hook_z) -> pre-activations [..., d_sae]."""
        x = self._normalise_in(self._flat(x.to(self.W_enc.dtype)))
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """pre-activations -> latent activations, by the architecture's rule (inference form)."""
        arch = self.cfg.architecture
        if self.cfg.rescale_acts_by_decoder_norm:
            pre = pre * self.W_dec.norm(dim=-1)
        if arch == "relu":
            return torch.relu(pre)
        if arch == "topk":
            top = pre.topk(self.cfg.k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
        # jumprelu, and batchtopk at inference (its threshold learnt in training)
        return torch.relu(pre) * (pre > self.threshold)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent activations [..., d_sae] of input x [..., d_in]."""
        return self.activate(self.pre_activations(x))

    def decode(self, acts: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruction [..., d_out] in the model's units (flat for hook_z). x, the input the acts came from, is
        needed by a skip transcoder and by the per-input normalisations (constant_norm_rescale, layer_norm)."""
        acts = acts.to(self.W_dec.dtype)
        if self.cfg.rescale_acts_by_decoder_norm:
            acts = acts * (1 / self.W_dec.norm(dim=-1))  # SAELens's expression, so results match to the bit
        out = self._normalise_out(acts @ self.W_dec + self.b_dec, x)
        if self.cfg.skip:
            if x is None:
                raise ValueError("a skip transcoder's output includes W_skip x: pass the input x to decode")
            out = out + x.to(self.W_skip.dtype) @ self.W_skip.T
        return out

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """x: the input activation [..., d_in]. target: what the model itself puts where the dictionary
        writes (for an SAE, x itself; for a transcoder, the MLP's true output) -- needed for the error term.

        Returns hook_sae_output: recons, or recons + error when `use_error_term` (error = target - the
        reconstruction without any hook's edit, so the model's output is unchanged unless a hook edits a latent).
        """
        shape = x.shape  # hook_z: the output goes back as [..., n_heads, d_head]
        x = self.hook_sae_input(self._flat(x))
        pre = self.hook_sae_acts_pre(self.pre_activations(x))
        acts = self.hook_sae_acts_post(self.activate(pre))
        recons = self.hook_sae_recons(self.decode(acts, x))
        if not self.use_error_term:
            return self.hook_sae_output(self._unflat(recons, shape).to(x.dtype))
        if target is None:
            if self.cfg.is_transcoder:
                raise ValueError("a transcoder's error term needs the true output (target=)")
            target = x
        # The error is what the reconstruction without any hook's edit misses. SAELens (6.54) computes it under
        # no_grad; here it stays on the graph, so d output / d x is the identity and gradients still reach the
        # latents through recons (what attribution over features relies on). Values are the same either way.
        clean = self.decode(self.activate(self.pre_activations(x)), x)
        error = self.hook_sae_error(self._flat(target).to(clean.dtype) - clean)
        return self.hook_sae_output(self._unflat(recons + error, shape).to(x.dtype))

    def _unflat(self, y: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        if self.cfg.reshape_activations == "hook_z" and shape[-1] != self.cfg.d_in:
            return y.unflatten(-1, shape[-2:])
        return y

    # ------------------------------------------------------------------ conveniences
    @property
    def W_dec_normed(self) -> torch.Tensor:
        return self.W_dec / self.W_dec.norm(dim=-1, keepdim=True).clamp(min=1e-12)

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    def extra_repr(self) -> str:
        return repr(self.cfg)

    def config_json(self) -> str:
        return json.dumps(self.cfg.to_dict(), indent=2, sort_keys=True)
