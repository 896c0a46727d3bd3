"""Patching metrics: functions of the logits at a few positions, one value per prompt.

A metric declares the positions it reads (default: the last), so the engine computes
the final norm and unembedding only there. It is called with those logits
`[n, k, d_vocab]`, the index of each row's prompt `[n]`, and a context holding the clean
and corrupted runs' logits at the same positions (for KL and normalisation).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch


@dataclass
class MetricContext:
    clean_logits: torch.Tensor  # [n_prompts, k, d_vocab] at the metric's positions
    corrupted_logits: torch.Tensor


@dataclass
class Metric:
    """fn(logits [n, k, vocab], prompt_index [n], ctx) -> [n]. positions: absolute, negative from the end."""

    name: str
    fn: Callable[[torch.Tensor, torch.Tensor, MetricContext], torch.Tensor]
    positions: tuple[int, ...] | None = (-1,)  # None: every position
    normalized: bool = False  # rescale to 0 = corrupted run, 1 = clean run
    description: str = ""

    def __call__(self, logits, prompt_index, ctx) -> torch.Tensor:
        # A model over several devices predicts where its head lives, not where the prompts were embedded.
        return self.fn(logits, prompt_index.to(logits.device), ctx)


def _token_ids(ids, name: str) -> torch.Tensor:
    t = torch.as_tensor(ids, dtype=torch.long)
    if t.dim() == 0:
        t = t[None]
    if t.dim() != 1:
        raise ValueError(f"{name} must be one token id per prompt (or one for all), got shape {tuple(t.shape)}")
    return t


def _pick(ids: torch.Tensor, prompt_index: torch.Tensor) -> torch.Tensor:
    ids = ids.to(prompt_index.device)
    return ids[prompt_index] if ids.numel() > 1 else ids.expand(prompt_index.shape[0])


def logit_diff(correct, wrong, normalized: bool = False, position: int = -1) -> Metric:
    """logit[correct] - logit[wrong] at `position`; per-prompt token ids (or one for all prompts)."""
    correct, wrong = _token_ids(correct, "correct"), _token_ids(wrong, "wrong")

    def fn(logits, prompt_index, ctx):
        rows = torch.arange(logits.shape[0], device=logits.device)
        last = logits[:, 0].float()
        return last[rows, _pick(correct, prompt_index)] - last[rows, _pick(wrong, prompt_index)]

    name = "normalized logit difference" if normalized else "logit difference"
    return Metric(name, fn, (position,), normalized, "0 = corrupted run, 1 = clean run" if normalized else "")


def log_prob(target, position: int = -1) -> Metric:
    target = _token_ids(target, "target")

    def fn(logits, prompt_index, ctx):
        lp = logits[:, 0].float().log_softmax(-1)
        return lp[torch.arange(lp.shape[0], device=lp.device), _pick(target, prompt_index)]

    return Metric("log-prob", fn, (position,))


def prob(target, position: int = -1) -> Metric:
    lp = log_prob(target, position)
    return Metric("probability", lambda l, i, c: lp.fn(l, i, c).exp(), (position,))


def kl_to_clean(position: int = -1) -> Metric:
    """KL(clean || patched) of the next-token distribution at `position` (0 when the patch restores the clean run)."""

    def fn(logits, prompt_index, ctx):
        clean = ctx.clean_logits[prompt_index.to(ctx.clean_logits.device), 0].float().log_softmax(-1)
        patched = logits[:, 0].float().log_softmax(-1)
        return (clean.exp() * (clean - patched)).sum(-1)

    return Metric("KL to clean", fn, (position,))


def custom(fn: Callable[[torch.Tensor], torch.Tensor], name: str = "custom", positions: Sequence[int] | None = (-1,),
           normalized: bool = False) -> Metric:
    """Any function of the logits `[n, k, vocab]` (k = len(positions), or all positions) returning `[n]`."""
    return Metric(name, lambda logits, prompt_index, ctx: fn(logits), tuple(positions) if positions else None, normalized)


def as_metric(metric) -> Metric:
    if isinstance(metric, Metric):
        return metric
    if callable(metric):
        return custom(metric, getattr(metric, "__name__", "custom"), positions=None)
    raise TypeError(f"a metric is a Metric or a function of logits, got {type(metric).__name__}")


@dataclass
class Baselines:
    """The metric on the unpatched runs, per prompt, and the logits it was read from."""

    clean: torch.Tensor  # [n_prompts]
    corrupted: torch.Tensor
    context: MetricContext = field(repr=False, default=None)

    def normalize(self, values: torch.Tensor) -> torch.Tensor:
        """values [n_prompts, ...] -> 0 at the corrupted run, 1 at the clean run."""
        shape = (-1,) + (1,) * (values.dim() - 1)
        lo, hi = self.corrupted.view(shape), self.clean.view(shape)
        return (values - lo) / (hi - lo)
