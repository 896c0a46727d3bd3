"""Readers of dictionaries that others publish in their own layouts: Google's Gemma Scope `params.npz` and
EleutherAI sparsify folders (their formats are described in interp.sae.formats' docstring)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from interp.sae.dictionary import DictionaryConfig
from interp.sae.formats import (  # the shared readers' pieces
    SPARSIFY_CFG, SPARSIFY_WEIGHTS, DictionaryWeightsError, HookNameError, UnsupportedDictionaryError, _dtype_name,
    _fold_feature_scale, _missing, _read_json, hooks_for_module_path,
)


_GEMMA_KINDS = re.compile(r"gemma-scope(?:-2)?-(\d+b)-(pt|it)-(res|mlp|att|transcoders)", re.IGNORECASE)


def load_gemma_scope(where: Path, hook_name, out_hook_name, model):
    with np.load(where) as data:
        arrays = {("W_" + k[2:] if k.startswith("w_") else k): np.asarray(data[k]) for k in data.files}
    need = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
    absent = [k for k in need if k not in arrays]
    if absent:
        raise DictionaryWeightsError(f"{where} lacks {', '.join(absent)} (a Gemma Scope params.npz holds "
                                     f"{', '.join(need)})")
    tensors = {k: torch.from_numpy(v.astype(np.float32, copy=False)) for k, v in arrays.items()}
    if tensors["W_enc"].ndim != 2 or tensors["W_dec"].ndim != 2:
        raise DictionaryWeightsError(f"{where}: W_enc {tuple(tensors['W_enc'].shape)} and W_dec "
                                     f"{tuple(tensors['W_dec'].shape)} should be matrices [d_in, d_sae], "
                                     "[d_sae, d_out]")
    if "scaling_factor" in tensors:
        _fold_feature_scale(tensors, "scaling_factor")
    d_in, d_sae = tensors["W_enc"].shape
    d_out = tensors["W_dec"].shape[1]
    text = where.resolve().as_posix()
    layer = re.search(r"(?:^|/)layer_(\d+)(?:/|$)", text)
    kind = _GEMMA_KINDS.search(text.replace("--", "/"))
    reshape, metadata = "none", {}
    if hook_name is None:
        if layer is None or kind is None:
            raise HookNameError(f"{where}: a Gemma Scope params.npz does not say where it reads, and the path does "
                                "not either (expected .../gemma-scope-2b-pt-res/layer_12/...): pass hook_name= "
                                "(e.g. 'blocks.12.hook_resid_post')")
        n, site = int(layer.group(1)), kind.group(3).lower()
        hook_name = {"res": f"blocks.{n}.hook_resid_post", "mlp": f"blocks.{n}.hook_mlp_out",
                     "att": f"blocks.{n}.attn.hook_z", "transcoders": f"blocks.{n}.ln2.hook_normalized"}[site]
        if site == "att":
            reshape = "hook_z"
        if site == "transcoders":
            out_hook_name = out_hook_name or f"blocks.{n}.hook_mlp_out"
            metadata["reads_norm_output"] = True
    elif hook_name.endswith("hook_z"):
        reshape = "hook_z"
    if out_hook_name is None and d_out != d_in:
        raise HookNameError(f"{where}: W_dec writes {d_out} features from {d_in} inputs, so this is a transcoder: "
                            "pass out_hook_name= (where it writes)")
    if kind is not None:
        metadata["model_name"] = f"gemma-2-{kind.group(1).lower()}" + ("-it" if kind.group(2).lower() == "it" else "")
    cfg = DictionaryConfig(architecture="jumprelu", d_in=d_in, d_sae=d_sae, hook_name=hook_name,
                           out_hook_name=out_hook_name, d_out=d_out, apply_b_dec_to_input=False,
                           model_name=metadata.pop("model_name", None), dtype="float32", metadata=metadata,
                           reshape_activations=reshape)
    return cfg, tensors


def load_sparsify(where: Path, hook_name, out_hook_name, model):
    from safetensors.torch import load_file

    raw = _read_json(where / SPARSIFY_CFG)
    _missing(raw, ("d_in", "k"), where / SPARSIFY_CFG, "sparsify writes d_in and k into every cfg.json")
    if raw.get("activation", "topk") != "topk":
        raise UnsupportedDictionaryError(f"{where}: sparsify activation {raw['activation']!r} (we implement topk)")
    if raw.get("signed"):
        raise UnsupportedDictionaryError(f"{where}: a signed sparsify SAE (top k by magnitude) is not implemented")
    transcode, skip = bool(raw.get("transcode")), bool(raw.get("skip_connection"))
    if skip and not transcode:
        raise UnsupportedDictionaryError(f"{where}: a skip connection on an SAE (transcode=false) is not implemented")
    stored = load_file(str(where / SPARSIFY_WEIGHTS))
    need = ["encoder.weight", "encoder.bias", "W_dec", "b_dec"] + (["W_skip"] if skip else [])
    absent = [k for k in need if k not in stored]
    if absent:
        raise DictionaryWeightsError(f"{where / SPARSIFY_WEIGHTS} lacks {', '.join(absent)} (a sparsify "
                                     f"{'transcoder' if transcode else 'SAE'} stores {', '.join(need)})")
    d_sae, d_in = stored["encoder.weight"].shape
    if raw.get("num_latents") and raw["num_latents"] != d_sae:
        raise DictionaryWeightsError(f"{where}: cfg.json says num_latents={raw['num_latents']}, encoder.weight "
                                     f"has {d_sae}")
    tensors = {"W_enc": stored["encoder.weight"].T, "b_enc": stored["encoder.bias"], "W_dec": stored["W_dec"],
               "b_dec": stored["b_dec"]}
    if skip:
        tensors["W_skip"] = stored["W_skip"]
    metadata = {"sparsify_hookpoint": where.name}
    if hook_name is None or (transcode and out_hook_name is None):
        try:
            module_in, module_out = hooks_for_module_path(where.name, model)
        except HookNameError as err:
            raise HookNameError(f"{where}: sparsify names the hookpoint by its folder; {err}") from None
        if transcode:
            if module_in is None:
                raise HookNameError(f"{where}: a transcoder on {where.name!r} has no input hook: pass hook_name=")
            hook_name, out_hook_name = hook_name or module_in, out_hook_name or module_out
            metadata["reads_norm_output"] = module_in.endswith("hook_normalized")
        else:
            hook_name = hook_name or module_out
    run_cfg = where.parent / "config.json"  # the training run's config, beside the hookpoint folders
    model_name = _read_json(run_cfg).get("model") if run_cfg.is_file() else None
    cfg = DictionaryConfig(architecture="topk", d_in=int(d_in), d_sae=int(d_sae), hook_name=hook_name,
                           out_hook_name=out_hook_name if transcode else None, d_out=int(tensors["W_dec"].shape[1]),
                           k=int(raw["k"]), apply_b_dec_to_input=not transcode, skip=skip, model_name=model_name,
                           dtype=_dtype_name(stored["encoder.weight"].dtype), metadata=metadata)
    if transcode and not cfg.is_transcoder:
        raise HookNameError(f"{where}: a transcoder must write somewhere other than it reads; got hook_name="
                            f"out_hook_name={hook_name!r}")
    return cfg, tensors


