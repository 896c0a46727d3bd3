"""circuitsvis attention views that work offline.

circuitsvis' own `_repr_html_` probes google.com to choose between its CDN and inline
JavaScript, and inlines the 1.3 MB bundle into every single view. Here the bundle is
inlined once per page (`Page` in interp.report does that) and each view is a small
`<div>` plus one call into it: no network, ever.
"""

from __future__ import annotations

import functools
import html
import importlib.util
import itertools
import json
from pathlib import Path

import torch

_ids = itertools.count()


@functools.lru_cache(maxsize=1)
def circuitsvis_bundle() -> str:
    """The JavaScript that defines the global `CircuitsVis`, safe to place inside <script>."""
    spec = importlib.util.find_spec("circuitsvis")
    if spec is None or spec.origin is None:
        raise RuntimeError("circuitsvis is not installed: pip install circuitsvis")
    path = Path(spec.origin).parent / "dist" / "cdn" / "iife.js"
    # "<\/script" is the same text to JavaScript but cannot close the surrounding tag.
    return path.read_text(encoding="utf-8").replace("</script", "<\\/script")


def _json_for_script(props: dict) -> str:
    return json.dumps(props).replace("</", "<\\/")


def _as_list(x):
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().tolist()
    return x


class View:
    """One circuitsvis component: HTML that needs the bundle on the page (see interp.report.Page)."""

    needs_circuitsvis = True

    def __init__(self, component: str, props: dict, title: str | None = None) -> None:
        self.component = component
        self.props = {k: _as_list(v) for k, v in props.items() if v is not None}
        self.title = title
        self.element_id = f"cv-{component.lower()}-{next(_ids)}"

    def fragment(self) -> str:
        title = f"<h3>{html.escape(self.title)}</h3>" if self.title else ""
        return (
            f'{title}<div id="{self.element_id}" class="circuitsvis" data-component="{self.component}"></div>'
            f"<script>CircuitsVis.render({json.dumps(self.element_id)}, CircuitsVis.{self.component}, "
            f"{_json_for_script(self.props)});</script>"
        )

    def _repr_html_(self) -> str:
        # A notebook cell is its own page: bring the bundle along.
        return f"<script>{circuitsvis_bundle()}</script>{self.fragment()}"


def attention_heads(
    pattern: torch.Tensor,
    tokens: list[str],
    head_names: list[str] | None = None,
    causal: bool = True,
    title: str | None = None,
) -> View:
    """A grid of heads, click one to zoom. pattern: [n_heads, query, key] for one prompt."""
    if pattern.dim() != 3:
        raise ValueError(f"pattern must be [n_heads, query, key], got shape {tuple(pattern.shape)}")
    if pattern.shape[-1] != len(tokens) or pattern.shape[-2] != len(tokens):
        raise ValueError(f"pattern covers {pattern.shape[-1]} positions but {len(tokens)} tokens were given")
    return View(
        "AttentionHeads",
        {
            "attention": pattern,
            "tokens": list(tokens),
            "attentionHeadNames": head_names,
            "maskUpperTri": causal,
        },
        title,
    )


def colored_tokens(tokens: list[str], values, title: str | None = None) -> View:
    """Tokens coloured by one value each (e.g. attention from one position, or a probe score)."""
    return View("ColoredTokens", {"tokens": list(tokens), "values": values}, title)


def attention_pattern(pattern: torch.Tensor, tokens: list[str], causal: bool = True, title: str | None = None) -> View:
    """One head, zoomed: pattern [query, key]."""
    if pattern.dim() != 2 or pattern.shape[0] != len(tokens) or pattern.shape[1] != len(tokens):
        raise ValueError(f"pattern must be [query, key] over the {len(tokens)} tokens, got {tuple(pattern.shape)}")
    return View("AttentionPattern", {"tokens": list(tokens), "attention": pattern, "maskUpperTri": causal,
                                     "showAxisLabels": True}, title)


def attention_from(pattern: torch.Tensor, tokens: list[str], query: int = -1, title: str | None = None) -> View:
    """The tokens coloured by how much one query position attends to each. pattern: [query, key]."""
    if pattern.dim() != 2 or pattern.shape[1] != len(tokens):
        raise ValueError(f"pattern must be [query, key] over the {len(tokens)} tokens, got {tuple(pattern.shape)}")
    q = query % len(tokens)
    title = title or f"attention from {tokens[q]!r} (position {q})"
    return colored_tokens(tokens, pattern[q], title)


def cache_attention(cache, layer: int, tokens: list[str], heads: list[int] | None = None, batch_index: int = 0,
                    causal: bool | None = None, head: int | None = None, query: int | None = None) -> View:
    """A view of any ActivationCache holding `("pattern", layer)`.

    Default: the grid of `heads` (all) of that layer; with `head`, that head zoomed; with
    `head` and `query`, the tokens coloured by that query's attention.
    """
    pattern = cache["pattern", layer]  # [batch, n_heads, q, k] (or without batch)
    if getattr(cache, "has_batch_dim", True):
        pattern = pattern[batch_index]
    if causal is None:
        causal = getattr(getattr(getattr(cache, "model", None), "cfg", None), "causal", True)
    if head is not None and query is not None:
        return attention_from(pattern[head], tokens, query, title=f"L{layer}H{head}: attention from position {query}")
    if head is not None:
        return attention_pattern(pattern[head], tokens, causal, title=f"L{layer}H{head}")
    heads = list(range(pattern.shape[0])) if heads is None else heads
    return attention_heads(pattern[heads], tokens, [f"L{layer}H{h}" for h in heads], causal, title=f"Layer {layer}")
