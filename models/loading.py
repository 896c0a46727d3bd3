"""models.load: registry names, local directories, hub names and live `transformers` models."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from models.config import TransformerConfig
from models.hooked_transformer import HookedTransformer
from models.registry import REGISTRY, UnknownModelError, load_path
from models.tokenizer import LIGHT_SPEC, LightTokenizer, transformers_tokenizer, write_light_spec

OUR_CONFIG = "interp_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model")


def load(
    source,
    tokenizer=None,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    fold_ln: bool = False,
    center_writing_weights: bool = False,
    center_unembed: bool = False,
    fold_value_biases: bool = False,
    name: str | None = None,
    revision: str | None = None,
    device_map=None,
    max_memory: dict | None = None,
) -> HookedTransformer:
    """Load a HookedTransformer.

    source: a registry name (`smollm2-135m`, `minilm-l6`, ...; see models.REGISTRY), a
    local directory (Hugging Face format, or one written by `model.save`), a hub name
    (only when a hub is reachable), or a constructed `transformers` model (pass its
    tokenizer too). The weights come back exactly as in the checkpoint unless you ask
    for processing; they are frozen (no autograd graph) until `requires_grad_(True)`.
    revision: a hub branch, tag or commit (Pythia's training checkpoints are branches:
    `models.load("EleutherAI/pythia-70m", revision="step3000")`).
    device_map: spread the blocks over several devices (models.placement): "auto", "balanced" or
    "sequential" (accelerate's planner, within max_memory={0: "20GiB", "cpu": "64GiB"}), a dict
    {block index: device} or a list of devices. Each weight goes straight from the checkpoint file to
    its device in the requested dtype, one tensor at a time.
    """
    if revision is not None and not isinstance(source, str):
        raise ValueError("revision= picks a version of a hub name; give the hub name as a string")
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if device_map is not None and str(device) != "cpu":
        raise ValueError(f"give device= (one device) or device_map= (several), not both: device={device!r}, "
                         f"device_map={device_map!r}")
    build = dict(dtype=dtype, device_map=device_map if device_map is not None else device, max_memory=max_memory)
    if isinstance(source, nn.Module):
        from models.convert import convert_hf

        hf_config = getattr(source, "config", None)
        if hf_config is None:
            raise TypeError("a module without a transformers config cannot be converted; use interp.attach(module)")
        label = name or getattr(hf_config, "_name_or_path", None) or type(source).__name__
        cfg, weights = convert_hf(hf_config, source.state_dict(), label)
        model = _build(cfg, weights, tokenizer, f"a {type(source).__name__} object", borrowed=True, **build)
    elif str(source).endswith(".pt") and Path(str(source)).expanduser().is_file():
        model = _load_nanogpt(Path(str(source)).expanduser(), tokenizer, name, build)
    else:
        directory, label = _locate(str(source), revision)
        converted = revision is None and str(source) in REGISTRY and REGISTRY[str(source)].converted is not None
        # A converted cache keeps the model_name it was converted with; name= renames it, as it names a conversion.
        model = load_directory(directory, tokenizer, name=name or label, model_name=name if converted else None,
                               **build)
    model.requires_grad_(False)
    model.eval()
    if fold_ln or center_writing_weights or center_unembed or fold_value_biases:
        model.process_weights(fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                              center_unembed=center_unembed, fold_value_biases=fold_value_biases)
    return model


def _load_nanogpt(path: Path, tokenizer, name: str | None, build: dict) -> HookedTransformer:
    """A nanoGPT `ckpt.pt` (model_args + state dict); its tokenizer (GPT-2 BPE, or a char map) is yours to pass."""
    from models.convert import nanogpt

    checkpoint = _torch_load(path)
    if not nanogpt.is_nanogpt(checkpoint):
        raise UnknownModelError(f"{path} is not a nanoGPT checkpoint (a dict with 'model_args' and 'model'); "
                                "for other .pt files build your model and use interp.attach(model)")
    label = name or path.parent.name or path.stem
    cfg, weights = nanogpt.convert(checkpoint, label)
    return _build(cfg, weights, tokenizer, f"nanoGPT checkpoint {path}", **build)


def _locate(source: str, revision: str | None = None) -> tuple[Path, str]:
    if revision is not None:
        return _from_hub(source, revision), f"{source}@{revision}"
    if source in REGISTRY:
        return load_path(source), source
    path = Path(source).expanduser()
    if path.is_dir():
        return path, path.name
    if path.exists():
        raise UnknownModelError(f"{source} is a file; give the directory that holds config.json and the weights")
    return _from_hub(source), source


def _from_hub(name: str, revision: str | None = None) -> Path:
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    known = ", ".join(sorted(REGISTRY))
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, revision=revision, local_files_only=offline))
    except Exception as exc:  # not cached / not found / no network: one clear message
        what = f"{name!r}" + (f" at revision {revision!r}" if revision is not None else "")
        why = "HF_HUB_OFFLINE=1 and it is not in the local hub cache" if offline else f"the hub said: {exc}"
        raise UnknownModelError(
            f"cannot load {what}: it is not a registered name ({known}), not a local directory, and {why}"
        ) from None


def load_directory(directory: Path, tokenizer=None, name: str | None = None,
                   model_name: str | None = None, **build) -> HookedTransformer:
    """A directory in our own format (interp_config.json: no `transformers` import, no converter) or
    in Hugging Face format (config through `transformers.AutoConfig`, then the converter).
    model_name: replaces the model_name saved in our format (Hugging Face directories take `name`).
    build: dtype, device_map, max_memory (see `_build`)."""
    directory = Path(directory)
    label = name or directory.name
    if (directory / OUR_CONFIG).exists():
        cfg = TransformerConfig.from_dict(json.loads((directory / OUR_CONFIG).read_text()))
        if model_name is not None:
            cfg = cfg.replace(model_name=model_name)
        weights = read_weights(directory)
    else:
        from transformers import AutoConfig

        from models.convert import convert_hf

        if not (directory / "config.json").exists():
            raise UnknownModelError(f"{directory} has no config.json (nor {OUR_CONFIG}); is it a model directory?")
        hf_config = AutoConfig.from_pretrained(directory, local_files_only=True)
        cfg, weights = convert_hf(hf_config, read_weights(directory), label)
    if tokenizer is None and any((directory / f).exists() for f in TOKENIZER_FILES):
        tokenizer = load_tokenizer(directory)
    return _build(cfg, weights, tokenizer, str(directory), **build)


def load_tokenizer(directory: Path):
    """The tokenizer of a model directory: a LightTokenizer (`tokenizers` only, see models/tokenizer.py)
    where the directory holds interp_tokenizer.json, else `transformers.AutoTokenizer`."""
    directory = Path(directory)
    if (directory / LIGHT_SPEC).exists():
        return LightTokenizer.from_directory(directory)
    return transformers_tokenizer(directory)


def save_converted(hf_directory: Path, out: Path, model_name: str) -> None:
    """Write what `load_directory(hf_directory)` gives in our own format into `out` (interp_config.json,
    model.safetensors, the tokenizer files), plus interp_tokenizer.json when a LightTokenizer behaves as
    the `transformers` tokenizer there. Loading `out` then needs neither `transformers` nor the
    converter, and gives the same model bit for bit."""
    model = load_directory(hf_directory, name=model_name)
    save_model(model, out)
    again = TransformerConfig.from_dict(json.loads((Path(out) / OUR_CONFIG).read_text()))
    if again != model.cfg:
        raise RuntimeError(f"the config of {model_name} does not survive its JSON round trip: {again} != {model.cfg}")
    if model.tokenizer is not None:
        # The tokenizer loading hf_directory gave, and the one `out` itself gives through transformers
        # (what a LightTokenizer falls back to).
        write_light_spec(out, [model.tokenizer, transformers_tokenizer(out)])


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory (safetensors, sharded or not, else pytorch_model.bin)."""
    from safetensors.torch import load_file

    index = directory / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        weights = {}
        for shard in shards:
            weights.update(load_file(directory / shard))
        return weights
    if (directory / "model.safetensors").exists():
        return load_file(directory / "model.safetensors")
    if (directory / "pytorch_model.bin").exists():
        return _torch_load(directory / "pytorch_model.bin")
    raise UnknownModelError(f"{directory} has no model.safetensors or pytorch_model.bin")


def _torch_load(path: Path):
    """A torch checkpoint memory-mapped (no copy in host memory), or read whole when it predates the zip format."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        return torch.load(path, map_location="cpu", weights_only=True)


def _build(cfg: TransformerConfig, weights: dict, tokenizer, source: str, *, dtype: torch.dtype | None = None,
           device_map="cpu", max_memory: dict | None = None, borrowed: bool = False):
    """The model of `cfg` holding `weights` (our names), each tensor cast and sent straight to its device.

    The model is built on the meta device and each parameter assigned in turn (and dropped from `weights`),
    so host memory never holds a second copy: a checkpoint's tensors are memory-mapped (safetensors), a
    tensor bound for a GPU crosses from the page cache, and one for the CPU becomes a private copy in the
    target dtype (the model never depends on the file, which `model.save` may overwrite).
    borrowed: the tensors belong to a live module (copy them, never share). device_map: models.placement.
    """
    from accelerate import init_empty_weights

    from models.encoder_decoder import HookedEncoderDecoder
    from models.placement import refresh, resolve_device_map, unit_of

    with init_empty_weights(include_buffers=False):
        model = (HookedEncoderDecoder if cfg.encoder_decoder else HookedTransformer)(cfg, tokenizer=tokenizer,
                                                                                       init_weights=False)
    model.source = source
    expected = dict(model.named_parameters())
    unexpected = set(weights) - set(expected)
    if unexpected:
        raise ValueError(f"converted weights do not fit the model: unexpected {sorted(unexpected)[:8]}")
    for key, param in expected.items():
        if key in weights and weights[key].shape != param.shape:
            raise ValueError(f"{key}: checkpoint shape {tuple(weights[key].shape)}, model {tuple(param.shape)}")
        if key not in weights and not key.rsplit(".", 1)[-1].lstrip("_").startswith("b"):
            raise ValueError(f"the checkpoint has no value for {key}")
    placement = resolve_device_map(model, device_map, max_memory, dtype)
    for key, param in expected.items():
        device = placement[unit_of(key, model)]
        target = dtype if dtype is not None and param.is_floating_point() else param.dtype
        if key in weights:
            value = weights.pop(key)
            # The model's own memory layout (nn.Linear's orientation, see "Weights" in docs/design.md), written
            # once; a tensor the converter made that already has it is kept as it is.
            own = not borrowed and value.untyped_storage().resizable()
            if not (own and value.device == device and value.dtype == target and value.stride() == param.stride()):
                value = torch.empty_strided(param.shape, param.stride(), dtype=target, device=device).copy_(value)
        else:
            value = torch.zeros(param.shape, dtype=target, device=device)  # no bias here: zero is what it computes
        module_path, _, leaf = key.rpartition(".")
        module = model.get_submodule(module_path) if module_path else model
        module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    refresh(model)
    model.cfg.device, model.cfg.dtype = str(model.embed.W_E.device), model.embed.W_E.dtype
    return model


def save_model(model: HookedTransformer, directory) -> None:
    """Write config, weights (safetensors) and tokenizer to a directory that `models.load` reads back."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / OUR_CONFIG).write_text(model.cfg.to_json())
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, directory / "model.safetensors")
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(directory)
