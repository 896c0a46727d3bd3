"""Head census: every head of a model scored by every detector, with the top heads shown.

    python -m analyses.heads [--models smollm2-135m minilm-l6 attn-only-2l attn-only-1l] [--out reports/heads]

Previous-token, BOS-sink, local-window and entropy scores are measured on natural text
(random tokens for the synthetic-vocabulary models); duplicate-token and induction
scores on Olsson et al.'s repeated random tokens, where they are unambiguous.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import torch

from interp.positions import TokenizedPrompt
from interp.probing import (
    HeadScores,
    ICLResult,
    detect_heads,
    in_context_learning,
    is_language_model,
    layer_patterns,
    random_tokens,
    repeated_random_tokens,
)

PROMPTS = [
    "The Eiffel Tower is located in the city of Paris, on the banks of the Seine.",
    "When Mary and John went to the store, John gave a drink to Mary.",
    "One mole of carbon dioxide weighs about forty-four grams.",
    "The doctor decided to take a biopsy of the mole on her arm.",
    "An American shrew mole dug a tunnel under the garden overnight.",
    "She opened the window, looked at the rain, and closed it again.",
    "In 1969, two astronauts walked on the surface of the Moon.",
    "The committee will meet on Tuesday to discuss the new budget.",
    "My grandmother keeps a miniature tower made of matches on her shelf.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "After the concert, the musicians packed their instruments and left.",
    "Researchers trained a small transformer to predict the next token.",
    "The library closes at nine, so we should leave before then.",
    "He bought bread, cheese and apples at the market this morning.",
    "The old lighthouse still guides ships through the narrow strait.",
]
ATTENTION_DETECTORS = ("previous_token", "duplicate_token", "induction", "bos", "local")


def natural_vocabulary(model) -> bool:
    """Whether the model reads English (the synthetic attention-only models do not)."""
    tok = getattr(model, "tokenizer", None)
    return tok is not None and model.cfg.d_vocab > 1000


@dataclass
class HeadCensus:
    model_name: str
    causal: bool
    scores: dict[str, HeadScores]  # detector -> per-prompt scores [n, n_layers, n_heads]
    icl: ICLResult | None
    text_tokens: list[str]  # one natural example and its patterns [n_layers, n_heads, q, k]
    text_patterns: torch.Tensor
    repeated_tokens: list[str]  # one repeated-random example (trimmed) and its patterns
    repeated_patterns: torch.Tensor
    settings: dict = field(default_factory=dict)

    def top(self, detector: str, k: int = 3) -> list[tuple[int, int, float, float]]:
        return self.scores[detector].top(k, largest=detector != "entropy")

    def heads_above(self, detector: str, threshold: float) -> list[tuple[int, int]]:
        mean = self.scores[detector].mean
        return [(int(l), int(h)) for l, h in torch.nonzero(mean >= threshold).tolist()]

    def to_frame(self):
        """One row per head, one column per detector (means)."""
        import pandas as pd

        first = next(iter(self.scores.values())).mean
        L, H = first.shape
        rows = []
        for l in range(L):
            for h in range(H):
                rows.append({"layer": l, "head": h, **{k: float(v.mean[l, h]) for k, v in self.scores.items()}})
        return pd.DataFrame(rows)

    def plot(self, detector: str = "induction"):
        """Heatmap of one detector's mean score for every head -> `Figure`."""
        return self.scores[detector].plot(f"{self.model_name}: {detector}")

    def save(self, directory) -> Path:
        from analyses.heads_report import write_census

        return write_census(self, Path(directory))

    def _repr_html_(self) -> str:
        from interp.plots import to_svg

        return to_svg(self.plot())


def head_census(model, prompts: list | None = None, n_random: int = 16, seed: int = 0, local_window: int = 3,
                icl_seq_len: int = 50) -> HeadCensus:
    """Score every head of `model`; `prompts` default to built-in English sentences (or random tokens)."""
    natural = natural_vocabulary(model)
    n_ctx = getattr(model.cfg, "n_ctx", None) or 512  # an attached model whose config gives no length
    if prompts is None and natural:
        prompts = PROMPTS
    text = dict(prompts=prompts) if prompts is not None else dict(tokens=random_tokens(model, n_random, min(60, n_ctx - 1), seed))
    scores = detect_heads(model, detectors=["previous_token", "bos", "local", "entropy"], local_window=local_window, **text)
    seq_len = min(25, (n_ctx - 1) // 4)
    repeated = repeated_random_tokens(model, seq_len, 4, n_random, seed)
    scores.update(detect_heads(model, tokens=repeated, detectors=["duplicate_token", "induction"]))
    icl = None
    if is_language_model(model):
        icl = in_context_learning(model, seq_len=min(icl_seq_len, (n_ctx - 1) // 2), n_repeats=2, batch=n_random, seed=seed)
    if prompts is not None:
        example = TokenizedPrompt.from_model(model, prompts[0]).tokens[None].to(model.device)
    else:
        example = text["tokens"][:1, :30]
    names = lambda ids: model.to_str_tokens(ids[0]) if model.tokenizer is not None else [str(t) for t in ids[0].tolist()]  # noqa: E731
    rep_example = repeated[:1, : 1 + 2 * seq_len]
    return HeadCensus(
        model_name=model.cfg.model_name, causal=model.cfg.causal, scores=scores, icl=icl,
        text_tokens=names(example), text_patterns=layer_patterns(model, example)[0].cpu(),
        repeated_tokens=names(rep_example), repeated_patterns=layer_patterns(model, rep_example)[0].cpu(),
        settings={"prompts": "built-in English sentences" if prompts is PROMPTS else
                  ("given prompts" if prompts is not None else f"{n_random} random-token sequences"),
                  "n_prompts": len(prompts) if prompts is not None else n_random,
                  "repeated": f"{n_random} x (BOS + {seq_len} random tokens x 4)", "local_window": local_window,
                  "seed": seed},
    )


def census_reports(names, out, load=None, prompts: list | None = None, seed: int = 0, log=print,
                   progress: bool = False) -> tuple[list[HeadCensus], Path]:
    """Census every model in `names`, one page each plus an index under `out`; (censuses, index path)."""
    import models
    from tqdm.auto import tqdm

    from analyses.heads_report import write_index

    load = load or models.load
    censuses = []
    for name in tqdm(names, desc="head census", disable=not progress, leave=False):
        census = head_census(load(name), prompts=prompts, seed=seed)
        log(f"{name}: " + "; ".join(f"{d} L{l}H{h} {mean:.2f}" for d in ATTENTION_DETECTORS
                                    for l, h, mean, _ in census.top(d, 1)))
        census.save(out)
        censuses.append(census)
    return censuses, write_index(censuses, Path(out))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "minilm-l6", "attn-only-2l", "attn-only-1l"])
    parser.add_argument("--out", default="reports/heads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print("wrote", census_reports(args.models, args.out, seed=args.seed)[1])


if __name__ == "__main__":
    main()
