"""Tokenization lives in `interp.tokens` (attached models use it too); these names stay importable here.

`LightTokenizer` is the tokenizer a registered model's converted cache loads: the calls the toolkit
makes, answered by `tokenizers` alone, so that a warm `models.load` never imports `transformers`
(docs/design.md, "Loading").
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from interp.tokens import (  # noqa: F401
    ContextLengthError, NoTokenizerError, Tokenized, bos_id, decode_each, pad_id, require_tokenizer, tokenize,
)

LIGHT_SPEC = "interp_tokenizer.json"  # its presence in a directory makes load_tokenizer return a LightTokenizer
LIGHT_SPEC_FORMAT = 1
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Plain attributes of a transformers tokenizer that LightTokenizer keeps itself (readable and settable).
STATE = ("name_or_path", "padding_side", "truncation_side", "model_max_length", "clean_up_tokenization_spaces",
         "split_special_tokens", "model_input_names", "verbose")
# TokenizersBackend's methods whose behaviour LightTokenizer reproduces: a tokenizer class that overrides
# any of them gets no LightTokenizer.
_REPRODUCED = ("__call__", "_encode_plus", "_convert_encoding", "set_truncation_and_padding",
               "_get_padding_truncation_strategies", "_eventual_warn_about_too_long_sequence", "decode", "_decode",
               "batch_decode", "convert_ids_to_tokens", "convert_tokens_to_ids", "_convert_token_to_id_with_added_voc",
               "get_vocab", "__len__", "__getattr__", "__setattr__", "all_special_tokens", "all_special_ids",
               "special_tokens_map", "vocab_size")
_FAST_CALL_ARGS = {"add_special_tokens", "padding", "truncation", "return_tensors", "return_token_type_ids",
                   "return_attention_mask", "return_offsets_mapping", "verbose"}


def transformers_tokenizer(directory):
    """`transformers.AutoTokenizer` for a local directory, without its warnings."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(directory, local_files_only=True)
    finally:
        hf_logging.set_verbosity(verbosity)


def _strip_id(name: str) -> str:
    return name.removesuffix("_ids").removesuffix("_id") if name.endswith(("_id", "_ids")) else name


def _to_py(obj):
    """transformers.utils.to_py_obj for what decode takes: tensors and arrays become lists."""
    import numpy as np
    import torch

    if isinstance(obj, (int, float)):
        return obj
    if isinstance(obj, dict):
        return {k: _to_py(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        if all(isinstance(x, (int, float, np.number)) for x in obj):
            return list(obj)
        return [_to_py(o) for o in obj]
    if isinstance(obj, (torch.Tensor, np.ndarray, np.number)):
        return obj.tolist()
    return obj


class LightEncoding(dict):
    """What a LightTokenizer call returns: transformers' BatchEncoding as a dict, with attribute access
    (`enc.input_ids`), `encodings` and `enc[i]` (the `tokenizers.Encoding` of row i). Any other
    BatchEncoding method (`tokens()`, `word_ids()`, `to()`, ...) is answered by a BatchEncoding built
    from it (importing transformers)."""

    def __init__(self, data: dict, encodings: list) -> None:
        super().__init__(data)
        self.encodings = encodings

    def __getitem__(self, item):
        if isinstance(item, str):
            return super().__getitem__(item)
        if isinstance(item, int):
            return self.encodings[item]
        if isinstance(item, slice):
            return {key: value[item] for key, value in self.items()}
        raise KeyError("Invalid key. Only three types of key are available: (1) string, (2) integers for backend "
                       "Encoding, and (3) slices for data subsetting.")

    def __getattr__(self, name):
        if name.startswith("__") or name == "encodings":
            raise AttributeError(name)
        if name in self:
            return dict.__getitem__(self, name)
        from transformers.tokenization_utils_base import BatchEncoding

        return getattr(BatchEncoding(dict(self), self.encodings), name)


class LightTokenizer:
    """A `transformers` fast tokenizer's everyday calls, answered by its `tokenizers` backend alone.

    `load_tokenizer` returns one for a directory holding `interp_tokenizer.json`, which the registry's
    conversion (and `save_pretrained`) writes only after `check_light_tokenizer` found it identical to
    the `transformers` tokenizer of that directory. It answers what the toolkit calls, exactly as `transformers`
    (TokenizersBackend) does: `tok(text or texts, add_special_tokens=, return_offsets_mapping=,
    padding=False, truncation=False, return_tensors=None or "pt", verbose=)`, `decode`,
    `batch_decode`, `convert_ids_to_tokens`, `convert_tokens_to_ids`, the special tokens and their
    ids, `all_special_ids`, `padding_side` and the other attributes of `STATE`, `len()`,
    `get_vocab()`, `vocab_size`, `backend_tokenizer`.

    Anything else (other arguments, other methods or attributes, setting other attributes) builds
    the `transformers` tokenizer from the same directory, with the special tokens and attributes set
    here, and from then on every call goes to it (`transformers_tokenizer`), so the state is never
    split between the two. `save_pretrained` saves through such a tokenizer (built for the occasion).
    """

    is_fast = True

    def __init__(self, backend, spec: dict, directory) -> None:
        d = self.__dict__
        d["_backend"] = backend
        d["_spec"] = spec
        d["_directory"] = Path(directory)
        d["_state"] = {key: spec[key] for key in STATE if key != "name_or_path"}
        d["_state"]["name_or_path"] = str(directory)
        d["_state"]["model_input_names"] = list(spec["model_input_names"])
        d["_special"] = dict(spec["special_tokens"])
        d["_extra"] = list(spec["extra_special_tokens"])
        d["_hf"] = None
        backend.encode_special_tokens = spec["split_special_tokens"]

    @classmethod
    def from_directory(cls, directory, spec: dict | None = None) -> "LightTokenizer":
        from tokenizers import Tokenizer

        directory = Path(directory)
        if spec is None:
            spec = json.loads((directory / LIGHT_SPEC).read_text())
        if spec.get("format") != LIGHT_SPEC_FORMAT:
            raise ValueError(f"{directory / LIGHT_SPEC} has format {spec.get('format')!r}, "
                             f"this version reads {LIGHT_SPEC_FORMAT}")
        return cls(Tokenizer.from_file(str(directory / "tokenizer.json")), spec, directory)

    # ------------------------------------------------------------------ the transformers tokenizer
    def _build_transformers(self):
        d = self.__dict__
        try:
            hf = transformers_tokenizer(d["_directory"])
        except Exception as exc:
            raise RuntimeError(f"this call needs the transformers tokenizer of {d['_directory']}, which cannot "
                               f"be loaded: {exc}") from exc
        for key in STATE:
            value = d["_state"][key]
            if value != (str(d["_directory"]) if key == "name_or_path" else d["_spec"][key]):
                setattr(hf, key, value)
        for key, value in d["_special"].items():
            if value != d["_spec"]["special_tokens"][key]:
                setattr(hf, key, value)
        if d["_extra"] != d["_spec"]["extra_special_tokens"]:
            hf.extra_special_tokens = list(d["_extra"])
        return hf

    @property
    def transformers_tokenizer(self):
        """The `transformers` tokenizer of the same directory, built on first use; from then on every
        call on this object goes to it."""
        d = self.__dict__
        if d["_hf"] is None:
            d["_hf"] = self._build_transformers()
        return d["_hf"]

    # ------------------------------------------------------------------ attributes
    def __getattr__(self, name):
        d = self.__dict__
        if name.startswith("__") or "_hf" not in d:
            raise AttributeError(name)
        if d["_hf"] is None:
            if name in d["_state"]:
                return d["_state"][name]
            key = _strip_id(name)
            if key in SPECIAL_TOKENS:
                value = d["_special"].get(key)
                if value is not None:
                    return self.convert_tokens_to_ids(value) if key != name else value
                if not d["_state"]["verbose"]:  # transformers logs an error when verbose
                    return None
            elif key == "extra_special_tokens":
                return self.convert_tokens_to_ids(list(d["_extra"])) if key != name else list(d["_extra"])
        return getattr(self.transformers_tokenizer, name)

    def __setattr__(self, name, value) -> None:
        d = self.__dict__
        if d["_hf"] is None:
            if name in STATE:
                d["_state"][name] = value
                return
            key = _strip_id(name)
            if key in SPECIAL_TOKENS:
                if key != name and value is not None:
                    value = self.convert_ids_to_tokens(value)
                if value is None or isinstance(value, str):
                    d["_special"][key] = value
                    return
        setattr(self.transformers_tokenizer, name, value)

    def __repr__(self) -> str:
        if self._hf is not None:
            return f"LightTokenizer(forwarding to {self._hf!r})"
        special = ", ".join(f"{k}={v!r}" for k, v in self._special.items() if v is not None)
        return (f"LightTokenizer(name_or_path={self.name_or_path!r}, vocab_size={self.vocab_size}, "
                f"padding_side={self.padding_side!r}, {special})")

    def __bool__(self) -> bool:
        return True

    def __len__(self) -> int:
        if self._hf is not None:
            return len(self._hf)
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        if self._hf is not None:
            return self._hf.vocab_size
        return self._backend.get_vocab_size(with_added_tokens=False)

    def get_vocab(self) -> dict[str, int]:
        if self._hf is not None:
            return self._hf.get_vocab()
        return self._backend.get_vocab(with_added_tokens=True)

    @property
    def vocab(self) -> dict[str, int]:
        return self.get_vocab()

    @property
    def backend_tokenizer(self):
        if self._hf is not None:
            return self._hf.backend_tokenizer
        return self._backend

    @property
    def special_tokens_map(self) -> dict[str, str]:
        if self._hf is not None:
            return self._hf.special_tokens_map
        return {key: str(value) for key, value in self._special.items() if value is not None}

    @property
    def all_special_tokens(self) -> list[str]:
        if self._hf is not None:
            return self._hf.all_special_tokens
        out: list[str] = []
        for token in [self._special.get(key) for key in SPECIAL_TOKENS] + list(self._extra):
            if token is not None and str(token) not in out:
                out.append(str(token))
        return out

    @property
    def all_special_ids(self) -> list[int]:
        if self._hf is not None:
            return self._hf.all_special_ids
        return self.convert_tokens_to_ids(self.all_special_tokens)

    # ------------------------------------------------------------------ ids <-> tokens
    def convert_tokens_to_ids(self, tokens):
        if self._hf is not None:
            return self._hf.convert_tokens_to_ids(tokens)
        if isinstance(tokens, str):
            return self._token_to_id(tokens)
        return [self._token_to_id(token) for token in tokens]

    def _token_to_id(self, token: str):
        index = self._backend.token_to_id(token)
        if index is None:
            unk = self._special.get("unk_token")
            return None if unk is None else self._backend.token_to_id(unk)
        return index

    def convert_ids_to_tokens(self, ids, skip_special_tokens: bool = False):
        if self._hf is not None:
            return self._hf.convert_ids_to_tokens(ids, skip_special_tokens=skip_special_tokens)
        if isinstance(ids, int):
            return self._backend.id_to_token(ids)
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        tokens = []
        for index in ids:
            index = int(index)
            if index in skip:
                continue
            tokens.append(self._backend.id_to_token(index))
        return tokens

    # ------------------------------------------------------------------ text -> ids
    def _fast_call(self, text, kwargs: dict) -> bool:
        if self._hf is not None or not set(kwargs) <= _FAST_CALL_ARGS:
            return False
        padding, truncation = kwargs.get("padding", False), kwargs.get("truncation", None)
        if not (padding is False or (isinstance(padding, str) and padding == "do_not_pad")):
            return False
        if not (truncation is None or truncation is False
                or (isinstance(truncation, str) and truncation == "do_not_truncate")):
            return False
        if kwargs.get("return_tensors") not in (None, "pt"):
            return False
        return isinstance(text, str) or (isinstance(text, list) and len(text) > 0
                                         and all(isinstance(t, str) for t in text))

    def __call__(self, text=None, *args, **kwargs):
        if args or not self._fast_call(text, kwargs):
            return self.transformers_tokenizer(text, *args, **kwargs)
        out = self._encode(text, **kwargs)
        if out is None:  # a case transformers answers with a warning or an error of its own
            return self.transformers_tokenizer(text, *args, **kwargs)
        return out

    def _encode(self, text, add_special_tokens: bool = True, padding=False, truncation=None, return_tensors=None,
                return_token_type_ids=None, return_attention_mask=None, return_offsets_mapping: bool = False,
                verbose: bool = True):
        batched = isinstance(text, list)
        backend, state = self._backend, self._state
        # TokenizersBackend.set_truncation_and_padding for DO_NOT_TRUNCATE / DO_NOT_PAD.
        if backend.truncation is not None:
            backend.no_truncation()
        if backend.padding is not None:
            backend.no_padding()
        if backend.encode_special_tokens != state["split_special_tokens"]:
            backend.encode_special_tokens = state["split_special_tokens"]
        encodings = backend.encode_batch(text if batched else [text], add_special_tokens=add_special_tokens,
                                         is_pretokenized=False)
        lengths = [len(e.ids) for e in encodings]
        limit = state["model_max_length"]
        if verbose and limit != 0 and any(n > limit for n in lengths):
            return None  # transformers warns about the length
        if return_tensors is not None and (len(set(lengths)) > 1 or 0 in lengths):
            return None  # ragged or empty rows: transformers' own error or dtype
        if return_token_type_ids is None:
            return_token_type_ids = "token_type_ids" in state["model_input_names"]
        if return_attention_mask is None:
            return_attention_mask = "attention_mask" in state["model_input_names"]
        data = {"input_ids": [e.ids for e in encodings]}
        if return_token_type_ids:
            data["token_type_ids"] = [e.type_ids for e in encodings]
        if return_attention_mask:
            data["attention_mask"] = [e.attention_mask for e in encodings]
        if return_offsets_mapping:
            data["offset_mapping"] = [e.offsets for e in encodings]
        if return_tensors == "pt":
            import torch

            data = {key: torch.tensor(value) for key, value in data.items()}
        elif not batched:
            data = {key: (value[0] if len(value) > 0 and isinstance(value[0], list) else value)
                    for key, value in data.items()}
        return LightEncoding(data, encodings)

    # ------------------------------------------------------------------ ids -> text
    def _cleanup(self, clean_up_tokenization_spaces) -> bool:
        if clean_up_tokenization_spaces is None:
            return bool(self._state["clean_up_tokenization_spaces"])
        return bool(clean_up_tokenization_spaces)

    def _decode_one(self, token_ids, skip_special_tokens: bool) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        if isinstance(token_ids, dict):
            token_ids = token_ids["input_ids"]
        return self._backend.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def decode(self, token_ids, skip_special_tokens: bool = False, **kwargs):
        if (self._hf is None and set(kwargs) <= {"clean_up_tokenization_spaces"}
                and not self._cleanup(kwargs.get("clean_up_tokenization_spaces"))):
            ids = _to_py(token_ids)
            if isinstance(ids, (list, tuple)) and len(ids) > 0 and isinstance(ids[0], (list, tuple)):
                return [self._decode_one(seq, skip_special_tokens) for seq in ids]
            return self._decode_one(ids, skip_special_tokens)
        return self.transformers_tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs)

    def batch_decode(self, sequences, skip_special_tokens: bool = False, clean_up_tokenization_spaces=None,
                     **kwargs) -> list[str]:
        if self._hf is None and not kwargs and not self._cleanup(clean_up_tokenization_spaces):
            seqs = _to_py(sequences)
            if isinstance(seqs, (list, tuple)):
                if len(seqs) == 0:
                    return []
                if isinstance(seqs[0], (list, tuple)):
                    return [self._decode_one(seq, skip_special_tokens) for seq in seqs]
        return self.transformers_tokenizer.batch_decode(
            sequences, skip_special_tokens=skip_special_tokens,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces, **kwargs)

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, save_directory, **kwargs):
        """Saved by the `transformers` tokenizer of the same directory (with this one's attributes), so the
        files are what `transformers` writes; interp_tokenizer.json too when a LightTokenizer of the saved
        files is checked equal to it (then the copy loads back as a LightTokenizer)."""
        hf = self._hf if self._hf is not None else self._build_transformers()
        out = hf.save_pretrained(save_directory, **kwargs)
        if not kwargs:
            write_light_spec(save_directory, [hf], quiet=True)
        return out


# ---------------------------------------------------------------------- writing and checking the spec
def light_spec(tokenizer) -> dict | None:
    """What a LightTokenizer needs besides tokenizer.json, read off a `transformers` tokenizer; None when
    its class changes any behaviour that LightTokenizer reproduces."""
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return None
    if not isinstance(tokenizer, TokenizersBackend):
        return None
    cls = type(tokenizer)
    if any(getattr(cls, name, None) is not getattr(TokenizersBackend, name, None) for name in _REPRODUCED):
        return None
    if list(tokenizer.SPECIAL_TOKENS_ATTRIBUTES) != list(SPECIAL_TOKENS):
        return None
    named = tokenizer._special_tokens_map
    return {
        "format": LIGHT_SPEC_FORMAT,
        "transformers_class": cls.__name__,
        **{key: getattr(tokenizer, key) for key in STATE if key != "name_or_path"},
        "model_input_names": list(tokenizer.model_input_names),
        "special_tokens": {key: None if named.get(key) is None else str(named[key]) for key in SPECIAL_TOKENS},
        "extra_special_tokens": [str(t) for t in tokenizer._extra_special_tokens],
    }


PROBE_TEXTS = (
    "The Eiffel Tower is located in the city of",
    "One mole of carbon dioxide weighs about forty-four grams, while",
    "",
    " ",
    "  leading and trailing spaces  ",
    "line one\nline two\r\n\ttabbed\n\n",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text<|im_end|>",
    "[CLS] [SEP] [MASK] [PAD] [UNK] <s></s><pad><unk>",
    "naïve café — 東京タワー 🗼 émigré Ünïcödé",
    "x = [i ** 2 for i in range(10)]  # squares\n",
    "1234567890 3.14159 -42 1e-5 $100",
    "It's John's; didn't they're we'll I'm . , ! ? 's",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
)


def check_light_tokenizer(reference, light: LightTokenizer, texts=PROBE_TEXTS) -> list[str]:
    """Where `light` and the `transformers` tokenizer `reference` differ (empty: nowhere): the backend,
    encodings with offsets of every probe text, alone and batched, with and without special tokens,
    tensors, the decoding of every id of the vocabulary and of every probe text, tokens, special
    tokens and their ids, attributes."""
    import torch

    if light._hf is not None:
        return ["the LightTokenizer already forwards to transformers"]
    problems: list[str] = []

    def same(what, a, b):
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            equal = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype \
                and a.shape == b.shape and torch.equal(a, b)
        else:
            equal = a == b and type(a) is type(b)
        if not equal:
            problems.append(f"{what}: transformers {a!r:.200}, light {b!r:.200}")

    def backend(tokenizer) -> dict:  # truncation and padding are set per call, by both
        return {k: v for k, v in json.loads(tokenizer.backend_tokenizer.to_str()).items()
                if k not in ("truncation", "padding")}

    if backend(reference) != backend(light):
        problems.append("the backend tokenizers differ")
    for key in (*STATE[1:], "vocab_size", "all_special_tokens", "all_special_ids", "special_tokens_map",
                *SPECIAL_TOKENS, *(f"{k}_id" for k in SPECIAL_TOKENS), "is_fast"):
        same(key, getattr(reference, key), getattr(light, key))
    same("len", len(reference), len(light))
    same("get_vocab", reference.get_vocab(), light.get_vocab())
    texts = list(texts)
    for special in (True, False):
        for offsets in (True, False):
            kwargs = dict(add_special_tokens=special, return_offsets_mapping=offsets, padding=False,
                          truncation=False, verbose=False)
            same(f"batch {kwargs}", dict(reference(texts, **kwargs)), dict(light(texts, **kwargs)))
            for text in texts:
                same(f"{text!r} {kwargs}", dict(reference(text, **kwargs)), dict(light(text, **kwargs)))
        for text in texts[:2]:
            a, b = reference(text, add_special_tokens=special, return_tensors="pt"), \
                light(text, add_special_tokens=special, return_tensors="pt")
            same(f"{text!r} tensor keys", list(a.keys()), list(b.keys()))
            for key in a:
                same(f"{text!r} tensor {key}", a[key], b[key])
    ids = list(range(len(reference)))
    same("batch_decode of every id", reference.batch_decode([[i] for i in ids], clean_up_tokenization_spaces=False),
         light.batch_decode([[i] for i in ids], clean_up_tokenization_spaces=False))
    same("convert_ids_to_tokens of every id", reference.convert_ids_to_tokens(ids), light.convert_ids_to_tokens(ids))
    for text in texts:
        row = reference(text)["input_ids"]
        for skip in (False, True):
            same(f"decode {text!r} skip={skip}", reference.decode(row, skip_special_tokens=skip),
                 light.decode(row, skip_special_tokens=skip))
            same(f"convert_ids_to_tokens {text!r} skip={skip}",
                 reference.convert_ids_to_tokens(row, skip_special_tokens=skip),
                 light.convert_ids_to_tokens(row, skip_special_tokens=skip))
        same(f"decode tensor {text!r}", reference.decode(torch.tensor(row, dtype=torch.long)),
             light.decode(torch.tensor(row, dtype=torch.long)))
        tokens = reference.convert_ids_to_tokens(row)
        same(f"convert_tokens_to_ids {text!r}", reference.convert_tokens_to_ids(tokens),
             light.convert_tokens_to_ids(tokens))
    same("convert_tokens_to_ids of an unknown token", reference.convert_tokens_to_ids("\u2603never-a-token\u2603"),
         light.convert_tokens_to_ids("\u2603never-a-token\u2603"))
    return problems


def write_light_spec(directory, references, quiet: bool = False) -> list[str]:
    """Write `interp_tokenizer.json` into `directory` (which holds tokenizer.json) when a LightTokenizer
    of it behaves as every `transformers` tokenizer in `references`; otherwise write nothing and
    return why (loading then uses transformers, as before; said on stderr unless quiet)."""
    directory = Path(directory)
    if not (directory / "tokenizer.json").exists():
        return [f"{directory} has no tokenizer.json"]
    specs = [light_spec(reference) for reference in references]
    if any(spec is None for spec in specs):
        return ["the tokenizer's class changes behaviour that LightTokenizer reproduces"]
    problems = [f"the tokenizers to match disagree on {key}" for key in specs[0]
                if any(spec[key] != specs[0][key] for spec in specs[1:])]
    for reference in references:
        problems += check_light_tokenizer(reference, LightTokenizer.from_directory(directory, spec=specs[0]))
    if not problems:
        tmp = directory / (LIGHT_SPEC + ".tmp")
        tmp.write_text(json.dumps(specs[0], indent=2))
        tmp.replace(directory / LIGHT_SPEC)
    elif not quiet:
        print(f"interp: the tokenizer in {directory} is loaded through transformers: {problems[0]}"
              + (f" (and {len(problems) - 1} more differences)" if len(problems) > 1 else ""),
              file=sys.stderr, flush=True)
    return problems
