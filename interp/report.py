"""Single-file HTML report pages that open offline.

A page holds headings, text, tables, figures and circuitsvis views; it inlines the
circuitsvis bundle once, only if a view needs it, and says what was run so the page can
be reproduced. Figures are matplotlib `Figure`s (what every result's `.plot()` returns),
rendered once to inline SVG when added: no script, nothing fetched.
"""

from __future__ import annotations

import html
import json
import platform
from datetime import datetime, timezone
from pathlib import Path

from interp.views import View, circuitsvis_bundle

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1100px;
       padding: 0 1rem; color: #1d1d1f; line-height: 1.45; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; } h2 { margin-top: 2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .5rem 0 1rem; font-size: .92rem; }
th, td { border: 1px solid #ddd; padding: .25rem .6rem; text-align: left; }
th { background: #f4f4f6; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.meta { background: #f7f7f9; border: 1px solid #e4e4e8; padding: .6rem .9rem; font-size: .88rem; }
.meta code, code { background: #eef; padding: 0 .2rem; border-radius: 3px; }
figure { margin: 1rem 0; } figcaption { font-size: .85rem; color: #555; }
figure.plot svg { max-width: 100%; height: auto; }
.row { display: flex; flex-wrap: wrap; gap: 1rem; align-items: flex-start; }
.tokens span { border: 1px solid #ccd; border-radius: 3px; padding: 0 .2rem; margin: 0 1px; white-space: pre; }
"""


def version() -> str:
    try:
        from importlib.metadata import version as v

        return v("interp-toolkit")
    except Exception:
        return "unknown"


class Page:
    def __init__(self, title: str, run: dict | None = None) -> None:
        self.title = title
        self.run = dict(run or {})
        self.parts: list[str | View] = []

    def heading(self, text: str, level: int = 2) -> "Page":
        self.parts.append(f"<h{level}>{html.escape(text)}</h{level}>")
        return self

    def text(self, text: str) -> "Page":
        self.parts.append(f"<p>{html.escape(text)}</p>")
        return self

    def raw(self, fragment: str) -> "Page":
        self.parts.append(fragment)
        return self

    def tokens(self, tokens: list[str]) -> "Page":
        spans = "".join(f"<span>{html.escape(t)}</span>" for t in tokens)
        self.parts.append(f'<p class="tokens">{spans}</p>')
        return self

    def table(self, rows: list[dict], caption: str | None = None) -> "Page":
        if not rows:
            return self
        cols = list(rows[0])
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
        body = []
        for row in rows:
            cells = []
            for c in cols:
                value = row.get(c, "")
                if isinstance(value, float):
                    cells.append(f'<td class="num">{value:.4g}</td>')
                else:
                    cells.append(f"<td>{html.escape(str(value))}</td>")
            body.append("<tr>" + "".join(cells) + "</tr>")
        cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
        self.parts.append(f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")
        return self

    def figure(self, figure, caption: str | None = None) -> "Page":
        """A matplotlib `Figure` (rendered to inline SVG now, then closed) or SVG text."""
        from interp.plots import as_svg

        cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
        self.parts.append(f'<figure class="plot">{as_svg(figure)}{cap}</figure>')
        return self

    def figures(self, figures: list, caption: str | None = None) -> "Page":
        """Several figures (`Figure`s or SVG text) side by side, wrapping on narrow screens."""
        from interp.plots import as_svg

        cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
        items = "".join(f"<div>{as_svg(f)}</div>" for f in figures)
        self.parts.append(f'<figure class="plot"><div class="row">{items}</div>{cap}</figure>')
        return self

    def view(self, view: View) -> "Page":
        self.parts.append(view)
        return self

    def render(self) -> str:
        needs_cv = any(isinstance(p, View) for p in self.parts)
        body = "\n".join(p.fragment() if isinstance(p, View) else p for p in self.parts)
        run = {**self.run, "toolkit version": version(), "python": platform.python_version(),
               "written": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
        meta_rows = "".join(
            f"<tr><th>{html.escape(str(k))}</th><td><code>{html.escape(v if isinstance(v, str) else json.dumps(v))}</code></td></tr>"
            for k, v in run.items()
        )
        script = f"<script>{circuitsvis_bundle()}</script>" if needs_cv else ""
        return (
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{html.escape(self.title)}</title><style>{STYLE}</style>{script}</head><body>"
            f"<h1>{html.escape(self.title)}</h1>"
            f"<details class=\"meta\" open><summary>What was run</summary><table>{meta_rows}</table></details>"
            f"{body}</body></html>\n"
        )

    def save(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.render(), encoding="utf-8")
        return path
