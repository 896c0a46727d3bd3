"""A patching study on a set of clean/corrupted prompt pairs: the shared engine of
`analyses.ioi` and `analyses.factual`.

For a metric (normalised logit difference between each pair's clean and corrupted
answers) it runs: the residual stream by layer x position and the heads' outputs by
layer x head, each denoising and noising; attribution patching of the same grids
(plus per-position head outputs, and queries/keys with AtP*'s fix) compared with the
exact maps; path patching from every head to the final residual (its direct effect)
and into the inputs of the heads that matter most.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from interp.patching import (
    PatchingRuns,
    PatchResult,
    activation_patch,
    attribution_sweeps,
    compare,
    logit_diff,
    path_patch,
)
from interp.report import Page


@dataclass
class PairSet:
    """Prompt pairs that tokenize to the same length, with each side's answer token."""

    name: str
    clean: list[str]
    corrupted: list[str]
    clean_answer: list[str]  # the clean run's answer (e.g. the indirect object)
    corrupted_answer: list[str]  # the corrupted run's answer
    description: str = ""

    def __post_init__(self) -> None:
        n = {len(self.clean), len(self.corrupted), len(self.clean_answer), len(self.corrupted_answer)}
        if len(n) != 1:
            raise ValueError(f"{self.name}: clean, corrupted and both answer lists must have the same length")

    def take(self, n: int | None) -> "PairSet":
        if n is None:
            return self
        return PairSet(self.name, self.clean[:n], self.corrupted[:n], self.clean_answer[:n],
                       self.corrupted_answer[:n], self.description)


def answer_ids(model, answers: list[str]) -> torch.Tensor:
    ids = []
    for a in answers:
        toks = model.to_tokens(a, prepend_bos=False)[0]
        if len(toks) != 1:
            raise ValueError(f"answer {a!r} is {len(toks)} tokens for {model.cfg.model_name}; answers must be one token")
        ids.append(int(toks[0]))
    return torch.tensor(ids)


@dataclass
class PatchingStudy:
    model_name: str
    pairs: PairSet
    clean_logit_diff: torch.Tensor  # [n_pairs]
    corrupted_logit_diff: torch.Tensor
    maps: dict[str, PatchResult]  # "<kind>/<direction>" -> exact sweep
    attribution: dict[str, PatchResult]  # same keys -> attribution estimate
    agreement: dict[str, dict]  # same keys -> compare(exact, attribution)
    paths: dict[str, PatchResult]  # "resid" / "heads" -> path-patching maps
    receivers: list[tuple[int, int]]
    timings: dict[str, float] = field(default_factory=dict)

    def top_heads(self, key: str = "z/noise", k: int = 5) -> list[tuple[dict, float]]:
        from interp.patching import effects

        res = self.maps[key]
        eff = effects(res).mean(0)
        idx = eff.abs().flatten().topk(k).indices
        out = []
        for i in idx.tolist():
            layer, head = divmod(i, eff.shape[1])
            out.append(({"layer": layer, "head": head}, float(eff[layer, head])))
        return out

    def noise_vs_denoise(self, kind: str = "resid_pre") -> float:
        """Max |denoise - (1 - noise effect)| over cells: 0 would mean the two directions tell the same story."""
        d, n = self.maps[f"{kind}/denoise"].mean, self.maps[f"{kind}/noise"].mean
        return float((d - (1 - n)).abs().max())

    def to_frame(self):
        import pandas as pd

        frames = []
        for key, res in self.maps.items():
            f = res.to_frame()
            f.insert(0, "sweep", key)
            frames.append(f)
        return pd.concat(frames, ignore_index=True)

    def to_dict(self) -> dict:
        return {
            "model": self.model_name, "pairs": self.pairs.name, "n_pairs": len(self.pairs.clean),
            "clean_logit_diff": self.clean_logit_diff.tolist(), "corrupted_logit_diff": self.corrupted_logit_diff.tolist(),
            "maps": {k: {"mean": v.mean.tolist(), "std": v.std.tolist(), "seconds": v.seconds, "forwards": v.forwards}
                     for k, v in self.maps.items()},
            "agreement": self.agreement, "receivers": self.receivers,
            "paths": {k: {"mean": v.mean.tolist(), "seconds": v.seconds} for k, v in self.paths.items()},
            "top_heads_noise": [(c, v) for c, v in self.top_heads()], "timings": self.timings,
        }

    def plot(self, key: str = "resid_pre/denoise"):
        """One map's heatmap (`PatchResult.plot`) -> `Figure`."""
        return self.maps[key].plot()

    def save(self, directory) -> Path:
        return write_study(self, Path(directory))

    def _repr_html_(self) -> str:
        from interp.plots import to_svg

        return to_svg(self.plot())


def solved_pairs(model, pairs: PairSet, log=print, margin: float = 0.5) -> PairSet:
    """The pairs the model gets right both ways (clean logit diff > margin, corrupted < -margin).

    Normalising by (clean - corrupted) per pair blows up where the two runs barely differ,
    so a pair the model fails on would dominate every averaged map.
    """
    correct, wrong = answer_ids(model, pairs.clean_answer), answer_ids(model, pairs.corrupted_answer)
    rows = torch.arange(len(correct))
    with torch.no_grad():
        ld = {}
        for side, prompts in (("clean", pairs.clean), ("corrupted", pairs.corrupted)):
            logits = model(prompts)[:, -1]
            ld[side] = (logits[rows, correct] - logits[rows, wrong]).cpu()
    keep = [i for i in range(len(correct)) if ld["clean"][i] > margin and ld["corrupted"][i] < -margin]
    for i in sorted(set(rows.tolist()) - set(keep)):
        log(f"  dropped pair {pairs.clean[i]!r}: logit diff clean {float(ld['clean'][i]):.2f}, "
            f"corrupted {float(ld['corrupted'][i]):.2f}")
    if not keep:
        raise ValueError(f"{model.cfg.model_name} solves none of the {pairs.name} pairs")
    pick = lambda xs: [xs[i] for i in keep]  # noqa: E731
    return PairSet(pairs.name, pick(pairs.clean), pick(pairs.corrupted), pick(pairs.clean_answer),
                   pick(pairs.corrupted_answer), pairs.description)


def run_study(model, pairs: PairSet, *, head_kind: str = "z", n_receivers: int = 3, batch_size: int = 512,
              progress: bool = True, require_solved: bool = True, log=print) -> PatchingStudy:
    """Every map of the study on `pairs` (see the module docstring); with `require_solved`, only on the pairs
    the model gets right (see `solved_pairs`)."""
    timings: dict[str, float] = {}
    if require_solved:
        pairs = solved_pairs(model, pairs, log)
    correct, wrong = answer_ids(model, pairs.clean_answer), answer_ids(model, pairs.corrupted_answer)
    metric = logit_diff(correct, wrong, normalized=True)
    runs = PatchingRuns(model, pairs.clean, pairs.corrupted)
    common = dict(metric=metric, runs=runs, progress=progress)
    maps, attribution, agreement = {}, {}, {}
    sweeps = [("resid_pre", "layer_pos"), (head_kind, "head")]
    extra_sweeps = [(head_kind, "head_pos"), ("q", "head_pos"), ("k", "head_pos")]
    for direction in ("denoise", "noise"):
        # One attribution pass per direction estimates every grid (AtP* for queries and keys).
        approx = attribution_sweeps(model, None, sweeps=sweeps + extra_sweeps, direction=direction, metric=metric,
                                    runs=runs)
        for kind, by in sweeps:
            key = f"{kind}/{direction}"
            maps[key] = activation_patch(model, None, kind=kind, by=by, direction=direction, batch_size=batch_size,
                                         **common)
            attribution[key] = approx[(kind, by)]
            agreement[key] = compare(maps[key], attribution[key])
            timings[f"exact {key}"] = round(maps[key].seconds, 2)
            log(f"  {key:<20} exact {maps[key].seconds:6.1f} s ({maps[key].forwards} forwards), "
                f"attribution pearson {agreement[key]['pearson']:.3f}, top-10 {agreement[key]['top_k']:.1f}")
        timings[f"attribution, every grid, {direction}"] = round(approx[sweeps[0]].extra["shared_pass_s"], 2)
        for kind, by in extra_sweeps:
            attribution[f"{kind}_by_pos/{direction}"] = approx[(kind, by)]
    # Path patching: each head's direct effect, then into the inputs of the strongest late heads.
    paths = {"resid": path_patch(model, None, senders="each", receivers="resid", metric=metric, runs=runs,
                                 progress=progress)}
    from interp.patching import effects

    direct = effects(paths["resid"]).mean(0)  # [layer, head]
    order = direct.abs().flatten().argsort(descending=True).tolist()
    receivers = [divmod(i, direct.shape[1]) for i in order if divmod(i, direct.shape[1])[0] > 0][:n_receivers]
    paths["heads"] = path_patch(model, None, senders="each", receivers=receivers, receiver_inputs="qkv",
                                metric=metric, runs=runs, progress=progress)
    for key, res in paths.items():
        timings[f"path {key}"] = round(res.seconds, 2)
    first = maps["resid_pre/denoise"]  # baselines hold the raw metric; the maps are normalised
    return PatchingStudy(model.cfg.model_name, pairs, first.clean_metric, first.corrupted_metric, maps, attribution,
                         agreement, paths, [tuple(r) for r in receivers], timings)


def write_study(study: PatchingStudy, out: Path, title: str | None = None, intro: str = "") -> Path:
    out.mkdir(parents=True, exist_ok=True)
    run = {"model": study.model_name, "pairs": f"{study.pairs.name} ({len(study.pairs.clean)})"}
    page = Page(title or f"Patching study: {study.pairs.name} on {study.model_name}", run)
    if intro:
        page.text(intro)
    page.heading("The pairs")
    page.table([{"clean": c, "answer": a, "corrupted": k, "corrupted answer": b,
                 "clean logit diff": float(lc), "corrupted logit diff": float(lk)}
                for c, a, k, b, lc, lk in zip(study.pairs.clean, study.pairs.clean_answer, study.pairs.corrupted,
                                              study.pairs.corrupted_answer, study.clean_logit_diff,
                                              study.corrupted_logit_diff)][:30],
               caption="logit diff = logit(clean answer) - logit(corrupted answer)")
    page.text("Every map shows what the patch changes in the normalised logit difference (0 = the corrupted "
              "run, 1 = the clean run), averaged over pairs, so 0 (white) means the patch changed nothing. "
              "Denoising patches clean activations into the corrupted run and shows what it restores (patched "
              "- corrupted); noising patches corrupted activations into the clean run and shows what it breaks "
              "(clean - patched).")
    for kind in ("resid_pre", next(k.split("/")[0] for k in study.maps if not k.startswith("resid"))):
        page.heading(f"{kind}: exact patching, both directions")
        page.figures([study.maps[f"{kind}/denoise"].plot(), study.maps[f"{kind}/noise"].plot()])
    page.text(f"Noising and denoising differ: max |denoise - (1 - noise)| over resid_pre cells = "
              f"{study.noise_vs_denoise():.3f}.")
    page.heading("Attribution patching against exact patching")
    page.table([{"sweep": k, **{m: v for m, v in a.items() if m != "k"}} for k, a in study.agreement.items()],
               caption="Correlation over cells of the mean effect; topN: share of the exact N strongest cells "
                       "that attribution also ranks in its N strongest (top_k, N = k)")
    page.figures([study.attribution[k].plot() for k in study.attribution if "by_pos" not in k][:2],
                 caption="Attribution estimates of the first two maps above")
    page.figures([study.attribution[k].plot() for k in study.attribution if k.endswith("by_pos/denoise")],
                 caption="Attribution only: per-position heads (max over positions), queries and keys (AtP*)")
    page.heading("Path patching")
    page.text("Direct effect: each head's output (from the corrupted run) reaches the logits only through the "
              "residual stream, every other head frozen at its clean value; MLPs recompute.")
    page.figure(study.paths["resid"].plot())
    page.text(f"Into the heads with the strongest direct effect, {study.receivers} (their queries, keys and "
              "values): which earlier heads feed them.")
    page.figure(study.paths["heads"].plot())
    page.heading("Timings")
    page.table([{"step": k, "seconds": float(v)} for k, v in study.timings.items()])
    (out / "results.json").write_text(json.dumps(study.to_dict(), indent=1))
    return page.save(out / "index.html")
