"""Positional encodings side by side: what each scheme adds, and how much of each head's attention is offset alone.

    python -m analyses.positional [--out reports/positional] [--quick]

Three schemes on the bundled models:

    learned      attn-only-2l (GPT-2 style, trained here) and minilm-l6 (BERT): a table W_pos [n_ctx, d_model]
                 added to the token embedding (hook_pos_embed)
    sinusoidal   translation-2l: the fixed [sin | cos] table of "Attention Is All You Need", added the same way
                 (encoder.pos_embed.W_pos, models.encoder_decoder.sinusoidal_table)
    rotary       smollm2-135m: nothing is added to the residual stream (no hook_pos_embed: resid_pre of block 0
                 is the token embedding, measured); q and k are rotated instead, pair k by the angle p theta_k

1. What each adds: the cosine similarity of position vectors i and j (rotary: the kernel mean_k cos((i - j)
   theta_k), the cosine between R_i x and R_j x for a vector x with equal energy in each rotated pair, which
   is what the rotation does to q.k), and the norm added against the token embedding's.
2. How much of each head's attention is relative position alone, on real text (Wikipedia summaries cut to
   one length for the English models; the synthetic corpus for attn-only-2l, which reads tokens t1..t255; the
   toy translation pairs for translation-2l, encoder and decoder self-attention). The offset-only model of a
   head: on the keys other than the sequence's ends, pattern[q, k] = r[q] g[q - k] / sum_k' g[q - k'] (r[q]:
   the row's mass there), what a head whose scores depend on q - k only produces. g is fitted by iterative
   proportional fitting (each offset gets, over all queries and texts, the attention the head gives it in
   total: the maximum-likelihood g); R^2 is the fraction of the variance within query rows it explains, over
   every text. The end keys (key 0; the last key in an encoder) are left out because each is the farthest key
   of its row: a steep enough g would pass a head that attends to [CLS] or <s> for a relative one. Their mass
   is `ends`, and `relative` = (1 - ends) R^2 ranks the heads. `r2_raw` predicts with the plain mean weight at
   each offset instead, which cannot follow the 1 / (number of keys) of a softmax row.

The offset-only fit lives in `analyses/positional_fit.py`; the result objects, figures and page in
`analyses/positional_report.py` (both re-exported here).
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from analyses.positional_fit import OffsetFit, PatternSums, _offset_index, end_keys, offset_fit
from analyses.positional_report import HeadOffsets, PositionalResult, Scheme

__all__ = [  # the study's own names, and those of positional_fit and positional_report it re-exports
    "MODELS", "HeadOffsets", "OffsetFit", "PatternSums", "PositionalResult", "Scheme", "cosine_matrix", "end_keys",
    "head_offsets", "main", "offset_fit", "offset_share", "positional_study", "rotary_kernel", "scheme_of",
]

MODELS = ("attn-only-2l", "minilm-l6", "translation-2l", "smollm2-135m")


# ---------------------------------------------------------------------- what each scheme adds
def cosine_matrix(vectors: torch.Tensor) -> torch.Tensor:
    """[N, d] -> [N, N] cosine similarity."""
    unit = torch.nn.functional.normalize(vectors.double(), dim=-1)
    return (unit @ unit.T).float()


def rotary_kernel(inv_freq: torch.Tensor, n: int) -> torch.Tensor:
    """[n, n]: mean over rotated pairs k of cos((i - j) theta_k), the cosine of R_i x and R_j x for any x with the
    same energy in every pair; depends on i - j only."""
    delta = (torch.arange(n)[:, None] - torch.arange(n)[None]).double()
    return torch.cos(delta[..., None] * inv_freq.double()).mean(-1).float()


def offset_share(matrix: torch.Tensor) -> float:
    """Fraction of an [N, N] matrix's variance that its mean along each diagonal (i - j) explains: 1 when it
    depends on i - j only (a Toeplitz matrix)."""
    n = matrix.shape[0]
    idx = _offset_index(n, n).flatten()
    m = matrix.double().flatten()
    means = torch.zeros(2 * n - 1, dtype=torch.float64).index_add_(0, idx, m) / torch.bincount(idx, minlength=2 * n - 1)
    return float(1 - (m - means[idx]).pow(2).sum() / (m - m.mean()).pow(2).sum())


def scheme_of(model, n_positions: int = 128) -> Scheme:
    """The positional scheme of a loaded model, its similarity matrix and what it adds on a short input."""
    cfg = model.cfg
    kind = cfg.positional_embedding_type
    encdec = getattr(cfg, "encoder_decoder", False)
    prefix = "encoder." if encdec else ""
    n = min(n_positions, cfg.n_ctx)
    tokens = torch.arange(1, 9)[None] % cfg.d_vocab
    names = [f"{prefix}hook_embed", f"{prefix}hook_pos_embed", f"{prefix}blocks.0.hook_resid_pre"]
    args = (tokens, tokens[:, :1]) if encdec else (tokens,)
    model_hooks = set(model.hook_dict)
    with torch.no_grad():
        _, cache = model.run_with_cache(*args, names_filter=[x for x in names if x in model_hooks])
    token_norm = float(cache[names[0]].norm(dim=-1).mean())
    if kind == "rotary":
        if names[1] in model_hooks:
            raise ValueError(f"{cfg.model_name} is rotary but also has {names[1]}; the study reads one scheme a model")
        added = cache[names[2]] - cache[names[0]]  # no embedding norm in these models: the stream is the embedding
        inv_freq = model.rotary.inv_freq
        kernel = rotary_kernel(inv_freq, n)
        return Scheme(cfg.model_name, "rotary", "model.rotary.inv_freq: q, k rotated by p theta_k (rotary_base "
                      f"{cfg.rotary_base:g}, {inv_freq.numel()} pairs of d_head {cfg.d_head})",
                      kernel, float(added.norm(dim=-1).mean()), token_norm, offset_share(kernel))
    if kind not in ("standard", "sinusoidal"):
        raise ValueError(f"{cfg.model_name} has {kind!r} positions; the study reads learned, sinusoidal and rotary "
                         "ones")
    table = (model.encoder.pos_embed.W_pos if encdec else model.W_pos)[:n].detach()
    sim = cosine_matrix(table)
    where = f"{prefix}pos_embed.W_pos [{cfg.n_ctx}, {cfg.d_model}]" + (", computed, not learned" if kind == "sinusoidal"
                                                                       else ", learned")
    return Scheme(cfg.model_name, "learned" if kind == "standard" else kind, where, sim,
                  float(cache[names[1]].norm(dim=-1).mean()), token_norm, offset_share(sim))


# ---------------------------------------------------------------------- every head on text
def _text_windows(model, n: int, n_texts: int) -> torch.Tensor:
    """[n_texts, n] token ids: the first n tokens of Wikipedia summaries longer than n (a trailing special
    token such as BERT's [SEP] kept at the end)."""
    from interp.collect.corpus import default_corpus

    texts = default_corpus().texts
    specials = set(getattr(model.tokenizer, "all_special_ids", None) or [])
    rows = []
    for start in range(0, len(texts), 256):
        tok = model.tokenize(list(texts[start:start + 256]), truncate=True)
        for ids, mask in zip(tok.tokens, tok.attention_mask):
            ids = ids[mask.bool()]
            if len(ids) <= n:
                continue
            rows.append(torch.cat([ids[:n - 1], ids[-1:]]) if int(ids[-1]) in specials else ids[:n])
            if len(rows) == n_texts:
                return torch.stack(rows)
    raise ValueError(f"the corpus has only {len(rows)} texts longer than {n} tokens for {model.cfg.model_name}; "
                     "pass a shorter seq_len or fewer texts")


def _decoder_heads(model, n: int, n_texts: int, seed: int, batch: int = 8) -> tuple[PatternSums, str]:
    from analyses.heads import natural_vocabulary

    sums = PatternSums()
    if natural_vocabulary(model):
        tokens = _text_windows(model, n, n_texts)
        data = f"{n_texts} Wikipedia summaries, first {n} tokens"
    else:
        from models.synthetic import CorpusConfig, SyntheticCorpus

        corpus = SyntheticCorpus(CorpusConfig(d_vocab=model.cfg.d_vocab, seq_len=model.cfg.n_ctx, p_periodic=0.0))
        tokens = corpus.sample(n_texts, torch.Generator().manual_seed(seed))[:, :n]
        data = f"{n_texts} sequences of {n} tokens of the synthetic corpus it was trained on (its text half)"
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(model.cfg.n_layers)]
    allowed = model.blocks[0].attn.allowed_from_start(n)
    for layer, block in enumerate(model.blocks):
        if not torch.equal(block.attn.allowed_from_start(n), allowed):
            raise ValueError(f"layer {layer} of {model.cfg.model_name} masks differently (a sliding window); "
                             "the study takes one mask per model")
    with torch.no_grad():
        for start in range(0, n_texts, batch):
            _, cache = model.run_with_cache(tokens[start:start + batch].to(model.device), names_filter=names,
                                            return_type=None)
            sums.add(torch.stack([cache[name] for name in names], dim=1).flatten(1, 2), allowed)
    return sums, data


def _encoder_decoder_heads(model, n_texts: int, seed: int) -> tuple[dict[str, PatternSums], str]:
    from models import toy_translation as toy

    sums = {"enc": PatternSums(), "dec": PatternSums()}
    stacks = {"enc": model.encoder, "dec": model.decoder}
    prefix = {"enc": "encoder", "dec": "decoder"}
    with torch.no_grad():
        for pair in toy.pairs(n_texts, seed=seed):
            src, tgt = torch.tensor([pair.source_ids]), torch.tensor([pair.target_ids[:-1]])
            names = [f"{prefix[s]}.blocks.{layer}.attn.hook_pattern" for s in stacks
                     for layer in range(len(stacks[s].blocks))]
            _, cache = model.run_with_cache(src, tgt, names_filter=names)
            for s, stack in stacks.items():
                pats = [cache[f"{prefix[s]}.blocks.{layer}.attn.hook_pattern"] for layer in range(len(stack.blocks))]
                n = pats[0].shape[-1]
                sums[s].add(torch.stack(pats, dim=1).flatten(1, 2), stack.blocks[0].attn.allowed_from_start(n))
    return sums, f"{n_texts} toy translation pairs (source for the encoder, teacher-forced target for the decoder)"


def head_offsets(model, n_texts: int = 64, seq_len: int = 128, seed: int = 0) -> HeadOffsets:
    """The offset-only R^2 of every self-attention head of `model` (module docstring)."""
    cfg = model.cfg
    if getattr(cfg, "encoder_decoder", False):
        sums, data = _encoder_decoder_heads(model, n_texts, seed)
        layers = {"enc": len(model.encoder.blocks), "dec": len(model.decoder.blocks)}
    else:
        n = min(seq_len, cfg.n_ctx)
        acc, data = _decoder_heads(model, n, n_texts, seed)
        sums = {"": acc}
        layers = {"": cfg.n_layers}
    rows, fits = [], []
    for stack, acc in sums.items():
        fits.append(offset_fit(acc.groups()))
        rows += [f"{stack} L{layer}".strip() for layer in range(layers[stack])]
    H = cfg.n_heads
    n_off = max(f.offsets.numel() for f in fits)

    def stacked(attr):  # [rows, heads, ...], offsets padded to the widest
        out = []
        for f in fits:
            v = getattr(f, attr)
            if v.dim() == 2 and v.shape[1] < n_off:
                pad = (n_off - v.shape[1]) // 2
                v = torch.nn.functional.pad(v, (pad, pad), value=math.nan)
            out.append(v.reshape(-1, H, *v.shape[1:]))
        return torch.cat(out)

    offsets = max((f.offsets for f in fits), key=len)
    return HeadOffsets(cfg.model_name, data, rows, offsets, stacked("r2"), stacked("r2_raw"), stacked("mean"),
                       stacked("ends"))


# ---------------------------------------------------------------------- the study
def positional_study(*models_or_names, quick: bool = False, n_texts: int | None = None, seq_len: int | None = None,
                     seed: int = 0) -> PositionalResult:
    """Positions of each model (names loaded with models.load; default MODELS) and the offset-only R^2 of every
    head. quick: 4 texts of 32 tokens (the translation model: 16 pairs)."""
    import models as registry

    start = time.perf_counter()
    n_texts = n_texts or (4 if quick else 64)
    seq_len = seq_len or (32 if quick else 128)
    schemes, heads = {}, {}
    for item in models_or_names or MODELS:
        model = registry.load(item) if isinstance(item, str) else item
        name = model.cfg.model_name
        schemes[name] = scheme_of(model)
        encdec = getattr(model.cfg, "encoder_decoder", False)
        heads[name] = head_offsets(model, n_texts=4 * n_texts if encdec else n_texts, seq_len=seq_len, seed=seed)
    settings = {"texts": n_texts, "seq_len": seq_len, "seed": seed, "quick": quick}
    return PositionalResult(schemes, heads, settings, time.perf_counter() - start)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="reports/positional")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    args = parser.parse_args(argv)
    result = positional_study(*args.models, quick=args.quick)
    print(result.headline())
    print("wrote", result.save(args.out))


if __name__ == "__main__":
    main()
