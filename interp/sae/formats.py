"""Dictionaries on disk: SAELens folders (read and written), Gemma Scope `params.npz`, sparsify folders (read).

    sae = load_dictionary("path/to/folder")              # the format is recognised from the files
    sae = load_dictionary(path, model)                   # ... and checked against the model (check_fits)
    save_dictionary(sae, "out/folder")                   # SAELens 6.x: cfg.json + sae_weights.safetensors

Formats, as their own code defines them (checked against sae-lens 6.54.12 and EleutherAI sparsify's
`SparseCoder`):

- SAELens 6.x: `cfg.json` with `architecture`, `d_in`, `d_sae`, ..., and `metadata` (hook_name in
  TransformerLens's names, sae_lens_version >= 6); weights `W_enc [d_in, d_sae]`, `b_enc`, `W_dec [d_sae,
  d_out]`, `b_dec`, `threshold` (JumpReLU), `W_skip [d_out, d_in]` (skip transcoders). A config without
  sae_lens_version (or an older one) is the pre-6 flat config (`hook_point`, `activation_fn_str`, ...),
  which SAELens reads through the same defaults we apply here.
- Gemma Scope: `params.npz` with W_enc, W_dec, b_enc, b_dec, threshold: a JumpReLU SAE that does not
  subtract b_dec from its input. The hook is not in the file; it comes from `hook_name=` or from the path as
  Google publishes it (`gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82`).
- sparsify: `cfg.json` (d_in, k, num_latents or expansion_factor, transcode, skip_connection, activation)
  and `sae.safetensors` (encoder.weight [d_sae, d_in], encoder.bias, W_dec [d_sae, d_in], b_dec, W_skip);
  TopK over ReLU'd pre-activations, b_dec subtracted from the input unless it transcodes. The folder's name
  is the hookpoint, a module path (`layers.8`, `layers.8.mlp`): an SAE reads that module's output, a
  transcoder maps its input to its output (so `layers.8.mlp` with transcode=True is an MLP transcoder,
  never a residual-stream SAE).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from interp.sae.dictionary import DictionaryConfig, DictionaryConfigError, SparseDictionary
from interp.sae.fitting import (  # noqa: F401  (re-exported: formats.py was their home)
    DictionaryMismatchError, DimensionMismatchError, HookNotInModelError, NormNotFoldedError, check_fits,
)

SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_SCALER = "activation_scaler.json"  # beside a SAELens training checkpoint whose factor is not folded yet
SAELENS_WHITENING = "activation_whitening.safetensors"
SPARSIFY_CFG = "cfg.json"
SPARSIFY_WEIGHTS = "sae.safetensors"
GEMMA_SCOPE_PARAMS = "params.npz"
# The SAELens release whose format we write and whose source we checked; written as metadata.sae_lens_version
# because SAELens decides from that field whether a config is 6.x or the pre-6 flat one.
SAELENS_FORMAT_VERSION = "6.54.12"

FORMATS = ("saelens", "saelens-legacy", "gemma-scope", "sparsify")


# ---------------------------------------------------------------------------------------------- errors
class DictionaryFormatError(ValueError):
    """A dictionary on disk that cannot be read as given; the message says what was expected."""


class UnknownDictionaryFormatError(DictionaryFormatError):
    """A path holding none of the formats we read (the message lists the files looked for and those found)."""


class MissingConfigFieldsError(DictionaryFormatError, DictionaryConfigError):
    """A cfg.json without fields its format requires (named in the message, with the file)."""


class DictionaryWeightsError(DictionaryFormatError):
    """A weights file lacking a tensor the format requires, or holding one of the wrong shape."""


class UnsupportedDictionaryError(DictionaryFormatError):
    """A well-formed dictionary of a kind SparseDictionary does not implement (gated, per-head, groupmax...)."""


class HookNameError(DictionaryFormatError):
    """Where the dictionary reads cannot be told from the files: pass hook_name= (and out_hook_name=)."""


# ---------------------------------------------------------------------------------------------- hook names
_TL_STACK = re.compile(r"^(encoder|decoder)\.(\d+)\.")
_OUR_STACK = re.compile(r"^(encoder|decoder)\.blocks\.(\d+)\.")


def from_saelens_hook_name(name: str) -> str:
    """A TransformerLens hook name (SAELens's metadata.hook_name) in our names.

    They are the same for every decoder-only and BERT hook (`blocks.8.hook_resid_post`, `hook_embed`,
    `blocks.3.attn.hook_z`, `blocks.5.ln2.hook_normalized`). They differ for encoder-decoders: TransformerLens's
    T5 keeps its blocks in `encoder.{l}` / `decoder.{l}`, ours in `encoder.blocks.{l}` / `decoder.blocks.{l}`.
    """
    return _TL_STACK.sub(r"\1.blocks.\2.", name)


def to_saelens_hook_name(name: str) -> str:
    """Our hook name as TransformerLens spells it (the inverse of from_saelens_hook_name)."""
    return _OUR_STACK.sub(r"\1.\2.", name)


# HF module paths (sparsify hookpoints, SAELens's hf_hook_name) -> our hooks. A decoder layer's output is the
# residual stream after it; a sublayer's output is what it adds to the stream, its input is its norm's output.
_MODULE_PATH = re.compile(
    r"^(?:base_model\.model\.|model\.|transformer\.|gpt_neox\.|model\.decoder\.)?"
    r"(?:layers|h|blocks)\.(\d+)(?:\.(mlp|feed_forward|self_attn|attn|attention))?$")
_EMBED_PATHS = ("embed_tokens", "wte", "embed_in", "model.embed_tokens", "transformer.wte", "gpt_neox.embed_in")


def hooks_for_module_path(path: str, model=None) -> tuple[str | None, str]:
    """(our hook for the module's input, our hook for its output) of a Hugging Face module path.

    `layers.8` -> (blocks.8.hook_resid_pre, blocks.8.hook_resid_post); `layers.8.mlp` ->
    (blocks.8.ln2.hook_normalized, blocks.8.hook_mlp_out); `layers.8.self_attn` -> (blocks.8.ln1.hook_normalized,
    blocks.8.hook_attn_out); `embed_tokens` -> (None, hook_embed). GPT-2's `h.8`, `h.8.attn` and GPT-NeoX's
    `layers.8.attention` likewise. With a model, a layer's output is `model.block_output_hook_name(l)`
    (differs for post-LN blocks). The sublayer inputs are after the norm's weights in Hugging Face and
    before them in our `hook_normalized`, the same place only once the norm is folded (check_fits says so).
    Raises HookNameError for anything else.
    """
    if path in _EMBED_PATHS:
        return None, "hook_embed"
    match = _MODULE_PATH.match(path)
    if match is None:
        raise HookNameError(f"{path!r} is not a module path we can map to a hook (expected layers.N, layers.N.mlp, "
                            f"layers.N.self_attn, h.N, embed_tokens, ...): pass hook_name= (and out_hook_name= for "
                            "a transcoder) in our hook names")
    layer, sub = int(match.group(1)), match.group(2)
    if sub is None:
        out = model.block_output_hook_name(layer) if hasattr(model, "block_output_hook_name") else \
            f"blocks.{layer}.hook_resid_post"
        return f"blocks.{layer}.hook_resid_pre", out
    if sub in ("mlp", "feed_forward"):
        return f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.hook_mlp_out"
    return f"blocks.{layer}.ln1.hook_normalized", f"blocks.{layer}.hook_attn_out"


# ---------------------------------------------------------------------------------------------- detection
def detect_format(path: str | Path) -> tuple[str, Path]:
    """(format, the file or folder to read): one of FORMATS. A path to one of a format's files means its folder
    (params.npz itself for Gemma Scope)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no dictionary at {path}: the path does not exist")
    if path.is_file():
        if path.name == GEMMA_SCOPE_PARAMS or path.suffix == ".npz":
            return "gemma-scope", path
        if path.name in (SAELENS_CFG, SAELENS_WEIGHTS, SPARSIFY_WEIGHTS):
            return detect_format(path.parent)
        raise UnknownDictionaryFormatError(f"{path} is a file of no dictionary format we read: give a folder "
                                           f"({SAELENS_CFG} + {SAELENS_WEIGHTS}, {SPARSIFY_CFG} + "
                                           f"{SPARSIFY_WEIGHTS}) or a Gemma Scope {GEMMA_SCOPE_PARAMS}")
    has = lambda name: (path / name).is_file()  # noqa: E731
    if has(SAELENS_CFG) and has(SAELENS_WEIGHTS):
        return ("saelens" if _is_saelens_6(_read_json(path / SAELENS_CFG)) else "saelens-legacy"), path
    if has(SPARSIFY_CFG) and has(SPARSIFY_WEIGHTS):
        return "sparsify", path
    if has(GEMMA_SCOPE_PARAMS):
        return "gemma-scope", path / GEMMA_SCOPE_PARAMS
    found = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    inner = [p.name for p in sorted(path.iterdir()) if p.is_dir() and (
        (p / SAELENS_WEIGHTS).is_file() or (p / SPARSIFY_WEIGHTS).is_file() or (p / GEMMA_SCOPE_PARAMS).is_file())]
    hint = f" It holds dictionaries in subfolders: pick one of {', '.join(inner[:12])}." if inner else ""
    raise UnknownDictionaryFormatError(
        f"{path} is not a dictionary folder we recognise: looked for {SAELENS_CFG} + {SAELENS_WEIGHTS} (SAELens), "
        f"{SPARSIFY_CFG} + {SPARSIFY_WEIGHTS} (sparsify) or {GEMMA_SCOPE_PARAMS} (Gemma Scope); found "
        f"{', '.join(found[:20]) or 'nothing'}{' ...' if len(found) > 20 else ''}.{hint}")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DictionaryFormatError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise DictionaryFormatError(f"{path} should hold a JSON object (the dictionary's config); got "
                                    f"{type(data).__name__}")
    return data


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", str(text))[:3])


def _is_saelens_6(raw: dict) -> bool:
    """SAELens's own test: a config whose sae_lens_version (top level or in metadata) is 6.0 or later."""
    version = raw.get("sae_lens_version") or (raw.get("metadata") or {}).get("sae_lens_version")
    return bool(version) and _version_tuple(version) >= (6,)


# ---------------------------------------------------------------------------------------------- loading
def load_dictionary(path: str | Path, model=None, *, hook_name: str | None = None, out_hook_name: str | None = None,
                    dtype: str | torch.dtype | None = None, device: str | torch.device | None = None
                    ) -> SparseDictionary:
    """Read a dictionary in any format we know (see the module docstring); returns it in eval mode.

    hook_name / out_hook_name (our names) override where it reads / writes; Gemma Scope files and sparsify
    folders whose name is not a module path need them. model: check_fits(sae, model) and put the dictionary
    on the model's device (device= overrides). dtype: cast the weights (default: the file's).
    """
    kind, where = detect_format(path)
    from interp.sae.foreign_formats import load_gemma_scope, load_sparsify

    loader = {"saelens": _load_saelens, "saelens-legacy": _load_saelens, "gemma-scope": load_gemma_scope,
              "sparsify": load_sparsify}[kind]
    cfg, tensors = loader(where, hook_name, out_hook_name, model)
    cfg.metadata["source_format"] = kind
    if dtype is not None:
        cfg.dtype = str(dtype).removeprefix("torch.")
    sae = _build(cfg, tensors, where)
    if model is not None:
        check_fits(sae, model)
        if device is None:
            device = next((p.device for p in model.parameters()), None)
    if device is not None:
        sae = sae.to(device)
    return sae.eval()


def _dtype_name(value) -> str:
    name = str(value or "float32").removeprefix("torch.")
    aliases = {"float": "float32", "half": "float16", "double": "float64", "bf16": "bfloat16", "fp32": "float32",
               "fp16": "float16"}
    name = aliases.get(name, name)
    if not isinstance(getattr(torch, name, None), torch.dtype):
        raise DictionaryFormatError(f"dtype {value!r} is not a torch dtype (expected e.g. float32, bfloat16)")
    return name


def _build(cfg: DictionaryConfig, tensors: dict[str, torch.Tensor], where: Path) -> SparseDictionary:
    """A SparseDictionary with these weights, every one checked for presence and shape."""
    d_in, d_sae, d_out = cfg.d_in, cfg.d_sae, cfg.d_out
    shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_out), "b_dec": (d_out,)}
    if cfg.architecture in ("jumprelu", "batchtopk"):
        shapes["threshold"] = (d_sae,)
    if cfg.skip:
        shapes["W_skip"] = (d_out, d_in)
    missing = [k for k in shapes if k not in tensors]
    if missing:
        raise DictionaryWeightsError(f"{where}: the weights lack {', '.join(missing)} (a {cfg.architecture} "
                                     f"{'transcoder' if cfg.is_transcoder else 'SAE'} needs {', '.join(shapes)})")
    wrong = [f"{k} {tuple(tensors[k].shape)} (expected {shape})" for k, shape in shapes.items()
             if tuple(tensors[k].shape) != shape]
    if wrong:
        raise DictionaryWeightsError(f"{where}: weights of the wrong shape for d_in={d_in}, d_sae={d_sae}, "
                                     f"d_out={d_out}: {'; '.join(wrong)}")
    sae = SparseDictionary(cfg)
    dtype = getattr(torch, cfg.dtype)
    with torch.no_grad():
        for name in shapes:
            getattr(sae, name).copy_(tensors[name].to(dtype))
    return sae


def _fold_feature_scale(tensors: dict[str, torch.Tensor], key: str) -> None:
    """Old SAELens multiplied the latents by a learnt per-latent `scaling_factor` before decoding; folding it
    into W_dec's rows gives the same reconstruction. All ones (the usual case) is simply dropped."""
    scale = tensors.pop(key, None)
    if scale is not None and not torch.all(scale == 1):
        tensors["W_dec"] = tensors["W_dec"] * scale.to(tensors["W_dec"].dtype)[:, None]


def _fold_decoder_norm(tensors: dict[str, torch.Tensor]) -> None:
    """`rescale_acts_by_decoder_norm` folded into the weights, as SAELens does when it saves an inference model
    (its JumpReLU has no such option): the same latents fire and the reconstruction is the same."""
    norm = tensors["W_dec"].norm(dim=-1)
    tensors["W_enc"] = tensors["W_enc"] * norm
    tensors["b_enc"] = tensors["b_enc"] * norm
    tensors["W_dec"] = tensors["W_dec"] / norm[:, None]


def _missing(raw: dict, names, where: Path, needs: str) -> None:
    absent = [n for n in names if raw.get(n) is None]
    if absent:
        raise MissingConfigFieldsError(f"{where} lacks {', '.join(absent)} ({needs})")


def _saelens_fields(raw: dict, where: Path) -> dict:
    """A SAELens config (6.x or pre-6 flat) as one flat dict of SAELens 6 fields, SAELens's defaults applied."""
    if _is_saelens_6(raw):
        flat = dict(raw)
        meta = dict(raw.get("metadata") or {})
        flat.update({k: meta.get(k) for k in ("hook_name", "hook_name_out", "hook_head_index", "model_name",
                                              "hf_hook_name", "hf_hook_name_out") if k in meta})
        flat.setdefault("architecture", None)
        return {"fields": flat, "metadata": meta}
    # pre-6: SAELens's handle_pre_6_0_config renames these three and fills the same defaults
    renames = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index",
               "activation_fn_str": "activation_fn"}
    flat = {renames.get(k, k): v for k, v in raw.items()}
    flat.setdefault("apply_b_dec_to_input", True)
    flat.setdefault("architecture", "standard")
    flat.setdefault("activation_fn", "relu")
    kwargs = flat.get("activation_fn_kwargs") or {}
    if flat["activation_fn"] == "topk" and kwargs.get("k") is not None:
        flat["architecture"], flat["k"] = "topk", kwargs["k"]
    elif flat["architecture"] == "standard" and flat["activation_fn"] != "relu":
        raise UnsupportedDictionaryError(f"{where}: activation_fn {flat['activation_fn']!r} (we implement relu, topk, "
                                         "jumprelu)")
    if isinstance(flat.get("normalize_activations"), bool):
        flat["normalize_activations"] = "expected_average_only_in" if flat["normalize_activations"] else "none"
    meta = {k: v for k, v in flat.items() if k in ("model_name", "context_size", "dataset_path", "prepend_bos",
                                                    "neuronpedia_id", "sae_lens_training_version")}
    return {"fields": flat, "metadata": meta}


# SAELens architecture -> (ours, is a transcoder, has a skip connection)
_SAELENS_ARCHS = {
    "standard": ("relu", False, False), "topk": ("topk", False, False), "jumprelu": ("jumprelu", False, False),
    "batchtopk": ("batchtopk", False, False),  # a training checkpoint (save_model of the trainer's SAE)
    "transcoder": ("relu", True, False), "skip_transcoder": ("relu", True, True),
    "jumprelu_transcoder": ("jumprelu", True, False), "jumprelu_skip_transcoder": ("jumprelu", True, True),
    # ours: SAELens 6.54 has no TopK transcoder class, so these names are ours (its loader refuses them)
    "topk_transcoder": ("topk", True, False), "topk_skip_transcoder": ("topk", True, True),
}


def _load_saelens(where: Path, hook_name, out_hook_name, model):
    from safetensors.torch import load_file

    raw = _read_json(where / SAELENS_CFG)
    parsed = _saelens_fields(raw, where)
    f, meta = parsed["fields"], parsed["metadata"]
    ours = meta.get("interp") if isinstance(meta.get("interp"), dict) else {}  # what we wrote ourselves
    _missing(f, ("architecture", "d_in", "d_sae"), where / SAELENS_CFG, "every SAELens config has them")
    arch_name = f["architecture"]
    if arch_name not in _SAELENS_ARCHS:
        raise UnsupportedDictionaryError(f"{where}: SAELens architecture {arch_name!r} is not one we implement "
                                         f"(we read {', '.join(_SAELENS_ARCHS)})")
    arch, transcoder, skip = _SAELENS_ARCHS[arch_name]
    if f.get("hook_head_index") is not None:
        raise UnsupportedDictionaryError(f"{where}: hook_head_index={f['hook_head_index']} (an SAE on one head's "
                                         "slice of a hook) is not implemented here")
    hook = hook_name or ours.get("hook_name") or _saelens_hook(f, "hook_name", "hf_hook_name", where, model, 0)
    out_hook = None
    if transcoder:
        _missing(f, ("d_out",), where / SAELENS_CFG, "a transcoder's output width")
        out_hook = out_hook_name or ours.get("out_hook_name") or _saelens_hook(f, "hook_name_out", "hf_hook_name_out",
                                                                               where, model, 1)
    tensors = load_file(str(where / SAELENS_WEIGHTS))
    if "log_threshold" in tensors and "threshold" not in tensors:  # older JumpReLU training checkpoints
        tensors["threshold"] = tensors.pop("log_threshold").exp()
    for key in ("scaling_factor", "finetuning_scaling_factor"):
        if key in tensors:
            _fold_feature_scale(tensors, key)
    k = f.get("k")
    if arch == "batchtopk":
        if "topk_threshold" not in tensors:
            raise DictionaryWeightsError(f"{where}: a batchtopk training checkpoint needs its topk_threshold")
        tensors["threshold"] = torch.full((f["d_sae"],), float(tensors.pop("topk_threshold")))
        f.setdefault("rescale_acts_by_decoder_norm", True)  # the training config's default
    if ours.get("architecture") == "batchtopk" and arch == "jumprelu":
        arch, k = "batchtopk", ours.get("k")  # we save BatchTopK as JumpReLU, as SAELens does; k kept for us
    if arch in ("topk", "batchtopk"):
        if k is None:
            raise MissingConfigFieldsError(f"{where / SAELENS_CFG} lacks k (a {arch_name} dictionary keeps k "
                                           "latents per token)")
        k = int(round(float(k)))
    norm, factor = f.get("normalize_activations") or "none", None
    if norm == "expected_average_only_in" and (where / SAELENS_SCALER).is_file():
        factor = _read_json(where / SAELENS_SCALER).get("scaling_factor")
    if norm == "covariance_whitening":
        if (where / SAELENS_WHITENING).is_file():
            raise UnsupportedDictionaryError(f"{where}: a training checkpoint with unfolded covariance whitening "
                                             f"({SAELENS_WHITENING}); save it for inference with SAELens first")
        norm = "none"  # SAELens folds the whitening into the weights when training ends; inference applies none
    if f.get("reshape_activations") == "hook_z" or (f.get("reshape_activations") is None and hook.endswith("hook_z")
                                                     and not _is_saelens_6(raw)):
        reshape = "hook_z"
    else:
        reshape = "none"
    metadata = {k_: v for k_, v in meta.items() if k_ not in ("hook_name", "hook_name_out", "model_name", "interp",
                                                               "sae_lens_version")}
    cfg = DictionaryConfig(
        architecture=arch, d_in=int(f["d_in"]), d_sae=int(f["d_sae"]), hook_name=hook, out_hook_name=out_hook,
        d_out=int(f["d_out"]) if transcoder else None, k=k,
        apply_b_dec_to_input=bool(f.get("apply_b_dec_to_input", True)) and not transcoder,
        normalize_activations=norm, norm_scaling_factor=factor, skip=skip, model_name=meta.get("model_name"),
        dtype=_dtype_name(f.get("dtype")), metadata=metadata, reshape_activations=reshape,
        rescale_acts_by_decoder_norm=bool(f.get("rescale_acts_by_decoder_norm")) and arch in ("topk", "batchtopk"))
    return cfg, tensors


def _saelens_hook(f: dict, key: str, hf_key: str, where: Path, model, side: int) -> str:
    if f.get(key):
        return from_saelens_hook_name(f[key])
    if f.get(hf_key):  # SAEs for TransformerLens's bridge name the Hugging Face module instead
        module = f[hf_key]
        for suffix, index in ((".input", 0), (".output", 1)):
            if module.endswith(suffix):
                module, side = module[: -len(suffix)], index
        hook = hooks_for_module_path(module, model)[side]
        if hook is not None:
            return hook
    field = f"metadata.{key}" if "metadata" in f else {"hook_name": "hook_point (or hook_name)"}.get(key, key)
    raise MissingConfigFieldsError(f"{where / SAELENS_CFG} lacks {field} (where the dictionary "
                                   f"{'reads' if side == 0 else 'writes'}, a TransformerLens hook name): add it, or "
                                   f"pass {'hook_name' if side == 0 else 'out_hook_name'}= in our hook names")


# ---------------------------------------------------------------------------------------------- saving
def saelens_architecture(cfg: DictionaryConfig) -> str:
    """The SAELens architecture a dictionary is saved as (BatchTopK as JumpReLU, with its threshold)."""
    base = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "jumprelu"}[cfg.architecture]
    if not cfg.is_transcoder:
        return base
    prefix = {"standard": "", "topk": "topk_", "jumprelu": "jumprelu_"}[base]
    return f"{prefix}{'skip_' if cfg.skip else ''}transcoder"


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def save_dictionary(sae: SparseDictionary, folder: str | Path) -> Path:
    """Write `sae` as SAELens 6.x does (cfg.json + sae_weights.safetensors), readable by `SAE.load_from_disk`.

    The expected_average_only_in factor is folded into the weights (SAELens applies none at inference); a
    BatchTopK dictionary is written as JumpReLU with its threshold. Hooks go into metadata.hook_name (and
    hook_name_out) in TransformerLens's names; what SAELens has no field for (our architecture, k, hook names)
    goes under metadata.interp so load_dictionary restores it. Returns the folder.
    """
    from safetensors.torch import save_file

    cfg = sae.cfg
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: p.detach().to("cpu").clone() for name, p in sae.named_parameters()}
    norm, factor = cfg.normalize_activations, cfg.norm_scaling_factor
    folding = norm == "expected_average_only_in" and factor is not None
    rescale = cfg.rescale_acts_by_decoder_norm
    if rescale and (cfg.architecture != "topk" or folding):
        # SAELens has the option for TopK only. Folded first, so that folding the factor after it leaves the
        # latents' values as they were (with the option on, they would shrink by the factor).
        _fold_decoder_norm(tensors)
        rescale = False
    if folding:
        # x f @ W_enc == x @ (W_enc f); (acts @ W_dec + b_dec) / f == acts @ (W_dec / f) + b_dec / f
        tensors["W_enc"] = tensors["W_enc"] * factor
        tensors["W_dec"] = tensors["W_dec"] / factor
        tensors["b_dec"] = tensors["b_dec"] / factor
    if norm == "expected_average_only_in":
        norm = "none"  # without a factor it is the identity, as in SAELens at inference
    architecture = saelens_architecture(cfg)
    reserved = {"hook_name", "hook_name_out", "hook_head_index", "hook_head_index_out", "model_name",
                "sae_lens_version", "sae_lens_training_version", "interp", "source_format"}
    metadata = {k: v for k, v in cfg.metadata.items() if k not in reserved and _jsonable(v)}
    metadata.update({"sae_lens_version": SAELENS_FORMAT_VERSION, "sae_lens_training_version": None,
                     "model_name": cfg.model_name, "hook_name": to_saelens_hook_name(cfg.hook_name),
                     "hook_head_index": None})
    if cfg.is_transcoder:
        metadata.update({"hook_name_out": to_saelens_hook_name(cfg.out_hook_name), "hook_head_index_out": None})
    metadata["interp"] = {"architecture": cfg.architecture, "k": cfg.k, "hook_name": cfg.hook_name,
                          "out_hook_name": cfg.out_hook_name if cfg.is_transcoder else None,
                          "folded_norm_scaling_factor": factor}
    out = {"architecture": architecture, "d_in": cfg.d_in, "d_sae": cfg.d_sae, "dtype": cfg.dtype, "device": "cpu",
           "apply_b_dec_to_input": cfg.apply_b_dec_to_input, "normalize_activations": norm,
           "reshape_activations": cfg.reshape_activations, "metadata": metadata}
    if cfg.architecture == "topk":
        out.update({"k": cfg.k, "rescale_acts_by_decoder_norm": rescale})
    if cfg.is_transcoder:
        out["d_out"] = cfg.d_out
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / SAELENS_WEIGHTS))
    (folder / SAELENS_CFG).write_text(json.dumps(out, indent=2))
    return folder


__all__ = [  # what the package exports; the fitting checks live in interp.sae.fitting
    "DictionaryFormatError", "DictionaryMismatchError", "DictionaryWeightsError", "DimensionMismatchError",
    "HookNameError", "HookNotInModelError", "MissingConfigFieldsError", "NormNotFoldedError",
    "UnknownDictionaryFormatError", "UnsupportedDictionaryError", "check_fits", "detect_format",
    "from_saelens_hook_name", "hooks_for_module_path", "load_dictionary", "save_dictionary", "to_saelens_hook_name",
]
