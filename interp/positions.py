"""Finding token positions by what the text says: words, character spans, the last token.

A selector is a function `TokenizedPrompt -> list[int]` of positions. Words are found in
the text by character span and mapped to the tokens whose spans overlap them, so a
multi-token word ("Eiffel" = " E" + "iffel") gives all its sub-tokens (`sub="last"`
picks one), and the same selector works for any tokenizer.

    flow = attention_flow(model, prompts, source=word("tower"), target=word("Eiffel"))
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Union

import torch


class PositionNotFound(ValueError):
    """A selector found nothing in a prompt."""


@dataclass
class TokenizedPrompt:
    """One prompt with its tokens and each token's character span in `text` ((0, 0) for special tokens)."""

    text: str
    tokens: torch.Tensor  # [pos]
    str_tokens: list[str]
    offsets: list[tuple[int, int]]
    meta: dict = field(default_factory=dict)

    @classmethod
    def from_model(cls, model, prompt: "str | dict", prepend_bos: bool | None = None) -> "TokenizedPrompt":
        """`prompt` is a string, or a dict with "text" and any fields selectors may read (e.g. "io")."""
        meta = dict(prompt) if isinstance(prompt, dict) else {}
        text = meta.pop("text") if meta else prompt
        tok = model.tokenize(text, prepend_bos=prepend_bos)
        ids = tok.tokens[0]
        return cls(text, ids, model.to_str_tokens(ids), tok.offsets[0], meta)

    def __len__(self) -> int:
        return len(self.str_tokens)


Selector = Callable[[TokenizedPrompt], list[int]]
SelectorSpec = Union[Selector, str, int]


def span_positions(prompt: TokenizedPrompt, start: int, end: int) -> list[int]:
    """Positions of the tokens whose characters overlap text[start:end]."""
    return [i for i, (a, b) in enumerate(prompt.offsets) if b > a and a < end and b > start]


def _pick(items: list, occurrence, what: str, prompt: TokenizedPrompt) -> list:
    if not items:
        raise PositionNotFound(f"{what} does not occur in {prompt.text!r}")
    if occurrence == "all":
        return items
    try:
        return [items[occurrence]]
    except IndexError:
        raise PositionNotFound(f"{what}: occurrence {occurrence} requested, {len(items)} found in {prompt.text!r}") from None


def _sub(positions: list[int], sub: str) -> list[int]:
    if sub == "all":
        return positions
    if sub == "last":
        return positions[-1:]
    if sub == "first":
        return positions[:1]
    raise ValueError(f"sub must be 'all', 'first' or 'last', got {sub!r}")


def word(text: str, occurrence: "int | str" = "all", sub: str = "all", case_sensitive: bool = True) -> Selector:
    """The tokens of a whole word (or phrase); `occurrence` is "all" or an index (-1: the last one)."""
    flags = 0 if case_sensitive else re.IGNORECASE
    pattern = re.compile(r"(?<!\w)" + re.escape(text) + r"(?!\w)", flags)

    def select(prompt: TokenizedPrompt) -> list[int]:
        matches = [m.span() for m in pattern.finditer(prompt.text)]
        spans = _pick(matches, occurrence, f"the word {text!r}", prompt)
        out = []
        for start, end in spans:
            out.extend(_sub(span_positions(prompt, start, end), sub))
        return out

    select.__name__ = f"word({text!r})"
    return select


def regex(pattern: str, occurrence: "int | str" = "all", sub: str = "all") -> Selector:
    compiled = re.compile(pattern)

    def select(prompt: TokenizedPrompt) -> list[int]:
        spans = _pick([m.span() for m in compiled.finditer(prompt.text)], occurrence, f"/{pattern}/", prompt)
        return [p for s, e in spans for p in _sub(span_positions(prompt, s, e), sub)]

    select.__name__ = f"regex({pattern!r})"
    return select


def field_word(name: str, occurrence: "int | str" = "all", sub: str = "all") -> Selector:
    """The word stored in the prompt's field `name` (e.g. the indirect object of each IOI prompt)."""

    def select(prompt: TokenizedPrompt) -> list[int]:
        if name not in prompt.meta:
            raise PositionNotFound(f"prompt {prompt.text!r} has no field {name!r} (fields: {sorted(prompt.meta)})")
        return word(str(prompt.meta[name]), occurrence, sub)(prompt)

    select.__name__ = f"field_word({name!r})"
    return select


def last_token() -> Selector:
    def select(prompt: TokenizedPrompt) -> list[int]:
        return [len(prompt) - 1]

    select.__name__ = "last_token()"
    return select


def first_token() -> Selector:
    def select(prompt: TokenizedPrompt) -> list[int]:
        return [0]

    select.__name__ = "first_token()"
    return select


def all_tokens() -> Selector:
    def select(prompt: TokenizedPrompt) -> list[int]:
        return list(range(len(prompt)))

    select.__name__ = "all_tokens()"
    return select


def positions(*index: int) -> Selector:
    def select(prompt: TokenizedPrompt) -> list[int]:
        n = len(prompt)
        for i in index:
            if not -n <= i < n:
                raise PositionNotFound(f"position {i} is outside {prompt.text!r} ({n} tokens)")
        return [i % n for i in index]

    select.__name__ = f"positions{index}"
    return select


def as_selector(spec: SelectorSpec) -> Selector:
    """A selector from a selector, a word (str) or a position (int)."""
    if isinstance(spec, str):
        return word(spec)
    if isinstance(spec, int):
        return positions(spec)
    if callable(spec):
        return spec
    raise TypeError(f"a position selector is a function, a word or an index; got {type(spec).__name__}")


def describe(spec: SelectorSpec) -> str:
    return spec if isinstance(spec, str) else getattr(spec, "__name__", repr(spec))
