"""Follow one word through every layer, in many contexts.

`trace_word(model, "mole", contexts)` finds the word in each context by character span
(whole-word, case-insensitive), runs the contexts, and keeps the residual stream at the
word at every layer: `vectors [n_contexts, n_layers + 1, d_model]`, entry 0 being the
static vector the first block reads (the token embedding, plus positions where the model
adds them) and entry l the output of block l-1. It also keeps every other token's
stream, which the anisotropy baselines draw from.

A decoder sees only the left context, so a cue after the word cannot move it. With
`read="end"` the study reads the context's last token instead, and says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from interp.positions import PositionNotFound, TokenizedPrompt, word as word_selector

POOLS = ("last", "mean", "first")


class WordNotFound(PositionNotFound):
    """The target word does not occur in a context."""


@dataclass
class WordTrace:
    """A word's residual-stream vectors, layer by layer, in each context."""

    word: str
    contexts: list[str]
    labels: list[str] | None  # a sense per context, or None
    str_tokens: list[list[str]]
    token_ids: list[torch.Tensor]  # per context [pos]
    word_positions: list[list[int]]  # the word's (sub-)token positions in each context
    read_positions: list[list[int]]  # the positions pooled into the vector (the word's, or the last token's)
    vectors: torch.Tensor  # [n_contexts, n_layers + 1, d_model], float32, CPU
    streams: list[torch.Tensor]  # per context [n_layers + 1, pos, d_model]: every token, for the baselines
    baseline_mask: list[torch.Tensor]  # per context [pos] bool: tokens the baselines may draw (not special, not first)
    pool: str = "last"
    read: str = "word"
    model_name: str = ""
    causal: bool = True
    notes: list[str] = field(default_factory=list)

    @property
    def n_layers(self) -> int:
        return self.vectors.shape[1] - 1

    @property
    def layer_labels(self) -> list[str]:
        return ["embed"] + [f"L{layer}" for layer in range(self.n_layers)]

    @property
    def senses(self) -> list[str]:
        """The distinct labels, in order of first appearance."""
        return list(dict.fromkeys(self.labels or []))

    def label_index(self) -> torch.Tensor:
        if self.labels is None:
            raise ValueError("this trace has no sense labels: pass labels=[...] (one per context) to trace_word")
        order = {s: i for i, s in enumerate(self.senses)}
        return torch.tensor([order[s] for s in self.labels])

    def read_tokens(self) -> list[str]:
        """The token(s) read in each context, e.g. ' mole' or ' E|iffel'."""
        return ["|".join(self.str_tokens[i][p] for p in ps) for i, ps in enumerate(self.read_positions)]


def locate(prompt: TokenizedPrompt, word: str, occurrence: int = 0) -> list[int]:
    """Positions of the tokens spelling `word` (whole word, any case) in the prompt; WordNotFound if absent."""
    try:
        return word_selector(word, occurrence=occurrence, case_sensitive=False)(prompt)
    except PositionNotFound as e:
        raise WordNotFound(f"{e}. Every context must contain the target word {word!r} (whole word, any case); "
                           f"fix or drop this context") from None


@torch.no_grad()
def trace_word(model, word: str, contexts: list[str], labels: list[str] | None = None, *, pool: str = "last",
               read: str = "word", occurrence: int = 0, prepend_bos: bool | None = None) -> WordTrace:
    """The residual stream at `word` in each context, at every layer (see the module docstring).

    pool: "last" sub-token of a multi-token word (default; in a decoder it is the only one
    that has seen the whole word), "mean" of its sub-tokens, or "first".
    read: "word", or "end" to read the context's last token (for cues after the word in a decoder).
    """
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    if read not in ("word", "end"):
        raise ValueError(f"read must be 'word' or 'end', got {read!r}")
    contexts = [contexts] if isinstance(contexts, str) else list(contexts)
    if not contexts:
        raise ValueError("no contexts")
    if labels is not None and len(labels) != len(contexts):
        raise ValueError(f"{len(contexts)} contexts but {len(labels)} labels: give one sense label per context")
    prompts = [TokenizedPrompt.from_model(model, text, prepend_bos) for text in contexts]
    word_pos = [locate(p, word, occurrence) for p in prompts]
    if read == "word":
        read_pos = [ps if pool == "mean" else ps[-1:] if pool == "last" else ps[:1] for ps in word_pos]
    else:
        read_pos = [[len(p) - 1] for p in prompts]
    n_layers = model.cfg.n_layers
    names = [f"blocks.{layer}.hook_resid_pre" for layer in range(n_layers)]
    names.append(model.block_output_hook_name(n_layers - 1))

    # Contexts of equal token length run together: no padding, so each equals its run alone.
    streams: list[torch.Tensor | None] = [None] * len(prompts)
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    for group in by_length.values():
        tokens = torch.stack([prompts[i].tokens for i in group])  # [batch, pos]
        _, cache = model.run_with_cache(tokens, names_filter=names, return_cache_object=False,
                                        return_type=None)
        stack = torch.stack([cache[n].float().cpu() for n in names], dim=1)  # [batch, n_layers + 1, pos, d_model]
        for row, i in enumerate(group):
            streams[i] = stack[row]
    vectors = torch.stack([s[:, ps].mean(1) for s, ps in zip(streams, read_pos)])  # [n, n_layers + 1, d_model]
    causal = bool(getattr(model.cfg, "causal", True))
    masks = []
    for p in prompts:
        mask = torch.tensor([b > a for a, b in p.offsets])  # special tokens have an empty span
        if causal:
            mask[0] = False  # a decoder's first token is an attention sink with an outsized norm
        masks.append(mask)
    notes = []
    if read == "end":
        notes.append(f"reads each context's last token, not {word!r}: the cue follows the word, and a causal "
                     "model's vector at the word cannot see it")
    if any(len(ps) > 1 for ps in word_pos):
        split = sorted({"|".join(prompts[i].str_tokens[q] for q in ps) for i, ps in enumerate(word_pos) if len(ps) > 1})
        notes.append(f"{word!r} is split into sub-tokens ({', '.join(split)}); pooled by {pool!r}")
    return WordTrace(word, contexts, list(labels) if labels is not None else None,
                     [p.str_tokens for p in prompts], [p.tokens for p in prompts], word_pos, read_pos, vectors,
                     streams, masks, pool, read,
                     getattr(model.cfg, "model_name", ""), causal, notes)
