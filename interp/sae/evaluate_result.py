"""DictionaryEvaluation: what evaluate_dictionary (interp.sae.evaluate) measured, as numbers, tensors, a figure
and a report page."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

METRICS = {
    "l0": "mean active latents per token",
    "explained_variance": "1 - E_t ||x_t - x_hat_t||^2 / (E_t ||x_t||^2 - ||E_t x_t||^2): SAELens 6.54's "
                          "explained_variance (evals.py ExplainedVarianceCalculator; its trainer logs the same)",
    "explained_variance_legacy": "mean over tokens of 1 - ||x_t - x_hat_t||^2 / ||x_t - mean x||^2, the mean over "
                                 "the token's batch (SAELens's explained_variance_legacy)",
    "mse": "mean over tokens and features of (x - x_hat)^2",
    "l2_error": "mean over tokens of ||x - x_hat||^2 (SAELens's training mse_loss)",
    "cosine": "mean over tokens of cos(x, x_hat)",
    "ce_clean": "next-token cross-entropy of the model (nats)",
    "ce_spliced": "cross-entropy with the dictionary's reconstruction spliced in, no error term",
    "ce_zero_ablation": "cross-entropy with the activation it replaces set to 0",
    "delta_ce": "ce_spliced - ce_clean",
    "ce_loss_recovered": "(ce_zero - ce_spliced) / (ce_zero - ce_clean) (SAELens's ce_loss_score)",
    "kl_spliced": "mean KL(clean || spliced) of the next-token distributions (nats)",
    "kl_zero_ablation": "mean KL(clean || zero-ablated)",
    "dead_fraction": "latents active on at most dead_threshold of the tokens",
    "dense_fraction": "latents active on more than dense_threshold of the tokens",
}


@dataclass
class DictionaryEvaluation:
    """The numbers of evaluate_dictionary (each defined in METRICS) and the tensors behind them.

    frequency [latent]: share of evaluated tokens each latent was active on. l0_per_token [sequence,
    position] and ce [run, sequence, position] ("clean", "spliced", "zero_ablation"; position p predicts
    token p + 1) hold NaN where a position was left out. `axes` names every tensor's dimensions.
    """

    dictionary: str
    reads: str
    writes: str
    n_tokens: int
    n_predictions: int
    l0: float
    explained_variance: float
    explained_variance_legacy: float
    mse: float
    l2_error: float
    cosine: float
    ce_clean: float
    ce_spliced: float
    ce_zero_ablation: float
    kl_spliced: float
    kl_zero_ablation: float
    frequency: torch.Tensor
    l0_per_token: torch.Tensor
    ce: dict[str, torch.Tensor]
    dead_threshold: float = 0.0
    dense_threshold: float = 0.1
    settings: dict = field(default_factory=dict)
    axes: dict = field(default_factory=lambda: {"frequency": ("latent",), "l0_per_token": ("sequence", "position"),
                                                "ce": ("run", "sequence", "position")})

    @property
    def delta_ce(self) -> float:
        return self.ce_spliced - self.ce_clean

    @property
    def ce_loss_recovered(self) -> float:
        gap = self.ce_zero_ablation - self.ce_clean
        return (self.ce_zero_ablation - self.ce_spliced) / gap if gap else float("nan")

    @property
    def dead(self) -> torch.Tensor:
        """Indices of dead latents (active on at most dead_threshold of the tokens; by default: never)."""
        return (self.frequency <= self.dead_threshold).nonzero().squeeze(1)

    @property
    def dense(self) -> torch.Tensor:
        return (self.frequency > self.dense_threshold).nonzero().squeeze(1)

    @property
    def dead_fraction(self) -> float:
        return len(self.dead) / len(self.frequency)

    @property
    def dense_fraction(self) -> float:
        return len(self.dense) / len(self.frequency)

    @property
    def log_frequency(self) -> torch.Tensor:
        """log10 of each latent's frequency; -inf for a latent that never fired."""
        return self.frequency.log10()

    def density_histogram(self, bins: int = 40) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(edges [bins + 1], counts [bins], latents that never fired) of log10 frequency, from one
        token in n_tokens (the rarest measurable) to 1."""
        live = self.log_frequency[torch.isfinite(self.log_frequency)]
        low = math.floor(math.log10(1 / max(self.n_tokens, 1)))
        edges = torch.linspace(low, 0, bins + 1)
        counts = torch.histc(live, bins=bins, min=low, max=0) if len(live) else torch.zeros(bins)
        return edges, counts, int((self.frequency == 0).sum())

    def summary(self) -> dict[str, float]:
        return {name: float(getattr(self, name)) for name in METRICS}

    def to_frame(self, per: str = "metric"):
        """per="metric": one row per number (metric, value, definition); per="latent": frequency of each latent."""
        import pandas as pd

        if per == "latent":
            return pd.DataFrame({"latent": range(len(self.frequency)), "frequency": self.frequency.tolist(),
                                 "log10_frequency": self.log_frequency.tolist(),
                                 "dead": (self.frequency <= self.dead_threshold).tolist(),
                                 "dense": (self.frequency > self.dense_threshold).tolist()})
        if per != "metric":
            raise ValueError(f"per must be 'metric' or 'latent', got {per!r}")
        return pd.DataFrame([{"metric": k, "value": v, "definition": METRICS[k]} for k, v in self.summary().items()])

    def plot(self):
        """Feature density (histogram of log10 frequency) beside the three cross-entropies -> `Figure`."""
        from interp.plots import COLORS, new_figure

        fig = new_figure(10.5, 3.4)
        left, right = fig.subplots(1, 2, width_ratios=[2, 1])
        edges, counts, never = self.density_histogram()
        left.bar(edges[:-1].tolist(), counts.tolist(), width=float(edges[1] - edges[0]), align="edge",
                 color=COLORS[0])
        left.set_xlabel("log10 frequency (share of tokens a latent is active on)", fontsize=9)
        left.set_ylabel("latents", fontsize=9)
        left.axvline(math.log10(self.dense_threshold), color="#888888", linestyle="--", linewidth=0.8)
        left.set_title(f"feature density: {never} of {len(self.frequency)} never active on {self.n_tokens} tokens",
                       fontsize=10)
        runs = ["clean", "spliced", "zero ablation"]
        values = [self.ce_clean, self.ce_spliced, self.ce_zero_ablation]
        bars = right.barh(runs, values, color=[COLORS[2], COLORS[0], COLORS[3]])
        right.bar_label(bars, labels=[f"{v:.3f}" for v in values], padding=3, fontsize=8)
        right.invert_yaxis()
        right.set_xlim(0, max(values) * 1.25)
        right.set_xlabel("cross-entropy (nats)", fontsize=9)
        right.set_title(f"ΔCE {self.delta_ce:+.3f}, recovered {self.ce_loss_recovered:.3f}", fontsize=10)
        for ax in (left, right):
            ax.tick_params(labelsize=8)
            for side in ("top", "right"):
                ax.spines[side].set_visible(False)
        fig.suptitle(f"{self.dictionary}: L0 {self.l0:.1f}, explained variance {self.explained_variance:.3f}",
                     fontsize=11)
        return fig

    def to_dict(self) -> dict:
        edges, counts, never = self.density_histogram()
        return {"dictionary": self.dictionary, "reads": self.reads, "writes": self.writes, "n_tokens": self.n_tokens,
                "n_predictions": self.n_predictions, **self.summary(), "dead_threshold": self.dead_threshold,
                "dense_threshold": self.dense_threshold, "settings": self.settings, "definitions": METRICS,
                "frequency": self.frequency.tolist(),
                "density_histogram": {"edges": edges.tolist(), "counts": counts.tolist(), "never_active": never}}

    def save(self, directory, name: str = "sae_evaluation") -> Path:
        """`name`.json (every number, the frequencies) and `name`.html (the report page) in `directory`."""
        from interp.report import Page

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"{name}.json").write_text(json.dumps(self.to_dict(), indent=1))
        page = Page(f"Dictionary evaluation: {self.dictionary}",
                    {"reads": self.reads, "writes": self.writes, "tokens": self.n_tokens, **self.settings})
        bos = " BOS positions are left out and left clean." if self.settings.get("exclude_bos") else ""
        page.text(f"Over {self.n_tokens} held-out tokens ({self.n_predictions} next-token predictions). The spliced "
                  "run replaces the activation by the dictionary's reconstruction with no error term; the "
                  "zero-ablation run sets it to 0." + bos)
        page.table([{"metric": k, "value": v, "definition": METRICS[k]} for k, v in self.summary().items()])
        page.figure(self.plot(), "Left: how often each latent is active (dashed: the dense threshold). Right: the "
                                 "model's loss clean, with the dictionary spliced in, and with the activation zeroed.")
        top = self.frequency.topk(min(10, len(self.frequency)))
        page.table([{"latent": int(i), "frequency": float(f)} for f, i in zip(top.values, top.indices)],
                   caption="Most frequent latents")
        return page.save(directory / f"{name}.html")

    def _repr_html_(self) -> str:
        from interp.plots import to_svg

        return to_svg(self.plot())
