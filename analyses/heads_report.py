"""Report pages of the head census: one per model, and an index comparing them."""

from __future__ import annotations

import json
from pathlib import Path

from interp.report import Page
from interp.views import attention_heads, attention_pattern

DETECTOR_DATA = {"previous_token": "text", "bos": "text", "local": "text", "entropy": "text",
                 "duplicate_token": "repeated", "induction": "repeated"}


def _slug(name: str) -> str:
    return name.replace("/", "_")


def census_dict(census) -> dict:
    return {
        "model": census.model_name,
        "settings": census.settings,
        "scores": {k: {"mean": v.mean.tolist(), "std": v.std.tolist(), "description": v.description}
                   for k, v in census.scores.items()},
        "top": {k: census.top(k, 5) for k in census.scores},
        "icl": None if census.icl is None else {
            "loss_per_repeat": census.icl.loss_per_repeat.tolist(), "score": census.icl.score,
            "loss_per_position": census.icl.loss_per_position.tolist()},
    }


def write_census(census, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    slug = _slug(census.model_name)
    (out / f"{slug}.json").write_text(json.dumps(census_dict(census), indent=1))
    page = Page(f"Head census: {census.model_name}",
                {"command": f"python -m analyses.heads --models {census.model_name}", "model": census.model_name,
                 **{k: str(v) for k, v in census.settings.items()}})
    page.heading("Top heads per detector")
    rows = []
    for name, scores in census.scores.items():
        for rank, (l, h, mean, std) in enumerate(census.top(name, 3), 1):
            rows.append({"detector": name, "rank": rank, "head": f"L{l}H{h}", "mean": mean, "std over prompts": std,
                         "measured on": "text" if DETECTOR_DATA.get(name) == "text" else "repeated random tokens"})
    page.table(rows)
    page.text("Scores are the attention mass on each behaviour's target positions, averaged over the queries "
              "that have one (1 = a pure head of that type); entropy is in nats, and its 'top' heads are the "
              "most focused (lowest).")
    page.heading("Every head, every detector")
    first = next(iter(census.scores.values())).mean
    L, H = first.shape
    page.figures([scores.plot(name) for name, scores in census.scores.items()],
                 "Mean score of each head (values in the cells where they fit; every value is in the JSON)")
    page.heading("The top heads")
    for name in ("previous_token", "induction", "duplicate_token", "bos"):
        if name not in census.scores:
            continue
        l, h, mean, _ = census.top(name, 1)[0]
        if DETECTOR_DATA[name] == "text":
            tokens, pats = census.text_tokens, census.text_patterns
        else:
            tokens, pats = census.repeated_tokens, census.repeated_patterns
        page.view(attention_pattern(pats[l, h], tokens, census.causal,
                                    title=f"{name}: L{l}H{h} (score {mean:.2f})"))
    l, _, _, _ = census.top("induction", 1)[0]
    page.view(attention_heads(census.repeated_patterns[l], census.repeated_tokens,
                              [f"L{l}H{h}" for h in range(H)], census.causal,
                              title=f"Layer {l}, all heads, on repeated random tokens"))
    if census.icl is not None:
        icl = census.icl
        page.heading("In-context learning")
        page.text(f"Loss on BOS + {icl.seq_len} random tokens repeated {icl.n_repeats} times: "
                  + ", ".join(f"copy {i + 1}: {v:.2f} nats" for i, v in enumerate(icl.loss_per_repeat.tolist()))
                  + f". Score (last copy minus first): {icl.score:.2f} nats.")
        page.figure(icl.plot(), "Next-token loss at each position, mean over sequences")
    return page.save(out / f"{slug}.html")


def write_index(censuses: list, out: Path) -> Path:
    page = Page("Head census", {"command": "python -m analyses.heads",
                                "models": ", ".join(c.model_name for c in censuses)})
    rows = []
    for c in censuses:
        row = {"model": c.model_name}
        for name in ("previous_token", "induction", "duplicate_token", "bos"):
            l, h, mean, _ = c.top(name, 1)[0]
            row[name] = f"L{l}H{h} {mean:.2f}"
        row["ICL score (nats)"] = f"{c.icl.score:.2f}" if c.icl is not None else "n/a (encoder)"
        rows.append(row)
    page.table(rows, caption="Best head per detector, and in-context learning")
    links = "".join(f'<li><a href="{_slug(c.model_name)}.html">{c.model_name}</a></li>' for c in censuses)
    page.raw(f"<ul>{links}</ul>")
    out.mkdir(parents=True, exist_ok=True)
    (out / "census.json").write_text(json.dumps({c.model_name: census_dict(c) for c in censuses}, indent=1))
    return page.save(out / "index.html")
