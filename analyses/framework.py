"""The transformer-circuits framework on the attention-only models trained here.

    python -m analyses.framework [--one-layer attn-only-1l] [--two-layer attn-only-2l] [--out reports/framework]

Elhage et al. (2021) read a 1-layer attention-only model as a table of skip-trigrams
and a 2-layer one as a previous-token head whose output the induction heads' keys read
(K-composition). This study measures each claim on our models and writes a report.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from interp import circuits
from interp.paths import path_expansion
from interp.probing import prefix_matching_scores, previous_token_scores, repeated_random_tokens


@dataclass
class FrameworkResult:
    """Numbers of the study; tensors indexed [layer, head] unless said otherwise."""

    one_layer: str
    two_layer: str
    skip_trigrams: dict[str, list[circuits.SkipTrigram]]  # 1-layer model, per head
    planted_rules: list[tuple[int, int, int]]  # (a, b, c) of the corpus, if known
    planted_found: list[tuple[int, int, int]]  # planted rules among the extracted triples
    direct_path_bigram_accuracy: float | None  # 1-layer direct path's argmax = the chain's likeliest successor
    rule_behaviour: dict[str, float] | None  # 1-layer model's p(c) after b, with and without a earlier
    one_layer_prefix: torch.Tensor  # [1, n_heads]
    prefix_matching: torch.Tensor  # 2-layer model [2, n_heads]
    previous_token: torch.Tensor
    previous_token_head: tuple[int, int]
    induction_heads: list[tuple[int, int]]
    prefix_after_ablation: torch.Tensor  # with the previous-token head zero-ablated
    ov_positivity: torch.Tensor  # eigenvalue positivity of full OV circuits
    ov_top1: torch.Tensor  # top-1 diagonal accuracy of full OV circuits
    k_circuit: dict[str, dict[str, float]]  # per induction head: composed K-circuit vs direct QK
    composition: dict[str, circuits.CompositionScores]
    path_terms: list[tuple[str, float]]  # strongest paths (norm at the last position of the probe)
    path_error: float  # max |sum of paths - logits|
    token_names: list[str]
    loss_curves: dict[str, list[float]] = field(default_factory=dict)
    corners: dict[str, torch.Tensor] = field(default_factory=dict)  # corners of circuits to draw
    probe_tokens: list[str] = field(default_factory=list)  # one repeated-random-token example
    probe_patterns: torch.Tensor | None = None  # its patterns [n_layers, n_heads, query, key]

    # ------------------------------------------------------------------ views
    def to_frame(self):
        """One row per head of the 2-layer model with every per-head score."""
        import pandas as pd

        rows = []
        L, H = self.prefix_matching.shape
        for l in range(L):
            for h in range(H):
                rows.append({
                    "head": f"L{l}H{h}", "prefix_matching": float(self.prefix_matching[l, h]),
                    "prefix_matching_ablated": float(self.prefix_after_ablation[l, h]),
                    "previous_token": float(self.previous_token[l, h]),
                    "ov_positivity": float(self.ov_positivity[l, h]), "ov_top1": float(self.ov_top1[l, h]),
                })
        return pd.DataFrame(rows)

    def to_dict(self) -> dict:
        name = lambda t: self.token_names[t] if t < len(self.token_names) else str(t)  # noqa: E731
        return {
            "models": {"one_layer": self.one_layer, "two_layer": self.two_layer},
            "skip_trigrams": {h: [{"source": name(t.source), "destination": name(t.destination), "out": name(t.out),
                                   "qk": t.qk, "ov": t.ov, "planted": (t.source, t.destination, t.out) in self.planted_rules}
                                  for t in ts] for h, ts in self.skip_trigrams.items()},
            "planted_rules_found": len(self.planted_found), "planted_rules": len(self.planted_rules),
            "direct_path_bigram_accuracy": self.direct_path_bigram_accuracy,
            "planted_rule_behaviour": self.rule_behaviour,
            "one_layer_prefix_matching": self.one_layer_prefix.tolist(),
            "prefix_matching": self.prefix_matching.tolist(),
            "prefix_matching_after_ablation": self.prefix_after_ablation.tolist(),
            "previous_token": self.previous_token.tolist(),
            "previous_token_head": list(self.previous_token_head),
            "induction_heads": [list(h) for h in self.induction_heads],
            "ov_positivity": self.ov_positivity.tolist(), "ov_top1": self.ov_top1.tolist(),
            "k_circuit": self.k_circuit,
            "composition": {m: {"scores": c.scores[0, :, 1, :].tolist(), "baseline": c.baseline,
                                "baseline_std": c.baseline_std} for m, c in self.composition.items()},
            "path_terms": self.path_terms, "path_error": self.path_error,
        }

    def plot(self):
        """The 2-layer model's prefix-matching (induction) score of every head -> `Figure`."""
        from interp.plots import heatmap

        L, H = self.prefix_matching.shape
        return heatmap(self.prefix_matching, [f"L{l}" for l in range(L)], [f"H{h}" for h in range(H)],
                       signed=False, vmin=0.0, vmax=1.0, title=f"prefix matching ({self.two_layer})")

    def save(self, directory) -> Path:
        from analyses.framework_report import write_report

        return write_report(self, Path(directory))

    def _repr_html_(self) -> str:
        from interp.plots import to_svg

        return self.to_frame().to_html() + to_svg(self.plot())


def _training_record(model) -> dict | None:
    path = Path(getattr(model, "source", "")) / "training.json"
    return json.loads(path.read_text()) if path.exists() else None


def _corpus_of(record: dict | None):
    if record is None:
        return None
    from models.synthetic import CorpusConfig, SyntheticCorpus

    corpus = dict(record["corpus"])
    for key in ("repeat_len", "periodic_len"):
        corpus[key] = tuple(corpus[key])
    return SyntheticCorpus(CorpusConfig(**corpus))


def planted_rule_behaviour(model, corpus, n_sequences: int = 256, seed: int = 123) -> dict[str, float]:
    """Mean probability the model gives c right after b, when a occurred earlier (the rule applies) and when not."""
    x = corpus.sample(n_sequences, torch.Generator().manual_seed(seed)).to(model.device)
    probs = model(x).softmax(-1)  # [batch, pos, vocab]
    seen = torch.zeros(x.shape[0], model.cfg.d_vocab, dtype=torch.bool, device=x.device)
    applies, other = [], []
    rows = torch.arange(x.shape[0], device=x.device)
    for pos in range(1, x.shape[1] - 1):
        tok = x[:, pos]
        a, c = corpus.rule_a[tok.cpu()].to(x.device), corpus.rule_c[tok.cpu()].to(x.device)
        has_rule = a >= 0
        p_c = probs[rows, pos, c.clamp(min=0)]
        hit = has_rule & seen[rows, a.clamp(min=0)]
        applies.append(p_c[hit])
        other.append(p_c[has_rule & ~hit])
        seen[rows, tok] = True
    applies, other = torch.cat(applies), torch.cat(other)
    return {"p_c_rule_applies": float(applies.mean()), "p_c_otherwise": float(other.mean()),
            "n_applies": int(applies.numel()), "n_otherwise": int(other.numel())}


def framework_study(one_layer="attn-only-1l", two_layer="attn-only-2l", n_examples: int = 32,
                    trigrams_per_head: int = 12, seed: int = 0) -> FrameworkResult:
    """Run the study on two models (names, directories or loaded models)."""
    import models

    m1 = models.load(one_layer) if isinstance(one_layer, (str, Path)) else one_layer
    m2 = models.load(two_layer) if isinstance(two_layer, (str, Path)) else two_layer
    names = [m1.to_str_tokens([t])[0] if m1.tokenizer is not None else str(t) for t in range(m1.cfg.d_vocab)]

    # 1 layer: skip-trigrams, and the direct path as a bigram table.
    record1 = _training_record(m1)
    corpus = _corpus_of(record1)
    trigrams = circuits.skip_trigrams(m1, layer=0, k=trigrams_per_head)
    planted = corpus.rules if corpus is not None else []
    found = sorted({(t.source, t.destination, t.out) for ts in trigrams.values() for t in ts} & set(planted))
    bigram_acc = behaviour = None
    if corpus is not None:
        behaviour = planted_rule_behaviour(m1, corpus)
        predicted = circuits.direct_path(m1).AB.argmax(-1)[1:]
        bigram_acc = float((predicted == corpus.transitions.argmax(-1)[1:]).float().mean())
    one_prefix = prefix_matching_scores(m1, batch=n_examples, seed=seed)

    # 2 layers: previous-token head, induction heads, their circuits.
    probe = repeated_random_tokens(m2, 25, 4, n_examples, seed=seed)
    prefix = prefix_matching_scores(m2, tokens=probe)
    previous = previous_token_scores(m2, probe)
    prev_head = (0, int(previous[0].argmax()))
    induction = [(1, h) for h in range(m2.cfg.n_heads) if prefix[1, h] >= 0.3] or [(1, int(prefix[1].argmax()))]

    def ablate(z, hook):
        z = z.clone()
        z[:, :, prev_head[1]] = 0.0
        return z

    with m2.hooks(fwd_hooks=[(f"blocks.{prev_head[0]}.attn.hook_z", ablate)]):
        prefix_ablated = prefix_matching_scores(m2, tokens=probe)
    ov = circuits.full_ov(m2)
    k_circuit, corners = {}, {}
    for layer, head in induction:
        composed = circuits.k_composition_circuit(m2, prev_head[0], prev_head[1], layer, head)
        direct = circuits.full_qk(m2, layer, head)
        k_circuit[f"L{layer}H{head}"] = {
            "composed_positivity": float(circuits.eigenvalue_positivity(composed)),
            "composed_top1": float(circuits.top1_diagonal_accuracy(composed)),
            "direct_qk_positivity": float(circuits.eigenvalue_positivity(direct)),
            "direct_qk_top1": float(circuits.top1_diagonal_accuracy(direct)),
        }
        if not corners:
            corners["composed"] = composed[1:25, 1:25].AB
            corners["direct"] = direct[1:25, 1:25].AB
    composition = {mode: circuits.composition_scores(m2, mode) for mode in "QKV"}
    expansion = path_expansion(m2, probe[:8])
    path_error = float((expansion.total() - expansion.logits).abs().max())
    frame = expansion.to_frame(position=-1)
    path_terms = [(r.path, round(r.norm, 4)) for r in frame.head(12).itertuples()]

    _, cache = m2.run_with_cache(probe[:1], names_filter=lambda n: n.endswith("hook_pattern"))
    probe_patterns = cache.stack_activation("pattern")[:, 0]
    curves = {}
    for model in (m1, m2):
        record = _training_record(model)
        if record is not None:
            curves[model.cfg.model_name] = record["losses"]
    return FrameworkResult(
        one_layer=m1.cfg.model_name, two_layer=m2.cfg.model_name, skip_trigrams=trigrams, planted_rules=planted,
        planted_found=found, direct_path_bigram_accuracy=bigram_acc, rule_behaviour=behaviour, one_layer_prefix=one_prefix,
        prefix_matching=prefix, previous_token=previous, previous_token_head=prev_head, induction_heads=induction,
        prefix_after_ablation=prefix_ablated, ov_positivity=circuits.eigenvalue_positivity(ov),
        ov_top1=circuits.top1_diagonal_accuracy(ov), k_circuit=k_circuit, composition=composition,
        path_terms=path_terms, path_error=path_error, token_names=names, loss_curves=curves, corners=corners,
        probe_tokens=[names[t] for t in probe[0].tolist()], probe_patterns=probe_patterns,
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one-layer", default="attn-only-1l")
    parser.add_argument("--two-layer", default="attn-only-2l")
    parser.add_argument("--out", default="reports/framework")
    args = parser.parse_args(argv)
    result = framework_study(args.one_layer, args.two_layer)
    print(result.to_frame().to_string(index=False))
    print("wrote", result.save(args.out))


if __name__ == "__main__":
    main()
