"""The framework study's report page (see analyses/framework.py for the numbers)."""

from __future__ import annotations

import json
from pathlib import Path

from interp.report import Page
from interp.plots import bar_chart, heatmap, line_chart
from interp.views import attention_heads


def _heads(n: int) -> list[str]:
    return [f"H{h}" for h in range(n)]


def write_report(result, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "framework.json").write_text(json.dumps(result.to_dict(), indent=1))
    names = result.token_names
    H = result.prefix_matching.shape[1]
    page = Page("The transformer-circuits framework on attention-only models",
                {"command": "python -m analyses.framework", "one-layer model": result.one_layer,
                 "two-layer model": result.two_layer,
                 "probe": "BOS + 25 random tokens repeated 4 times (Olsson et al. 2022)"})
    pl, ph = result.previous_token_head
    best = max(result.induction_heads, key=lambda lh: float(result.prefix_matching[lh]))
    page.heading("Summary")
    page.table([
        {"claim": "1-layer: no induction", "measure": "max prefix-matching score",
         "value": float(result.one_layer_prefix.max())},
        {"claim": "1-layer: planted skip-trigrams recovered", "measure": "found among top triples",
         "value": f"{len(result.planted_found)} of {len(result.planted_rules)}"},
        {"claim": "1-layer: ... and used", "measure": "p(c | a ... b) vs p(c | b alone)",
         "value": (f"{result.rule_behaviour['p_c_rule_applies']:.2f} vs {result.rule_behaviour['p_c_otherwise']:.2f}"
                   if result.rule_behaviour else "n/a")},
        {"claim": "2-layer: induction head", "measure": f"prefix matching of L{best[0]}H{best[1]}",
         "value": float(result.prefix_matching[best])},
        {"claim": "... that copies", "measure": "full-OV eigenvalue positivity",
         "value": float(result.ov_positivity[best])},
        {"claim": "... built on the previous-token head", "measure": f"prefix matching with L{pl}H{ph} ablated",
         "value": float(result.prefix_after_ablation[best])},
        {"claim": "exact path expansion", "measure": "max |sum of paths - logits|", "value": result.path_error},
    ])

    page.heading(f"One layer ({result.one_layer}): skip-trigrams")
    page.text("Each head's full QK circuit (which source token a destination token attends to) and full OV "
              "circuit (what attending to it does to the logits) combine into [source] ... [destination] -> "
              "[out] triples. The corpus planted rules a ... b -> c; a triple marked 'planted' is one of them. "
              "Many of the strongest triples instead copy their source ([a] ... [b] -> a): the model learned that "
              "tokens seen earlier tend to come back (the corpus repeats segments), the paper's copying "
              "skip-trigrams.")
    rows = []
    for head, triples in result.skip_trigrams.items():
        for t in triples[:6]:
            rows.append({"head": head, "source": names[t.source], "destination": names[t.destination],
                         "out": names[t.out], "qk (z)": t.qk, "ov (z)": t.ov,
                         "planted": "yes" if (t.source, t.destination, t.out) in result.planted_rules else ""})
    page.table(rows)
    if result.rule_behaviour is not None:
        b = result.rule_behaviour
        page.text(f"Behaviour on fresh corpus text: right after b, the model gives c probability "
                  f"{b['p_c_rule_applies']:.2f} when a occurred earlier (the rule applies, n={b['n_applies']}) and "
                  f"{b['p_c_otherwise']:.2f} when it did not (n={b['n_otherwise']}). Rules are rare events, so only "
                  "the strongest reach the top of the circuit tables; the rest are learned more weakly.")
    if result.direct_path_bigram_accuracy is not None:
        page.text(f"Direct path W_E W_U: for {result.direct_path_bigram_accuracy:.0%} of tokens its top "
                  "prediction is the bigram chain's likeliest successor.")

    page.heading(f"Two layers ({result.two_layer}): previous-token and induction heads")
    L = result.prefix_matching.shape[0]
    layers = [f"L{l}" for l in range(L)]
    # Scores and accuracies are shares (0 to 1, sequential colours); eigenvalue positivity runs -1 to 1 (diverging).
    page.figures([heatmap(values, layers, _heads(H), title=title, signed=signed, vmax=1.0,
                          vmin=None if signed else 0.0)
                  for title, values, signed in (("prefix matching", result.prefix_matching, False),
                                                (f"prefix matching, L{pl}H{ph} ablated", result.prefix_after_ablation,
                                                 False),
                                                ("previous-token score", result.previous_token, False),
                                                ("full-OV eigenvalue positivity", result.ov_positivity, True),
                                                ("full-OV top-1 diagonal accuracy", result.ov_top1, False))])
    page.text(f"Previous-token head: L{pl}H{ph}. Induction heads (prefix matching >= 0.3): "
              + ", ".join(f"L{l}H{h}" for l, h in result.induction_heads) + ".")

    page.heading("K-composition: how an induction head finds its source")
    page.text("The composed circuit W_E W_Q^j W_K^jT (W_V^i W_O^i)^T W_E^T matches a destination token against "
              "the token that the previous-token head i wrote into each key position. A positive diagonal means "
              "'attend where the previous token equals me'. The head's direct token QK circuit has no such "
              "diagonal: the match only exists through composition.")
    page.table([{"induction head": k, **v} for k, v in result.k_circuit.items()])
    if result.corners:
        labels = names[1:25]
        page.figures([heatmap(result.corners["composed"], labels, labels, signed=True, annotate=False, cell=0.17,
                              title="composed K-circuit, tokens t1-t24", x_label="source", y_label="destination"),
                      heatmap(result.corners["direct"], labels, labels, signed=True, annotate=False, cell=0.17,
                              title="direct token QK circuit of the same head", x_label="source",
                              y_label="destination")])

    page.heading("Composition scores against a random baseline")
    page.text("Score = ||OV_i M_j||_F / (||OV_i||_F ||M_j||_F) for layer-0 head i (rows) and layer-1 head j "
              "(columns). Raw scores in models this small sit near the random-matrix baseline (the paper's "
              "erratum says as much); the mechanism shows in the composed circuit above, not in the raw score.")
    for mode, comp in result.composition.items():
        page.figure(heatmap(comp.scores[0, :, 1, :], [f"L0H{h}" for h in range(H)], [f"L1H{h}" for h in range(H)],
                            value_format="{:.3f}", signed=False,
                            title=f"{mode}-composition (baseline {comp.baseline:.3f} ± {comp.baseline_std:.3f})"))

    page.heading("Path expansion of the logits")
    page.text(f"On the probe, the logits are an exact sum of paths (max error {result.path_error:.1e}): the direct "
              "path, each head, and each virtual head i->j. Norm of each path's contribution at the last position:")
    page.figure(bar_chart([n for n, _ in result.path_terms], [v for _, v in result.path_terms], value_format="{:.2f}",
                          x_label="norm of the path's logits at the last position"))

    if result.probe_patterns is not None:
        page.heading("Attention on the probe")
        for layer in range(result.probe_patterns.shape[0]):
            page.view(attention_heads(result.probe_patterns[layer], result.probe_tokens,
                                      [f"L{layer}H{h}" for h in range(H)], causal=True, title=f"Layer {layer}"))
    if result.loss_curves:
        page.heading("Training")
        smooth = {name: [sum(c[max(0, i - 49): i + 1]) / len(c[max(0, i - 49): i + 1]) for i in range(0, len(c), 10)]
                  for name, c in result.loss_curves.items()}
        page.figure(line_chart(smooth, x=[10 * i for i in range(max(len(c) for c in smooth.values()))],
                               x_label="step", y_label="loss (nats)"),
                    "Training loss, moving average over 50 steps")
    return page.save(out / "index.html")
