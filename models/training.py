"""A reusable training loop: any HookedTransformer, any stream of token batches.

    result = train(model, batches, TrainConfig(steps=2000, lr=1e-3, seed=0))

Deterministic from `seed` (initialisation is the caller's; this seeds everything the
loop itself draws), with a progress bar and the loss curve returned.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Iterator

import torch
from tqdm.auto import tqdm


@dataclass
class TrainConfig:
    steps: int = 2000
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float | None = 1.0
    seed: int = 0
    train_biases: bool = True  # False keeps attention biases at zero (cleaner circuits)
    log_every: int = 10

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    losses: list[float]  # one per step
    seconds: float
    config: TrainConfig
    extra: dict = field(default_factory=dict)

    def smoothed(self, window: int = 50) -> list[float]:
        out, acc = [], 0.0
        for i, loss in enumerate(self.losses):
            acc += loss
            if i >= window:
                acc -= self.losses[i - window]
            out.append(acc / min(i + 1, window))
        return out


def _lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    def schedule(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))  # cosine to zero

    return schedule


def train(model, batches: Iterable[torch.Tensor] | Iterator[torch.Tensor], cfg: TrainConfig,
          progress: bool = True, loss_fn: Callable | None = None) -> TrainResult:
    """Train `model` in place on next-token loss (or `loss_fn(model, batch)`), `cfg.steps` batches.

    A batch is a token tensor, or a tuple of tensors for `loss_fn` (an encoder-decoder's source, masks, target)."""
    torch.manual_seed(cfg.seed)
    trainable = []
    fixed = set(getattr(model, "fixed_parameters", lambda: ())())  # e.g. sinusoidal position tables
    for name, p in model.named_parameters():
        is_attn_bias = ".attn." in name and name.rsplit(".", 1)[-1].lstrip("_").startswith("b")
        p.requires_grad_((cfg.train_biases or not is_attn_bias) and name not in fixed)
        if p.requires_grad:
            trainable.append(p)
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    optim = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=cfg.betas,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(optim, _lr_lambda(cfg))
    losses: list[float] = []
    it = iter(batches)
    start = time.perf_counter()
    bar = tqdm(range(cfg.steps), disable=not progress, desc=f"training {model.cfg.model_name}", mininterval=1.0)
    model.train()
    for step in bar:
        batch = next(it)
        tokens = tuple(t.to(model.device) for t in batch) if isinstance(batch, (tuple, list)) else batch.to(model.device)
        loss = loss_fn(model, tokens) if loss_fn is not None else model(tokens, return_type="loss")
        optim.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        optim.step()
        sched.step()
        losses.append(loss.item())
        if step % cfg.log_every == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    model.eval()
    return TrainResult(losses=losses, seconds=time.perf_counter() - start, config=cfg)
