"""The encoder-vs-decoder study's result objects, figures and page (`analyses/directionality.py` measures)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

CATEGORIES = ("past", "self", "future", "special")
ROLES = ("encoder", "decoder")


@dataclass
class AttentionDestinations:
    """Where one model's content tokens attend; shares sum to 1 over CATEGORIES for every query."""

    model_name: str
    causal: bool
    n_sentences: int
    n_queries: int  # content-token queries averaged over (each weighs the same)
    special_tokens: list[str]  # the tokenizer-added tokens seen, e.g. ['[CLS]', '[SEP]']
    shares: torch.Tensor  # [n_layers, n_heads, 4]: mean share of a query's attention per category
    by_position: torch.Tensor  # [n_layers, n_bins, 4]: head-mean shares of queries in each relative-position bin
    baseline: torch.Tensor  # [4]: the shares uniform attention over each query's visible keys would give
    baseline_by_position: torch.Tensor  # [n_bins, 4]
    position_counts: torch.Tensor  # [n_bins]: queries per bin
    future_max: float  # the largest future share of any content query, any head (0 for a causal model: a check)
    first_word: torch.Tensor  # [n_layers]: head-mean share of later content queries' attention on the first word
    prepend_bos: bool | None = None

    @property
    def n_layers(self) -> int:
        return self.shares.shape[0]

    @property
    def layer_shares(self) -> torch.Tensor:
        """[n_layers, 4]: the head mean."""
        return self.shares.mean(1)

    @property
    def excess(self) -> torch.Tensor:
        """[n_layers, 4]: layer shares minus the uniform-attention baseline (like with like across positions)."""
        return self.layer_shares - self.baseline

    @property
    def bin_centres(self) -> list[float]:
        n = self.by_position.shape[1]
        return [(i + 0.5) / n for i in range(n)]

    def to_dict(self) -> dict:
        return {"model": self.model_name, "causal": self.causal, "sentences": self.n_sentences,
                "queries": self.n_queries, "special_tokens": self.special_tokens, "prepend_bos": self.prepend_bos,
                "layer_shares": self.layer_shares.tolist(), "head_shares": self.shares.tolist(),
                "uniform_baseline": self.baseline.tolist(), "excess_over_uniform": self.excess.tolist(),
                "by_position": self.by_position.tolist(), "uniform_by_position": self.baseline_by_position.tolist(),
                "position_bin_centres": self.bin_centres, "position_counts": self.position_counts.tolist(),
                "future_max": self.future_max, "first_word": self.first_word.tolist()}


@dataclass
class Contextuality:
    """The shift study's per-layer geometry of each word across its contexts; tensors are [n_words, n_layers + 1]
    (entry 0: the vector the first block reads)."""

    model_name: str
    words: list[str]
    n_contexts: list[int]
    self_similarity: torch.Tensor  # raw mean cosine between the word's vectors in different contexts
    baseline: torch.Tensor  # the anisotropy baseline: mean cosine of random tokens of different contexts
    intra_sentence: torch.Tensor  # adjusted intra-sentence similarity
    mev: torch.Tensor  # adjusted maximum explainable variance

    @property
    def adjusted(self) -> torch.Tensor:
        """Self-similarity minus the anisotropy baseline, [n_words, n_layers + 1]."""
        return self.self_similarity - self.baseline

    @property
    def relative_depth(self) -> torch.Tensor:
        """[n_layers + 1]: 0 (the embedding) ... 1 (the last block's output)."""
        n = self.self_similarity.shape[1] - 1
        return torch.arange(n + 1, dtype=torch.float64) / n

    def to_dict(self) -> dict:
        return {"model": self.model_name, "words": self.words, "contexts": self.n_contexts,
                "relative_depth": self.relative_depth.tolist(), "self_similarity": self.self_similarity.tolist(),
                "anisotropy_baseline": self.baseline.tolist(), "adjusted": self.adjusted.tolist(),
                "adjusted_mean": self.adjusted.mean(0).tolist(),
                "intra_sentence_adjusted": self.intra_sentence.tolist(),
                "mev_adjusted": self.mev.tolist()}


def _pct(x) -> str:
    return f"{100 * float(x):.1f}%"


@dataclass
class DirectionalityResult:
    """Attention destinations and contextuality of the same text in an encoder and a decoder."""

    attention: dict  # "encoder" / "decoder" -> AttentionDestinations
    context: dict  # "encoder" / "decoder" -> Contextuality
    sentences: list  # the sentences whose attention was measured
    words: dict  # word -> its contexts
    quick: bool = False
    decoder_bos: bool = True
    seconds: float = 0.0

    @property
    def n_sentences(self) -> int:
        return len(self.sentences)

    def headline(self) -> str:
        enc, dec = self.attention["encoder"], self.attention["decoder"]
        ce, cd = self.context["encoder"], self.context["decoder"]
        e, d = enc.layer_shares.mean(0), dec.layer_shares.mean(0)
        return (f"{enc.model_name} (encoder) sends {_pct(e[2])} of a word's attention forward (uniform attention: "
                f"{_pct(enc.baseline[2])}) and {_pct(e[3])} to {'/'.join(enc.special_tokens)}; {dec.model_name} "
                f"(decoder) {_pct(d[2])} forward (a check) and {_pct(d[3])} to "
                f"{'/'.join(dec.special_tokens) or 'special tokens'} (uniform: {_pct(dec.baseline[3])}), means over "
                f"layers; self-similarity above anisotropy at the last layer: {float(ce.adjusted[:, -1].mean()):.2f} "
                f"vs {float(cd.adjusted[:, -1].mean()):.2f} ({len(self.words)} words)")

    def to_frame(self, which: str = "attention"):
        """"attention": one row per (model, layer, head or 'mean') with the four shares; "position": per (model,
        layer, bin); "contextuality": per (model, word, layer) with the self-similarity columns."""
        import pandas as pd

        rows = []
        if which == "attention":
            for role, a in self.attention.items():
                for layer in range(a.n_layers):
                    heads = [(h, a.shares[layer, h]) for h in range(a.shares.shape[1])]
                    for head, v in heads + [("mean", a.layer_shares[layer])]:
                        rows.append({"role": role, "model": a.model_name, "layer": layer, "head": head,
                                     **{c: float(v[i]) for i, c in enumerate(CATEGORIES)}})
        elif which == "position":
            for role, a in self.attention.items():
                for layer in range(a.n_layers):
                    for b, centre in enumerate(a.bin_centres):
                        rows.append({"role": role, "model": a.model_name, "layer": layer, "position": centre,
                                     **{c: float(a.by_position[layer, b, i]) for i, c in enumerate(CATEGORIES)},
                                     **{f"uniform {c}": float(a.baseline_by_position[b, i])
                                        for i, c in enumerate(CATEGORIES)}})
        elif which == "contextuality":
            for role, c in self.context.items():
                depth = c.relative_depth
                for w, word in enumerate(c.words):
                    for layer in range(depth.shape[0]):
                        rows.append({"role": role, "model": c.model_name, "word": word, "layer": layer,
                                     "relative depth": float(depth[layer]),
                                     "self-similarity": float(c.self_similarity[w, layer]),
                                     "anisotropy baseline": float(c.baseline[w, layer]),
                                     "adjusted": float(c.adjusted[w, layer]),
                                     "intra-sentence adjusted": float(c.intra_sentence[w, layer]),
                                     "MEV adjusted": float(c.mev[w, layer])})
        else:
            raise ValueError(f"which must be 'attention', 'position' or 'contextuality', got {which!r}")
        return pd.DataFrame(rows)

    def plot(self, which: str = "shares"):
        """"shares": stacked shares by layer, the models side by side; "position": shares against relative
        position, with the uniform baseline; "contextuality": adjusted self-similarity against relative depth,
        both models on one axis -> `Figure`."""
        if which == "shares":
            return _shares_figure(self)
        if which == "position":
            return _position_figure(self)
        if which == "contextuality":
            return _context_figure(self)
        raise ValueError(f"which must be 'shares', 'position' or 'contextuality', got {which!r}")

    def to_dict(self) -> dict:
        return {"categories": list(CATEGORIES), "sentences": self.sentences, "quick": self.quick,
                "decoder_bos": self.decoder_bos, "words": self.words,
                "attention": {r: a.to_dict() for r, a in self.attention.items()},
                "contextuality": {r: c.to_dict() for r, c in self.context.items()},
                "headline": self.headline(), "seconds": self.seconds}

    def save(self, directory) -> Path:
        """`directionality.json` (every number) and `index.html` (the page, offline) in `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "directionality.json").write_text(json.dumps(self.to_dict(), indent=1))
        return _page(self).save(directory / "index.html")

    def _repr_html_(self) -> str:
        from interp.plots import to_svg

        return to_svg(self.plot())


# ---------------------------------------------------------------------- figures
COLORS = {"past": "#4c78a8", "self": "#54a24b", "future": "#f58518", "special": "#9d9d9d"}


def _shares_figure(result: DirectionalityResult):
    from interp.plots import PAGE_WIDTH, new_figure

    atts = [result.attention[r] for r in ROLES]
    fig = new_figure(PAGE_WIDTH, 3.6)
    grid = fig.add_gridspec(1, 2, width_ratios=[a.n_layers + 2 for a in atts])
    for i, a in enumerate(atts):
        ax = fig.add_subplot(grid[0, i])
        stack = torch.cat([a.layer_shares, a.baseline[None]]).float()  # the last bar: uniform attention
        xs = list(range(a.n_layers)) + [a.n_layers + 0.5]
        bottom = torch.zeros(stack.shape[0])
        for c, name in enumerate(CATEGORIES):
            ax.bar(xs, stack[:, c].tolist(), bottom=bottom.tolist(), color=COLORS[name], width=0.8,
                   label=name if i == 0 else None)
            bottom += stack[:, c]
        step = 1 if a.n_layers <= 12 else 5
        ticks = list(range(0, a.n_layers, step))
        ax.set_xticks(ticks + [xs[-1]], [str(t) for t in ticks] + ["unif."], fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_xlabel("layer", fontsize=9)
        special = "/".join(a.special_tokens) or "none"
        ax.set_title(f"{a.model_name} ({'decoder' if a.causal else 'encoder'})\nspecial: {special}", fontsize=10)
        ax.tick_params(labelsize=8)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
        if i == 0:
            ax.set_ylabel("share of a word's attention", fontsize=9)
    fig.legend(loc="outside right upper", fontsize=8, frameon=False)
    return fig


def _position_figure(result: DirectionalityResult):
    from interp.plots import PAGE_WIDTH, new_figure

    fig = new_figure(PAGE_WIDTH, 3.4)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, role in zip(axes, ROLES):
        a = result.attention[role]
        observed = a.by_position.mean(0)  # [bins, 4]: mean over layers (and heads)
        for c, name in enumerate(CATEGORIES):
            ax.plot(a.bin_centres, observed[:, c].tolist(), color=COLORS[name], marker="o", markersize=3,
                    label=name if role == "encoder" else None)
            ax.plot(a.bin_centres, a.baseline_by_position[:, c].tolist(), color=COLORS[name], linestyle="--",
                    linewidth=1)
        ax.set_title(f"{a.model_name}: mean over layers (dashed: uniform attention)", fontsize=10)
        ax.set_xlabel("query's relative position in the sentence", fontsize=9)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3, linewidth=0.6)
        ax.tick_params(labelsize=8)
    axes[0].set_ylabel("share of attention", fontsize=9)
    fig.legend(loc="outside right upper", fontsize=8, frameon=False)
    return fig


def _context_figure(result: DirectionalityResult):
    from interp.plots import COLORS as LINE_COLORS
    from interp.plots import new_figure

    fig = new_figure(7.0, 3.6)
    ax = fig.add_subplot()
    for i, role in enumerate(ROLES):
        c = result.context[role]
        depth = c.relative_depth.tolist()
        for w in range(len(c.words)):
            ax.plot(depth, c.adjusted[w].tolist(), color=LINE_COLORS[i], alpha=0.25, linewidth=0.8)
        ax.plot(depth, c.adjusted.mean(0).tolist(), color=LINE_COLORS[i], linewidth=2.2, marker="o", markersize=3,
                label=f"{c.model_name} (mean of {len(c.words)} words)")
    ax.axhline(0, color="#888888", linewidth=0.8)
    ax.set_xlabel("relative depth (block / n_layers; 0 = embedding)", fontsize=9)
    ax.set_ylabel("self-similarity - anisotropy baseline", fontsize=9)
    ax.set_title("How contextual a word's vector becomes (lower: more context-specific)", fontsize=10)
    ax.grid(alpha=0.3, linewidth=0.6)
    ax.tick_params(labelsize=8)
    ax.legend(fontsize=8, frameon=False)
    return fig


# ---------------------------------------------------------------------- the page
def _page(result: DirectionalityResult):
    from interp.report import Page

    enc, dec = result.attention["encoder"], result.attention["decoder"]
    page = Page("Encoder vs decoder: where attention goes, how contextual words become",
                {"command": "python -m analyses.directionality" + (" --quick" if result.quick else ""),
                 "encoder": enc.model_name, "decoder": dec.model_name, "sentences": result.n_sentences,
                 "content-token queries": {enc.model_name: enc.n_queries, dec.model_name: dec.n_queries},
                 "decoder BOS": result.decoder_bos, "seconds": round(result.seconds, 1)})
    page.text(result.headline() + ".")
    page.heading("Where each token's attention goes")
    page.text("For every content token (a query) and every head: the share of its attention on earlier content "
              "tokens (past), on itself (self), on later ones (future) and on the tokens the tokenizer added "
              f"(special: {', '.join(enc.special_tokens)} for {enc.model_name}; "
              f"{', '.join(dec.special_tokens) or 'none'} for {dec.model_name}), averaged over queries of all "
              "sentences; bars are the head mean per layer. The last bar, 'unif.', is what attention spread "
              "uniformly over the keys each query can see would give: the first word has no past, a decoder no "
              f"future. The decoder's future share is at most {dec.future_max:.1e}: a check of the causal mask, not "
              "a finding.")
    page.figure(result.plot("shares"))
    rows = []
    for role in ROLES:
        a = result.attention[role]
        for layer in range(a.n_layers):
            rows.append({"model": a.model_name, "layer": str(layer),
                         **{c: float(a.layer_shares[layer, i]) for i, c in enumerate(CATEGORIES)},
                         **{f"{c} - uniform": float(a.excess[layer, i]) for i, c in enumerate(CATEGORIES)},
                         "first word": float(a.first_word[layer])})
        rows.append({"model": a.model_name, "layer": "uniform", **{c: float(a.baseline[i])
                                                                   for i, c in enumerate(CATEGORIES)}})
    page.table(rows, caption="Head-mean share of a word's attention, per layer, and its excess over uniform attention; "
                             "'first word': the share later words give the sentence's first content token (part of "
                             "past), where a decoder run without BOS keeps its attention sink")
    page.heading("Like with like: shares by position")
    page.text("What a query can reach depends on where it stands, so the shares are also given against the "
              "query's relative position among the sentence's content tokens (index / (n - 1), in 10 bins), "
              "averaged over layers, with the uniform-attention baseline dashed. Where a solid line lies above its "
              "dashed one, that destination gets more than its share of the visible keys.")
    page.figure(result.plot("position"))
    page.heading("How contextual the word vectors become")
    ce, cd = result.context["encoder"], result.context["decoder"]
    page.text("The shift study's self-similarity (Ethayarajh 2019): the mean cosine between a word's residual-stream "
              "vectors in different contexts, minus the anisotropy baseline (the mean cosine of random tokens of "
              "different contexts at the same layer), for the same words and contexts in both models, against "
              f"relative depth ({enc.model_name}: {ce.self_similarity.shape[1] - 1} blocks, {dec.model_name}: "
              f"{cd.self_similarity.shape[1] - 1}). Thin lines: single words; thick: their mean. At depth 0 a decoder "
              "reads the bare token embedding (similarity 1 across contexts), an encoder adds the position.")
    page.figure(result.plot("contextuality"))
    rows = []
    for w, word in enumerate(ce.words):
        row = {"word": word, "contexts": ce.n_contexts[w]}
        for c in (ce, cd):
            row[f"{c.model_name} adj. min"] = float(c.adjusted[w].min())
            row[f"{c.model_name} adj. last"] = float(c.adjusted[w, -1])
        rows.append(row)
    page.table(rows, caption="Adjusted self-similarity per word: its minimum over layers and at the last layer")
    rows = [{"model": c.model_name, "layer": layer, "relative depth": float(c.relative_depth[layer]),
             "self-similarity": float(c.self_similarity[:, layer].mean()),
             "anisotropy baseline": float(c.baseline[:, layer].mean()), "adjusted": float(c.adjusted[:, layer].mean()),
             "intra-sentence adj.": float(c.intra_sentence[:, layer].mean()), "MEV adj.": float(c.mev[:, layer].mean())}
            for c in (ce, cd) for layer in range(c.self_similarity.shape[1])]
    page.table(rows, caption="Mean over words, by layer")
    return page
