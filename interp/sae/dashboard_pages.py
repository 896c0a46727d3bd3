"""The dashboards' pages: one offline HTML file per feature and an index over all of them.

Built with interp.report.Page, so they look like the toolkit's other reports and open offline:
figures are inline SVG from matplotlib, the index's sorting and search are a few lines of inline
script (nothing is fetched; with scripts off the table is still there, unsorted). Token highlighting
is plain CSS: each token's background alpha is its activation over the feature's maximum, the token
a context was picked for is outlined (class `max`), and hovering shows the value (`title`, and
`data-act` for scripts and tests).
"""

from __future__ import annotations

import html
import math
from pathlib import Path

import torch

STYLE = """<style>
.ctx { display: flex; gap: .7rem; margin: .12rem 0; font-family: ui-monospace, "DejaVu Sans Mono", monospace;
       font-size: .84rem; }
.ctx .v { min-width: 4.8rem; text-align: right; color: #555; font-variant-numeric: tabular-nums; }
.ctx .t { white-space: pre; border-radius: 2px; padding: 0 1px; }
.ctx .t.max { outline: 2px solid #b30000; font-weight: 600; }
.ctx .t.off { color: #9a9a9a; }
.pair { display: flex; flex-wrap: wrap; gap: 2rem; align-items: flex-start; }
code.tok { white-space: pre; }
.controls { display: flex; gap: 1.2rem; align-items: center; margin: .6rem 0; }
#search { width: 22rem; padding: .3rem .5rem; font-size: .95rem; }
th[data-type] { cursor: pointer; user-select: none; }
th[aria-sort=descending]::after { content: " \\25BC"; } th[aria-sort=ascending]::after { content: " \\25B2"; }
</style>"""

# Sorting by a column (first click: descending) and filtering by token text; rows carry their search
# text in data-search and each sortable cell its value in data-v.
SCRIPT = """<script>
(() => {
  const table = document.getElementById("features"), body = table.tBodies[0];
  const search = document.getElementById("search"), dead = document.getElementById("hide-dead");
  const shown = document.getElementById("shown");
  const filter = () => {
    const q = search.value.toLowerCase();
    let n = 0;
    for (const row of body.rows) {
      const ok = (!q || row.dataset.search.includes(q)) && !(dead.checked && row.dataset.dead === "1");
      row.hidden = !ok;
      n += ok ? 1 : 0;
    }
    shown.textContent = n;
  };
  search.addEventListener("input", filter);
  dead.addEventListener("change", filter);
  const heads = Array.from(table.tHead.rows[0].cells);
  for (const th of heads) {
    if (!th.dataset.type) continue;
    th.addEventListener("click", () => {
      const i = th.cellIndex, num = th.dataset.type === "num";
      const dir = th.getAttribute("aria-sort") === "descending" ? 1 : -1;
      heads.forEach(h => h.removeAttribute("aria-sort"));
      th.setAttribute("aria-sort", dir < 0 ? "descending" : "ascending");
      const key = row => {
        const cell = row.cells[i], v = cell.dataset.v ?? cell.textContent;
        if (!num) return v.toLowerCase();
        const x = parseFloat(v);
        return Number.isNaN(x) ? -Infinity : x;
      };
      const rows = Array.from(body.rows).map(r => [key(r), r]);
      rows.sort((a, b) => dir * ((a[0] > b[0]) - (a[0] < b[0])));
      for (const [, r] of rows) body.appendChild(r);
    });
  }
  filter();
})();
</script>"""

HIGHLIGHT = (230, 85, 13)  # orange: the feature's activation


def page_name(feature: int) -> str:
    return f"feature-{int(feature)}.html"


def show(text: str) -> str:
    """A token as it reads, with newlines and tabs made visible, HTML-escaped."""
    return html.escape(text.replace("\n", "\u23ce").replace("\t", "\u21e5"))


def _fmt(v: float) -> str:
    return "" if v != v else f"{v:.4g}"


def context_html(dash, tokens: torch.Tensor, acts: torch.Tensor, value: float, feature_max: float) -> str:
    """One context: the activation it was picked for, then its tokens, each shaded by its activation."""
    left = dash.context[0]
    spans = []
    for j, (tok, act) in enumerate(zip(tokens.tolist(), acts.tolist())):
        if tok < 0:
            continue
        text = dash.token_text.get(tok, f"<{tok}>")
        classes = "t max" if j == left else "t"
        if act != act:  # not counted (BOS) or not collected
            spans.append(f'<span class="{classes} off" title="{html.escape(repr(text))}: not counted">{show(text)}</span>')
            continue
        alpha = min(max(act / feature_max, 0.0), 1.0) if feature_max > 0 else 0.0
        style = f' style="background:rgba({HIGHLIGHT[0]},{HIGHLIGHT[1]},{HIGHLIGHT[2]},{alpha:.3f})"' if alpha > 0 else ""
        spans.append(f'<span class="{classes}"{style} data-act="{act:.6g}" '
                     f'title="{html.escape(repr(text))}: {act:.4g}">{show(text)}</span>')
    return f'<div class="ctx"><span class="v">{_fmt(value)}</span><span class="toks">{"".join(spans)}</span></div>'


def _logit_table(dash, ids, values, caption: str) -> str:
    rows = "".join(f'<tr><td><code class="tok">{show(dash.token_text.get(int(t), str(int(t))))}</code></td>'
                   f'<td class="num">{_fmt(float(v))}</td></tr>' for t, v in zip(ids.tolist(), values.tolist()) if t >= 0)
    return f"<table><caption>{html.escape(caption)}</caption><tbody>{rows}</tbody></table>"


# ---------------------------------------------------------------------- figures
def _axis_labels(ax, x: str, y: str) -> None:
    ax.set_xlabel(x, fontsize=8)
    ax.set_ylabel(y, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.spines[["top", "right"]].set_visible(False)


def _draw_histogram(ax, dash, i: int) -> None:
    counts = dash.hist_counts[i].tolist()
    width = float(dash.hist_width[i])
    f = int(dash.features[i])
    if width != width:
        ax.text(0.5, 0.5, "never fired", ha="center", va="center", transform=ax.transAxes, color="#777")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.spines[["top", "right"]].set_visible(False)
    else:
        last = max(j for j, c in enumerate(counts) if c) + 1
        ax.stairs(counts[:last], [j * width for j in range(last + 1)], fill=True, color="#4c78a8")
        ax.set_xlim(0, last * width)
        _axis_labels(ax, "activation", "tokens")
    ax.set_title(f"feature {f}: activations where it fires ({int(dash.fired[i])} tokens)", fontsize=9)


def histogram_figure(dash, i: int):
    """Row i's activation histogram (exact counts, equal bins from 0 to its maximum) -> `Figure`."""
    from interp.plots import new_figure

    fig = new_figure(6.0, 2.3)
    _draw_histogram(fig.add_subplot(), dash, i)
    return fig


class _Histograms:
    """One figure redrawn per feature: a fresh figure with constrained layout costs ~3x more per page."""

    def __init__(self) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        self.fig = Figure(figsize=(6.0, 2.3))  # fixed margins: no layout engine to run per page
        FigureCanvasAgg(self.fig)
        self.fig.subplots_adjust(left=0.1, right=0.98, bottom=0.2, top=0.87)
        self.ax = self.fig.add_subplot()

    def svg(self, dash, i: int) -> str:
        from interp.plots import to_svg

        self.ax.clear()
        _draw_histogram(self.ax, dash, i)
        return to_svg(self.fig, close=False)


def density_figure(dash):
    """How many features have each log10 density (dead features counted in the title) -> `Figure`."""
    from interp.plots import new_figure

    log = dash.log10_density
    alive = log[torch.isfinite(log)].tolist()
    fig = new_figure(6.0, 2.5)
    ax = fig.add_subplot()
    if alive:
        ax.hist(alive, bins=min(50, max(5, len(alive) // 4)), color="#4c78a8")
    _axis_labels(ax, "log10 density (fraction of tokens where the feature fires)", "features")
    ax.set_title(f"{len(alive)} features fired, {len(log) - len(alive)} never did, over {dash.n_tokens} tokens",
                 fontsize=9)
    return fig


# ---------------------------------------------------------------------- pages
def feature_page(dash, i: int, histogram_svg: str):
    from interp.report import Page

    f = int(dash.features[i])
    peak = float(dash.max_activation[i])
    where = dash.hook_name + (f" -> {dash.out_hook_name}" if dash.out_hook_name else "")
    page = Page(f"Feature {f} of {where}", {**dash.run, "feature": f})
    page.raw(STYLE)
    page.raw('<p><a href="index.html">&larr; all features</a></p>')
    density = float(dash.density[i])
    page.table([{"latent": f, "density": density, "log10 density": float(dash.log10_density[i]),
                 "tokens where it fires": f"{int(dash.fired[i])} of {dash.n_tokens}", "max activation": peak,
                 "mean activation (where it fires)": float(dash.mean_activation[i])}])
    page.heading("Logits it writes directly")
    page.text(f"The direct effect on the logits of one unit of activation: {dash.logit_note}.")
    if int(dash.logit_top_ids[i, 0]) >= 0:
        page.raw('<div class="pair">' + _logit_table(dash, dash.logit_top_ids[i], dash.logit_top[i], "promoted")
                 + _logit_table(dash, dash.logit_bottom_ids[i], dash.logit_bottom[i], "suppressed") + "</div>")
    page.heading("Activation histogram")
    page.figure(histogram_svg, caption="Exact counts over the tokens where the feature fires (BOS excluded).")
    page.heading("Top activations")
    left, right = dash.context
    valid = [k for k, v in enumerate(dash.top_values[i].tolist()) if v == v]
    page.text(f"The {len(valid)} largest activations over the corpus, {left} tokens before and {right} after each; "
              "shading is the activation over the feature's maximum, the outlined token the one picked, and hovering "
              "a token shows its activation." if valid else "The feature never fired on this corpus.")
    page.raw('<div class="contexts" id="top">' + "".join(
        context_html(dash, dash.top_tokens[i, k], dash.top_acts[i, k], float(dash.top_values[i, k]), peak)
        for k in valid) + "</div>")
    if not valid:
        return page
    page.heading("Activation bands")
    page.text("Contexts sampled uniformly from bands of equal width between 0 and the maximum (each edge within "
              "1/32 of the maximum of its exact fraction), highest band first; counts are exact.")
    edges, counts = dash.band_edges[i].tolist(), dash.band_counts[i].tolist()
    fired = max(int(dash.fired[i]), 1)
    for b in reversed(range(len(counts))):
        lo, hi = edges[b], min(edges[b + 1], peak)  # the top band's grid edge lies just above the maximum
        page.raw(f'<h3>{lo / peak:.2f}&ndash;{hi / peak:.2f} of max ({_fmt(lo)} to {_fmt(hi)}): '
                 f"{counts[b]} tokens ({100 * counts[b] / fired:.3g}% of firing)</h3>")
        shown = [s for s, v in enumerate(dash.band_values[i, b].tolist()) if v == v]
        page.raw(f'<div class="contexts band" data-band="{b}">' + "".join(
            context_html(dash, dash.band_tokens[i, b, s], dash.band_acts[i, b, s], float(dash.band_values[i, b, s]),
                         peak) for s in shown) + "</div>")
    return page


def index_page(dash):
    from interp.plots import to_svg
    from interp.report import Page

    where = dash.hook_name + (f" -> {dash.out_hook_name}" if dash.out_hook_name else "")
    page = Page(f"Feature dashboards: {where}", dash.run)
    page.raw(STYLE)
    dead = int((dash.fired == 0).sum())
    page.text(f"{len(dash.features)} features over {dash.n_tokens} tokens ({dead} never fired). Click a column to "
              "sort; the search box matches the text of each feature's top-activating tokens and of the tokens it "
              "promotes most.")
    page.figure(to_svg(density_figure(dash)))
    page.raw('<div class="controls"><input id="search" type="search" placeholder="token text, e.g. tower" '
             'aria-label="search by token text"><label><input id="hide-dead" type="checkbox"> hide dead features'
             '</label><span><span id="shown">' + str(len(dash.features)) + "</span> shown</span></div>")
    heads = [("feature", "num"), ("density", "num"), ("log10 density", "num"), ("max activation", "num"),
             ("top activating tokens", "text"), ("promoted logits", "text")]
    head = "".join(f'<th data-type="{t}">{html.escape(n)}</th>' for n, t in heads)
    rows = []
    for i, f in enumerate(dash.features.tolist()):
        top = dash.top_activating_tokens(f)
        logits = dash.text(t for t in dash.logit_top_ids[i, :5].tolist() if t >= 0)
        search = "|".join(top + logits).lower()
        density, log10 = float(dash.density[i]), float(dash.log10_density[i])
        peak = float(dash.max_activation[i])
        cells = [f'<td class="num" data-v="{f}"><a href="{page_name(f)}">{f}</a></td>',
                 f'<td class="num" data-v="{density!r}">{density:.3g}</td>',
                 f'<td class="num" data-v="{log10!r}">{"dead" if math.isinf(log10) else f"{log10:.2f}"}</td>',
                 f'<td class="num" data-v="{peak!r}">{_fmt(peak)}</td>',
                 "<td>" + " ".join(f'<code class="tok">{show(t)}</code>' for t in top) + "</td>",
                 "<td>" + " ".join(f'<code class="tok">{show(t)}</code>' for t in logits) + "</td>"]
        rows.append(f'<tr data-feature="{f}" data-dead="{int(dash.fired[i] == 0)}" '
                    f'data-search="{html.escape(search)}">{"".join(cells)}</tr>')
    page.raw(f'<table id="features"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>')
    page.raw(SCRIPT)
    return page


def write_pages(dash, directory) -> Path:
    """index.html and one feature-<id>.html per feature in `directory`; returns the index's path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    histograms = _Histograms()
    for i, f in enumerate(dash.features.tolist()):
        feature_page(dash, i, histograms.svg(dash, i)).save(directory / page_name(f))
    return index_page(dash).save(directory / "index.html")
