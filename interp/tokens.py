"""Text <-> tokens with each checkpoint's own conventions, plus the errors for bad text input.

Model-agnostic (it works on any `transformers` tokenizer), so models built here and models
hooked with `interp.attach` tokenize the same way."""

from __future__ import annotations

from dataclasses import dataclass

import torch


class NoTokenizerError(RuntimeError):
    """The model has no tokenizer, so it cannot take strings."""


class ContextLengthError(ValueError):
    """More positions than the model's context (n_ctx)."""


@dataclass
class Tokenized:
    """A tokenized batch. Padding follows `padding_side`; `attention_mask` is 1 on real tokens.

    offsets[i][j] is the character span `(start, end)` of token j in texts[i]; special
    tokens and padding get `(0, 0)`.
    """

    tokens: torch.Tensor  # [batch, pos]
    attention_mask: torch.Tensor  # [batch, pos]
    offsets: list[list[tuple[int, int]]]
    texts: list[str]
    padding_side: str

    @property
    def is_padded(self) -> bool:
        return bool((self.attention_mask == 0).any())


def require_tokenizer(tokenizer, source: str):
    if tokenizer is None:
        raise NoTokenizerError(
            f"this model has no tokenizer (loaded from {source}, which has no tokenizer files), so it "
            "cannot take strings; pass token ids, or give one: models.load(..., tokenizer=AutoTokenizer"
            ".from_pretrained(path)) or model.set_tokenizer(tokenizer)"
        )
    return tokenizer


def bos_id(tokenizer) -> int | None:
    """The token a sequence starts with: BOS for decoders, [CLS] for BERT-style encoders."""
    if tokenizer.bos_token_id is not None:
        return tokenizer.bos_token_id
    return getattr(tokenizer, "cls_token_id", None)


def pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id):
        if candidate is not None:
            return candidate
    return 0


def tokenize(
    tokenizer,
    texts: str | list[str],
    *,
    n_ctx: int,
    model_name: str,
    prepend_bos: bool | None = None,
    padding_side: str | None = None,
    truncate: bool = False,
) -> Tokenized:
    """Tokenize like the checkpoint's own tokenizer does.

    prepend_bos=None keeps the tokenizer's convention (SmolLM2 adds nothing, BERT adds
    [CLS] ... [SEP]); True makes sure the sequence starts with BOS (or [CLS]); False
    adds no special tokens at all.
    """
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be a string or a list of strings")
    texts = list(texts)
    fast = getattr(tokenizer, "is_fast", False)
    enc = tokenizer(
        texts, add_special_tokens=prepend_bos is not False, return_offsets_mapping=fast, padding=False,
        truncation=False, verbose=False,
    )
    rows = [list(ids) for ids in enc["input_ids"]]
    offsets = [list(map(tuple, o)) for o in enc["offset_mapping"]] if fast else [[(0, 0)] * len(r) for r in rows]
    if prepend_bos:
        bos = bos_id(tokenizer)
        if bos is None:
            raise ValueError(f"prepend_bos=True, but the tokenizer of {model_name} has no BOS or CLS token")
        for ids, offs in zip(rows, offsets):
            if not ids or ids[0] != bos:
                ids.insert(0, bos)
                offs.insert(0, (0, 0))
    for i, ids in enumerate(rows):
        if len(ids) > n_ctx:
            if not truncate:
                raise ContextLengthError(
                    f"text {i} is {len(ids)} tokens long but {model_name} has a context of n_ctx={n_ctx}; "
                    "shorten it or pass truncate=True"
                )
            del ids[n_ctx:], offsets[i][n_ctx:]
    side = padding_side or getattr(tokenizer, "padding_side", None) or "right"
    if side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad_id(tokenizer), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    padded_offsets = []
    for i, (ids, offs) in enumerate(zip(rows, offsets)):
        n = len(ids)
        sl = slice(0, n) if side == "right" else slice(width - n, width)
        tokens[i, sl] = torch.tensor(ids, dtype=torch.long)
        mask[i, sl] = 1
        pad = [(0, 0)] * (width - n)
        padded_offsets.append(offs + pad if side == "right" else pad + offs)
    return Tokenized(tokens, mask, padded_offsets, texts, side)


def decode_each(tokenizer, ids: list[int]) -> list[str]:
    """One string per token, as it reads in text (' tower', not 'Ġtower')."""
    return tokenizer.batch_decode([[i] for i in ids], clean_up_tokenization_spaces=False)
