"""Contextual-embedding shift studies: how "mole" and "tower" move with their context.

    python -m analyses.embedding_shift [--models smollm2-135m minilm-l6] [--studies mole tower] [--out reports/shift]
    interp shift --word bank --context "She sat on the river bank." --context "He robbed the bank." ...

Each built-in study has 9 natural contexts per sense (`analyses/shift_data.py`), with the
cue before the word so a decoder can use it at the word. Every (model, study) gets the
per-layer curves, similarity heatmaps, trajectories, the logit lens (decoders) or nearest
embeddings (encoders), and the components that carry one sense contrast, with their
attention from the word; the summary table leads the report.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from typing import TYPE_CHECKING

from analyses.shift_data import STUDIES, flatten

if TYPE_CHECKING:
    from interp.shift.study import ShiftResult

# torch, the models and the studies are imported where used: `interp --help` stays instant.

DEFAULT_MODELS = ("smollm2-135m", "minilm-l6")
CORPUS = Path(__file__).parent / "data" / "smollm2_lens_corpus.json"
HELD_OUT_TOKENS = 400


def train_lens(model, log=print):
    """A tuned lens for a decoder, trained on the shipped corpus (SmolLM2's own samples), and the
    held-out KL to the final distribution per layer, {"logit": [L + 1], "tuned": [L + 1]}."""
    import time as _time

    from interp.shift.tuned_lens import lens_kl, residual_streams, train_tuned_lens

    data = json.loads(CORPUS.read_text(encoding="utf-8"))
    start = _time.perf_counter()
    lens = train_tuned_lens(model, data["train"])
    held = residual_streams(model, data["held_out"])[:HELD_OUT_TOKENS]
    kl = {"logit": lens_kl(model, held), "tuned": lens_kl(model, held, lens)}
    log(f"  tuned lens trained in {_time.perf_counter() - start:.1f} s; held-out KL to the output, mean over layers: "
        f"logit lens {kl['logit'][:-1].mean():.2f} nats, tuned lens {kl['tuned'][:-1].mean():.2f}")
    return lens, kl


def run_builtin(model, study: str, **options) -> "ShiftResult":
    """One built-in study ("mole" or "tower") on a loaded model."""
    from interp.shift.study import shift_study

    if study not in STUDIES:
        raise ValueError(f"unknown study {study!r}; built in: {sorted(STUDIES)} (or give your own word and contexts)")
    spec = STUDIES[study]
    contexts, labels = flatten(spec["senses"])
    decoder = getattr(model.cfg, "causal", True) and getattr(model, "unembed", None) is not None
    track = spec["track"] if decoder else None
    return shift_study(model, spec["word"], contexts, labels, contrast=spec["contrast"], track=track, **options)


def summary_row(model_name: str, study: str, r: "ShiftResult") -> dict:
    row = {"model": model_name, "study": study, "contexts": len(r.trace.contexts)}
    acc = r.centroid_accuracy
    if acc is not None:  # sense labels were given
        row.update({"centroid acc, layer 0": float(acc[0]), "best layer": r.layer_labels[r.best_layer()],
                    "centroid acc, best": float(acc.max()), "centroid acc, last": float(acc[-1])})
    if r.probe is not None:
        row["probe, best"] = float(r.probe.accuracy.max())
        row["shuffled, best"] = float(r.probe.control.max())
    row["self-sim adj, last"] = float(r.geometry.adjusted_self_similarity[-1])
    row["s"] = round(r.seconds, 1)
    return row


def write_report(results: dict, out: Path, title: str = "Contextual-embedding shift",
                 lens_kl: dict | None = None) -> Path:
    """One offline page for {(model, study): ShiftResult}, plus each result's JSON and page under results/."""
    from interp.report import Page
    from interp.shift.figures import write_sections

    out.mkdir(parents=True, exist_ok=True)
    page = Page(title, {"models": sorted({m for m, _ in results}), "studies": sorted({s for _, s in results})})
    page.text("How a word's residual-stream vector moves with its context, layer by layer. Layer 'embed' is the "
              "static vector the first block reads: identical across contexts in a model with rotary positions "
              "(SmolLM2), different in one with absolute positions (MiniLM).")
    page.table([summary_row(m, s, r) for (m, s), r in results.items()], caption="Summary")
    for model_name, kl in (lens_kl or {}).items():
        from interp.plots import line_chart

        page.heading(f"Logit lens and tuned lens on {model_name}", 2)
        page.figure(line_chart({name: v.tolist() for name, v in kl.items()}, x_label="layer", y_label="KL (nats)",
                               title=f"{model_name}: each lens against the model's output"),
                    f"Mean KL from the model's output distribution to each lens's, per layer, on "
                    f"{HELD_OUT_TOKENS} held-out tokens of the shipped corpus (text SmolLM2 sampled itself). The "
                    "tuned lens has one affine translator per layer (Belrose et al. 2023), trained on the rest.")
    for (model_name, study), r in results.items():
        page.heading(f"{study!r} on {model_name}", 2)
        write_sections(page, r, level=3)
        r.save(out / "results", name=f"{study}_{model_name}")
    (out / "summary.json").write_text(json.dumps([summary_row(m, s, r) for (m, s), r in results.items()], indent=1))
    return page.save(out / "index.html")


def run(model_names=DEFAULT_MODELS, studies=("mole", "tower"), out="reports/shift", tuned_lens: bool = True,
        log=print, load=None) -> dict:
    """The built-in studies on each model; decoders also get a tuned lens (~45 s on SmolLM2) unless
    `tuned_lens=False`. `load(name)` loads a model (default `models.load`)."""
    import models

    load = load or models.load
    results, kls = {}, {}
    for name in model_names:
        start = time.perf_counter()
        model = load(name)
        log(f"loaded {name} in {time.perf_counter() - start:.1f} s")
        lens = None
        if tuned_lens and getattr(model.cfg, "causal", True) and getattr(model, "unembed", None) is not None:
            lens, kls[name] = train_lens(model, log)
        for study in studies:
            r = run_builtin(model, study, tuned_lens=lens)
            results[(name, study)] = r
            acc = r.centroid_accuracy
            log(f"  {study}: nearest-centroid accuracy {acc[0]:.2f} at layer 0, {acc.max():.2f} at "
                f"{r.layer_labels[r.best_layer()]}, {acc[-1]:.2f} at the last layer ({r.seconds:.1f} s)")
    index = write_report(results, Path(out), lens_kl=kls)
    log(f"wrote {index}")
    return results


def read_contexts(path: str) -> tuple[list[str], list[str] | None]:
    """A file of contexts, one per line; "label<TAB>context" lines give sense labels (all lines or none)."""
    lines = [line.rstrip("\n") for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    tabbed = ["\t" in line for line in lines]
    if any(tabbed) and not all(tabbed):
        raise ValueError(f"{path}: either every line is 'label<TAB>context' or none is")
    if all(tabbed) and lines:
        pairs = [line.split("\t", 1) for line in lines]
        return [c for _, c in pairs], [lab for lab, _ in pairs]
    return lines, None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `python -m analyses.embedding_shift` and `interp shift`."""
    parser.add_argument("--models", "--model", nargs="+", default=list(DEFAULT_MODELS), dest="models")
    parser.add_argument("--studies", nargs="+", default=["mole", "tower"], help="built-in studies (without --word)")
    parser.add_argument("--word", default=None, help="your own word (with --context or --contexts-file)")
    parser.add_argument("--context", action="append", default=[], help="a context containing the word (repeat)")
    parser.add_argument("--label", action="append", default=None, help="the sense of each --context, in order")
    parser.add_argument("--contexts-file", default=None, help="one context per line, or 'label<TAB>context'")
    parser.add_argument("--contrast", nargs=2, default=None, help="two senses to attribute the difference of")
    parser.add_argument("--read", choices=["word", "end"], default="word",
                        help="'end': read each context's last token (a cue after the word, in a decoder)")
    parser.add_argument("--pool", choices=["last", "mean", "first"], default="last",
                        help="which sub-token(s) of a multi-token word")
    parser.add_argument("--no-tuned-lens", action="store_true", help="skip training a tuned lens for decoders")
    parser.add_argument("--out", default="reports/shift")


def run_args(args, load=None) -> Path:
    import models

    load = load or models.load
    if args.word is None:
        run(args.models, args.studies, args.out, tuned_lens=not args.no_tuned_lens, load=load)
        return Path(args.out) / "index.html"
    contexts, labels = list(args.context), args.label
    if args.contexts_file:
        more, more_labels = read_contexts(args.contexts_file)
        if (labels is None) != (more_labels is None) and contexts:
            raise ValueError("label every context or none: --label for each --context, and 'label<TAB>context' lines")
        contexts += more
        labels = (labels or []) + more_labels if more_labels is not None else labels
    if len(contexts) < 2:
        raise ValueError("give at least 2 contexts (--context ... --context ..., or --contexts-file)")
    from interp.shift.study import shift_study

    results = {}
    for name in args.models:
        model = load(name)
        results[(name, args.word)] = shift_study(model, args.word, contexts, labels, pool=args.pool, read=args.read,
                                                 contrast=tuple(args.contrast) if args.contrast else None)
    index = write_report(results, Path(args.out), title=f"How {args.word!r} moves with its context")
    print(f"wrote {index}")
    return index


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    run_args(parser.parse_args(argv))


if __name__ == "__main__":
    main()
