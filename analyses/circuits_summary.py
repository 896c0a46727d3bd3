"""Every head's circuits read from the weights alone (Elhage et al. 2021), for any model.

    interp circuits --model smollm2-135m [--out reports/circuits]

Per head: the eigenvalue positivity of its full OV circuit W_E W_V W_O W_U (near 1: the
head copies the tokens it attends to into the output) and of its full QK circuit
W_E W_Q W_K^T W_E^T (near 1: it attends to the same token). Per pair of layers: the
strongest Q-, K- and V-composition scores against their random baseline. Nothing is run
on text, so it takes seconds even for SmolLM2 (FactoredMatrix never forms the vocab x
vocab matrices). The attention-only models get the full framework study instead
(`analyses.framework`), through the same command without --model.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from interp import circuits


@dataclass
class CircuitSummary:
    model_name: str
    ov_positivity: torch.Tensor  # [n_layers, n_heads]
    qk_positivity: torch.Tensor  # [n_layers, n_heads]
    composition: dict  # mode -> circuits.CompositionScores
    seconds: float

    def top_composition(self, k: int = 10) -> list[dict]:
        rows = []
        for mode, c in self.composition.items():
            for earlier, later, score in c.pairs()[:k]:
                rows.append({"mode": mode, "earlier": earlier, "later": later, "score": score,
                             "x baseline": score / c.baseline})
        return sorted(rows, key=lambda r: -r["x baseline"])[:k]

    def to_frame(self):
        import pandas as pd

        L, H = self.ov_positivity.shape
        return pd.DataFrame([{"layer": l, "head": h, "ov_positivity": float(self.ov_positivity[l, h]),
                              "qk_positivity": float(self.qk_positivity[l, h])} for l in range(L) for h in range(H)])

    def to_dict(self) -> dict:
        return {"model": self.model_name, "ov_positivity": self.ov_positivity.tolist(),
                "qk_positivity": self.qk_positivity.tolist(),
                "composition_baseline": {m: c.baseline for m, c in self.composition.items()},
                "top_composition": self.top_composition(), "seconds": self.seconds}

    def plot(self, which: str = "ov"):
        """Eigenvalue positivity of every head's full OV (or QK) circuit, heads x layers -> `Figure`."""
        from interp.plots import heatmap

        m = self.ov_positivity if which == "ov" else self.qk_positivity
        L, H = m.shape
        return heatmap(m.T, [f"H{h}" for h in range(H)], [f"L{l}" for l in range(L)], signed=True, vmax=1.0,
                       title=f"{self.model_name}: {which.upper()} eigenvalue positivity", value_format="{:.1f}")

    def save(self, directory) -> Path:
        from interp.report import Page

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        (out / "circuits.json").write_text(json.dumps(self.to_dict(), indent=1))
        page = Page(f"Circuits of {self.model_name}, from the weights",
                    {"command": f"interp circuits --model {self.model_name}", "model": self.model_name})
        page.text("Eigenvalue positivity Re(sum of eigenvalues) / sum of |eigenvalues| of each head's full circuit: "
                  "+1 copies (OV) or matches the same token (QK), -1 suppresses, 0 neither.")
        page.figures([self.plot("ov"), self.plot("qk")])
        page.table(self.top_composition(15), caption="Strongest composition between heads (score / random "
                   "baseline of Gaussian factors with the same shapes)")
        return page.save(out / "index.html")

    def _repr_html_(self) -> str:
        from interp.plots import to_svg

        return to_svg(self.plot("ov"))


def circuit_summary(model, modes: str = "QKV") -> CircuitSummary:
    """Positivity of every head's full OV and QK circuits and the composition scores, from the weights."""
    start = time.perf_counter()
    if model.unembed is None:
        raise ValueError(f"{model.cfg.model_name} has no unembedding, so it has no full OV circuit; "
                         "composition scores alone: interp.circuits.composition_scores(model, 'Q')")
    with torch.no_grad():
        ov = circuits.eigenvalue_positivity(circuits.full_ov(model)).float().cpu()
        qk = circuits.eigenvalue_positivity(circuits.full_qk(model)).float().cpu()
        comp = {mode: circuits.composition_scores(model, mode) for mode in modes}
    return CircuitSummary(model.cfg.model_name, ov, qk, comp, round(time.perf_counter() - start, 2))
