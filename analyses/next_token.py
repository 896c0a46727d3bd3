"""What does the model predict next, and where does each head look? The first stop of the tour.

    python -m analyses.next_token --model smollm2-135m --prompt "The Eiffel Tower is in"
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from interp.report import Page
from interp.views import View, attention_heads


@dataclass
class NextTokenResult:
    """Top next-token predictions for a prompt and every head's attention pattern on it."""

    model_name: str
    prompt: str
    str_tokens: list[str]  # [pos]
    top_tokens: list[str]  # [k]
    top_ids: torch.Tensor  # [k]
    top_probs: torch.Tensor  # [k]
    top_logits: torch.Tensor  # [k]
    patterns: torch.Tensor  # [n_layers, n_heads, query, key]
    causal: bool

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame({
            "rank": range(1, len(self.top_tokens) + 1),
            "token": self.top_tokens,
            "token_id": self.top_ids.tolist(),
            "prob": self.top_probs.tolist(),
            "logit": self.top_logits.tolist(),
        })

    def plot(self):
        """Probability of each of the top next tokens -> `Figure`."""
        from interp.plots import bar_chart

        return bar_chart([repr(t) for t in self.top_tokens], self.top_probs.tolist(), x_label="probability",
                         title=f"next token after {self.prompt!r}")

    def attention_view(self, layer: int) -> View:
        n_heads = self.patterns.shape[1]
        return attention_heads(
            self.patterns[layer], self.str_tokens, head_names=[f"L{layer}H{h}" for h in range(n_heads)],
            causal=self.causal, title=f"Layer {layer}",
        )

    def to_dict(self) -> dict:
        return {
            "model": self.model_name,
            "prompt": self.prompt,
            "tokens": self.str_tokens,
            "top": self.to_frame().to_dict(orient="records"),
        }

    def add_to_page(self, page: Page, layers: list[int] | None = None) -> Page:
        page.heading("Prompt").tokens(self.str_tokens)
        page.heading("Top next-token predictions")
        page.table([{**r, "token": repr(r["token"])} for r in self.to_frame().to_dict(orient="records")])
        page.figure(self.plot(), "Probability of each of the top next tokens")
        page.heading("Attention patterns")
        page.text("Each grid shows every head of one layer; hover a head to enlarge it, and a token to see "
                  "where it attends.")
        for layer in layers if layers is not None else range(self.patterns.shape[0]):
            page.view(self.attention_view(layer))
        return page

    def save(self, directory) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "next_token.json").write_text(json.dumps(self.to_dict(), indent=2))
        page = Page(f"Next-token predictions: {self.model_name}", {"model": self.model_name, "prompt": self.prompt})
        return self.add_to_page(page).save(directory / "next_token.html")

    def _repr_html_(self) -> str:
        from interp.plots import to_svg

        return self.to_frame().to_html() + to_svg(self.plot())


def next_token_predictions(model, prompt: str, top_k: int = 10, prepend_bos: bool | None = None) -> NextTokenResult:
    """Run `prompt` once, caching only the attention patterns, and read the last position's prediction."""
    tokens = model.to_tokens(prompt, prepend_bos=prepend_bos)
    logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_pattern"))
    last = logits[0, -1].float()  # [d_vocab]
    probs = last.softmax(-1)
    top = probs.topk(top_k)
    patterns = cache.stack_activation("pattern")[:, 0]  # [n_layers, n_heads, q, k]
    return NextTokenResult(
        model_name=model.cfg.model_name,
        prompt=prompt,
        str_tokens=model.to_str_tokens(tokens[0]),
        top_tokens=model.to_str_tokens(top.indices),
        top_ids=top.indices,
        top_probs=top.values,
        top_logits=last[top.indices],
        patterns=patterns,
        causal=model.cfg.causal,
    )


def main(argv=None) -> None:
    import models

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompt", default="The Eiffel Tower is located in the city of")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--out", default="reports/next_token")
    args = parser.parse_args(argv)
    result = next_token_predictions(models.load(args.model), args.prompt, args.top_k)
    print(result.to_frame().to_string(index=False))
    print("wrote", result.save(args.out))


if __name__ == "__main__":
    main()
