"""The `interp` command.

    interp tour      the main job: run the tour on the bundled models, write reports/tour/
    interp models    list the registered models and where each loads from
    interp heads     head census: every head scored by every detector, with attention views
    interp patch     activation / attribution patching of your own prompt pairs
    interp ioi       activation, path and attribution patching on indirect-object pairs
    interp factual   the same on landmark -> city recall, plus a Gaussian-noise causal trace
    interp shift     contextual-embedding shift: the built-in "mole" and "tower" studies, or your word
    interp circuits  circuits from the weights: the framework study, or any model's heads
    interp cache     run prompts and save the activations whose hook names match
    interp collect   activations over a corpus (default: Wikipedia summaries) to sharded safetensors

Every analysis takes --model, --out, --device and --dtype; prompts come from flags or a
file (--prompts-file, one per line). Errors print one line and exit non-zero
(INTERP_DEBUG=1 shows the traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# The toolkit never reaches a model hub on its own.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _tour(args) -> int:
    from analyses.tour import DEFAULT_PROMPT, run_tour

    run_tour(args.model, args.prompt or DEFAULT_PROMPT, args.out, top_k=args.top_k, device=args.device,
             dtype=args.dtype, quick=args.quick, only=args.only)
    return 0


def _models(args) -> int:
    from models.convert import support_table
    from models.registry import REGISTRY

    if args.families:
        print(support_table())
        return 0
    for entry in REGISTRY.values():
        print(f"{entry.name:<16} {entry.description}\n{'':<16} from {entry.source}")
    print("Also: any local Hugging Face directory (or hub name, when a hub is reachable) of a supported family "
          "(interp models --families), a nanoGPT ckpt.pt, and (interp.attach) any torch module.")
    return 0


def _ioi(args) -> int:
    from analyses.ioi import INTRO, ioi_study
    from analyses.patching_study import write_study

    study = ioi_study(_load(args)(args.model), args.pairs)
    print("wrote", write_study(study, Path(args.out), f"Indirect-object identification on {args.model}", INTRO))
    return 0


def _factual(args) -> int:
    from analyses.factual import factual_study

    print("wrote", factual_study(_load(args)(args.model)).save(args.out))
    return 0


def _shift(args) -> int:
    from analyses.embedding_shift import run_args

    run_args(args, load=_load(args))
    return 0


def _load(args):
    from analyses.commands import loader

    return loader(args)


def _command(name):
    def run(args) -> int:
        from analyses import commands

        getattr(commands, name)(args)
        return 0

    return run


def _common(p: argparse.ArgumentParser, out: str, model: str | None = "smollm2-135m") -> None:
    if model is not None:
        p.add_argument("--model", default=model, help=f"a registered name (interp models) or a directory (default "
                                                      f"{model})")
    p.add_argument("--out", default=out, help=f"where to write (default {out})")
    _device_dtype(p)


def _device_dtype(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])


def _prompts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", action="append", default=None, help="a prompt (repeat for several)")
    p.add_argument("--prompts-file", default=None, help="a text file, one prompt per line ('-': standard input)")


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line too (subcommand parsers are made of the same class)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="interp", description="Mechanistic-interpretability toolkit.")
    sub = parser.add_subparsers(dest="command", required=True)
    tour = sub.add_parser("tour", help="run the tour of the toolkit and write an offline HTML report")
    _common(tour, "reports/tour")
    tour.add_argument("--prompt", default=None, help="the prompt of the first stop (next-token predictions)")
    tour.add_argument("--top-k", type=int, default=None)
    tour.add_argument("--quick", action="store_true", help="smaller studies (fewer pairs and models, no tuned lens)")
    tour.add_argument("--only", nargs="+", default=None, help="run only these stops: next_token framework heads ioi "
                                                              "factual shift seq2seq")
    tour.set_defaults(func=_tour)

    listing = sub.add_parser("models", help="list the models that load without a hub")
    listing.add_argument("--families", action="store_true",
                         help="the architectures that convert, as a markdown table (the README's support table)")
    listing.set_defaults(func=_models)

    heads = sub.add_parser("heads", help="head census: every head scored by every detector (reports/heads)")
    _common(heads, "reports/heads", model=None)
    heads.add_argument("--models", "--model", nargs="+", default=["smollm2-135m"], dest="models",
                       help="one or more models (default smollm2-135m)")
    _prompts(heads)
    heads.add_argument("--seed", type=int, default=0)
    heads.set_defaults(func=_command("heads"))

    patch = sub.add_parser("patch", help="activation / attribution patching of your prompt pairs (reports/patch)")
    _common(patch, "reports/patch")
    patch.add_argument("--clean", default=None, help="the clean prompt")
    patch.add_argument("--corrupted", default=None, help="the corrupted prompt (same token length)")
    patch.add_argument("--answer", default=None, help="the clean answer, e.g. ' Mary' (one token)")
    patch.add_argument("--wrong", default=None, help="the corrupted answer, e.g. ' John'")
    patch.add_argument("--pairs-file", default=None, help="tab-separated lines: clean, corrupted, answer, wrong")
    patch.add_argument("--kind", default="resid_pre", help="site kind: resid_pre, attn_out, mlp_out, z, q, k, v, "
                                                           "pattern, ... (default resid_pre)")
    patch.add_argument("--by", default="layer_pos", help="layer_pos, layer, head, head_pos (default layer_pos)")
    patch.add_argument("--direction", default="denoise", choices=["denoise", "noise"])
    patch.add_argument("--method", default="both", choices=["exact", "attribution", "both"])
    patch.add_argument("--normalized", action="store_true", help="0 = corrupted, 1 = clean")
    patch.set_defaults(func=_command("patch"))

    ioi = sub.add_parser("ioi", help="patching study: indirect-object identification (reports/ioi)")
    _common(ioi, "reports/ioi")
    ioi.add_argument("--pairs", type=int, default=None, help="the first N of the 24 pairs")
    ioi.set_defaults(func=_ioi)
    factual = sub.add_parser("factual", help="patching study: landmark -> city recall (reports/factual)")
    _common(factual, "reports/factual")
    factual.set_defaults(func=_factual)

    shift = sub.add_parser("shift", help="contextual-embedding shift: mole/tower, or --word with --context (reports/shift)")
    from analyses.embedding_shift import add_arguments

    add_arguments(shift)  # its own --models/--model and --out, shared with python -m analyses.embedding_shift
    _device_dtype(shift)
    shift.set_defaults(func=_shift)

    circ = sub.add_parser("circuits", help="circuits from the weights (reports/circuits)")
    _common(circ, "reports/circuits", model=None)
    circ.add_argument("--model", default=None, help="any model: OV/QK positivity and composition of every head "
                                                    "(default: the framework study on the attention-only models)")
    circ.add_argument("--one-layer", default="attn-only-1l")
    circ.add_argument("--two-layer", default="attn-only-2l")
    circ.set_defaults(func=_command("circuits"))

    cache = sub.add_parser("cache", help="run prompts and save the activations whose hook names match (a .pt file)")
    _common(cache, "reports/cache/activations.pt")
    _prompts(cache)
    cache.add_argument("--names", nargs="+", default=None,
                       help="hook-name globs, e.g. 'blocks.*.hook_resid_post' 'blocks.3.attn.hook_pattern' (default all)")
    cache.set_defaults(func=_command("cache"))

    collect = sub.add_parser("collect", help="activations over a corpus to sharded safetensors + manifest.json "
                                             "(reports/activations); a killed run resumes")
    _common(collect, "reports/activations")
    collect.add_argument("--corpus", default="wiki", help="'wiki' (the bundled English Wikipedia summaries), a .txt/"
                                                         ".jsonl/.json file, a folder of them, or token ids (.npy, "
                                                         ".safetensors)")
    collect.add_argument("--hooks", nargs="+", required=True,
                         help="hook names or globs, e.g. 'blocks.5.hook_resid_post' 'blocks.*.hook_mlp_out'")
    collect.add_argument("--seq-len", type=int, default=128, help="tokens per packed sequence (default 128)")
    collect.add_argument("--batch-size", type=int, default=8, help="sequences per forward (default 8)")
    collect.add_argument("--max-sequences", type=int, default=None)
    collect.add_argument("--max-tokens", type=int, default=None)
    collect.add_argument("--positions", nargs="+", type=int, default=None,
                         help="keep only these positions (negative from the end), e.g. --positions -1")
    collect.add_argument("--store-dtype", default=None, choices=["float32", "float16", "bfloat16"],
                         help="what activations are stored as (default: the model's dtype)")
    collect.add_argument("--shard-mb", type=float, default=256, help="about how big each shard is (default 256)")
    collect.add_argument("--no-bos", action="store_true", help="pack without BOS (token corpora with separators)")
    collect.set_defaults(func=_command("collect"))
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
