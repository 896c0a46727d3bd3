"""Which experts read which token: routing statistics of mixture-of-experts models.

    result = word_routing(model, "mole", contexts, labels=senses)
    result.by_sense()["chemistry"]      # [n_moe_layers, n_experts]: mean routing weight at "mole"
    result.plot(); result.save("reports/routing")

Reads the router's own decision (`mlp.hook_expert_indices` / `mlp.hook_expert_weights`, the
weights actually used) at the word's last token in each context, for every MoE layer.
Works on any model with those hooks and a `cfg` with `num_experts` and `is_moe(layer)`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch


class NotMoEError(ValueError):
    """Routing statistics were asked of a model without mixture-of-experts layers."""


def moe_layers(model) -> list[int]:
    cfg = model.cfg
    is_moe = getattr(cfg, "is_moe", None)
    layers = [layer for layer in range(cfg.n_layers) if is_moe is not None and is_moe(layer)]
    if not layers:
        raise NotMoEError(f"{getattr(cfg, 'model_name', type(model).__name__)} has no mixture-of-experts layers")
    return layers


@dataclass
class RoutingResult:
    """weights[c, l, e]: the routing weight expert e got at the word in context c, MoE layer layers[l]
    (0 where the router did not choose it)."""

    word: str
    contexts: list[str]
    labels: list[str] | None
    layers: list[int]
    weights: torch.Tensor  # [n_contexts, n_moe_layers, n_experts]
    positions: list[int] = field(default_factory=list)  # the token read in each context

    @property
    def fired(self) -> torch.Tensor:
        """[n_contexts, n_moe_layers, n_experts] bool: was the expert among the top-k?"""
        return self.weights != 0

    @property
    def senses(self) -> list[str]:
        return list(dict.fromkeys(self.labels)) if self.labels else []

    def by_sense(self) -> dict[str, torch.Tensor]:
        """sense -> [n_moe_layers, n_experts] mean routing weight over its contexts (all contexts if unlabelled)."""
        if not self.labels:
            return {"all": self.weights.mean(0)}
        return {s: self.weights[[i for i, lab in enumerate(self.labels) if lab == s]].mean(0) for s in self.senses}

    def firing_rate(self) -> dict[str, torch.Tensor]:
        """sense -> [n_moe_layers, n_experts] share of its contexts in which the expert fired."""
        groups = {"all": list(range(len(self.contexts)))} if not self.labels else \
            {s: [i for i, lab in enumerate(self.labels) if lab == s] for s in self.senses}
        return {s: self.fired[idx].float().mean(0) for s, idx in groups.items()}

    def top(self, sense: str | None = None, k: int = 3) -> list[tuple[int, int, float]]:
        """(layer, expert, mean weight) of the k strongest routes for a sense (or all contexts)."""
        table = self.by_sense()[sense or next(iter(self.by_sense()))]
        values, flat = table.flatten().topk(min(k, table.numel()))
        n_e = table.shape[1]
        return [(self.layers[i // n_e], i % n_e, float(v)) for v, i in zip(values.tolist(), flat.tolist())]

    def to_frame(self):
        import pandas as pd

        rows = []
        for c in range(len(self.contexts)):
            for li, layer in enumerate(self.layers):
                for e in range(self.weights.shape[-1]):
                    w = float(self.weights[c, li, e])
                    if w:
                        rows.append({"context": c, "sense": self.labels[c] if self.labels else None,
                                     "layer": layer, "expert": e, "weight": w})
        return pd.DataFrame(rows)

    def plot(self):
        """One heatmap per sense, side by side: layers x experts, the mean routing weight at the word -> `Figure`."""
        from interp.plots import heatmaps

        cols = [f"E{e}" for e in range(self.weights.shape[-1])]
        rows = [f"L{layer}" for layer in self.layers]
        return heatmaps([dict(values=table, row_labels=rows, col_labels=cols, title=f"{self.word!r}: {sense}",
                              signed=False, vmin=0.0, vmax=1.0) for sense, table in self.by_sense().items()])

    def to_dict(self) -> dict:
        return {"word": self.word, "contexts": self.contexts, "labels": self.labels, "layers": self.layers,
                "positions": self.positions, "weights": self.weights.tolist(),
                "by_sense": {s: t.tolist() for s, t in self.by_sense().items()},
                "firing_rate": {s: t.tolist() for s, t in self.firing_rate().items()}}

    def save(self, directory, name: str | None = None) -> Path:
        from interp.report import Page

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        name = name or f"routing_{self.word}"
        (directory / f"{name}.json").write_text(json.dumps(self.to_dict(), indent=1))
        page = Page(f"Expert routing at {self.word!r}", {"contexts": len(self.contexts), "layers": self.layers})
        page.text("Mean routing weight each expert gets at the word (0 where the router passed it over), per sense.")
        page.figure(self.plot())
        page.table([{"sense": s, "layer": layer, "expert": e, "mean weight": w}
                    for s in self.by_sense() for layer, e, w in self.top(s, k=5)], caption="Strongest routes")
        return page.save(directory / f"{name}.html")

    def _repr_html_(self) -> str:
        from interp.plots import to_svg

        return to_svg(self.plot())


@torch.no_grad()
def word_routing(model, word: str, contexts: list[str], labels: list[str] | None = None,
                 occurrence: int = 0) -> RoutingResult:
    """Which experts each MoE layer sends `word` (its last token) to, in each context."""
    from interp.positions import TokenizedPrompt
    from interp.shift.trace import locate

    layers = moe_layers(model)
    if labels is not None and len(labels) != len(contexts):
        raise ValueError(f"{len(contexts)} contexts but {len(labels)} labels: give one sense label per context")
    names = [f"blocks.{layer}.mlp.hook_expert_{what}" for layer in layers for what in ("indices", "weights")]
    E = model.cfg.num_experts
    weights, positions = [], []
    for text in contexts:
        prompt = TokenizedPrompt.from_model(model, text)
        pos = locate(prompt, word, occurrence)[-1]
        _, cache = model.run_with_cache(prompt.tokens[None], names_filter=names, return_type=None)
        per_layer = []
        for layer in layers:
            idx = cache[f"blocks.{layer}.mlp.hook_expert_indices"][0, pos]
            w = cache[f"blocks.{layer}.mlp.hook_expert_weights"][0, pos].float()
            per_layer.append(torch.zeros(E).scatter(0, idx.cpu(), w.cpu()))
        weights.append(torch.stack(per_layer))
        positions.append(pos)
    return RoutingResult(word, list(contexts), list(labels) if labels is not None else None, layers,
                         torch.stack(weights), positions)
