"""The positional study's result objects, figures and page (`analyses/positional.py` measures).

`Scheme`: one model's positions (what they add, their similarity matrix); `HeadOffsets`: the offset-only fit
(`analyses/positional_fit.py`) of every self-attention head of one model; `PositionalResult`: both for every model,
with its figures, JSON and page.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from analyses.positional_fit import _offset_index


@dataclass
class Scheme:
    model_name: str
    kind: str  # "learned", "sinusoidal" or "rotary"
    where: str  # what holds it in the model
    similarity: torch.Tensor  # [N, N]: cosine of position vectors i, j (rotary: the kernel on q.k)
    position_norm: float  # mean |what hook_pos_embed adds| on a text (rotary: measured resid_pre - embed)
    token_norm: float  # mean |token embedding| on the same text
    offset_share: float  # of the similarity's variance, explained by i - j alone

    @property
    def by_distance(self) -> torch.Tensor:
        """[N]: mean similarity at each distance |i - j|."""
        n = self.similarity.shape[0]
        d = _offset_index(n, n).flatten() - (n - 1)
        sums = torch.zeros(n, dtype=torch.float64).index_add_(0, d.abs(), self.similarity.double().flatten())
        return (sums / torch.bincount(d.abs(), minlength=n)).float()


@dataclass
class HeadOffsets:
    model_name: str
    data: str  # what the patterns were measured on
    rows: list[str]  # one per attention layer: "L0", or "enc L0" / "dec L0"
    offsets: torch.Tensor  # [n_offsets] (q - k)
    r2: torch.Tensor  # [rows, heads]: offset-only model, renormalised per query
    r2_raw: torch.Tensor  # [rows, heads]: the plain mean weight by offset
    mean_by_offset: torch.Tensor  # [rows, heads, n_offsets]: mean attention weight at q - k, end keys left out
    ends: torch.Tensor  # [rows, heads]: mean attention on the end keys (first; last in an encoder)

    @property
    def relative(self) -> torch.Tensor:
        """[rows, heads]: (1 - ends) R^2, the share of the head's attention that relative position accounts for:
        what is off the end keys, times how much of its spread over those keys the offset explains."""
        return (1 - self.ends) * self.r2.nan_to_num(0.0).clamp(min=0.0)

    def score(self, offset: int) -> torch.Tensor:
        """[rows, heads]: mean attention at q - k = offset (1: previous-token score, 0: self)."""
        return self.mean_by_offset[..., int((self.offsets == offset).nonzero())]

    def top(self, k: int = 3) -> list[tuple[str, int, float]]:
        """(row, head, relative share) of the k heads with the largest share explained by relative position."""
        order = self.relative.flatten().argsort(descending=True)[:k]
        H = self.r2.shape[1]
        return [(self.rows[int(i) // H], int(i) % H, float(self.relative.flatten()[i])) for i in order]

    def rank(self, row: str, head: int) -> int:
        """1-based rank of a head by its relative share among the model's heads."""
        value = self.relative[self.rows.index(row), head]
        return int((self.relative > value).sum()) + 1

    def previous_token_head(self) -> tuple[str, int, float]:
        """(row, head, previous-token score) of the head with the most attention on q - k = 1."""
        prev = self.score(1)
        i = int(prev.flatten().argmax())
        return self.rows[i // prev.shape[1]], i % prev.shape[1], float(prev.flatten()[i])


@dataclass
class PositionalResult:
    schemes: dict[str, Scheme]  # model name -> its positions
    heads: dict[str, HeadOffsets]  # model name -> offset statistics of every self-attention head
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0

    def headline(self) -> str:
        added = ", ".join(f"{s.kind} ({n}) {s.position_norm / s.token_norm:.2f}" for n, s in self.schemes.items())
        best = []
        for name, h in self.heads.items():
            row, head, share = h.top(1)[0]
            best.append(f"{name} {row}H{head} {share:.2f}")
        return (f"|what positions add to the residual| / |token embedding|: {added}; the head whose attention "
                "relative position explains best: " + ", ".join(best))

    def to_frame(self):
        import pandas as pd

        rows = []
        for name, h in self.heads.items():
            prev, own = h.score(1), h.score(0)
            for r, label in enumerate(h.rows):
                for head in range(h.r2.shape[1]):
                    rows.append({"model": name, "scheme": self.schemes[name].kind, "layer": label, "head": head,
                                 "offset R2": float(h.r2[r, head]), "raw offset R2": float(h.r2_raw[r, head]),
                                 "end keys": float(h.ends[r, head]), "relative share": float(h.relative[r, head]),
                                 "previous-token": float(prev[r, head]), "self": float(own[r, head]),
                                 "rank": h.rank(label, head)})
        return pd.DataFrame(rows)

    def plot(self, what: str = "similarity"):
        """"similarity": position-position similarity per scheme side by side, and by distance; "r2": offset-only
        R^2 and end-key share of every head, per model; "offsets": mean attention by offset of each model's top
        heads -> `Figure`."""
        plots = {"similarity": self._plot_similarity, "r2": self._plot_r2, "offsets": self._plot_offsets}
        if what not in plots:
            raise ValueError(f"plot(what=...) takes one of {list(plots)}, got {what!r}")
        return plots[what]()

    def _plot_similarity(self):
        from interp.plots import COLORS, new_figure

        schemes = list(self.schemes.values())
        fig = new_figure(10.5, 6.6)
        axes = fig.subplots(2, 3).flatten()
        for ax, sc in zip(axes, schemes):
            image = ax.imshow(sc.similarity.numpy(), cmap="RdBu_r", vmin=-1, vmax=1, interpolation="none")
            _style(ax, f"{sc.kind}: {sc.model_name}", "position j", "position i")
        fig.colorbar(image, ax=axes[:len(schemes)].tolist(), fraction=0.03, label="cosine")
        if len(schemes) < len(axes):
            curves = axes[len(schemes)]
            for i, sc in enumerate(schemes):
                curves.plot(sc.by_distance.numpy(), color=COLORS[i % len(COLORS)], linewidth=1.3,
                            label=f"{sc.kind} ({sc.model_name})")
            _style(curves, "mean by distance", "distance |i - j|", "cosine")
            curves.legend(fontsize=6, frameon=False)
        for ax in axes[len(schemes) + 1:]:
            ax.set_visible(False)
        fig.suptitle("cos(position i, position j); rotary: mean_k cos((i - j) theta_k), what rotation does to q.k",
                     fontsize=10)
        return fig

    def _plot_r2(self):
        from interp.plots import heatmap, new_figure

        heads = list(self.heads.values())
        tallest = max(len(h.rows) for h in heads)
        fig = new_figure(10.5, min(12.0, 2.0 + 0.44 * tallest))
        axes = fig.subplots(2, len(heads), squeeze=False,
                            gridspec_kw={"width_ratios": [h.r2.shape[1] + 3 for h in heads]})
        for col, h in enumerate(heads):
            labels = [f"H{i}" for i in range(h.r2.shape[1])]
            for row, (values, title) in enumerate(((h.r2, "offset-only R²"), (h.ends, "on end keys"))):
                heatmap(values, h.rows, labels, signed=False, vmin=0.0, vmax=1.0, annotate=values.numel() <= 48,
                        value_format="{:.1f}", title=f"{h.model_name}\n{title}", ax=axes[row, col])
        return fig

    def _plot_offsets(self, k: int = 3, window: int = 24):
        from interp.plots import COLORS, new_figure

        heads = list(self.heads.values())
        fig = new_figure(10.5, 2.9 * math.ceil(len(heads) / 2))
        axes = fig.subplots(math.ceil(len(heads) / 2), 2, squeeze=False).flatten()
        for ax, h in zip(axes, heads):
            keep = (h.offsets >= -window) & (h.offsets <= window) & ~h.mean_by_offset.isnan().all(0).all(0)
            for i, (row, head, share) in enumerate(h.top(k)):
                curve = h.mean_by_offset[h.rows.index(row), head][keep]
                ax.plot(h.offsets[keep].numpy(), curve.numpy(), "o-", markersize=2.5, linewidth=1.2, color=COLORS[i],
                        label=f"{row}H{head}: R² {float(h.r2[h.rows.index(row), head]):.2f}, share {share:.2f}")
            _style(ax, h.model_name, "offset q - k", "mean attention")
            ax.legend(fontsize=7, frameon=False)
        for ax in axes[len(heads):]:
            ax.set_visible(False)
        return fig

    def to_dict(self) -> dict:
        schemes = {name: {"kind": sc.kind, "where": sc.where, "position_norm": sc.position_norm,
                          "token_norm": sc.token_norm, "position_to_token_norm": sc.position_norm / sc.token_norm,
                          "offset_share": sc.offset_share, "n_positions": sc.similarity.shape[0],
                          "similarity_by_distance": sc.by_distance.tolist()} for name, sc in self.schemes.items()}
        heads = {}
        for name, h in self.heads.items():
            row, head, score = h.previous_token_head()
            i = h.rows.index(row)
            heads[name] = {"data": h.data, "rows": h.rows, "r2": _nan_none(h.r2), "r2_raw": _nan_none(h.r2_raw),
                           "ends": _nan_none(h.ends), "relative_share": _nan_none(h.relative),
                           "mean_r2": float(h.r2.nanmean()), "median_r2": float(h.r2.nanmedian()),
                           "mean_relative_share": float(h.relative.mean()),
                           "top": [{"layer": r, "head": hd, "relative_share": v,
                                    "r2": float(h.r2[h.rows.index(r), hd])} for r, hd, v in h.top(5)],
                           "previous_token_head": {"layer": row, "head": head, "score": score,
                                                   "r2": float(h.r2[i, head]), "ends": float(h.ends[i, head]),
                                                   "rank": h.rank(row, head), "of": h.r2.numel()}}
        return {"schemes": schemes, "heads": heads, "settings": self.settings, "seconds": self.seconds}

    def save(self, directory) -> Path:
        from interp.report import Page

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        data = self.to_dict()
        (directory / "positional.json").write_text(json.dumps(data, indent=1))
        page = Page("Positional encodings side by side", {"command": "python -m analyses.positional", **self.settings})
        page.text(self.headline() + ".")
        page.heading("What each scheme adds")
        page.table([{"model": n, "scheme": sc.kind, "where": sc.where, "|added| / |token|": sc.position_norm
                     / sc.token_norm, "similarity explained by i - j": sc.offset_share}
                    for n, sc in self.schemes.items()],
                   caption="|added|: mean norm of what hook_pos_embed adds on a short input (rotary: resid_pre of "
                           "block 0 minus the token embedding, measured)")
        page.figure(self.plot("similarity"), caption="Learned tables are only roughly a function of i - j; the "
                    "sinusoidal table and the rotary kernel exactly (sin a sin b + cos a cos b = cos(a - b)).")
        page.heading("How much of each head's attention is relative position alone")
        page.text("Offset-only model: on the keys other than the sequence's ends, pattern[q, k] = g[q - k] "
                  "renormalised over the keys q sees there, g fitted so that each offset gets the attention the head "
                  "gives it in total. R² is of the variance within query rows, over every text. The end keys (first; "
                  "last in an encoder) are left out of the fit because each is the farthest key of its row, so a "
                  "steep g would pass a head that attends to [CLS] or <s> for a relative one; their share is shown "
                  "apart. Relative share = (1 - end keys) x R². Data: "
                  + "; ".join(f"{n}: {h.data}" for n, h in self.heads.items()) + ".")
        page.figure(self.plot("r2"))
        page.figure(self.plot("offsets"), caption="Mean attention weight at each offset q - k (end keys left out) of "
                    "each model's three heads with the largest relative share.")
        rows = []
        for n, d in data["heads"].items():
            prev = d["previous_token_head"]
            rows.append({"model": n, "mean R²": d["mean_r2"], "mean relative share": d["mean_relative_share"],
                         "top": ", ".join(f"{t['layer']}H{t['head']} {t['relative_share']:.2f}" for t in d["top"][:3]),
                         "previous-token head": f"{prev['layer']}H{prev['head']} (score {prev['score']:.2f}, R² "
                                                f"{prev['r2']:.2f}, rank {prev['rank']}/{prev['of']})"})
        page.table(rows)
        return page.save(directory / "index.html")

    def _repr_html_(self) -> str:
        from interp.plots import to_svg

        return "".join(to_svg(self.plot(w)) for w in ("similarity", "r2", "offsets"))


def _style(ax, title: str, x_label: str, y_label: str) -> None:
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(x_label, fontsize=8)
    ax.set_ylabel(y_label, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3, linewidth=0.6)


def _nan_none(t: torch.Tensor):
    return [_nan_none(x) for x in t] if t.dim() else (None if math.isnan(float(t)) else float(t))
