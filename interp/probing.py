"""Attention-pattern scores for every (layer, head).

Each score is a function of attention patterns `[batch, n_heads, query, key]` and a
mask of the (query, key) pairs the behaviour should attend to; the model-level helpers
run the prompts, cache only the patterns, and average over positions and prompts.
"""

from __future__ import annotations

import torch


def special_token_ids(model) -> set[int]:
    tok = getattr(model, "tokenizer", None)
    ids = set(getattr(tok, "all_special_ids", []) or []) if tok is not None else set()
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(model.cfg, name, None)
        if value is not None:
            ids.add(value)
    return ids


def repeated_random_tokens(model, seq_len: int = 25, n_repeats: int = 4, batch: int = 16, seed: int = 0,
                           prepend_bos: bool = True) -> torch.Tensor:
    """Olsson et al. (2022)'s induction probe: BOS + `seq_len` random tokens, repeated `n_repeats` times.

    Tokens are drawn uniformly from the vocabulary without special tokens, reproducibly from `seed`.
    Returns `[batch, 1 + seq_len * n_repeats]` (without the BOS column if `prepend_bos=False`).
    """
    excluded = special_token_ids(model)
    allowed = torch.tensor([t for t in range(model.cfg.d_vocab) if t not in excluded])
    g = torch.Generator().manual_seed(seed)
    segment = allowed[torch.randint(len(allowed), (batch, seq_len), generator=g)]
    tokens = segment.repeat(1, n_repeats)
    if prepend_bos:
        bos = model.cfg.bos_token_id
        if bos is None and getattr(model, "tokenizer", None) is not None:
            bos = model.tokenizer.bos_token_id
        if bos is None:
            raise ValueError(f"{model.cfg.model_name} has no BOS token; pass prepend_bos=False")
        tokens = torch.cat([torch.full((batch, 1), bos), tokens], dim=1)
    return tokens.to(model.device)


def induction_mask(n_pos: int, seq_len: int, offset: int = 1) -> torch.Tensor:
    """[query, key] True where key = the position after an earlier occurrence of the query's token.

    For a sequence of period `seq_len` starting at `offset` (1 after a BOS): query i
    attends to i - k * seq_len + 1 for every k >= 1 that stays inside the sequence.
    """
    q = torch.arange(n_pos)[:, None]
    k = torch.arange(n_pos)[None, :]
    back = q - (k - 1)  # distance from the query to the earlier occurrence
    return (k - 1 >= offset) & (back > 0) & (back % seq_len == 0) & (q >= offset)


def previous_token_mask(n_pos: int, offset: int = 1) -> torch.Tensor:
    q = torch.arange(n_pos)[:, None]
    k = torch.arange(n_pos)[None, :]
    return (k == q - 1) & (q >= offset)


def mask_score(patterns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention mass on `mask` per head, averaged over the queries that have a target.

    patterns: [batch, n_heads, query, key]; mask: [query, key]. Returns [batch, n_heads].
    """
    queries = mask.any(-1)
    mass = (patterns * mask.to(patterns.dtype)).sum(-1)  # [batch, n_heads, query]
    return mass[..., queries].mean(-1)


def _patterns(model, tokens: torch.Tensor) -> torch.Tensor:
    """[batch, n_layers, n_heads, query, key] for the given tokens."""
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_pattern"))
    return torch.stack([cache["pattern", layer] for layer in range(model.cfg.n_layers)], dim=1)


def prefix_matching_scores(model, tokens: torch.Tensor | None = None, seq_len: int = 25, n_repeats: int = 4,
                           batch: int = 16, seed: int = 0) -> torch.Tensor:
    """Induction (prefix-matching) score `[n_layers, n_heads]` on repeated random tokens (Olsson et al. 2022).

    The mean, over examples and over queries in the second and later repeats, of the
    attention paid to the tokens that followed earlier occurrences of the query token.
    1.0 is a perfect induction head; a head attending uniformly scores about
    (copies before the query) / (query position).
    """
    if tokens is None:
        tokens = repeated_random_tokens(model, seq_len, n_repeats, batch, seed)
    pats = _patterns(model, tokens)
    mask = induction_mask(tokens.shape[1], seq_len, offset=1).to(pats.device)
    return mask_score(pats.flatten(1, 2), mask).mean(0).view(model.cfg.n_layers, model.cfg.n_heads)


def previous_token_scores(model, tokens: torch.Tensor) -> torch.Tensor:
    """Mean attention from each position to the one before it, `[n_layers, n_heads]`."""
    pats = _patterns(model, tokens)
    mask = previous_token_mask(tokens.shape[1], offset=1).to(pats.device)
    return mask_score(pats.flatten(1, 2), mask).mean(0).view(model.cfg.n_layers, model.cfg.n_heads)
