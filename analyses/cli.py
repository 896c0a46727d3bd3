"""The `interp` command.

    interp tour      the main job: run the tour on the bundled models, write reports/tour/
    interp models    list the registered models and where each loads from
    interp ioi       activation, path and attribution patching on indirect-object pairs
    interp factual   the same on landmark -> city recall, plus a Gaussian-noise causal trace
    interp shift     contextual-embedding shift: the built-in "mole" and "tower" studies, or your word
"""

from __future__ import annotations

import argparse
import os
import sys

# The toolkit never reaches a model hub on its own.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _tour(args) -> int:
    from analyses.tour import DEFAULT_PROMPT, run_tour

    run_tour(args.model, args.prompt or DEFAULT_PROMPT, args.out, top_k=args.top_k, device=args.device,
             dtype=args.dtype)
    return 0


def _models(args) -> int:
    from models.registry import REGISTRY

    for entry in REGISTRY.values():
        print(f"{entry.name:<16} {entry.description}\n{'':<16} from {entry.source}")
    print("Also: any local Hugging Face directory of a GPT-2, LLaMA/Mistral/Qwen2 or BERT checkpoint.")
    return 0


def _ioi(args) -> int:
    from analyses.ioi import main

    main(["--model", args.model, "--out", args.out] + (["--pairs", str(args.pairs)] if args.pairs else []))
    return 0


def _factual(args) -> int:
    from analyses.factual import main

    main(["--model", args.model, "--out", args.out])
    return 0


def _shift(args) -> int:
    from analyses.embedding_shift import run_args

    run_args(args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="interp", description="Mechanistic-interpretability toolkit.")
    sub = parser.add_subparsers(dest="command", required=True)
    tour = sub.add_parser("tour", help="run the tour of the toolkit and write an offline HTML report")
    tour.add_argument("--model", default="smollm2-135m")
    tour.add_argument("--prompt", default=None)
    tour.add_argument("--out", default="reports/tour")
    tour.add_argument("--top-k", type=int, default=10)
    tour.add_argument("--device", default="cpu")
    tour.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    tour.set_defaults(func=_tour)
    ioi = sub.add_parser("ioi", help="patching study: indirect-object identification (reports/ioi)")
    ioi.add_argument("--model", default="smollm2-135m")
    ioi.add_argument("--pairs", type=int, default=None, help="the first N of the 24 pairs")
    ioi.add_argument("--out", default="reports/ioi")
    ioi.set_defaults(func=_ioi)
    factual = sub.add_parser("factual", help="patching study: landmark -> city recall (reports/factual)")
    factual.add_argument("--model", default="smollm2-135m")
    factual.add_argument("--out", default="reports/factual")
    factual.set_defaults(func=_factual)
    shift = sub.add_parser("shift", help="contextual-embedding shift: mole/tower, or --word with --context (reports/shift)")
    from analyses.embedding_shift import add_arguments

    add_arguments(shift)
    shift.set_defaults(func=_shift)
    listing = sub.add_parser("models", help="list the models that load without a hub")
    listing.set_defaults(func=_models)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one clear line, not a traceback
        if os.environ.get("INTERP_DEBUG"):
            raise
        print(f"interp {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
