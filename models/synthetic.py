"""A synthetic corpus in which the framework paper's phenomena pay off, and its tokenizer.

Each sequence starts with BOS. Half of them are "text" mixing three sources, so that
each of the paper's mechanisms has something to predict:

- a random sparse bigram Markov chain: the next token depends on the current one, which
  the direct path W_E W_U can learn;
- planted skip-trigrams `a ... b -> c`: once `a` has occurred, `b` is followed by `c`,
  which one attention head can learn (attend from `b` back to `a`, copy toward `c`);
- repeated segments: a stretch of uniformly random tokens that occurs again later, so
  that the second copy is predictable only by induction (find the earlier occurrence of
  the current token, predict what followed it).

Everything is drawn from one seed, so the corpus is reproducible.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterator

import torch

BOS = 0


@dataclass
class CorpusConfig:
    d_vocab: int = 256  # token 0 is BOS
    seq_len: int = 128
    successors: int = 3  # likely successors of each token in the bigram chain
    bigram_mass: float = 0.9  # probability that the chain moves to one of them
    n_skip_trigrams: int = 48
    p_trigram: float = 0.9  # probability a planted rule fires when it can
    p_repeat: float = 0.5  # probability that a text sequence also holds a repeated random segment
    repeat_len: tuple[int, int] = (6, 30)
    max_copies: int = 4
    p_periodic: float = 0.5  # fraction of sequences that are one random segment repeated to the end
    periodic_len: tuple[int, int] = (10, 40)
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


class SyntheticCorpus:
    """Sample batches `[batch, seq_len]` of the corpus; `rules` lists the planted skip-trigrams."""

    def __init__(self, cfg: CorpusConfig) -> None:
        self.cfg = cfg
        g = torch.Generator().manual_seed(cfg.seed)
        V = cfg.d_vocab
        # Bigram chain over tokens 1..V-1: each token has a few favoured successors.
        probs = torch.full((V, V), (1 - cfg.bigram_mass) / (V - 2))
        probs[:, BOS] = 0
        for tok in range(V):
            succ = torch.randperm(V - 1, generator=g)[: cfg.successors] + 1
            weights = torch.rand(cfg.successors, generator=g) + 0.5
            probs[tok, succ] += cfg.bigram_mass * weights / weights.sum()
        self.transitions = probs / probs.sum(-1, keepdim=True)  # [V, V], row-stochastic
        self._cdf = self.transitions.cumsum(-1)
        self._cdf[:, -1] = 1.0  # guard searchsorted against rounding at the top
        # Skip-trigram rules a ... b -> c, at most one per trigger b so the sampler can vectorise.
        tokens = torch.randperm(V - 1, generator=g) + 1
        n = cfg.n_skip_trigrams
        b_tok, a_tok = tokens[:n], tokens[n : 2 * n]
        c_tok = torch.randint(1, V, (n,), generator=g)
        self.rule_a = torch.full((V,), -1, dtype=torch.long)
        self.rule_c = torch.full((V,), -1, dtype=torch.long)
        self.rule_a[b_tok], self.rule_c[b_tok] = a_tok, c_tok
        self.rules = [(int(a), int(b), int(c)) for a, b, c in zip(a_tok, b_tok, c_tok)]

    def sample(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        cfg = self.cfg
        L, V = cfg.seq_len, cfg.d_vocab
        out = torch.empty(batch, L, dtype=torch.long)
        out[:, 0] = BOS
        out[:, 1] = torch.randint(1, V, (batch,), generator=generator)
        seen = torch.zeros(batch, V, dtype=torch.bool)
        seen[torch.arange(batch), out[:, 1]] = True
        rows = torch.arange(batch)
        uniform = torch.rand(L, batch, generator=generator)  # [pos, batch]: contiguous rows
        fire_draw = torch.rand(batch, L, generator=generator) < cfg.p_trigram
        for pos in range(2, L):
            prev = out[:, pos - 1]
            # Inverse-CDF sampling: one searchsorted per position for the whole batch.
            nxt = torch.searchsorted(self._cdf[prev], uniform[pos, :, None])[:, 0]
            a, c = self.rule_a[prev], self.rule_c[prev]
            fire = (a >= 0) & seen[rows, a.clamp(min=0)] & fire_draw[:, pos]
            nxt = torch.where(fire, c, nxt)
            out[:, pos] = nxt
            seen[rows, nxt] = True
        self._plant_repeats(out, generator)
        self._make_periodic(out, generator)
        return out

    def _make_periodic(self, out: torch.Tensor, generator: torch.Generator) -> None:
        """Turn a fraction of the rows into BOS + one random segment repeated (the shape of Olsson's probe).

        Without these, repeats are a small share of the tokens and a 2-layer model sits
        on the bigram plateau for thousands of steps before an induction head forms.
        """
        cfg = self.cfg
        batch, L = out.shape
        periodic = (torch.rand(batch, generator=generator) < cfg.p_periodic)
        lengths = torch.randint(cfg.periodic_len[0], cfg.periodic_len[1] + 1, (batch,), generator=generator)
        segments = torch.randint(1, cfg.d_vocab, (batch, cfg.periodic_len[1]), generator=generator)
        for i in torch.nonzero(periodic)[:, 0].tolist():
            n = int(lengths[i])
            out[i, 1:] = segments[i, :n].repeat((L - 1) // n + 1)[: L - 1]

    def _plant_repeats(self, out: torch.Tensor, generator: torch.Generator) -> None:
        cfg = self.cfg
        L = cfg.seq_len
        lo, hi = cfg.repeat_len
        batch = out.shape[0]
        # All random draws up front, in one order, so the stream is reproducible.
        repeat = (torch.rand(batch, generator=generator) < cfg.p_repeat).tolist()
        lengths = torch.randint(lo, hi + 1, (batch,), generator=generator).tolist()
        n_copies = torch.randint(2, cfg.max_copies + 1, (batch,), generator=generator).tolist()
        segments = torch.randint(1, cfg.d_vocab, (batch, hi), generator=generator)
        gap_draws = torch.rand(batch, cfg.max_copies, generator=generator)
        for i in range(batch):
            if not repeat[i]:
                continue
            length = lengths[i]
            copies = max(2, min(n_copies[i], (L - 1) // length))
            # Place the copies in order, at random gaps after BOS.
            slack = L - 1 - copies * length
            gaps = torch.sort((gap_draws[i, :copies] * (slack + 1)).long()).values.tolist()
            for k in range(copies):
                begin = 1 + gaps[k] + k * length
                out[i, begin : begin + length] = segments[i, :length]

    def batches(self, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
        """An endless, reproducible stream of batches."""
        generator = torch.Generator().manual_seed(seed)
        while True:
            yield self.sample(batch_size, generator)


def token_names(d_vocab: int) -> list[str]:
    return ["<bos>"] + [f"t{i}" for i in range(1, d_vocab)]


def build_tokenizer(d_vocab: int):
    """A word-level tokenizer for the synthetic vocabulary: "t5 t17 t5" <-> [5, 17, 5], BOS is "<bos>".

    Its convention, like GPT-2-style models trained with a BOS, is to prepend BOS.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {name: i for i, name in enumerate(token_names(d_vocab))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<bos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", pad_token="<bos>", eos_token="<bos>")
