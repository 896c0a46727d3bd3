"""Head detectors: how much of each (layer, head)'s attention goes where a behaviour says it should.

A detector is a mask over (query, key) pairs built from the tokens: previous token,
earlier copies of the current token (duplicate), the tokens after earlier copies
(induction, Olsson et al.'s prefix matching), the first token (BOS sink), a local window;
plus attention entropy. A head's score on a prompt is, by default, the attention mass it
puts on the mask averaged over the queries that have a target, so a pure
previous-token head scores 1 (`normalize="targets"`). `normalize="all"` divides by the
whole pattern's mass instead, which is TransformerLens' `detect_head` ("mul"), so the
two can be compared. Scores come back per prompt, with their mean and spread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from interp.devices import one_device
from interp.positions import TokenizedPrompt


# ---------------------------------------------------------------------- datasets
def special_token_ids(model) -> set[int]:
    tok = getattr(model, "tokenizer", None)
    ids = set(getattr(tok, "all_special_ids", []) or []) if tok is not None else set()
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(model.cfg, name, None)
        if value is not None:
            ids.add(value)
    return ids


def _bos(model) -> int:
    bos = model.cfg.bos_token_id
    if bos is None and getattr(model, "tokenizer", None) is not None:
        bos = model.tokenizer.bos_token_id if model.tokenizer.bos_token_id is not None else model.tokenizer.cls_token_id
    if bos is None:
        raise ValueError(f"{model.cfg.model_name} has no BOS token; pass prepend_bos=False")
    return bos


def random_tokens(model, batch: int = 16, seq_len: int = 50, seed: int = 0, prepend_bos: bool = True) -> torch.Tensor:
    """Uniformly random tokens from the vocabulary without special tokens, `[batch, (1 +) seq_len]`."""
    excluded = special_token_ids(model)
    allowed = torch.tensor([t for t in range(model.cfg.d_vocab) if t not in excluded])
    g = torch.Generator().manual_seed(seed)
    tokens = allowed[torch.randint(len(allowed), (batch, seq_len), generator=g)]
    if prepend_bos:
        tokens = torch.cat([torch.full((batch, 1), _bos(model)), tokens], dim=1)
    return tokens.to(model.device)


def repeated_random_tokens(model, seq_len: int = 25, n_repeats: int = 4, batch: int = 16, seed: int = 0,
                           prepend_bos: bool = True) -> torch.Tensor:
    """Olsson et al. (2022)'s probe: BOS + `seq_len` random tokens repeated `n_repeats` times."""
    segment = random_tokens(model, batch, seq_len, seed, prepend_bos=False)
    tokens = segment.repeat(1, n_repeats)
    if prepend_bos:
        tokens = torch.cat([torch.full((batch, 1), _bos(model), device=tokens.device), tokens], dim=1)
    return tokens


# ---------------------------------------------------------------------- masks: [query, key] for one sequence
def previous_token_mask(tokens: torch.Tensor) -> torch.Tensor:
    n = tokens.shape[-1]
    q, k = torch.arange(n)[:, None], torch.arange(n)[None, :]
    return k == q - 1


def duplicate_token_mask(tokens: torch.Tensor) -> torch.Tensor:
    """Earlier positions holding the query's token."""
    n = tokens.shape[-1]
    same = tokens.cpu()[:, None] == tokens.cpu()[None, :]
    return same & (torch.arange(n)[None, :] < torch.arange(n)[:, None])


def induction_mask(tokens: torch.Tensor) -> torch.Tensor:
    """The positions right after earlier occurrences of the query's token (prefix matching)."""
    dup = duplicate_token_mask(tokens)
    out = torch.zeros_like(dup)
    out[:, 1:] = dup[:, :-1]  # key j+1 for every earlier copy j
    n = tokens.shape[-1]
    return out & (torch.arange(n)[None, :] <= torch.arange(n)[:, None])


def bos_mask(tokens: torch.Tensor) -> torch.Tensor:
    """The first position, for every query after it (a query at 0 has nothing else to attend to)."""
    n = tokens.shape[-1]
    mask = torch.zeros(n, n, dtype=torch.bool)
    mask[1:, 0] = True
    return mask


def local_mask(tokens: torch.Tensor, window: int, causal: bool = True) -> torch.Tensor:
    """Keys 1..window positions back (either side for bidirectional models); window=1 is previous-token."""
    n = tokens.shape[-1]
    d = torch.arange(n)[:, None] - torch.arange(n)[None, :]
    dist = d if causal else d.abs()
    return (dist >= 1) & (dist <= window)


# ---------------------------------------------------------------------- scores
def mask_score(pattern: torch.Tensor, mask: torch.Tensor, normalize: str = "targets", exclude_bos: bool = False,
               exclude_current_token: bool = False) -> torch.Tensor:
    """Attention on `mask`. pattern: [..., query, key], mask: [query, key] -> [...].

    "targets": mean over queries with a target of the mass on their targets (BOS and
    the current token, if excluded, are dropped from the row before it is renormalised);
    "all": sum over the whole pattern divided by its total mass after the exclusions
    (TransformerLens' "mul" measure).
    """
    mask = mask.to(pattern.device)
    keep = torch.ones_like(mask)
    if exclude_bos:
        keep[:, 0] = False
    if exclude_current_token:
        keep.fill_diagonal_(False)
    p = pattern * keep.to(pattern.dtype)
    hit = (p * (mask & keep).to(p.dtype)).sum(-1)  # [..., query]
    if normalize == "all":
        return hit.sum(-1) / p.sum((-2, -1))
    if normalize != "targets":
        raise ValueError(f"normalize must be 'targets' or 'all', got {normalize!r}")
    rows = (mask & keep).any(-1)
    if not rows.any():
        return torch.full(pattern.shape[:-2], float("nan"), device=pattern.device)
    return (hit[..., rows] / p.sum(-1)[..., rows].clamp_min(1e-12)).mean(-1)


def entropy(pattern: torch.Tensor, first_query: int = 1) -> torch.Tensor:
    """Mean attention entropy (nats) over queries from `first_query` on. pattern: [..., query, key] -> [...]."""
    p = pattern[..., first_query:, :]
    return -(p * p.clamp_min(1e-12).log()).sum(-1).mean(-1)


@dataclass
class Detector:
    name: str
    description: str
    mask: Callable[[torch.Tensor], torch.Tensor] | None  # tokens -> [query, key]; None for entropy
    data: str  # "prompts" (natural text) or "repeated" (repeated random tokens)


def default_detectors(local_window: int = 3, causal: bool = True) -> dict[str, Detector]:
    return {d.name: d for d in [
        Detector("previous_token", "attention to the previous position", previous_token_mask, "prompts"),
        Detector("duplicate_token", "attention to earlier copies of the current token", duplicate_token_mask, "repeated"),
        Detector("induction", "attention to the token after earlier copies of the current token", induction_mask,
                 "repeated"),
        Detector("bos", "attention to the first token (attention sink)", bos_mask, "prompts"),
        Detector("local", f"attention within {local_window} positions {'back' if causal else 'either side'}",
                 lambda t: local_mask(t, local_window, causal), "prompts"),
        Detector("entropy", "mean attention entropy in nats (low: focused, high: diffuse)", None, "prompts"),
    ]}


@dataclass
class HeadScores:
    """One detector's score for every head: per prompt `[n_prompts, n_layers, n_heads]`, mean and std."""

    name: str
    description: str
    per_prompt: torch.Tensor

    @property
    def mean(self) -> torch.Tensor:
        return self.per_prompt.nanmean(0)

    @property
    def std(self) -> torch.Tensor:
        x = self.per_prompt
        return (x - self.mean).pow(2).nanmean(0).sqrt() if x.shape[0] > 1 else torch.zeros_like(self.mean)

    def top(self, k: int = 3, largest: bool = True) -> list[tuple[int, int, float, float]]:
        """(layer, head, mean, std) of the k highest (or lowest) scoring heads."""
        mean = torch.nan_to_num(self.mean, nan=-float("inf") if largest else float("inf"))
        values, idx = mean.flatten().topk(min(k, mean.numel()), largest=largest)
        H = mean.shape[1]
        return [(int(i) // H, int(i) % H, float(self.mean.flatten()[i]), float(self.std.flatten()[i])) for i in idx]

    def to_frame(self):
        import pandas as pd

        L, H = self.mean.shape
        return pd.DataFrame([{"layer": l, "head": h, "mean": float(self.mean[l, h]), "std": float(self.std[l, h])}
                             for l in range(L) for h in range(H)])

    def plot(self, title: str | None = None):
        """Heatmap of the mean score of every head -> `Figure`. A deep model (more layers than
        heads) is drawn with layers as columns, so the map is wide rather than tall."""
        from interp.plots import heatmap

        mean = self.mean
        L, H = mean.shape
        title = self.name if title is None else title
        if L > H:
            return heatmap(mean.T, [f"H{h}" for h in range(H)], [str(l) for l in range(L)], title=title,
                           x_label="layer")
        return heatmap(mean, [f"L{l}" for l in range(L)], [f"H{h}" for h in range(H)], title=title)

    def _repr_html_(self) -> str:
        from interp.plots import to_svg

        return to_svg(self.plot())


def layer_patterns(model, tokens: torch.Tensor) -> torch.Tensor:
    """[batch, n_layers, n_heads, query, key] for equal-length token rows, caching only the patterns."""
    if hasattr(model, "attention_patterns"):  # a model we did not build (interp.attach): its own weights
        return torch.stack(model.attention_patterns(tokens), dim=1)
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_pattern"))
    return torch.stack(one_device([cache["pattern", layer] for layer in range(model.cfg.n_layers)]), dim=1)


def _sequences(model, prompts, tokens) -> Iterable[torch.Tensor]:
    """Token rows to score: the given [batch, pos] ids, or each prompt tokenized alone (no padding)."""
    if tokens is not None:
        yield torch.as_tensor(tokens, device=model.device)
        return
    for prompt in prompts:
        yield TokenizedPrompt.from_model(model, prompt).tokens[None].to(model.device)


def detect_heads(model, prompts: list | None = None, tokens: torch.Tensor | None = None, detectors=None,
                 normalize: str = "targets", exclude_bos: bool = False, exclude_current_token: bool = False,
                 local_window: int = 3) -> dict[str, HeadScores]:
    """Score every head with each detector on `prompts` (strings or dicts) or token rows `[batch, pos]`.

    `detectors`: names from `default_detectors()` (default: all), or Detector objects.
    """
    available = default_detectors(local_window, causal=model.cfg.causal)
    chosen = [available[d] if isinstance(d, str) else d for d in (detectors or available)]
    if (prompts is None) == (tokens is None):
        raise ValueError("give exactly one of prompts= (texts) or tokens= ([batch, pos] ids)")
    per_prompt: dict[str, list[torch.Tensor]] = {d.name: [] for d in chosen}
    for seq in _sequences(model, prompts, tokens):
        pats = layer_patterns(model, seq)  # [b, L, H, q, k]
        for d in chosen:
            if d.mask is None:
                per_prompt[d.name].append(entropy(pats, first_query=1 if model.cfg.causal else 0))
                continue
            scores = [mask_score(pats[i], d.mask(seq[i]), normalize, exclude_bos, exclude_current_token)
                      for i in range(seq.shape[0])]
            per_prompt[d.name].append(torch.stack(scores))
    return {d.name: HeadScores(d.name, d.description, torch.cat(per_prompt[d.name]).float().cpu()) for d in chosen}


# ---------------------------------------------------------------------- the classic two, as one-liners
def prefix_matching_scores(model, tokens: torch.Tensor | None = None, seq_len: int = 25, n_repeats: int = 4,
                           batch: int = 16, seed: int = 0) -> torch.Tensor:
    """Induction score `[n_layers, n_heads]`, Olsson et al.'s protocol: mean over examples and over
    queries that have an earlier copy of their token, of the attention on the tokens after those copies."""
    if tokens is None:
        tokens = repeated_random_tokens(model, seq_len, n_repeats, batch, seed)
    return detect_heads(model, tokens=tokens, detectors=["induction"])["induction"].mean


def previous_token_scores(model, tokens: torch.Tensor) -> torch.Tensor:
    """Mean attention from each position to the one before it, `[n_layers, n_heads]`."""
    return detect_heads(model, tokens=tokens, detectors=["previous_token"])["previous_token"].mean
