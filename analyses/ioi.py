"""Indirect-object identification on SmolLM2: where the model finds the name it should say.

    python -m analyses.ioi [--model smollm2-135m] [--pairs 24] [--out reports/ioi]

"When Mary and John went to the store, John gave a drink to" -> " Mary" (Wang et al. 2022).
The corrupted prompt swaps the second mention of a name ("..., Mary gave a drink to"),
so its answer is " John": the same tokens, the same length, the opposite answer. The
metric is logit(clean answer) - logit(corrupted answer), normalised per pair.
"""

from __future__ import annotations

import sys

from analyses.patching_study import PairSet, PatchingStudy, run_study

TEMPLATES = [
    "When {A} and {B} went to the store, {S} gave a drink to",
    "When {A} and {B} went to the park, {S} gave a ball to",
    "After {A} and {B} went to the office, {S} gave a book to",
    "While {A} and {B} were at the school, {S} handed a pen to",
]
# Single-token names for SmolLM2's tokenizer (with the leading space); each pair also appears swapped.
NAME_PAIRS = [("Mary", "John"), ("Anna", "David"), ("Sarah", "Michael")]


def ioi_pairs(n: int | None = None) -> PairSet:
    """Templated IOI pairs: every template x name pair, in both name orders (24 by default)."""
    clean, corrupted, answer, other = [], [], [], []
    for a, b in NAME_PAIRS:
        for first, second in ((a, b), (b, a)):
            for t in TEMPLATES:
                clean.append(t.format(A=first, B=second, S=second))
                corrupted.append(t.format(A=first, B=second, S=first))
                answer.append(" " + first)
                other.append(" " + second)
    pairs = PairSet("indirect object", clean, corrupted, answer, other,
                    "the second mention of a name swapped, so the indirect object changes")
    return pairs.take(n)


def ioi_study(model, n_pairs: int | None = None, progress: bool = True, log=print) -> PatchingStudy:
    return run_study(model, ioi_pairs(n_pairs), progress=progress, log=log)


INTRO = ("Indirect-object identification (Wang et al. 2022): in 'When Mary and John went to the store, John gave "
         "a drink to', the model should say ' Mary'. The corrupted prompt repeats the other name, so the answer flips.")


def main(argv=None) -> int:
    """`python -m analyses.ioi` is `interp ioi`."""
    from analyses.cli import main as cli_main

    return cli_main(["ioi", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())
