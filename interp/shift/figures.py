"""Figures and the offline HTML page of one `ShiftResult`."""

from __future__ import annotations

import json
from pathlib import Path

from interp.plots import bar_chart, heatmap, line_chart, trajectory


def _series(result, names: dict[str, str]) -> dict[str, list[float]]:
    per = result.per_layer()
    return {label: per[key].tolist() for key, label in names.items() if key in per}


def _per_layer(result, names: dict[str, str], y_label: str = "", **kwargs):
    """A line chart over the layers ('embed', 1, 2, ...) of the named per-layer measures."""
    return line_chart(_series(result, names), x_ticks=result.layer_labels, x_label="layer", y_label=y_label, **kwargs)


def curves(result):
    """The headline curves -> `Figure`: sense separation if there are senses, else context-specificity."""
    if result.centroid_accuracy is not None:
        chance = 1 / len(result.trace.senses) if result.trace.senses else None
        fig = _per_layer(result, {"centroid_accuracy": "nearest centroid", "probe_accuracy": "probe",
                                  "probe_control": "probe, shuffled"}, "accuracy", ylim=(0, 1.02),
                         styles={"probe, shuffled": {"linestyle": "--"}},
                         title=f"{result.word!r}: which sense, read from its vector")
        if chance:
            fig.axes[0].axhline(chance, color="#888888", linestyle=":", linewidth=1)
        return fig
    return _per_layer(result, {"self_similarity_adj": "self-sim (adj)", "mev_adj": "MEV (adj)"}, "minus baseline",
                      title=f"{result.word!r}: context-specificity")


def figures(result) -> list[tuple[object, str]]:
    """(Figure, caption) for every per-layer figure of the result."""
    word = result.word
    out = [(_per_layer(result, {"cos_to_static": "cos to static", "relative_shift": "|shift| / |v|"}),
            f"How far {word!r} moves from its static (layer-0) vector: cosine to it, and the norm of the shift "
            "relative to the vector's norm (means over contexts).")]
    out.append((_per_layer(result, {"self_similarity_adj": "self-similarity", "intra_sentence_adj": "intra-sentence",
                                    "mev_adj": "MEV"}, "minus baseline"),
                "Ethayarajh (2019), each minus its anisotropy baseline (random tokens of other contexts, same "
                "layer). Low self-similarity: the vector is context-specific."))
    if result.centroid_accuracy is not None:
        out.append((curves(result), "Sense read-out: leave-one-out nearest-sense-centroid accuracy, "
                    f"{result.probe.folds if result.probe else '-'}-fold logistic probe, and the probe on "
                    "shuffled labels (balanced within each sense); dotted: chance."))
        out.append((_per_layer(result, {"within_sense": "within sense", "between_sense": "between senses"}),
                    "Mean cosine between contexts of the same sense and of different senses."))
    return out


def _layers_to_show(result) -> list[int]:
    n = result.trace.n_layers
    keep = [0, n]
    if result.centroid_accuracy is not None:
        keep.insert(1, result.best_layer())
    return sorted(set(keep))


def save_result(result, directory, name: str | None = None) -> Path:
    from interp.report import Page

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    t = result.trace
    name = name or f"shift_{t.word}_{t.model_name or 'model'}".replace("/", "_").replace(" ", "_")
    (directory / f"{name}.json").write_text(json.dumps(result.to_dict(), indent=1))
    page = Page(f"How {t.word!r} moves through {t.model_name or 'the model'}",
                {"word": t.word, "model": t.model_name, "contexts": len(t.contexts), "senses": t.senses,
                 "pool": t.pool, "read": t.read, "seconds": round(result.seconds, 1)})
    write_sections(page, result)
    return page.save(directory / f"{name}.html")


def write_sections(page, result, level: int = 2) -> None:
    """The sections of one result's report, appended to `page`."""
    from interp.views import colored_tokens

    t = result.trace
    for note in t.notes:
        page.text(f"Note: {note}.")
    page.heading("Per layer", level)
    for fig, caption in figures(result):
        page.figure(fig, caption)
    rows = result.to_frame().round(3).to_dict("records")
    page.table(rows, caption="Every per-layer measure (layer 'embed' is the static vector the first block reads)")

    labels = t.labels or [f"context {i}" for i in range(len(t.contexts))]
    short = [f"{labels[i]} {i}" for i in range(len(t.contexts))]
    page.heading("Similarity between contexts", level)
    page.figures([heatmap(result.geometry.pairwise[l], short, [str(i) for i in range(len(short))],
                          title=f"cosine at layer {result.layer_labels[l]}", signed=True, annotate=False,
                          cell=0.12 if len(short) > 16 else 0.2)
                  for l in _layers_to_show(result)],
                 caption="Cosine between every two contexts' vectors of the word (rows labelled sense and index).")
    if result.trajectory is not None:
        share = result.trajectory_share.tolist()
        page.heading("Trajectories", level)
        page.figure(trajectory(result.trajectory, labels, point_labels=[str(i) for i in range(len(t.contexts))],
                               title=f"{t.word!r}, layer 0 (dot) to the last layer (ring)"),
                    f"Each context's vector across layers in 2-D (PCA of unit vectors centred per layer; the axes "
                    f"hold {100 * share[0]:.0f}% and {100 * share[1]:.0f}% of the variance); each ring is numbered "
                    "with its context's index.")

    if result.lens is not None:
        page.heading("Logit lens at the word", level)
        first = list(dict.fromkeys(labels))
        rows = []
        for sense in first:
            i = labels.index(sense)
            for s, layer in enumerate(result.lens.layers):
                if layer % max(1, t.n_layers // 10) and layer != t.n_layers:
                    continue
                row = {"context": f"{sense} {i}", "layer": result.layer_labels[layer],
                       "top-3": " | ".join(repr(x) for x in result.lens.top_tokens[i][s][:3]),
                       "p(top1)": float(result.lens.top_probs[i, s, 0])}
                for j, tok in enumerate(result.lens.tracked):
                    row[f"rank {tok!r}"] = int(result.lens.tracked_ranks[i, s, j])
                if result.tuned is not None:
                    row["tuned lens top-3"] = " | ".join(repr(x) for x in result.tuned.top_tokens[i][s][:3])
                    for j, tok in enumerate(result.tuned.tracked):
                        row[f"tuned rank {tok!r}"] = int(result.tuned.tracked_ranks[i, s, j])
                rows.append(row)
        page.table(rows, caption="What the word's vector predicts next, read through the final norm and unembedding "
                                 "(the logit lens" + (", and through the tuned lens's translator first" if
                                                      result.tuned is not None else "") +
                                 "), for the first context of each sense.")
        if result.lens.tracked:
            series = {}
            for sense in first:
                idx = [i for i, lab in enumerate(labels) if lab == sense]
                for j, tok in enumerate(result.lens.tracked[:1]):
                    series[f"{sense}: log p({tok!r})"] = result.lens.tracked_logprobs[idx, :, j].mean(0).tolist()
            page.figure(line_chart(series, x_ticks=[result.layer_labels[layer] for layer in result.lens.layers],
                                   x_label="layer", y_label="log-prob"),
                        f"Logit lens: mean log-probability of {result.lens.tracked[0]!r} at the word, per sense.")
    if result.nearest is not None:
        page.heading("Nearest token embeddings", level)
        first = list(dict.fromkeys(labels))
        rows = [{"context": f"{sense} {labels.index(sense)}", "layer": result.layer_labels[l],
                 "nearest": " | ".join(result.nearest.tokens[labels.index(sense)][l][:5])}
                for sense in first for l in range(t.n_layers + 1)]
        page.table(rows, caption="Cosine-nearest rows of the input embedding matrix (an encoder has no next-token "
                                 "readout).")

    for att in result.attributions:
        page.heading(f"What carries {att.a} vs {att.b} after {att.layer} blocks", level)
        top = att.top(12)
        page.figure(bar_chart([c for c, _ in top], [abs(v) for _, v in top], value_format="{:.2f}",
                              x_label="|contribution|"),
                    f"|contribution| to ||mean({att.a}) - mean({att.b})|| = {att.distance:.2f} (signed values in the "
                    "table; the contributions of all components sum to the distance exactly).")
        page.table([{"component": c, "contribution": v, "share": v / att.distance} for c, v in top])
        for head in att.attention:
            row_a = att.group_a[0]
            row_b = att.group_b[0]
            for r, i in ((0, row_a), (len(att.group_a), row_b)):
                page.view(colored_tokens(t.str_tokens[i], head.weights[r],
                                         title=f"{head.label}: attention from {t.read_tokens()[i]!r} "
                                               f"({labels[i]} {i})"))
            mean_top = {}
            for r, i in enumerate(att.group_a + att.group_b):
                for tok, w in head.top[r][:1]:
                    mean_top.setdefault(labels[i], []).append(f"{tok!r} {w:.2f}")
            page.text(f"{head.label}, most attended token from the word (sink excluded): " +
                      "; ".join(f"{k}: {', '.join(v)}" for k, v in mean_top.items()))
