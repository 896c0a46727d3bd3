"""Figures as matplotlib `Figure`s: heatmaps, bar charts, line charts and trajectories.

Every result's `.plot()` returns one of these, so a figure can be restyled with the
matplotlib API and saved in any format it writes::

    fig = result.plot()
    fig.axes[0].set_title("denoising resid_pre")
    fig.savefig("patching.pdf")

Report pages embed the same figures as inline SVG (`to_svg`): no JavaScript, nothing
fetched, so a page renders offline, prints, and shows on GitHub.

matplotlib is imported inside the functions, never when this module is imported, so
`import interp` stays light. Figures are plain `matplotlib.figure.Figure` objects drawn
on the Agg canvas: no pyplot state, no display, no GUI backend, and nothing to close
(a figure is freed when the last reference to it goes).
"""

from __future__ import annotations

import io
import math
import re
from typing import Sequence

# Cells above which a heatmap leaves its values out (they would be too small to read).
MAX_ANNOTATED = 400
# Colours: blue (negative) - white (0) - red (positive) for signed data, white -> blue for non-negative data.
DIVERGING = "RdBu_r"
SEQUENTIAL = "Blues"
MISSING = "#e4e4e4"
COLORS = ("#4c78a8", "#f58518", "#54a24b", "#e45756", "#b279a2", "#9d755d", "#72b7b2", "#ff9da6")
PAGE_WIDTH = 10.5  # inches: the widest figure a report page shows at full size
# Text stays text (selectable, searchable, small), each element naming a short font list.
SVG_RC = {"svg.fonttype": "none", "font.sans-serif": ["DejaVu Sans", "Helvetica", "Arial"]}


def new_figure(width: float, height: float):
    """An empty `Figure` on the Agg canvas (non-interactive: needs no display) with constrained layout."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _axes(ax, width: float, height: float):
    if ax is not None:
        return ax.figure, ax
    fig = new_figure(width, height)
    return fig, fig.add_subplot()


def _matrix(values) -> list[list[float]]:
    if hasattr(values, "detach"):
        values = values.detach().float().cpu()
    if hasattr(values, "tolist"):
        values = values.tolist()
    rows = [[float(v) for v in r] for r in values]
    if not rows or not rows[0]:
        raise ValueError("a heatmap needs a non-empty 2-D grid")
    return rows


def _floats(values) -> list[float]:
    if hasattr(values, "detach"):
        values = values.detach().float().cpu()
    if hasattr(values, "tolist"):
        values = values.tolist()
    return [float(v) for v in values]


def _fmt(value_format: str, v: float) -> str:
    if v != v:
        return ""
    text = value_format.format(v)
    if text.startswith("-") and not any(c in "123456789" for c in text):  # "-0.00": rounding noise
        text = text[1:]
    return text


def _text_width(labels: Sequence[str], size: float) -> float:
    """Rough width in inches of the longest label at font `size` (points)."""
    return max((len(str(s)) for s in labels), default=0) * size * 0.6 / 72


def heatmap(values, row_labels: Sequence[str] | None = None, col_labels: Sequence[str] | None = None, *,
            title: str = "", signed: bool | None = None, vmin: float | None = None, vmax: float | None = None,
            value_format: str = "{:.2f}", annotate: bool | None = None, cmap: str | None = None,
            x_label: str = "", y_label: str = "", colorbar_label: str = "", max_annotated: int = MAX_ANNOTATED,
            cell: float | None = None, ax=None):
    """A labelled heatmap of a 2-D grid (tensor, array or nested lists) -> `Figure`.

    signed: a diverging colormap centred at 0 (vmin = -vmax: 0 is white), for effects and other signed
      values; else sequential (white -> blue) from 0 (or the minimum, if below) to the maximum, for
      non-negative values such as attention or accuracy. None: signed if any value is negative.
    annotate: print each cell's value; None: when the grid has at most `max_annotated` cells and the
      cells are wide enough for the text. NaN cells are grey and unlabelled.
    cell: the side of a cell in inches (default: room for the printed values, else 0.26 or 0.16).
    """
    from matplotlib import colors as mcolors
    from matplotlib import colormaps

    rows = _matrix(values)
    n_rows, n_cols = len(rows), len(rows[0])
    row_labels = [str(r) for r in (row_labels if row_labels is not None else range(n_rows))]
    col_labels = [str(c) for c in (col_labels if col_labels is not None else range(n_cols))]
    if len(row_labels) != n_rows or len(col_labels) != n_cols:
        raise ValueError(f"{n_rows} x {n_cols} grid but {len(row_labels)} row and {len(col_labels)} column labels")
    finite = [v for r in rows for v in r if math.isfinite(v)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    if signed is None:
        signed = lo < 0
    if signed:
        m = max(abs(lo), abs(hi), abs(vmin or 0.0), abs(vmax or 0.0)) or 1.0
        norm = mcolors.Normalize(vmin=-m, vmax=m)
    else:
        lo_, hi_ = (min(lo, 0.0) if vmin is None else vmin), (hi if vmax is None else vmax)
        norm = mcolors.Normalize(vmin=lo_, vmax=hi_ if hi_ > lo_ else lo_ + 1.0)
    cmap = colormaps[cmap or (DIVERGING if signed else SEQUENTIAL)].with_extremes(bad=MISSING)

    # Size: fixed cells when values are printed, smaller ones otherwise; capped to a page's width.
    want_text = annotate if annotate is not None else n_rows * n_cols <= max_annotated
    chars = max((len(_fmt(value_format, v)) for r in rows for v in r), default=1)
    if cell is None:  # cells are as wide as their printed values and a little taller than the text
        cell = max(0.3, chars * 7 * 0.6 / 72 + 0.06) if want_text else (0.26 if max(n_rows, n_cols) <= 30 else 0.16)
    row_h = min(cell, 0.25) if want_text else cell
    tick_size = 9 if max(n_rows, n_cols) <= 24 else 7
    rotate = n_cols > 1 and _text_width(col_labels, tick_size) > cell * 0.9
    left = _text_width(row_labels, tick_size) + 0.35 + (0.25 if y_label else 0)
    bottom = (_text_width(col_labels, tick_size) if rotate else 0.2) + 0.3 + (0.25 if x_label else 0)
    top = 0.35 if title else 0.1
    bar = 0.9
    width = left + n_cols * cell + bar
    title_w = max((len(line) for line in title.splitlines()), default=0) * 10 * 0.6 / 72 + 0.4
    top += 0.17 * title.count("\n")
    width = min(max(width, title_w, 3.0), PAGE_WIDTH)
    cell_w = (width - left - bar) / n_cols
    height = min(max(top + n_rows * min(row_h, max(cell_w, 0.16)) + bottom, 1.6), 14.0)
    fig, ax = _axes(ax, width, height)

    image = ax.imshow(rows, cmap=cmap, norm=norm, aspect="auto", interpolation="none")
    step_x = max(1, math.ceil(n_cols / 80))
    step_y = max(1, math.ceil(n_rows / 80))
    ax.set_xticks(range(0, n_cols, step_x), col_labels[::step_x], fontsize=tick_size,
                  rotation=90 if rotate else 0)
    ax.set_yticks(range(0, n_rows, step_y), row_labels[::step_y], fontsize=tick_size)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title:
        ax.set_title(title, fontsize=10)
    if x_label:
        ax.set_xlabel(x_label, fontsize=9)
    if y_label:
        ax.set_ylabel(y_label, fontsize=9)
    cb = fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02, aspect=max(8, min(30, 8 * n_rows)))
    cb.ax.tick_params(labelsize=7)
    if colorbar_label:
        cb.set_label(colorbar_label, fontsize=8)

    # Values in the cells, if they fit: the font shrinks with the cell, down to 5 pt.
    row_h = (height - top - bottom) / n_rows
    size = min(8.0, cell_w * 72 / (0.6 * chars + 0.5), row_h * 72 * 0.6)
    if want_text and (annotate or size >= 5):
        size = max(size, 5.0)
        for i, r in enumerate(rows):
            for j, v in enumerate(r):
                if not math.isfinite(v):
                    continue
                red, green, blue, _ = cmap(norm(v))
                dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
                ax.text(j, i, _fmt(value_format, v), ha="center", va="center", fontsize=size,
                        color="white" if dark else "#222222")
    return fig


def heatmaps(grids: Sequence[dict], columns: int | None = None, title: str = ""):
    """Several heatmaps side by side in one `Figure`: grids = [dict(values=..., row_labels=..., ...), ...]
    (each dict is `heatmap`'s arguments)."""
    n = len(grids)
    if n == 1:
        return heatmap(**grids[0])
    columns = columns or min(n, 3)
    n_rows = math.ceil(n / columns)
    first = _matrix(grids[0]["values"])
    w = min(PAGE_WIDTH, columns * min(4.5, 1.6 + 0.3 * len(first[0])))
    h = n_rows * min(6.0, 1.2 + 0.3 * len(first))
    fig = new_figure(w, h)
    axes = fig.subplots(n_rows, columns, squeeze=False).flatten()
    for grid, ax in zip(grids, axes):
        heatmap(**{**grid, "ax": ax})
    for ax in axes[n:]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def bar_chart(labels: Sequence[str], values, *, title: str = "", value_format: str = "{:.3f}", x_label: str = "",
              color: str = COLORS[0], ax=None):
    """Horizontal bars, the first label on top, each bar's value printed at its end -> `Figure`."""
    values = _floats(values)
    labels = [str(s) for s in labels]
    width = min(PAGE_WIDTH, max(5.5, _text_width(labels, 9) + 4.5))
    fig, ax = _axes(ax, width, 0.6 + (0.35 if title else 0) + 0.26 * max(1, len(values)))
    bars = ax.barh(range(len(values)), values, color=color, height=0.75)
    ax.set_yticks(range(len(values)), labels, fontsize=9)
    ax.invert_yaxis()
    ax.bar_label(bars, labels=[_fmt(value_format, v) for v in values], padding=3, fontsize=8)
    finite = [v for v in values if math.isfinite(v)] or [0.0]
    lo, hi = min(0.0, min(finite)), max(0.0, max(finite))
    span = (hi - lo) or 1.0
    ax.set_xlim(lo - (0.18 * span if lo < 0 else 0), hi + 0.18 * span)
    ax.axvline(0, color="#888888", linewidth=0.8)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.tick_params(axis="x", labelsize=8)
    ax.tick_params(axis="y", length=0)
    if title:
        ax.set_title(title, fontsize=10)
    if x_label:
        ax.set_xlabel(x_label, fontsize=9)
    return fig


def line_chart(series: dict[str, Sequence[float]], *, x: Sequence[float] | None = None,
               x_ticks: Sequence[str] | None = None, x_label: str = "step", y_label: str = "", title: str = "",
               ylim: tuple[float, float] | None = None, styles: dict[str, dict] | None = None,
               markers: bool | None = None, ax=None):
    """One line per series (x = 0, 1, ... unless given) -> `Figure`.

    x_ticks: a label for each x position (e.g. layer names); styles: series name -> extra `plot`
    keyword arguments (e.g. {"chance": {"linestyle": "--"}}); markers: dots on the points (None:
    when there are at most 40). NaN values leave gaps.
    """
    fig, ax = _axes(ax, 6.5, 3.2)
    n = max((len(_floats(s)) for s in series.values()), default=0)
    markers = n <= 40 if markers is None else markers
    for i, (name, values) in enumerate(series.items()):
        ys = _floats(values)
        xs = list(x)[: len(ys)] if x is not None else list(range(len(ys)))
        kwargs = dict(color=COLORS[i % len(COLORS)], linewidth=1.6, label=name,
                      marker="o" if markers else None, markersize=3.5)
        kwargs.update((styles or {}).get(name, {}))
        ax.plot(xs, ys, **kwargs)
    if x_ticks is not None:
        step = max(1, math.ceil(len(x_ticks) / 16))
        positions = list(x) if x is not None else list(range(len(x_ticks)))
        ax.set_xticks(positions[::step], [str(t) for t in x_ticks][::step])
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3, linewidth=0.6)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.tick_params(labelsize=8)
    ax.set_xlabel(x_label, fontsize=9)
    if y_label:
        ax.set_ylabel(y_label, fontsize=9)
    if title:
        ax.set_title(title, fontsize=10)
    if series and (len(series) > 1 or next(iter(series))):
        ax.legend(fontsize=8, frameon=False)
    return fig


def trajectory(coords, groups: Sequence[str], *, point_labels: Sequence[str] | None = None, title: str = "",
               ax=None):
    """Paths through 2-D points: coords [n_paths, n_steps, 2], one colour per group -> `Figure`.

    A dot marks each path's first step and a ring its last; `point_labels` (one per path) are
    written small next to the ring.
    """
    if hasattr(coords, "detach"):
        coords = coords.detach().float().cpu()
    paths = [[(float(a), float(b)) for a, b in p] for p in (coords.tolist() if hasattr(coords, "tolist") else coords)]
    order = list(dict.fromkeys(groups))
    fig, ax = _axes(ax, 5.6, 5.2)
    for i, path in enumerate(paths):
        color = COLORS[order.index(groups[i]) % len(COLORS)]
        xs, ys = [p[0] for p in path], [p[1] for p in path]
        ax.plot(xs, ys, color=color, alpha=0.55, linewidth=1.1)
        ax.plot(xs[:1], ys[:1], "o", color=color, markersize=3)
        ax.plot(xs[-1:], ys[-1:], "o", markerfacecolor="none", markeredgecolor=color, markersize=7,
                markeredgewidth=1.4)
        if point_labels is not None:
            ax.annotate(str(point_labels[i]), (xs[-1], ys[-1]), xytext=(4, 3), textcoords="offset points",
                        fontsize=6, color=color)
    from matplotlib.lines import Line2D

    ax.legend([Line2D([], [], color=COLORS[j % len(COLORS)], linewidth=2) for j in range(len(order))], order,
              fontsize=8, frameon=False)
    ax.set_aspect("equal", adjustable="datalim")
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.25, linewidth=0.5)
    if title:
        ax.set_title(title, fontsize=10)
    return fig


_PROLOG = re.compile(r"^.*?(?=<svg[\s>])", re.S)
_METADATA = re.compile(r"\s*<metadata>.*?</metadata>", re.S)


def to_svg(fig, close: bool = True) -> str:
    """The figure as an SVG element to inline in HTML: no XML prolog, doctype or metadata.

    Text stays text (svg.fonttype none). matplotlib's global style rule is scoped to the
    figure so it cannot touch the rest of a page. close: release the figure from pyplot
    (if pyplot manages it; figures made here are not registered anywhere).
    """
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context(SVG_RC):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    if close:
        close_figure(fig)
    text = _METADATA.sub("", _PROLOG.sub("", buf.getvalue(), count=1), count=1)
    text = text.replace("<svg ", '<svg class="mpl" ', 1)
    text = text.replace("<style type=\"text/css\">*{", "<style type=\"text/css\">svg.mpl *{", 1)
    return text.strip()


def close_figure(fig) -> None:
    """Let pyplot forget `fig` if it knows it (a figure made by plt.figure()); no-op otherwise."""
    import sys

    manager = getattr(fig.canvas, "manager", None)
    if manager is not None and "matplotlib.pyplot" in sys.modules:
        sys.modules["matplotlib.pyplot"].close(fig)


def as_svg(figure) -> str:
    """A `Figure` as inline SVG text; a string (already SVG or HTML) is returned as it is."""
    return figure if isinstance(figure, str) else to_svg(figure)
