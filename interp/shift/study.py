"""One call for a whole embedding-shift study: `shift_study(model, word, contexts, labels)`.

It follows the word through every layer (`trace_word`), measures how far and how
context-specifically it moves (`geometry`), how well its vectors sort by sense
(`senses`), what the vectors predict (logit lens for decoders, nearest embeddings for
encoders), and which components carry the difference between two senses, with where
their heads attend from the word (`shift_attribution`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from interp.shift import senses as sense_stats
from interp.shift.attribution import ShiftAttribution, shift_attribution
from interp.shift.geometry import Geometry, geometry
from interp.shift.lens import LensReadout, NearestTokens, nearest_tokens, read_lens
from interp.shift.trace import WordTrace, trace_word


@dataclass
class ShiftResult:
    """Everything `shift_study` measured. Per-layer tensors are `[n_layers + 1]` (0 = the static vector)."""

    trace: WordTrace
    geometry: Geometry
    centroid_accuracy: torch.Tensor | None = None
    within_sense: torch.Tensor | None = None
    between_sense: torch.Tensor | None = None
    probe: sense_stats.ProbeScores | None = None
    trajectory: torch.Tensor | None = None  # [n, L + 1, 2]
    trajectory_share: torch.Tensor | None = None  # [2]: variance share of the two axes
    lens: LensReadout | None = None  # decoders: the logit lens at the word, per context and layer
    tuned: LensReadout | None = None  # decoders, with a TunedLens given: its readout of the same vectors
    nearest: NearestTokens | None = None  # encoders: nearest token embeddings, per context and layer
    attributions: list[ShiftAttribution] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def word(self) -> str:
        return self.trace.word

    @property
    def layer_labels(self) -> list[str]:
        return self.trace.layer_labels

    def best_layer(self) -> int:
        """The earliest layer index (0..n_layers) with the highest nearest-centroid accuracy."""
        if self.centroid_accuracy is None:
            raise ValueError("no sense labels, so no best layer")
        return int(torch.argmax(self.centroid_accuracy))  # argmax returns the first maximum

    def per_layer(self) -> dict[str, torch.Tensor]:
        g = self.geometry
        out = {"cos_to_static": g.static_cosine.mean(0), "shift_norm": g.shift_norm.mean(0),
               "relative_shift": g.relative_shift.mean(0), "self_similarity": g.self_similarity,
               "self_similarity_adj": g.adjusted_self_similarity, "intra_sentence": g.intra_sentence,
               "intra_sentence_adj": g.adjusted_intra_sentence, "mev": g.mev, "mev_adj": g.adjusted_mev,
               "baseline_cosine": g.baselines.cosine, "baseline_mev": g.baselines.mev}
        if self.centroid_accuracy is not None:
            out.update(centroid_accuracy=self.centroid_accuracy, within_sense=self.within_sense,
                       between_sense=self.between_sense)
        if self.probe is not None:
            out.update(probe_accuracy=self.probe.accuracy, probe_control=self.probe.control)
        return out

    def to_frame(self):
        """One row per layer with every per-layer measure."""
        import pandas as pd

        frame = pd.DataFrame({k: v.tolist() for k, v in self.per_layer().items()})
        frame.insert(0, "layer", self.layer_labels)
        return frame

    def to_dict(self) -> dict:
        t = self.trace
        out = {"word": t.word, "model": t.model_name, "contexts": t.contexts, "labels": t.labels,
               "read_tokens": t.read_tokens(), "pool": t.pool, "read": t.read, "notes": t.notes,
               "layers": self.layer_labels, "per_layer": {k: v.tolist() for k, v in self.per_layer().items()},
               "pairwise_cosine": self.geometry.pairwise.tolist(), "seconds": self.seconds}
        if self.probe is not None:
            out["probe"] = {"folds": self.probe.folds, "chance": self.probe.chance}
        if self.trajectory is not None:
            out["trajectory"] = self.trajectory.tolist()
            out["trajectory_share"] = self.trajectory_share.tolist()
        if self.lens is not None:
            out["lens"] = self.lens.to_dict()
        if self.tuned is not None:
            out["tuned_lens"] = self.tuned.to_dict()
        if self.nearest is not None:
            out["nearest"] = self.nearest.to_dict()
        out["attributions"] = [a.to_dict() for a in self.attributions]
        return out

    def plot(self):
        """The headline per-layer curves -> `Figure`: sense read-out accuracy (with senses), else
        context-specificity. The report's other figures: `interp.shift.figures.figures(result)`."""
        from interp.shift.figures import curves

        return curves(self)

    def save(self, directory, name: str | None = None):
        """`{name}.json` (every number) and `{name}.html` (the report, offline)."""
        from interp.shift.figures import save_result

        return save_result(self, directory, name)

    def _repr_html_(self) -> str:
        from interp.plots import to_svg

        return to_svg(self.plot())


def shift_study(model, word: str, contexts: list[str], labels: list[str] | None = None, *,
                contrast: tuple | None = None, attribution_layers="best+final", pool: str = "last",
                read: str = "word", track: list[str] | None = None, tuned_lens=None, probe_folds: int = 4,
                n_heads_shown: int = 4, seed: int = 0) -> ShiftResult:
    """Measure how `word`'s vector moves across `contexts` (one sense label per context, optional).

    contrast: the two senses (or two context indices) whose difference is attributed to
      components; default the first two senses (or contexts 0 and 1 without labels).
    attribution_layers: "best+final" (the best-separating layer and the last), "final", or a
      list of layer indices (blocks applied, 0..n_layers).
    track: tokens whose logit-lens probability is followed through the layers (decoders).
    tuned_lens: a `TunedLens` for this model (decoders): read the vectors through it as well.
    """
    start = time.perf_counter()
    trace = trace_word(model, word, contexts, labels, pool=pool, read=read)
    result = ShiftResult(trace, geometry(trace, seed=seed))
    if labels is not None and len(trace.senses) >= 2:
        result.centroid_accuracy = sense_stats.centroid_accuracy(trace)
        result.within_sense, result.between_sense = sense_stats.sense_similarity(trace)
        counts = torch.bincount(trace.label_index())
        if int(counts.min()) >= probe_folds:
            result.probe = sense_stats.probe_accuracy(trace, folds=probe_folds, seed=seed)
    if len(contexts) >= 2:
        result.trajectory, result.trajectory_share = sense_stats.trajectories(trace)
    decoder = getattr(model, "unembed", None) is not None and getattr(model.cfg, "causal", True)
    if decoder:
        targets = [f"{i}: {c}" for i, c in enumerate(contexts)]
        result.lens = read_lens(model, trace.vectors, k=5, track=track, targets=targets)
        if tuned_lens is not None:
            result.tuned = read_lens(model, trace.vectors, k=5, track=track, lens=tuned_lens, targets=targets)
    else:
        result.nearest = nearest_tokens(model, trace.vectors, k=5)
    if len(contexts) >= 2:
        if contrast is None:
            contrast = tuple(trace.senses[:2]) if result.centroid_accuracy is not None else (0, 1)
        if attribution_layers == "best+final":
            # Layer 0 only differs across contexts by position (if at all): start at 1.
            layers = sorted({max(1, result.best_layer()), trace.n_layers}) if result.centroid_accuracy is not None \
                else [trace.n_layers]
        elif attribution_layers == "final":
            layers = [trace.n_layers]
        else:
            layers = list(attribution_layers)
        for layer in layers:
            result.attributions.append(shift_attribution(model, trace, contrast[0], contrast[1], layer,
                                                         n_heads_shown=n_heads_shown))
    result.seconds = time.perf_counter() - start
    return result
