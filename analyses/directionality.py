"""Encoder vs decoder, measured: where each token's attention goes, and how contextual words become.

    python -m analyses.directionality [--out reports/directionality] [--quick]

Every course says an encoder sees both directions and a decoder only the past. The same
sentences (Wikipedia sentences from `interp.collect.corpus.default_corpus()` and the shift
study's "mole"/"tower" contexts) go through MiniLM (BERT: [CLS] ... [SEP]) and SmolLM2 (a
causal decoder), and two things are measured:

1. Attention destinations. For every layer and head, the share of a content token's
   attention that goes to earlier content tokens (past), to itself (self), to later ones
   (future) and to the tokens the tokenizer added (special: [CLS]/[SEP], BOS), averaged
   over content-token queries. Position decides what a query can reach (the first word has
   no past), so each share comes with the share uniform attention over the same visible
   keys would give, and with both as a function of the query's relative position.
2. Contextuality. The shift study's self-similarity (Ethayarajh 2019: the mean cosine of
   a word's vectors in different contexts, minus the anisotropy baseline) for the same
   words and contexts on both models, by relative depth (block / n_layers).

Choices, so that like is compared with like:

- Special tokens are the ones the tokenizer added (an empty character span: [CLS], [SEP], BOS). They are
  keys of their own category and never queries. SmolLM2's tokenizer adds no BOS
  (`cfg.default_prepend_bos` is None), so the study prepends it (`decoder_bos=True`): both models then have
  a special token at position 0, and the decoder's attention sink is counted as special, as the encoder's
  [CLS]/[SEP] are. Without it the sink moves to the first word, inside "past" (`first_word` shows it).
- Every content-token query weighs the same (pooled over sentences); the shares are head means per layer,
  and per head in `shares`.
- The uniform baseline of a query is the share each category would get if it attended uniformly over the
  keys it can see (all of them in an encoder, itself and earlier ones in a decoder); `excess` = share -
  baseline. Shares are also binned by the query's relative position (its index among the content tokens
  / (n - 1)), with the baseline in the same bins.
- Sentences of equal token length run as one batch: no padding exists, so none needs masking.
- The decoder's future share is measured, not assumed: a causal model with any future attention is an error.

The result, its figures and its page live in `analyses/directionality_report.py`.
"""

from __future__ import annotations

import argparse
import re
import time

import torch
from einops import einsum

from analyses.directionality_report import CATEGORIES, AttentionDestinations, Contextuality, DirectionalityResult
from analyses.shift_data import STUDIES, flatten
from interp.positions import TokenizedPrompt

N_BINS = 10
# Full and quick sizes: corpus sentences and shift contexts per sense for the attention shares; shift
# contexts per sense, corpus words and contexts per corpus word for contextuality.
SIZES = {False: dict(corpus=200, shift_sentences=None, shift_contexts=None, n_words=8, contexts=16),
         True: dict(corpus=8, shift_sentences=1, shift_contexts=2, n_words=1, contexts=8)}
MIN_CONTEXTS = 8
DOC_STRIDE = 25  # the corpus is sorted by topic: every 25th summary spreads the sentences over it
_SENTENCE_END = re.compile(r"(?<=[a-z0-9\)][.!?])\s+(?=[A-Z])")


class NoAttentionPatterns(ValueError):
    """The model exposes no attention pattern to read."""


# ---------------------------------------------------------------------- text
def corpus_sentences(n: int | None = None, *, stride: int = DOC_STRIDE) -> list[str]:
    """Plain English sentences (8-35 words, ASCII, no brackets or quotes) from every `stride`-th Wikipedia
    summary of the default corpus, in corpus order; the first `n` (all when None)."""
    from interp.collect.corpus import default_corpus

    out = []
    for doc in list(default_corpus())[::stride]:
        for s in _SENTENCE_END.split(doc.replace("\n", " ")):
            s = s.strip()
            if 8 <= len(s.split()) <= 35 and s.isascii() and s[-1] in ".!?" and not re.search(r"[()\[\]\"]", s):
                out.append(s)
                if n is not None and len(out) == n:
                    return out
    return out


def _single_token(model, sentence: str, word: str) -> bool:
    """Whether `word` is one token of `sentence` in `model`'s tokenizer."""
    from interp.shift.trace import locate

    return len(locate(TokenizedPrompt.from_model(model, sentence), word)) == 1


def common_words(sentences: list[str], models_: tuple = (), n_words: int = 8, n_contexts: int = 16,
                 min_contexts: int = MIN_CONTEXTS, min_length: int = 4) -> dict[str, list[str]]:
    """{word: contexts}: the `n_words` most frequent lower-case words of at least `min_length` letters that occur
    once, after a space, in at least `min_contexts` sentences and are one token there in every model given
    (so a decoder reads one and the same token everywhere); up to `n_contexts` contexts each."""
    found: dict[str, list[str]] = {}
    for s in sentences:
        lower = [w.lower() for w in re.findall(r"[A-Za-z]+", s)]
        for w in set(lower):
            if len(w) >= min_length and lower.count(w) == 1 and re.search(rf"(?<= ){w}(?![\w'-])", s):
                found.setdefault(w, []).append(s)
    out = {}
    for word, contexts in sorted(found.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        if len(out) == n_words:
            break
        if len(contexts) < min_contexts:
            break
        if all(_single_token(m, c, word) for m in models_ for c in contexts[:n_contexts]):
            out[word] = contexts[:n_contexts]
    return out


def shift_contexts(per_sense: int | None = None) -> dict[str, list[str]]:
    """The shift study's words and contexts (`analyses/shift_data.py`), the first `per_sense` of each sense."""
    out = {}
    for name, spec in STUDIES.items():
        senses = {s: cs[:per_sense] for s, cs in spec["senses"].items()}
        out[spec["word"]] = flatten(senses)[0]
    return out


# ---------------------------------------------------------------------- attention destinations
def check_patterns(model) -> None:
    """NoAttentionPatterns unless every block has an `attn.hook_pattern` hook point."""
    hooks = getattr(model, "hook_dict", {})
    cfg = getattr(model, "cfg", None)
    n_layers = getattr(cfg, "n_layers", None)
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(n_layers or 0)]
    missing = [n for n in names if n not in hooks]
    if not n_layers or missing:
        name = getattr(cfg, "model_name", type(model).__name__)
        what = f"{missing[0]} is not a hook point" if missing else "it has no cfg.n_layers"
        raise NoAttentionPatterns(
            f"{name} exposes no attention patterns ({what}): this study reads `blocks.{{l}}.attn.hook_pattern` "
            "[batch, head, query, key] of a decoder-only or encoder-only model. Load the checkpoint with "
            "`models.load(...)` (a model wrapped by `interp.attach` has no pattern hook)")


def category_masks(special: torch.Tensor) -> torch.Tensor:
    """Which (query, key) pairs fall in each category: special [batch, pos] bool -> [4, batch, q, k] bool.

    A key the tokenizer added is "special" whatever its position; otherwise the key's position against the
    query's decides past / self / future. Every pair is in exactly one category.
    """
    pos = special.shape[-1]
    idx = torch.arange(pos, device=special.device)
    content = ~special[:, None, :]  # [batch, 1, k]
    past, same, future = (idx[None, :] < idx[:, None]), (idx[None, :] == idx[:, None]), (idx[None, :] > idx[:, None])
    special = special[:, None, :].expand(-1, pos, -1)
    return torch.stack([past & content, same & content, future & content, special])


def destination_shares(pattern: torch.Tensor, special: torch.Tensor) -> torch.Tensor:
    """Each query's attention by destination: pattern [batch, head, q, k], special [batch, k] -> [batch, head, q, 4]
    (float64, on the CPU)."""
    if pattern.dtype != torch.float64:
        pattern = pattern.float()  # sums of half-precision patterns would lose digits
    masks = category_masks(special.to(pattern.device)).to(pattern.dtype)[:, :, None]  # [4, batch, 1, q, k]
    return torch.stack([(pattern * m).sum(-1) for m in masks], -1).double().cpu()


def _position_bins(special: torch.Tensor, n_bins: int) -> torch.Tensor:
    """The relative-position bin of each content token (its index among content tokens / (n - 1)); -1 for special
    tokens. special [batch, pos] -> [batch, pos] long."""
    content = ~special
    index = content.long().cumsum(-1) - 1
    n = content.sum(-1, keepdim=True).clamp_min(2)
    bins = (index.double() / (n - 1) * n_bins).long().clamp(0, n_bins - 1)
    return torch.where(content, bins, -1)


@torch.no_grad()
def attention_destinations(model, sentences: list[str], *, prepend_bos: bool | None = None,
                           n_bins: int = N_BINS) -> AttentionDestinations:
    """Where each content token's attention goes, per layer and head (see the module docstring).

    Sentences of equal token length run together, so there is no padding to mask; each row is the sentence
    run alone. prepend_bos: as `model.tokenize` (None: the model's default).
    """
    check_patterns(model)
    if not sentences:
        raise ValueError("no sentences: pass a list of strings (or None for the default corpus sentences)")
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    causal = bool(getattr(model.cfg, "causal", True))
    prompts = [TokenizedPrompt.from_model(model, s, prepend_bos) for s in sentences]
    sums = torch.zeros(n_layers, n_heads, n_bins, len(CATEGORIES), dtype=torch.float64)
    uniform = torch.zeros(n_bins, len(CATEGORIES), dtype=torch.float64)
    counts = torch.zeros(n_bins, dtype=torch.float64)
    future_max = 0.0
    first_word = torch.zeros(n_layers, dtype=torch.float64)  # head-mean attention on the first content token
    n_later = 0  # content queries after the first one
    special_strings: set[str] = set()
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    for group in by_length.values():
        tokens = torch.stack([prompts[i].tokens for i in group])  # [batch, pos]
        special = torch.tensor([[b <= a for a, b in prompts[i].offsets] for i in group])  # tokenizer-added: no span
        special_strings.update(prompts[i].str_tokens[q] for row, i in enumerate(group)
                               for q in special[row].nonzero()[:, 0].tolist())
        bins = _position_bins(special, n_bins)  # [batch, pos]
        first = (~special).long().argmax(-1)  # [batch]: the first content token
        later = ~special & (torch.arange(special.shape[1])[None] > first[:, None])  # [batch, q]
        n_later += int(later.sum())
        onehot = torch.nn.functional.one_hot(bins.clamp_min(0), n_bins).double() * (bins >= 0)[..., None]  # [b, q, bin]
        counts += onehot.sum((0, 1))
        visible = torch.ones(tokens.shape[1], tokens.shape[1], dtype=torch.float64)  # [q, k]: keys a query can see
        visible = visible.tril() if causal else visible
        flat = (visible / visible.sum(-1, keepdim=True))[None, None].expand(len(group), 1, -1, -1)
        uniform += einsum(destination_shares(flat, special)[:, 0], onehot, "b q c, b q n -> n c")

        def reduce(pattern, hook, special=special, onehot=onehot, first=first, later=later):
            nonlocal future_max
            shares = destination_shares(pattern, special)  # [b, h, q, 4]
            sums[hook.layer()] += einsum(shares, onehot, "b h q c, b q n -> h n c")
            to_first = pattern.float().mean(1)[torch.arange(len(first)), :, first.to(pattern.device)].cpu()  # [b, q]
            first_word[hook.layer()] += to_first[later].double().sum()
            content = shares[..., 2].masked_select(~special[:, None, :].expand_as(shares[..., 2]))
            future_max = max(future_max, float(content.max()))

        model.run_with_hooks(tokens, return_type=None,
                             fwd_hooks=[(f"blocks.{l}.attn.hook_pattern", reduce) for l in range(n_layers)])
    total = counts.sum()
    return AttentionDestinations(
        model_name=getattr(model.cfg, "model_name", ""), causal=causal, n_sentences=len(sentences),
        n_queries=int(total), special_tokens=sorted(special_strings),
        shares=sums.sum(2) / total, by_position=sums.mean(1) / counts.clamp_min(1)[:, None],
        baseline=uniform.sum(0) / total, baseline_by_position=uniform / counts.clamp_min(1)[:, None],
        position_counts=counts, future_max=future_max, first_word=first_word / max(n_later, 1),
        prepend_bos=prepend_bos)


# ---------------------------------------------------------------------- contextuality
def contextuality(model, words: dict[str, list[str]], *, prepend_bos: bool | None = None,
                  seed: int = 0) -> Contextuality:
    """The shift study's self-similarity (raw, anisotropy baseline, adjusted), intra-sentence similarity and MEV
    (adjusted) of each word across its contexts, at every layer: `interp.shift.trace_word` + `geometry`."""
    from interp.shift.geometry import geometry
    from interp.shift.trace import trace_word

    rows = {k: [] for k in ("self_similarity", "baseline", "intra_sentence", "mev")}
    n_contexts = []
    for word, contexts in words.items():
        if len(contexts) < 2:
            raise ValueError(f"{word!r} has {len(contexts)} context(s): self-similarity needs at least 2")
        g = geometry(trace_word(model, word, contexts, prepend_bos=prepend_bos), seed=seed)
        rows["self_similarity"].append(g.self_similarity)
        rows["baseline"].append(g.baselines.cosine)
        rows["intra_sentence"].append(g.adjusted_intra_sentence)
        rows["mev"].append(g.adjusted_mev)
        n_contexts.append(len(contexts))
    return Contextuality(getattr(model.cfg, "model_name", ""), list(words), n_contexts,
                         **{k: torch.stack(v).double() for k, v in rows.items()})


# ---------------------------------------------------------------------- the study
def _words_for(words, sentences, models_, size) -> dict[str, list[str]]:
    """Resolve the `words` argument to {word: contexts}."""
    from interp.shift.trace import WordNotFound

    if isinstance(words, dict):
        return {w: list(cs) for w, cs in words.items()}
    if words is None:
        pool = corpus_sentences()
        common = common_words(pool, models_, size["n_words"], size["contexts"])
        return {**shift_contexts(size["shift_contexts"]), **common}
    out = {}
    pool = sentences if sentences is not None else corpus_sentences()
    for w in [words] if isinstance(words, str) else words:
        found = [s for s in pool if re.search(rf"(?<!\w){re.escape(w)}(?!\w)", s, re.IGNORECASE)]
        if len(found) < 2:
            raise WordNotFound(f"the word {w!r} occurs in {len(found)} of the {len(pool)} sentences: self-similarity "
                               "needs it in at least 2; pick another word or pass words={word: [contexts]}")
        out[w] = found[: size["contexts"]]
    return out


def directionality_study(encoder, decoder, sentences: list[str] | None = None, *, words=None, quick: bool = False,
                         decoder_bos: bool = True, n_bins: int = N_BINS) -> DirectionalityResult:
    """Attention destinations and contextuality of the same text in an encoder and a decoder.

    sentences: for the attention shares (None: Wikipedia sentences + the shift study's contexts).
    words: {word: contexts} (every context must contain its word: else `WordNotFound`), a list of words (their
      contexts drawn from `sentences`, or the corpus), or None (the shift study's "mole" and "tower" plus the
      corpus's most frequent words that are one token in both models).
    decoder_bos: prepend the decoder's BOS (SmolLM2's tokenizer adds none, `cfg.default_prepend_bos` is None), so
      that both models have a special token at position 0 and the decoder's attention sink is counted as special,
      as the encoder's [CLS]/[SEP] are; False runs the decoder as its tokenizer does (the first word is the sink).
    quick: a few sentences and words (seconds to tens of seconds).
    """
    start = time.perf_counter()
    for model in (encoder, decoder):
        check_patterns(model)
    if getattr(encoder.cfg, "causal", True):
        raise ValueError(f"the encoder {encoder.cfg.model_name} is causal: pass an encoder (e.g. minilm-l6) first, "
                         "then a decoder")
    if not getattr(decoder.cfg, "causal", True):
        raise ValueError(f"the decoder {decoder.cfg.model_name} is not causal: pass a decoder (e.g. smollm2-135m) "
                         "second")
    size = SIZES[bool(quick)]
    given = sentences is not None
    if sentences is None:
        shift = [c for cs in shift_contexts(size["shift_sentences"]).values() for c in cs]
        sentences = corpus_sentences(size["corpus"]) + shift
    bos = True if decoder_bos else None
    attention = {"encoder": attention_destinations(encoder, sentences, n_bins=n_bins),
                 "decoder": attention_destinations(decoder, sentences, prepend_bos=bos, n_bins=n_bins)}
    word_contexts = _words_for(words, sentences if given else None, (encoder, decoder), size)
    if not word_contexts:
        raise ValueError("no words to trace: pass words={word: [contexts]} or a list of words")
    context = {"encoder": contextuality(encoder, word_contexts),
               "decoder": contextuality(decoder, word_contexts, prepend_bos=bos)}
    if attention["decoder"].future_max > 1e-6:
        raise AssertionError(f"{decoder.cfg.model_name} put {attention['decoder'].future_max:.3g} of a query's "
                             "attention on later tokens although it is causal: its mask is broken")
    return DirectionalityResult(attention, context, list(sentences), word_contexts, bool(quick), decoder_bos,
                                time.perf_counter() - start)


def main(argv=None) -> None:
    import models

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="minilm-l6")
    parser.add_argument("--decoder", default="smollm2-135m")
    parser.add_argument("--out", default="reports/directionality")
    parser.add_argument("--quick", action="store_true", help="a few sentences and words (seconds)")
    parser.add_argument("--no-decoder-bos", action="store_true", help="run the decoder without a BOS token")
    args = parser.parse_args(argv)
    result = directionality_study(models.load(args.encoder), models.load(args.decoder), quick=args.quick,
                                  decoder_bos=not args.no_decoder_bos)
    print(result.headline())
    print("wrote", result.save(args.out))


if __name__ == "__main__":
    main()
