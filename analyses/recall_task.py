"""A long-range recall task, and the three small models trained on it for the gradient-flow study.

The task: a sequence of `length = max(gaps) + 2` tokens, all noise except one key token at position
`length - 1 - n` and the query token at the last position, where the model must output the key.
So the key is recalled after a gap of exactly n positions (n - 1 noise tokens between key and query);
gap 1: the key is the token right before the query. Keys and noise are disjoint vocabularies, so
the key is the only key-type token of the sequence: an RNN can learn to store it when it sees it
and hold it through noise (its input gate and forget gate suffice), a transformer to attend to
it; neither needs to count positions. Gaps are drawn uniformly from `gaps` in training.

Vocabulary: 0 = the query, 1..n_keys = keys, then n_noise noise tokens.

The models, of comparable size (~100k parameters each, counted in the study): a 2-layer
transformer (the toolkit's own `HookedTransformer`, learned positions, so its hooks are native)
and an LSTM and a GRU language model (embedding -> nn.LSTM / nn.GRU -> linear), plain
`nn.Module`s that `interp.attach` hooks. All three train with the same loop
(`models.training.train`: AdamW, warm-up then cosine, gradient clipping), data, seed and steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

QUERY = 0


@dataclass(frozen=True)
class RecallTask:
    gaps: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    n_keys: int = 8
    n_noise: int = 16

    def __post_init__(self) -> None:
        if not self.gaps or min(self.gaps) < 1:
            raise ValueError(f"gaps must be positive distances, got {self.gaps}")

    @property
    def length(self) -> int:
        return max(self.gaps) + 2  # position 0 is always noise

    @property
    def d_vocab(self) -> int:
        return 1 + self.n_keys + self.n_noise

    def sample(self, n: int, generator: torch.Generator, gap: int | None = None):
        """(tokens [n, length], keys [n], gaps [n]); the key of row b sits at length - 1 - gaps[b]."""
        if gap is not None and gap > max(self.gaps):
            raise ValueError(f"gap {gap} does not fit sequences of length {self.length} (max gap {max(self.gaps)})")
        tokens = 1 + self.n_keys + torch.randint(self.n_noise, (n, self.length), generator=generator)
        keys = 1 + torch.randint(self.n_keys, (n,), generator=generator)
        if gap is None:
            gaps = torch.tensor(self.gaps)[torch.randint(len(self.gaps), (n,), generator=generator)]
        else:
            gaps = torch.full((n,), gap)
        rows = torch.arange(n)
        tokens[rows, self.length - 1 - gaps] = keys
        tokens[:, -1] = QUERY
        return tokens, keys, gaps

    def batches(self, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(seed)
        while True:
            tokens, keys, _ = self.sample(batch_size, gen)
            yield tokens, keys


def recall_loss(model, batch) -> torch.Tensor:
    """Cross-entropy of the key at the query (last) position: the training loss."""
    tokens, keys = batch
    return F.cross_entropy(model(tokens)[:, -1].float(), keys)


@dataclass
class RecurrentConfig:
    kind: str  # "lstm" or "gru"
    d_vocab: int
    d_embed: int
    d_hidden: int
    model_name: str = ""


class RecurrentLM(nn.Module):
    """Embedding -> one nn.LSTM / nn.GRU layer (batch first) -> linear head: logits [batch, pos, vocab]."""

    def __init__(self, cfg: RecurrentConfig) -> None:
        super().__init__()
        if cfg.kind not in ("lstm", "gru"):
            raise ValueError(f"kind must be 'lstm' or 'gru', got {cfg.kind!r}")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.d_vocab, cfg.d_embed)
        self.rnn = (nn.LSTM if cfg.kind == "lstm" else nn.GRU)(cfg.d_embed, cfg.d_hidden, batch_first=True)
        self.head = nn.Linear(cfg.d_hidden, cfg.d_vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.rnn(self.embed(tokens))  # [batch, pos, d_hidden]
        return self.head(hidden)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device


def build_models(task: RecallTask, seed: int = 0) -> dict[str, nn.Module]:
    """The transformer, the LSTM and the GRU, each initialised from `seed`, ~100k parameters each."""
    import models

    torch.manual_seed(seed)
    cfg = models.TransformerConfig(n_layers=2, d_model=64, n_heads=4, d_head=16, d_mlp=256, d_vocab=task.d_vocab,
                                   n_ctx=task.length, act_fn="gelu", normalization_type="LN",
                                   model_name="recall-transformer")
    out = {"transformer": models.HookedTransformer(cfg)}
    for kind, hidden in (("lstm", 128), ("gru", 150)):
        torch.manual_seed(seed)
        out[kind] = RecurrentLM(RecurrentConfig(kind, task.d_vocab, 64, hidden, f"recall-{kind}"))
    return out


def train_model(model: nn.Module, task: RecallTask, steps: int, batch_size: int = 64, lr: float = 3e-3,
                seed: int = 0, progress: bool = False):
    """Train in place on the recall loss with the toolkit's loop -> `models.training.TrainResult`."""
    from models.training import TrainConfig, train

    cfg = TrainConfig(steps=steps, lr=lr, warmup_steps=max(1, steps // 10), seed=seed, log_every=50)
    return train(model, task.batches(batch_size, seed), cfg, progress=progress, loss_fn=recall_loss)


@torch.no_grad()
def accuracy_by_gap(model: nn.Module, task: RecallTask, n_per_gap: int, seed: int) -> torch.Tensor:
    """[gap]: share of held-out sequences whose argmax at the query is the key."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for gap in task.gaps:
        tokens, keys, _ = task.sample(n_per_gap, gen, gap)
        out.append((model(tokens)[:, -1].argmax(-1) == keys).float().mean())
    return torch.stack(out)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
