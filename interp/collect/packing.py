"""Documents to fixed-length rows of token ids, the way SAELens and TransformerLens pack a corpus.

Each document is tokenised without special tokens and the documents are concatenated with one BOS
between neighbours; the stream is cut into rows of `seq_len`, and every row begins with BOS (a row
that continues a document gets one too). This is SAELens's `ActivationsStore` with its defaults
(`prepend_bos=True`, `sequence_separator_token="bos"`: `concat_and_batch_sequences` with
`begin_batch_token_id=bos`, `sequence_separator_token_id=bos`) and TransformerLens'
`tokenize_and_concatenate` (BOS at the start of each row), so activations collected here are
those an SAE trained with those tools would see. The last partial row is dropped, as both do.
A document that already begins with BOS gets no second one. With `bos=None` documents are simply
concatenated (for token-id corpora that carry their own separators).
"""

from __future__ import annotations

import hashlib

import numpy as np

from interp.collect.corpus import Corpus, EmptyCorpusError

TOKENIZE_CHUNK = 64  # documents per tokenizer call: batched for speed, small enough to stop early


def document_ids(corpus: Corpus, tokenizer):
    """Each document's token ids (1-D int64), tokenised lazily in chunks without special tokens."""
    if corpus.is_tokens:
        yield from corpus.token_docs
        return
    texts = corpus.texts
    for start in range(0, len(texts), TOKENIZE_CHUNK):
        chunk = list(texts[start:start + TOKENIZE_CHUNK])
        # verbose=False: documents longer than the model's context are expected here (they are cut into rows).
        ids = tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]
        for row in ids:
            yield np.asarray(row, dtype=np.int64)


def pack(docs, seq_len: int, bos: int | None, max_sequences: int | None = None) -> np.ndarray:
    """Rows `[n_sequences, seq_len]` (int32) packed from token-id documents (see the module docstring)."""
    if seq_len < 2 and bos is not None:
        raise ValueError(f"seq_len={seq_len} leaves no room for a token after BOS: use seq_len >= 2")
    rows: list[np.ndarray] = []
    parts: list[np.ndarray] = []
    filled = 0
    bos_part = np.array([bos], dtype=np.int64) if bos is not None else None
    for ids in docs:
        pos = 0
        while pos < len(ids):
            if bos is not None and ids[pos] != bos and (filled == 0 or pos == 0):
                parts.append(bos_part)  # begins a row, or separates this document from the previous one
                filled += 1
            take = min(seq_len - filled, len(ids) - pos)
            parts.append(ids[pos:pos + take])
            filled += take
            pos += take
            if filled == seq_len:
                rows.append(np.concatenate(parts))
                parts, filled = [], 0
                if max_sequences is not None and len(rows) >= max_sequences:
                    return np.stack(rows).astype(np.int32)
    if not rows:
        raise EmptyCorpusError(
            f"the corpus has {filled} tokens after packing, fewer than one sequence of seq_len={seq_len}: "
            "lower seq_len or give more text"
        )
    return np.stack(rows).astype(np.int32)


def tokenizer_identity(tokenizer) -> dict:
    """What names a tokenizer in a manifest: its name and a hash of its definition (None without one).

    A fast tokenizer hashes its whole serialised definition (vocabulary, merges, normaliser); others
    their vocabulary."""
    if tokenizer is None:
        return {"name": None, "vocab_hash": None}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()
    else:
        text = "\n".join(f"{i}\t{t}" for t, i in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]))
    name = str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
    return {"name": name.rstrip("/").rsplit("/", 1)[-1], "vocab_hash": hashlib.sha256(text.encode()).hexdigest()[:16]}
