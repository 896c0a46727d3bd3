"""The tour: one command that shows a newcomer everything the toolkit does, as an offline report.

    interp tour [--model smollm2-135m] [--out reports/tour] [--quick] [--only ioi shift ...]

On the bundled models it runs, in order: next-token predictions and every head's
attention on a prompt; the transformer-circuits framework on the attention-only models;
the head census of every bundled model; the IOI and factual-recall patching studies
(exact, path and attribution patching); the "mole" and "tower" contextual-embedding
shift studies; the encoder-decoder trained here on a toy translation task (alignment,
positions, patching across the two stacks); the dictionary features (an SAE and a transcoder trained here);
the textbook claims measured (gradient flow against RNNs, attention cost, positional encodings, encoder
against decoder). It writes `index.html` linking every study's page and `results.json`
with all their numbers. `--quick` runs smaller versions (fewer pairs, fewer models, no
tuned lens): the same pages, for tests and a first look.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from tqdm.auto import tqdm

DEFAULT_PROMPT = "The Eiffel Tower is located in the city of"
STUDIES = ("next_token", "framework", "heads", "ioi", "factual", "shift", "seq2seq", "dictionary", "textbook")
BUNDLED = ("smollm2-135m", "minilm-l6", "attn-only-2l", "attn-only-1l")
SEQ2SEQ_MODEL = "translation-2l"


@dataclass
class TourSettings:
    """What each study runs on; `quick()` is the small version."""

    ioi_pairs: int = 8
    factual_landmarks: int | None = None  # all 4: 8 pairs
    heads_models: tuple = BUNDLED
    shift_models: tuple = ("smollm2-135m", "minilm-l6")
    tuned_lens: bool = True
    top_k: int = 10
    seq2seq_sentences: int = 200
    dictionary_tokens: int = 20_000  # corpus tokens the dictionary study's feature dashboards read
    textbook_quick: bool = False  # the textbook studies' small versions

    @classmethod
    def quick(cls) -> "TourSettings":
        return cls(ioi_pairs=3, factual_landmarks=1, heads_models=("attn-only-2l", "attn-only-1l"),
                   shift_models=("minilm-l6",), tuned_lens=False, top_k=5, seq2seq_sentences=50,
                   dictionary_tokens=2_000, textbook_quick=True)


@dataclass
class Stop:
    """One study of the tour: its page, its numbers and the line the index shows."""

    name: str
    title: str
    page: Path
    numbers: dict
    headline: str
    seconds: float = 0.0


def run_tour(model_name: str = "smollm2-135m", prompt: str = DEFAULT_PROMPT, out: str | Path = "reports/tour",
             top_k: int | None = None, device: str = "cpu", dtype: str = "float32", quick: bool = False,
             only=None, log=print, progress: bool = True) -> Path:
    """Run the tour and write `out/index.html` and `out/results.json`; returns the index path."""
    import models

    settings = TourSettings.quick() if quick else TourSettings()
    if top_k is not None:
        settings.top_k = top_k
    chosen = list(STUDIES) if not only else list(only)
    unknown = [s for s in chosen if s not in STUDIES]
    if unknown:
        raise ValueError(f"unknown tour stop(s) {unknown}; choose from {', '.join(STUDIES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    loaded: dict = {}

    def load(name):
        if name not in loaded:
            start = time.perf_counter()
            loaded[name] = models.load(name, device=device, dtype=dtype)
            log(f"loaded {name} in {time.perf_counter() - start:.1f} s from {loaded[name].source}")
        return loaded[name]

    stops = []
    total = time.perf_counter()
    if {"next_token", "ioi", "factual"} & set(chosen):
        load(model_name)  # a bad --model fails here, in one line, before any progress bar
    bar = tqdm(chosen, desc="tour", unit="study", disable=not progress)
    for name in bar:
        bar.set_postfix_str(name)
        log(f"== {name}")
        start = time.perf_counter()
        stop = _STOPS[name](load=load, model_name=model_name, prompt=prompt, out=out, settings=settings, log=log,
                            progress=progress)
        stop.seconds = round(time.perf_counter() - start, 1)
        log(f"   {stop.headline} ({stop.seconds} s)")
        stops.append(stop)
    seconds = round(time.perf_counter() - total, 1)
    run = {"command": _command(model_name, prompt, quick, only), "model": model_name, "device": device,
           "dtype": dtype, "mode": "quick" if quick else "full", "settings": _settings_dict(settings)}
    index = _write_index(out, stops, run, seconds)
    numbers = {"run": run, "seconds": seconds, "studies": {s.name: {"page": str(s.page.relative_to(out)),
                                                                    "seconds": s.seconds, "headline": s.headline,
                                                                    "numbers": s.numbers} for s in stops}}
    (out / "results.json").write_text(json.dumps(numbers, indent=1, default=_jsonable))
    log(f"wrote {index} ({seconds} s)")
    return index


def _command(model_name, prompt, quick, only) -> str:
    parts = ["interp tour", f"--model {model_name}", f"--prompt {json.dumps(prompt)}"]
    if quick:
        parts.append("--quick")
    if only:
        parts.append("--only " + " ".join(only))
    return " ".join(parts)


def _settings_dict(settings: TourSettings) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in settings.__dict__.items()}


def _jsonable(x):
    import torch

    if isinstance(x, torch.Tensor):
        return x.tolist()
    return str(x)


# ---------------------------------------------------------------------------- the stops
def _next_token(*, load, model_name, prompt, out, settings, log, progress) -> Stop:
    from analyses.next_token import next_token_predictions
    from interp.report import Page

    model = load(model_name)
    result = next_token_predictions(model, prompt, top_k=settings.top_k)
    for row in result.to_frame().itertuples():
        log(f"  {row.rank:2d}. {row.token!r:<16} p={row.prob:.3f}  logit={row.logit:.2f}")
    page = Page(f"Next-token predictions and attention on {model_name}",
                {"command": f"interp tour --only next_token --model {model_name}", "model": model_name,
                 "model source": model.source, "prompt": prompt})
    page.text(f"Model: {model.extra_repr()}.")
    result.add_to_page(page)
    path = page.save(out / "next_token" / "index.html")
    top = result.top_tokens[0]
    return Stop("next_token", "Next-token predictions and attention", path, result.to_dict(),
                f"{model_name} predicts {top!r} (p={float(result.top_probs[0]):.2f}) after {prompt!r}")


def _framework(*, load, model_name, prompt, out, settings, log, progress) -> Stop:
    from analyses.framework import framework_study

    result = framework_study(load("attn-only-1l"), load("attn-only-2l"))
    path = result.save(out / "framework")
    numbers = result.to_dict()
    heads = ", ".join(f"L{l}H{h}" for l, h in result.induction_heads)
    return Stop("framework", "The transformer-circuits framework (attention-only models)", path, numbers,
                f"{numbers['planted_rules_found']}/{numbers['planted_rules']} planted skip-trigrams read off the 1-layer "
                f"weights; previous-token head L{result.previous_token_head[0]}H{result.previous_token_head[1]} and "
                f"induction head(s) {heads} in the 2-layer model; path expansion exact to {result.path_error:.1e}")


def _heads(*, load, model_name, prompt, out, settings, log, progress) -> Stop:
    from analyses.heads import census_reports
    from analyses.heads_report import census_dict

    names = list(dict.fromkeys(([model_name] if model_name in BUNDLED else []) + list(settings.heads_models)))
    censuses, path = census_reports(names, out / "heads", load, log=log, progress=progress)
    best = [f"{c.model_name} L{l}H{h} {score:.2f}" for c in censuses for l, h, score, _ in c.top("induction", 1)]
    return Stop("heads", "Head census of the bundled models", path, {c.model_name: census_dict(c) for c in censuses},
                "strongest induction head: " + "; ".join(best))


def _patching(study_name, *, load, model_name, prompt, out, settings, log, progress) -> Stop:
    from analyses import factual, ioi
    from analyses.patching_study import write_study

    model = load(model_name)
    if study_name == "ioi":
        study = ioi.ioi_study(model, settings.ioi_pairs, progress=progress, log=log)
        path = write_study(study, out / "ioi", f"Indirect-object identification on {model_name}", ioi.INTRO)
        title = "Indirect-object identification: activation, path and attribution patching"
    else:
        result = factual.factual_study(model, progress=progress, log=log, n_landmarks=settings.factual_landmarks)
        study = result.study
        path = result.save(out / "factual")
        title = "Factual recall: patching and a Gaussian-noise causal trace"
    numbers = study.to_dict()
    (layer_head, effect), = study.top_heads("z/noise", 1)
    agree = study.agreement["z/noise"]
    return Stop(study_name, title, path, numbers,
                f"{len(study.pairs.clean)} pairs; top head when noised L{layer_head['layer']}H{layer_head['head']} "
                f"(effect {effect:+.2f}); attribution vs exact over heads: pearson {agree['pearson']:.2f}")


def _shift(*, load, model_name, prompt, out, settings, log, progress) -> Stop:
    from analyses.embedding_shift import run, summary_row

    results = run(settings.shift_models, out=out / "shift", tuned_lens=settings.tuned_lens, log=log, load=load)
    rows = [summary_row(m, s, r) for (m, s), r in results.items()]
    headline = "; ".join(f"{r['study']} on {r['model']}: centroid accuracy {r['centroid acc, layer 0']:.2f} -> "
                         f"{r['centroid acc, best']:.2f}" for r in rows if "centroid acc, best" in r)
    return Stop("shift", "Contextual-embedding shift: 'mole' and 'tower'", out / "shift" / "index.html",
                {"summary": rows}, headline)


def _seq2seq(*, load, model_name, prompt, out, settings, log, progress) -> Stop:
    from analyses.seq2seq import seq2seq_study

    result = seq2seq_study(load(SEQ2SEQ_MODEL), n_sentences=settings.seq2seq_sentences, progress=progress)
    path = result.save(out / "seq2seq")
    return Stop("seq2seq", "The original transformer, trained here: cross-attention alignment, positions, patching",
                path, result.to_dict(), result.headline())


def _dictionary(*, load, model_name, prompt, out, settings, log, progress) -> Stop:
    from analyses.dictionary import dictionary_study, load_study_dictionaries

    sae, transcoder = load_study_dictionaries()
    result = dictionary_study(load("smollm2-135m"), sae, transcoder, dashboard_tokens=settings.dictionary_tokens,
                              eval_sequences=4 if settings.dictionary_tokens < 10_000 else 16,
                              readout_contexts=2 if settings.dictionary_tokens < 10_000 else 8, progress=progress)
    path = result.save(out / "dictionary")
    return Stop("dictionary", "Dictionary features: an SAE and a transcoder trained here on Wikipedia", path,
                result.to_dict(), result.headline())


def _textbook(*, load, model_name, prompt, out, settings, log, progress) -> Stop:
    from analyses.textbook import textbook_study

    result = textbook_study(load, quick=settings.textbook_quick, log=log, progress=progress)
    path = result.save(out / "textbook")
    first = next(iter(result.results.values()))  # the full headline of all four is too long for the index
    return Stop("textbook", "The textbook claims measured: gradient flow, attention cost, positions, encoder vs "
                "decoder", path, result.to_dict(), first.headline())


_STOPS = {"next_token": _next_token, "framework": _framework, "heads": _heads, "ioi": partial(_patching, "ioi"),
          "factual": partial(_patching, "factual"), "shift": _shift, "seq2seq": _seq2seq,
          "dictionary": _dictionary, "textbook": _textbook}


def _write_index(out: Path, stops: list[Stop], run: dict, seconds: float) -> Path:
    import html

    from interp.report import Page

    page = Page("A tour of the interp toolkit", run)
    page.text("Each study below ran on the bundled models, offline, and wrote its own page; every number on those "
              "pages is also in results.json next to this file.")
    items = []
    for s in stops:
        href = s.page.relative_to(out).as_posix()
        items.append(f'<li><a href="{html.escape(href)}">{html.escape(s.title)}</a> '
                     f'<span class="secs">({s.seconds} s)</span><br>{html.escape(s.headline)}</li>')
    page.raw(f'<ol class="stops">{"".join(items)}</ol>')
    page.text(f"Total: {seconds} s. Numbers: results.json.")
    return page.save(out / "index.html")
