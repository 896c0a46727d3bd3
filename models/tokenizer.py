"""Tokenization lives in `interp.tokens` (attached models use it too); these names stay importable here."""

from interp.tokens import (  # noqa: F401
    ContextLengthError, NoTokenizerError, Tokenized, bos_id, decode_each, pad_id, require_tokenizer, tokenize,
)
