"""The textbook claims about transformers, measured: one stop of the tour, four studies, a page each.

    python -m analyses.textbook [--out reports/textbook] [--quick] [--only gradient_flow positional ...]

- gradient_flow (analyses.gradient_flow): "transformers do not suffer vanishing gradients the way RNNs do": a
  transformer, an LSTM and a GRU trained here on one recall-after-a-gap task, the gradient reaching the key
  by distance and the accuracy by gap, at initialisation and trained; SmolLM2's and MiniLM's residual-stream
  gradients by layer and distance on Wikipedia text.
- attention_cost (analyses.attention_cost): "attention costs O(n^2)": forward time and peak memory against
  sequence length for the fused and explicit attention paths and with patterns cached, fitted exponents and
  the length where the quadratic term takes over on this machine.
- positional (analyses.positional): learned, sinusoidal and rotary positions side by side, and how much of
  every head's pattern relative position alone explains.
- directionality (analyses.directionality): "encoders see both directions, decoders only the past": where
  MiniLM's and SmolLM2's attention goes (past / self / future / special tokens) and how contextual their word
  vectors become.

Each claim is stated on its page only as far as the numbers bear it out.
"""

from __future__ import annotations

import html
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

STUDIES = ("gradient_flow", "attention_cost", "positional", "directionality")
TITLES = {"gradient_flow": "Gradient flow: transformer against LSTM and GRU, and real models",
          "attention_cost": "Attention cost against sequence length",
          "positional": "Positional encodings side by side",
          "directionality": "Encoder against decoder: where attention goes, how contextual words become"}
# The tour's full run measures attention cost up to 2,048 tokens (the benchmark goes to 16,384).
TOUR_LENGTHS = (64, 128, 256, 512, 1024, 2048)


@dataclass
class TextbookResult:
    """The four studies' results (name -> Result) and the seconds each took."""

    results: dict
    seconds: dict = field(default_factory=dict)
    quick: bool = False

    def headline(self) -> str:
        return " | ".join(f"{name}: {r.headline()}" for name, r in self.results.items())

    def to_dict(self) -> dict:
        return {name: {"headline": r.headline(), "seconds": round(self.seconds.get(name, 0.0), 1),
                       "numbers": r.to_dict()} for name, r in self.results.items()}

    def save(self, directory) -> Path:
        """Each study's page in `directory/<study>/`, and `directory/index.html` linking them."""
        from interp.report import Page

        directory = Path(directory)
        items = []
        for name, result in self.results.items():
            page = result.save(directory / name)
            href = page.relative_to(directory).as_posix()
            items.append(f'<li><a href="{html.escape(href)}">{html.escape(TITLES[name])}</a> '
                         f'({self.seconds.get(name, 0.0):.1f} s)<br>{html.escape(result.headline())}</li>')
        page = Page("The textbook claims about transformers, measured",
                    {"command": "python -m analyses.textbook" + (" --quick" if self.quick else ""),
                     "mode": "quick" if self.quick else "full"})
        page.text("Four claims every course repeats, each measured on the bundled models and on models trained "
                  "here; each page states a claim only as far as its numbers bear it out.")
        page.raw(f'<ol class="stops">{"".join(items)}</ol>')
        return page.save(directory / "index.html")


def textbook_study(load=None, *, quick: bool = False, only=None, log=print, progress: bool = False) -> TextbookResult:
    """Run the studies (`only`: a subset of STUDIES). `load(name)` gives a loaded model (the tour's cache;
    default models.load)."""
    if load is None:
        import models

        load = models.load
    chosen = list(only or STUDIES)
    unknown = [s for s in chosen if s not in STUDIES]
    if unknown:
        raise ValueError(f"unknown textbook study {unknown}; choose from {', '.join(STUDIES)}")
    results, seconds = {}, {}
    for name in chosen:
        start = time.perf_counter()
        results[name] = _RUNS[name](load, quick, progress)
        seconds[name] = time.perf_counter() - start
        log(f"  {name} ({seconds[name]:.0f} s): {results[name].headline()}")
    return TextbookResult(results, seconds, quick)


def _gradient_flow(load, quick, progress):
    from analyses.gradient_flow import gradient_flow_study

    return gradient_flow_study(quick=quick, real_models=(load("smollm2-135m"), load("minilm-l6")),
                               progress=progress)


def _attention_cost(load, quick, progress):
    from analyses.attention_cost import attention_cost

    # One thread: on a shared two-core machine two threads waiting on each other at every op distort the fit.
    return attention_cost(quick=True, threads=1) if quick else attention_cost(lengths=TOUR_LENGTHS, threads=1)


def _positional(load, quick, progress):
    from analyses.positional import MODELS, positional_study

    return positional_study(*(load(name) for name in MODELS), quick=quick)


def _directionality(load, quick, progress):
    from analyses.directionality import directionality_study

    return directionality_study(load("minilm-l6"), load("smollm2-135m"), quick=quick)


_RUNS = {"gradient_flow": _gradient_flow, "attention_cost": _attention_cost, "positional": _positional,
         "directionality": _directionality}


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="reports/textbook")
    parser.add_argument("--quick", action="store_true", help="small versions of every study (tens of seconds)")
    parser.add_argument("--only", nargs="+", choices=STUDIES, default=None)
    args = parser.parse_args(argv)
    result = textbook_study(quick=args.quick, only=args.only)
    print(f"wrote {result.save(args.out)}")


if __name__ == "__main__":
    main(sys.argv[1:])
