"""Charts as inline SVG: no plotting library, no JavaScript, they render in any browser offline."""

from __future__ import annotations

import html


def bar_chart_svg(labels: list[str], values: list[float], width: int = 560, bar_h: int = 20,
                  value_format: str = "{:.3f}", color: str = "#4c78a8") -> str:
    """A horizontal bar chart as inline SVG (no plotting library, no JavaScript)."""
    label_w, pad = 150, 6
    top = max(values) if values and max(values) > 0 else 1.0
    height = len(values) * (bar_h + pad) + pad
    rows = []
    for i, (label, value) in enumerate(zip(labels, values)):
        y = pad + i * (bar_h + pad)
        w = max(0.0, value) / top * (width - label_w - 70)
        rows.append(
            f'<text x="{label_w - 6}" y="{y + bar_h * 0.72:.1f}" text-anchor="end" font-size="13">{html.escape(label)}</text>'
            f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{color}"><title>{html.escape(label)}: '
            f"{value_format.format(value)}</title></rect>"
            f'<text x="{label_w + w + 4:.1f}" y="{y + bar_h * 0.72:.1f}" font-size="12">{value_format.format(value)}</text>'
        )
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" font-family="system-ui, sans-serif">{"".join(rows)}</svg>')


def line_chart_svg(series: dict[str, list[float]], width: int = 560, height: int = 220, x_label: str = "step",
                   y_label: str = "", colors: tuple[str, ...] = ("#4c78a8", "#f58518", "#54a24b", "#e45756")) -> str:
    """Lines through each series (same x = index) as inline SVG, with min/max axis labels."""
    left, right, top, bottom = 50, 10, 10, 30
    values = [v for s in series.values() for v in s if v == v]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    hi = hi if hi > lo else lo + 1.0
    n = max(len(s) for s in series.values()) if series else 1
    sx = (width - left - right) / max(1, n - 1)
    sy = (height - top - bottom) / (hi - lo)
    parts = []
    for i, (name, s) in enumerate(series.items()):
        pts = " ".join(f"{left + j * sx:.1f},{top + (hi - v) * sy:.1f}" for j, v in enumerate(s) if v == v)
        color = colors[i % len(colors)]
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{pts}"><title>{html.escape(name)}</title></polyline>')
        parts.append(f'<text x="{width - right - 4}" y="{top + 14 * (i + 1)}" text-anchor="end" font-size="12" fill="{color}">{html.escape(name)}</text>')
    axes = (f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="#888"/>'
            f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="#888"/>'
            f'<text x="{left - 4}" y="{top + 10}" text-anchor="end" font-size="11">{hi:.3g}</text>'
            f'<text x="{left - 4}" y="{height - bottom}" text-anchor="end" font-size="11">{lo:.3g}</text>'
            f'<text x="{left}" y="{height - 8}" font-size="11">0</text>'
            f'<text x="{width - right}" y="{height - 8}" text-anchor="end" font-size="11">{n - 1} {html.escape(x_label)}</text>'
            f'<text x="12" y="{(height - bottom) / 2}" font-size="11" transform="rotate(-90 12 {(height - bottom) / 2})" '
            f'text-anchor="middle">{html.escape(y_label)}</text>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
            f'font-family="system-ui, sans-serif">{axes}{"".join(parts)}</svg>')


def heatmap_svg(matrix, row_labels: list[str], col_labels: list[str], cell: int = 28, title: str = "",
                value_format: str = "{:.2f}", center_zero: bool = False) -> str:
    """A labelled heatmap as inline SVG; values shown in cells. matrix: 2-D tensor or nested lists."""
    rows = [[float(v) for v in r] for r in (matrix.tolist() if hasattr(matrix, "tolist") else matrix)]
    finite = [v for r in rows for v in r if v == v]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    if center_zero:
        m = max(abs(lo), abs(hi)) or 1.0
        lo, hi = -m, m
    span = (hi - lo) or 1.0
    label_w, head_h = 60, 40 if title else 24
    width, height = label_w + cell * len(col_labels) + 4, head_h + cell * len(rows) + 4
    width = max(width, label_w + int(7.5 * len(title)))  # room for the title

    def color(v: float) -> str:
        if v != v:
            return "#eeeeee"
        t = (v - lo) / span
        if center_zero:  # blue (negative) - white - red (positive)
            r, g, b = (255, int(255 * (1 - 2 * (t - .5))), int(255 * (1 - 2 * (t - .5)))) if t >= .5 else \
                (int(255 * 2 * t), int(255 * 2 * t), 255)
        else:  # white -> dark blue
            r, g, b = int(255 - 200 * t), int(255 - 170 * t), int(255 - 80 * t)
        return f"rgb({r},{g},{b})"

    parts = [f'<text x="{label_w}" y="14" font-size="12" font-weight="bold">{html.escape(title)}</text>'] if title else []
    for j, lab in enumerate(col_labels):
        parts.append(f'<text x="{label_w + j * cell + cell / 2}" y="{head_h - 6}" text-anchor="middle" font-size="10">{html.escape(lab)}</text>')
    for i, (lab, r) in enumerate(zip(row_labels, rows)):
        y = head_h + i * cell
        parts.append(f'<text x="{label_w - 4}" y="{y + cell * 0.65}" text-anchor="end" font-size="10">{html.escape(lab)}</text>')
        for j, v in enumerate(r):
            x = label_w + j * cell
            text = "" if v != v else value_format.format(v)
            dark = v == v and (v - lo) / span > 0.6 and not center_zero
            parts.append(f'<rect x="{x}" y="{y}" width="{cell}" height="{cell}" fill="{color(v)}" stroke="#fff">'
                         f'<title>{html.escape(lab)} / {html.escape(col_labels[j])}: {text}</title></rect>')
            if cell >= 26:
                parts.append(f'<text x="{x + cell / 2}" y="{y + cell * 0.62}" text-anchor="middle" font-size="9" '
                             f'fill="{"#fff" if dark else "#222"}">{text}</text>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
            f'font-family="system-ui, sans-serif">{"".join(parts)}</svg>')


def trajectory_svg(coords, groups: list[str], labels: list[str] | None = None, size: int = 420,
                   colors: tuple[str, ...] = ("#4c78a8", "#f58518", "#54a24b", "#e45756", "#b279a2", "#9d755d"),
                   title: str = "") -> str:
    """Paths through 2-D points: coords [n_paths, n_steps, 2], one colour per group; a dot marks each
    path's first step and a ring its last. `labels` (one per path) become hover titles."""
    pts = [[(float(x), float(y)) for x, y in path] for path in (coords.tolist() if hasattr(coords, "tolist") else coords)]
    xs = [x for p in pts for x, _ in p]
    ys = [y for p in pts for _, y in p]
    pad, head = 24, 22 if title else 6
    lo_x, hi_x = (min(xs), max(xs)) if xs else (0.0, 1.0)
    lo_y, hi_y = (min(ys), max(ys)) if ys else (0.0, 1.0)
    span = max(hi_x - lo_x, hi_y - lo_y) or 1.0

    def sx(x):
        return pad + (x - lo_x) / span * (size - 2 * pad)

    def sy(y):
        return head + pad + (hi_y - y) / span * (size - 2 * pad)

    order = list(dict.fromkeys(groups))
    parts = [f'<text x="{pad}" y="16" font-size="12" font-weight="bold">{html.escape(title)}</text>'] if title else []
    for i, path in enumerate(pts):
        color = colors[order.index(groups[i]) % len(colors)]
        name = html.escape(labels[i] if labels else groups[i])
        line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in path)
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-opacity="0.55" stroke-width="1.2" points="{line}">'
                     f"<title>{name}</title></polyline>")
        (x0, y0), (x1, y1) = path[0], path[-1]
        parts.append(f'<circle cx="{sx(x0):.1f}" cy="{sy(y0):.1f}" r="2.5" fill="{color}"/>')
        parts.append(f'<circle cx="{sx(x1):.1f}" cy="{sy(y1):.1f}" r="4" fill="none" stroke="{color}" stroke-width="1.5">'
                     f"<title>{name}</title></circle>")
    for j, g in enumerate(order):
        parts.append(f'<text x="{size - 6}" y="{head + 14 * (j + 1)}" text-anchor="end" font-size="12" '
                     f'fill="{colors[j % len(colors)]}">{html.escape(g)}</text>')
    height = size + head
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{size}" height="{height}" viewBox="0 0 {size} {height}" '
            f'font-family="system-ui, sans-serif">{"".join(parts)}</svg>')
