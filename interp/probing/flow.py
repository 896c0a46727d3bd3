"""Attention-flow probes: how much attention goes from positions matching one selector to
positions matching another, per head, over a set of prompts.

    flow = attention_flow(model, prompts, source=word("tower"), target=word("Eiffel"))
    flow.top(5)   # the heads that carry "tower" -> "Eiffel"

Positions are found by character span (interp.positions), so the probe reads the same
for any tokenizer; dict prompts carry per-prompt fields (`field_word("io")`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from interp.positions import SelectorSpec, TokenizedPrompt, as_selector, describe
from interp.probing.detectors import HeadScores, layer_patterns


@dataclass
class FlowScores(HeadScores):
    """HeadScores whose value per prompt is the mass from source positions (mean over them) to targets (sum)."""

    source: str = ""
    target: str = ""
    prompts: list[str] | None = None

    def plot(self, title: str | None = None):
        """Heatmap of the mean flow of every head -> `Figure`."""
        return super().plot(f"attention {self.source} -> {self.target}" if title is None else title)


def flow_on(pattern: torch.Tensor, sources: list[int], targets: list[int]) -> torch.Tensor:
    """pattern: [..., query, key] -> [...]: mean over source queries of the mass on the target keys."""
    rows = pattern[..., sources, :]  # [..., n_src, key]
    return rows[..., targets].sum(-1).mean(-1)


def attention_flow(model, prompts: list, source: SelectorSpec, target: SelectorSpec, name: str | None = None,
                   prepend_bos: bool | None = None) -> FlowScores:
    """Score every head on each prompt; selectors are functions, words (str) or positions (int).

    Causal heads cannot attend forward, so a target after every source contributes 0.
    A selector that finds nothing raises PositionNotFound naming the prompt.
    """
    src_sel, tgt_sel = as_selector(source), as_selector(target)
    scores = []
    texts = []
    for prompt in prompts:
        tp = TokenizedPrompt.from_model(model, prompt, prepend_bos=prepend_bos)
        sources, targets = src_sel(tp), tgt_sel(tp)
        pats = layer_patterns(model, tp.tokens[None].to(model.device))[0]  # [L, H, q, k]
        scores.append(flow_on(pats, sources, targets).float().cpu())
        texts.append(tp.text)
    label = name or f"{describe(source)} -> {describe(target)}"
    return FlowScores(label, f"attention from {describe(source)} to {describe(target)}", torch.stack(scores),
                      source=describe(source), target=describe(target), prompts=texts)
